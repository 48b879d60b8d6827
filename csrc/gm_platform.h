/* What the CPU offers, and the calling thread's tag-check state:
 * PSTATE.TCO and the prctl check mode (or their model where MTE is absent). */
#ifndef GM_PLATFORM_H
#define GM_PLATFORM_H

enum gm_check_mode {
    GM_CHECKS_NONE = 0,
    GM_CHECKS_SYNC = 1,
    GM_CHECKS_ASYNC = 2
};

int gm_cpu_has_mte(void);
int gm_thread_enable_mte(void);
int gm_thread_tco(void);
int gm_thread_check_mode(void);
int gm_unchecked_enter(void);
int gm_unchecked_exit(void);
int gm_unchecked_thread_enter(void);
int gm_unchecked_thread_exit(void);
int gm_probe_signal_tco(int *in_handler, int *after_return);

#endif
