#define _GNU_SOURCE
#include "gm_fault.h"

#include <pthread.h>
#include <signal.h>
#include <string.h>

#ifndef SEGV_MTESERR
#define SEGV_MTESERR 9
#endif

GM_TLS sigjmp_buf *gm_armed;
GM_TLS uintptr_t gm_fault_addr;

static struct sigaction previous;
static pthread_once_t install_once = PTHREAD_ONCE_INIT;
static int install_status;

static void pass_on(int sig, siginfo_t *info, void *context)
{
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, context);
        return;
    }
    if (previous.sa_handler == SIG_DFL || previous.sa_handler == SIG_IGN) {
        /* Returning re-runs the faulting instruction, now under the default. */
        signal(sig, SIG_DFL);
        return;
    }
    previous.sa_handler(sig);
}

static void on_sigsegv(int sig, siginfo_t *info, void *context)
{
    sigjmp_buf *jb = gm_armed;
    if (jb != 0 && info->si_code == SEGV_MTESERR) {
        gm_armed = 0;
        gm_fault_addr = (uintptr_t)info->si_addr;
        siglongjmp(*jb, 1);
    }
    pass_on(sig, info, context);
}

static void install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigsegv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    install_status = sigaction(SIGSEGV, &sa, &previous);
}

int gm_fault_install(void)
{
    pthread_once(&install_once, install);
    return install_status;
}
