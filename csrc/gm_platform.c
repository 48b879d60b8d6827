#define _GNU_SOURCE
#include "gm_platform.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/prctl.h>

#include "gm_fault.h"
#include "gm_insn.h"
#include "gm_status.h"
#include "gm_thread.h"

#ifndef PR_SET_TAGGED_ADDR_CTRL
#define PR_SET_TAGGED_ADDR_CTRL 55
#define PR_GET_TAGGED_ADDR_CTRL 56
#endif
#ifndef PR_TAGGED_ADDR_ENABLE
#define PR_TAGGED_ADDR_ENABLE (1UL << 0)
#endif
#ifndef PR_MTE_TCF_SHIFT
#define PR_MTE_TCF_NONE 0UL
#define PR_MTE_TCF_SYNC (1UL << 1)
#define PR_MTE_TCF_ASYNC (1UL << 2)
#define PR_MTE_TCF_MASK (PR_MTE_TCF_SYNC | PR_MTE_TCF_ASYNC)
#define PR_MTE_TAG_SHIFT 3
#endif
#define GM_HWCAP2_MTE (1UL << 18)
#define GM_TAG_INCLUDE_ALL_BUT_ZERO (0xfffeUL << PR_MTE_TAG_SHIFT)

/* Per thread: whether the tagged-address ABI is on, and the state this
 * library changed (the model of TCO and check mode where MTE is absent). */
static GM_TLS int thread_ready;
static GM_TLS int unchecked_depth;
static GM_TLS int unchecked_saved_tco;
static GM_TLS int unchecked_thread_depth;
static GM_TLS long unchecked_thread_saved_ctrl;
static GM_TLS int model_tco;
static GM_TLS int model_checks = GM_CHECKS_SYNC;

int gm_cpu_has_mte(void)
{
#if GM_HAVE_MTE_INSN
    static int cached = -1;
    if (cached < 0)
        cached = (getauxval(AT_HWCAP2) & GM_HWCAP2_MTE) != 0;
    return cached;
#else
    return 0;
#endif
}

int gm_thread_enable_mte(void)
{
    if (thread_ready)
        return GM_OK;
    if (!gm_cpu_has_mte()) {
        errno = ENOTSUP;
        return GM_ERR_UNSUPPORTED;
    }
    if (gm_fault_install() != 0)
        return GM_ERR_ERRNO;
    unsigned long ctrl = PR_TAGGED_ADDR_ENABLE | PR_MTE_TCF_SYNC | GM_TAG_INCLUDE_ALL_BUT_ZERO;
    if (prctl(PR_SET_TAGGED_ADDR_CTRL, ctrl, 0, 0, 0) != 0)
        return GM_ERR_ERRNO;
    thread_ready = 1;
    return GM_OK;
}

int gm_thread_tco(void)
{
    return gm_cpu_has_mte() ? gm_tco_get() : model_tco;
}

int gm_thread_check_mode(void)
{
    if (!gm_cpu_has_mte())
        return model_checks;
    long ctrl = prctl(PR_GET_TAGGED_ADDR_CTRL, 0, 0, 0, 0);
    if (ctrl < 0)
        return GM_ERR_ERRNO;
    if (!(ctrl & PR_TAGGED_ADDR_ENABLE))
        return GM_CHECKS_NONE;
    if (ctrl & PR_MTE_TCF_SYNC)
        return GM_CHECKS_SYNC;
    if (ctrl & PR_MTE_TCF_ASYNC)
        return GM_CHECKS_ASYNC;
    return GM_CHECKS_NONE;
}

int gm_unchecked_enter(void)
{
    if (unchecked_depth++ == 0) {
        unchecked_saved_tco = gm_thread_tco();
        if (gm_cpu_has_mte())
            gm_tco_set(1);
        else
            model_tco = 1;
    }
    return GM_OK;
}

int gm_unchecked_exit(void)
{
    if (unchecked_depth == 0) {
        errno = EINVAL;
        return GM_ERR_ERRNO;
    }
    if (--unchecked_depth == 0) {
        if (gm_cpu_has_mte())
            gm_tco_set(unchecked_saved_tco);
        else
            model_tco = unchecked_saved_tco;
    }
    return GM_OK;
}

int gm_unchecked_thread_enter(void)
{
    if (unchecked_thread_depth > 0) {
        unchecked_thread_depth++;
        return GM_OK;
    }
    if (!gm_cpu_has_mte()) {
        unchecked_thread_saved_ctrl = model_checks;
        model_checks = GM_CHECKS_NONE;
        unchecked_thread_depth = 1;
        return GM_OK;
    }
    int status = gm_thread_enable_mte();
    if (status != GM_OK)
        return status;
    long ctrl = prctl(PR_GET_TAGGED_ADDR_CTRL, 0, 0, 0, 0);
    if (ctrl < 0)
        return GM_ERR_ERRNO;
    unsigned long off = ((unsigned long)ctrl & ~PR_MTE_TCF_MASK) | PR_MTE_TCF_NONE;
    if (prctl(PR_SET_TAGGED_ADDR_CTRL, off, 0, 0, 0) != 0)
        return GM_ERR_ERRNO;
    unchecked_thread_saved_ctrl = ctrl;
    unchecked_thread_depth = 1;
    return GM_OK;
}

int gm_unchecked_thread_exit(void)
{
    if (unchecked_thread_depth == 0) {
        errno = EINVAL;
        return GM_ERR_ERRNO;
    }
    if (--unchecked_thread_depth > 0)
        return GM_OK;
    if (!gm_cpu_has_mte()) {
        model_checks = (int)unchecked_thread_saved_ctrl;
        return GM_OK;
    }
    if (prctl(PR_SET_TAGGED_ADDR_CTRL, (unsigned long)unchecked_thread_saved_ctrl, 0, 0, 0) != 0)
        return GM_ERR_ERRNO;
    return GM_OK;
}

int gm_checking_begin(struct gm_checking *saved)
{
    int status = gm_thread_enable_mte();
    if (status != GM_OK)
        return status;
    saved->mode_forced = 0;
    if (unchecked_thread_depth > 0) {
        unsigned long on = ((unsigned long)unchecked_thread_saved_ctrl & ~PR_MTE_TCF_MASK) | PR_MTE_TCF_SYNC;
        long now = prctl(PR_GET_TAGGED_ADDR_CTRL, 0, 0, 0, 0);
        if (now < 0 || prctl(PR_SET_TAGGED_ADDR_CTRL, on, 0, 0, 0) != 0)
            return GM_ERR_ERRNO;
        saved->ctrl = now;
        saved->mode_forced = 1;
    }
    saved->tco = gm_tco_get();
    gm_tco_set(0);
    return GM_OK;
}

void gm_checking_end(const struct gm_checking *saved)
{
    gm_tco_set(saved->tco);
    if (saved->mode_forced)
        prctl(PR_SET_TAGGED_ADDR_CTRL, (unsigned long)saved->ctrl, 0, 0, 0);
}

static volatile sig_atomic_t probed_tco = -1;

static void record_tco(int sig)
{
    (void)sig;
    probed_tco = gm_tco_get();
}

/* Raise a signal on this thread and report PSTATE.TCO inside its handler
 * and after the handler returned. A real kernel starts handlers with TCO=0
 * (checks on) and restores the interrupted TCO on return; QEMU user mode
 * starts them with TCO=1. */
int gm_probe_signal_tco(int *in_handler, int *after_return)
{
    if (!gm_cpu_has_mte()) {
        errno = ENOTSUP;
        return GM_ERR_UNSUPPORTED;
    }
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = record_tco;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR2, &sa, &old) != 0)
        return GM_ERR_ERRNO;
    probed_tco = -1;
    raise(SIGUSR2);
    *after_return = gm_tco_get();
    *in_handler = probed_tco;
    sigaction(SIGUSR2, &old, NULL);
    return GM_OK;
}
