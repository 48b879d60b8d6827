/* Internal: make the calling thread check tags for the length of one access,
 * whatever TCO and the check mode are now, and put both back after. */
#ifndef GM_THREAD_H
#define GM_THREAD_H

struct gm_checking {
    int tco;          /* TCO before */
    long ctrl;        /* prctl word before, when the mode had to change */
    int mode_forced;
};

int gm_checking_begin(struct gm_checking *saved);
void gm_checking_end(const struct gm_checking *saved);

#endif
