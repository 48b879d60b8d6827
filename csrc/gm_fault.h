/* Armed sections (internal): a synchronous tag-check fault raised inside one
 * returns through siglongjmp instead of killing the process; every other
 * SIGSEGV goes to the handler that was installed before ours. */
#ifndef GM_FAULT_H
#define GM_FAULT_H

#include <setjmp.h>
#include <stdint.h>

#define GM_TLS __thread __attribute__((tls_model("initial-exec")))

extern GM_TLS sigjmp_buf *gm_armed;
extern GM_TLS uintptr_t gm_fault_addr;

int gm_fault_install(void);

/* Use: if (sigsetjmp(jb, 1) == 0) { gm_arm(&jb); ...access...; gm_disarm(); }
 *      else { fault at gm_fault_addr, already disarmed } */
static inline void gm_arm(sigjmp_buf *jb)
{
    gm_armed = jb;
    __asm__ volatile("" ::: "memory");
}

static inline void gm_disarm(void)
{
    __asm__ volatile("" ::: "memory");
    gm_armed = 0;
}

#endif
