#include "gm_route.h"

#include <errno.h>
#include <stdlib.h>
#include <setjmp.h>
#include <string.h>

#include "gm_bounce.h"
#include "gm_bounce_internal.h"
#include "gm_fault.h"
#include "gm_insn.h"
#include "gm_kvm.h"
#include "gm_platform.h"
#include "gm_status.h"
#include "gm_thread.h"

/* How often MATCH_ALL re-reads a run's tag after the guest changed it
 * between LDG and the access, before it gives up with GM_ERR_RACE. */
#define GM_RACE_RETRIES 64

static inline size_t granule_end(const uint8_t *p)
{
    return GM_GRANULE - ((uintptr_t)p & (GM_GRANULE - 1));
}

static void move(int op, uint8_t *guest, uint8_t *buf, size_t n, int fill_byte)
{
    switch (op) {
    case GM_OP_READ:
        memcpy(buf, guest, n);
        break;
    case GM_OP_WRITE:
        memcpy(guest, buf, n);
        break;
    default:
        memset(guest, fill_byte, n);
        break;
    }
}

static void move_spans(const struct gm_access *a)
{
    uint8_t *buf = a->buf;
    for (size_t i = 0; i < a->nspans; i++) {
        move(a->op, a->spans[i].guest, buf, a->spans[i].len, a->fill_byte);
        if (buf)
            buf += a->spans[i].len;
    }
}

/* A move whose tag-check fault returns -1 (fault address in gm_fault_addr)
 * instead of killing the process. The handler runs with SA_NODEFER, so
 * sigsetjmp need not save the signal mask (a system call each time). */
static int armed_move(int op, uint8_t *guest, uint8_t *buf, size_t n, int fill_byte)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 0) != 0)
        return -1;
    gm_arm(&jb);
    move(op, guest, buf, n, fill_byte);
    gm_disarm();
    return 0;
}

static int armed_probe(const uint8_t *tagged, size_t n)
{
    sigjmp_buf jb;
    if (sigsetjmp(jb, 0) != 0)
        return -1;
    gm_arm(&jb);
    for (size_t off = 0; off < n; off += granule_end(tagged + off))
        (void)*(const volatile uint8_t *)(tagged + off);
    gm_disarm();
    return 0;
}

/* ---- where a checked access failed -------------------------------------- */

static int fault_in_hardware(const struct gm_access *a, size_t span, uintptr_t at)
{
    const struct gm_span *s = &a->spans[span];
    uintptr_t base = (uintptr_t)s->guest;
    uintptr_t addr = at & GM_ADDR_MASK;
    size_t from = (addr >= base && addr < base + s->len) ? (addr - base) & ~(size_t)(GM_GRANULE - 1) : 0;
    for (int pass = 0; pass < 2; pass++) {
        for (size_t off = from; off < s->len; off += granule_end(s->guest + off)) {
            unsigned tag = gm_ldg(s->guest + off);
            if (tag != (unsigned)a->logical_tag) {
                struct gm_access *w = (struct gm_access *)a;
                w->fault.span = span;
                w->fault.offset = off;
                w->fault.logical_tag = a->logical_tag;
                w->fault.allocation_tag = (int)tag;
                return GM_ERR_TAG_CHECK;
            }
        }
        from = 0;
    }
    /* The guest put the tag back before we looked: report what the CPU saw. */
    struct gm_access *w = (struct gm_access *)a;
    w->fault.span = span;
    w->fault.offset = (addr >= base && addr < base + s->len) ? addr - base : 0;
    w->fault.logical_tag = a->logical_tag;
    w->fault.allocation_tag = (int)gm_ldg(s->guest + w->fault.offset);
    return GM_ERR_TAG_CHECK;
}

/* The first granule of a span whose table entry is not `tag`, eight at a time. */
static size_t first_other_tag(const uint8_t *table, size_t granules, uint8_t tag)
{
    const uint64_t all = 0x0101010101010101ULL * tag;
    size_t g = 0;
    for (; g + 8 <= granules; g += 8) {
        uint64_t word;
        memcpy(&word, table + g, sizeof word);
        if (word != all)
            break;
    }
    for (; g < granules; g++)
        if (table[g] != tag)
            return g;
    return granules;
}

static int mismatch_in_table(struct gm_access *a)
{
    for (size_t i = 0; i < a->nspans; i++) {
        const struct gm_span *s = &a->spans[i];
        size_t lead = (uintptr_t)s->guest & (GM_GRANULE - 1);
        size_t granules = (lead + s->len + GM_GRANULE - 1) / GM_GRANULE;
        size_t g = first_other_tag(s->table, granules, (uint8_t)a->logical_tag);
        if (g < granules) {
            a->fault.span = i;
            a->fault.offset = g == 0 ? 0 : g * GM_GRANULE - lead;
            a->fault.logical_tag = a->logical_tag;
            a->fault.allocation_tag = s->table[g];
            return GM_ERR_TAG_CHECK;
        }
    }
    return GM_OK;
}

/* KVM: fetch each span's tags through the VM, then check them as a table. */
static int mismatch_in_kvm(struct gm_access *a)
{
    struct gm_span *shadow = calloc(a->nspans, sizeof *shadow);
    if (shadow == NULL)
        return GM_ERR_ERRNO;
    int status = GM_OK;
    for (size_t i = 0; i < a->nspans && status == GM_OK; i++) {
        const struct gm_span *s = &a->spans[i];
        uint64_t first = s->gpa & ~(uint64_t)(GM_GRANULE - 1);
        size_t granules = (size_t)((s->gpa + s->len + GM_GRANULE - 1 - first) / GM_GRANULE);
        shadow[i] = *s;
        shadow[i].table = malloc(granules ? granules : 1);
        if (shadow[i].table == NULL)
            status = GM_ERR_ERRNO;
        else
            status = gm_kvm_tags_get(a->vm_fd, first, granules, shadow[i].table);
    }
    if (status == GM_OK) {
        const struct gm_span *real = a->spans;
        a->spans = shadow;
        status = mismatch_in_table(a);
        a->spans = real;
    }
    for (size_t i = 0; i < a->nspans; i++)
        free(shadow[i].table);
    free(shadow);
    return status;
}

static int route_tco(struct gm_access *a)
{
    if (a->mode != GM_MODE_HARDWARE) {
        move_spans(a);
        return GM_OK;
    }
    int saved = gm_tco_get();
    gm_tco_set(1);
    move_spans(a);
    gm_tco_set(saved);
    return GM_OK;
}

static int route_unchecked_thread(struct gm_access *a)
{
    if (a->mode == GM_MODE_NONE || a->mode == GM_MODE_KVM) {
        move_spans(a);
        return GM_OK;
    }
    int status = gm_unchecked_thread_enter();
    if (status != GM_OK)
        return status;
    move_spans(a);
    return gm_unchecked_thread_exit();
}

static int route_bounce(struct gm_access *a)
{
    if (a->pool == NULL) {
        errno = EINVAL;
        return GM_ERR_ERRNO;
    }
    size_t cap = gm_pool_buffer_size(a->pool);
    uint8_t *stage = gm_pool_take(a->pool);
    int hardware = a->mode == GM_MODE_HARDWARE;
    int saved = hardware ? gm_tco_get() : 0;
    if (a->op == GM_OP_FILL)
        memset(stage, a->fill_byte, cap);
    uint8_t *buf = a->buf;
    for (size_t i = 0; i < a->nspans; i++) {
        const struct gm_span *s = &a->spans[i];
        for (size_t off = 0; off < s->len; off += cap) {
            size_t n = s->len - off < cap ? s->len - off : cap;
            if (a->op == GM_OP_READ) {
                if (hardware)
                    gm_tco_set(1);
                memcpy(stage, s->guest + off, n);
                if (hardware)
                    gm_tco_set(saved);
                memcpy(buf, stage, n);
            } else {
                if (a->op == GM_OP_WRITE)
                    memcpy(stage, buf, n);
                if (hardware)
                    gm_tco_set(1);
                memcpy(s->guest + off, stage, n);
                if (hardware)
                    gm_tco_set(saved);
            }
            if (buf)
                buf += n;
        }
    }
    gm_pool_give(a->pool, stage);
    return GM_OK;
}

static int match_all_span_hardware(struct gm_access *a, const struct gm_span *s, uint8_t *buf)
{
    int tco = gm_tco_get(); /* a handler may leave TCO set (QEMU user mode does) */
    int retries = 0;
    size_t off = 0;
    while (off < s->len) {
        uint8_t *p = s->guest + off;
        unsigned tag = gm_ldg(p);
        size_t end = off + granule_end(p);
        while (end < s->len && gm_ldg(s->guest + end) == tag)
            end += GM_GRANULE;
        if (end > s->len)
            end = s->len;
        uint8_t *b = buf ? buf + off : NULL;
        if (armed_move(a->op, gm_with_tag(p, tag), b, end - off, a->fill_byte) != 0) {
            gm_tco_set(tco);
            if (++retries > GM_RACE_RETRIES)
                return GM_ERR_RACE;
            continue;
        }
        off = end;
    }
    return GM_OK;
}

/* The span's fields and the request's op live in locals: the copies may
 * write anywhere, so the compiler would reload them on every tag run. */
static void match_all_span_table(const struct gm_access *a, const struct gm_span *s, uint8_t *buf)
{
    const int op = a->op, fill_byte = a->fill_byte;
    uint8_t *const guest = s->guest;
    const uint8_t *const table = s->table;
    const size_t len = s->len;
    size_t off = 0, g = 0;
    while (off < len) {
        uint8_t tag = table[g];
        size_t end = off + granule_end(guest + off);
        g++;
        while (end < len && table[g] == tag) {
            end += GM_GRANULE;
            g++;
        }
        if (end > len)
            end = len;
        move(op, guest + off, buf ? buf + off : NULL, end - off, fill_byte);
        off = end;
    }
}

static int route_match_all(struct gm_access *a)
{
    /* Under KVM the VMM's mapping carries no tags: there is nothing to match. */
    if (a->mode == GM_MODE_NONE || a->mode == GM_MODE_KVM) {
        move_spans(a);
        return GM_OK;
    }
    uint8_t *buf = a->buf;
    for (size_t i = 0; i < a->nspans; i++) {
        if (a->mode == GM_MODE_HARDWARE) {
            int status = match_all_span_hardware(a, &a->spans[i], buf);
            if (status != GM_OK)
                return status;
        } else {
            match_all_span_table(a, &a->spans[i], buf);
        }
        if (buf)
            buf += a->spans[i].len;
    }
    return GM_OK;
}

static int checked_hardware(struct gm_access *a)
{
    struct gm_checking saved;
    int status = gm_checking_begin(&saved);
    if (status != GM_OK)
        return status;
    int reading = a->op == GM_OP_READ;
    /* Writes touch nothing until every granule passed a checked load. */
    for (size_t i = 0; !reading && i < a->nspans; i++) {
        const struct gm_span *s = &a->spans[i];
        if (armed_probe(gm_with_tag(s->guest, (unsigned)a->logical_tag), s->len) != 0) {
            gm_checking_end(&saved);
            return fault_in_hardware(a, i, gm_fault_addr);
        }
    }
    uint8_t *buf = a->buf;
    for (size_t i = 0; i < a->nspans; i++) {
        const struct gm_span *s = &a->spans[i];
        if (armed_move(a->op, gm_with_tag(s->guest, (unsigned)a->logical_tag), buf, s->len, a->fill_byte) != 0) {
            gm_checking_end(&saved);
            uintptr_t at = gm_fault_addr & GM_ADDR_MASK;
            if (at < (uintptr_t)s->guest || at >= (uintptr_t)s->guest + s->len) {
                a->fault.span = a->nspans; /* the caller's own buffer is tagged */
                a->fault.offset = 0;
                a->fault.logical_tag = 0;
                a->fault.allocation_tag = 0;
                return GM_ERR_TAG_CHECK;
            }
            return fault_in_hardware(a, i, gm_fault_addr);
        }
        if (buf)
            buf += s->len;
    }
    gm_checking_end(&saved);
    return GM_OK;
}

static int route_checked(struct gm_access *a)
{
    if (a->logical_tag < 0 || a->logical_tag > 15) {
        errno = EINVAL;
        return GM_ERR_ERRNO;
    }
    switch (a->mode) {
    case GM_MODE_HARDWARE:
        return checked_hardware(a);
    case GM_MODE_SOFTWARE:
    case GM_MODE_KVM: {
        int status = a->mode == GM_MODE_KVM ? mismatch_in_kvm(a) : mismatch_in_table(a);
        if (status == GM_OK)
            move_spans(a);
        return status;
    }
    default:
        return GM_ERR_UNSUPPORTED;
    }
}

static GM_TLS struct gm_fault last_fault;

static int dispatch(struct gm_access *a);

int gm_access(struct gm_access *a)
{
    int status = dispatch(a);
    if (status == GM_ERR_TAG_CHECK)
        last_fault = a->fault;
    if (status == GM_OK && (a->op & (GM_OP_WRITE | GM_OP_FILL)) && a->space != NULL)
        for (size_t i = 0; i < a->nspans; i++) {
            const struct gm_span *s = &a->spans[i];
            if (s->region != NULL)
                gm_space_mark_region(a->space, s->region, s->gpa - s->region->gpa, s->len);
        }
    return status;
}

/* One span inside one region, with scalar arguments: the binding's fast path
 * (no structures to allocate from Python). A tag-check failure's facts are
 * left for gm_last_fault(). */
/* One range of hot's region, which [gpa, gpa + len) must lie in; a write or
 * fill marks the pages it changed in the space's dirty log. */
static int move_in(const struct gm_hot *hot, int route, int op, uint64_t gpa, size_t len,
                   uint8_t *buf, int fill_byte, int logical_tag, int vm_fd)
{
    uint64_t offset = gpa - hot->gpa;
    struct gm_span span = {
        .gpa = gpa,
        .guest = hot->base + offset,
        .table = hot->table ? hot->table + offset / GM_GRANULE : NULL,
        .len = len,
    };
    struct gm_access a = {
        .mode = hot->mode, .route = route, .op = op, .spans = &span, .nspans = 1, .buf = buf,
        .fill_byte = fill_byte, .logical_tag = logical_tag, .pool = hot->pool, .vm_fd = vm_fd,
    };
    int status = gm_access(&a);
    if (status == GM_OK && (op & (GM_OP_WRITE | GM_OP_FILL)) && hot->region != NULL)
        gm_space_mark_region(hot->space, hot->region, offset, len);
    return status;
}

static int fits(const struct gm_hot *hot, uint64_t gpa, size_t len)
{
    return hot->base && gpa >= hot->gpa && len <= hot->size && gpa - hot->gpa <= hot->size - len;
}

int gm_hot_move(const struct gm_hot *hot, int route, int op, uint64_t gpa, size_t len,
                uint8_t *buf, int fill_byte, int logical_tag, int vm_fd)
{
    if (!fits(hot, gpa, len))
        return GM_MISS;
    return move_in(hot, route, op, gpa, len, buf, fill_byte, logical_tag, vm_fd);
}

static int hot_move(const struct gm_hot *hot, int route, int op, uint64_t gpa, size_t len,
                    uint8_t *buf, int fill_byte)
{
    if (route == GM_ROUTE_CHECKED || !fits(hot, gpa, len))
        return GM_MISS;
    return move_in(hot, route, op, gpa, len, buf, fill_byte, 0, -1);
}

int gm_hot_read(const struct gm_hot *hot, int route, uint64_t gpa, size_t len, uint8_t *buf)
{
    return hot_move(hot, route, GM_OP_READ, gpa, len, buf, 0);
}

int gm_hot_write(const struct gm_hot *hot, int route, uint64_t gpa, size_t len,
                 const uint8_t *buf)
{
    /* A write only reads buf (gm_access's buf serves reads too, so it is not const). */
    return hot_move(hot, route, GM_OP_WRITE, gpa, len, (uint8_t *)buf, 0);
}

int gm_hot_fill(const struct gm_hot *hot, int route, uint64_t gpa, size_t len, int byte)
{
    return hot_move(hot, route, GM_OP_FILL, gpa, len, NULL, byte);
}

void gm_last_fault(struct gm_fault *out)
{
    *out = last_fault;
}

static int run_route(struct gm_access *a);

/* Whether the caller's buffer shares a byte with any span (tags ignored). */
static int buf_overlaps_spans(const struct gm_access *a)
{
    uintptr_t lo = (uintptr_t)a->buf & GM_ADDR_MASK;
    size_t total = 0;
    for (size_t i = 0; i < a->nspans; i++)
        total += a->spans[i].len;
    for (size_t i = 0; i < a->nspans; i++) {
        uintptr_t s = (uintptr_t)a->spans[i].guest & GM_ADDR_MASK;
        if (a->spans[i].len && lo < s + a->spans[i].len && s < lo + total)
            return 1;
    }
    return 0;
}

/* Copy between the caller's buffer and a temporary with tag checks off:
 * the buffer may be tagged guest memory reached through an untagged pointer. */
static void copy_unchecked(int mode, uint8_t *dst, const uint8_t *src, size_t n)
{
    if (mode != GM_MODE_HARDWARE) {
        memcpy(dst, src, n);
        return;
    }
    int saved = gm_tco_get();
    gm_tco_set(1);
    memcpy(dst, src, n);
    gm_tco_set(saved);
}

/* The route over a private snapshot of the caller's buffer: a write reads
 * all of the source before the first guest byte changes, a read fills the
 * destination only after the last guest byte was read. memmove results,
 * whatever the overlap. */
static int run_staged(struct gm_access *a)
{
    size_t total = 0;
    for (size_t i = 0; i < a->nspans; i++)
        total += a->spans[i].len;
    uint8_t *tmp = malloc(total ? total : 1);
    if (tmp == NULL)
        return GM_ERR_ERRNO;
    uint8_t *user = a->buf;
    if (a->op == GM_OP_WRITE)
        copy_unchecked(a->mode, tmp, user, total);
    a->buf = tmp;
    int status = run_route(a);
    a->buf = user;
    if (status == GM_OK && a->op == GM_OP_READ)
        copy_unchecked(a->mode, user, tmp, total);
    free(tmp);
    return status;
}

static int dispatch(struct gm_access *a)
{
    int stage = (a->op & GM_OP_STAGE) != 0;
    a->op &= ~GM_OP_STAGE;
    if (a->op < GM_OP_READ || a->op > GM_OP_FILL || (a->op != GM_OP_FILL && a->buf == NULL)) {
        errno = EINVAL;
        return GM_ERR_ERRNO;
    }
    if (a->mode == GM_MODE_HARDWARE) {
        int status = gm_thread_enable_mte();
        if (status != GM_OK)
            return status;
    } else if (a->mode != GM_MODE_SOFTWARE && a->mode != GM_MODE_NONE && a->mode != GM_MODE_KVM) {
        errno = EINVAL;
        return GM_ERR_ERRNO;
    }
    if (a->op != GM_OP_FILL && (stage || buf_overlaps_spans(a)))
        return run_staged(a);
    return run_route(a);
}

static int run_route(struct gm_access *a)
{
    switch (a->route) {
    case GM_ROUTE_TCO:
        return route_tco(a);
    case GM_ROUTE_MATCH_ALL:
        return route_match_all(a);
    case GM_ROUTE_BOUNCE:
        return route_bounce(a);
    case GM_ROUTE_UNCHECKED_THREAD:
        return route_unchecked_thread(a);
    case GM_ROUTE_CHECKED:
        return route_checked(a);
    }
    errno = EINVAL;
    return GM_ERR_ERRNO;
}
