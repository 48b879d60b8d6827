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

static unsigned load_tag(uint8_t *p)
{
    __asm__ volatile("ldg %0, [%0]" : "+r"(p));
    return (unsigned)(((uintptr_t)p >> 56) & 0xf);
}

static void exit_with_si_code(int sig, siginfo_t *info, void *context)
{
    (void)sig;
    (void)context;
    _exit(info->si_code == SEGV_MTESERR ? 42 : 1);
}

/* Whether a load through ``wrong`` (a pointer with a tag its granule does not
 * have) dies of SEGV_MTESERR, in a child so the caller lives on. */
static int wrong_tag_faults(volatile uint8_t *wrong)
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
    return WIFEXITED(status) && WEXITSTATUS(status) == 42;
}

#endif
