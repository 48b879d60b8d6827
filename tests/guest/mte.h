/* What the nested guest's probes share: MTE for this process, tagged
 * pointers, STG/LDG, and a forked check that a wrong tag faults. */
#ifndef GUEST_MTE_H
#define GUEST_MTE_H

#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PROT_MTE
#define PROT_MTE 0x20
#endif
#ifndef PR_MTE_TCF_SYNC
#define PR_MTE_TCF_SYNC (1UL << 1)
#define PR_MTE_TAG_SHIFT 3
#endif
#ifndef SEGV_MTEAERR
#define SEGV_MTEAERR 8
#endif
#ifndef SEGV_MTESERR
#define SEGV_MTESERR 9
#endif

/* Tagged addresses and synchronous tag checks, every tag but 0 for IRG. */
static int enable_mte(void)
{
    return prctl(PR_SET_TAGGED_ADDR_CTRL, 1UL | PR_MTE_TCF_SYNC | (0xfffeUL << PR_MTE_TAG_SHIFT),
                 0, 0, 0);
}

static uint8_t *with_tag(uint8_t *p, unsigned tag)
{
    return (uint8_t *)(((uintptr_t)p & ~(0xfUL << 56)) | ((uintptr_t)tag << 56));
}

static void store_tag(uint8_t *p) { __asm__ volatile("stg %0, [%0]" : : "r"(p) : "memory"); }

/* STGP: the granule's tag (from p's) and its 16 bytes in one store. */
static inline void store_tag_and_pair(uint8_t *p, uint64_t lo, uint64_t hi)
{
    __asm__ volatile("stgp %1, %2, [%0]" : : "r"(p), "r"(lo), "r"(hi) : "memory");
}

static unsigned load_tag(uint8_t *p)
{
    __asm__ volatile("ldg %0, [%0]" : "+r"(p));
    return (unsigned)(((uintptr_t)p >> 56) & 0xf);
}

static void exit_with_si_code(int sig, siginfo_t *info, void *context)
{
    (void)sig;
    (void)context;
    _exit(info->si_code == SEGV_MTESERR ? 42 : info->si_code == SEGV_MTEAERR ? 43 : 44);
}

/* The child's exit status after a load through ``wrong`` (a pointer with a
 * tag its granule does not have), in a child so the caller lives on: 42 for
 * SEGV_MTESERR, 43 SEGV_MTEAERR, 44 another SIGSEGV, 2 no fault. */
static inline int wrong_tag_status(volatile uint8_t *wrong)
{
    pid_t child = fork();
    if (child == 0) {
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_sigaction = exit_with_si_code;
        action.sa_flags = SA_SIGINFO;
        sigaction(SIGSEGV, &action, NULL);
        (void)*wrong;
        _exit(2);
    }
    int status = 0;
    waitpid(child, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Whether a load through ``wrong`` dies of SEGV_MTESERR. */
static inline int wrong_tag_faults(volatile uint8_t *wrong) { return wrong_tag_status(wrong) == 42; }

/* What a load through ``wrong`` does, as one word for a probe's line. */
static inline const char *wrong_tag_result(volatile uint8_t *wrong)
{
    switch (wrong_tag_status(wrong)) {
    case 42: return "SEGV_MTESERR";
    case 43: return "SEGV_MTEAERR";
    case 44: return "SEGV_other";
    case 2: return "none";
    default: return "error";
    }
}

#endif
