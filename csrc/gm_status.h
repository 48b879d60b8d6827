/* Status codes every gm_ entry point returns. */
#ifndef GM_STATUS_H
#define GM_STATUS_H

enum gm_status {
    GM_OK = 0,
    GM_ERR_ERRNO = -1,       /* a system call failed: errno says why */
    GM_ERR_TAG_CHECK = -2,   /* a checked access met another allocation tag */
    GM_ERR_UNSUPPORTED = -3, /* the route or operation does not exist in this mode */
    GM_ERR_RACE = -4,        /* tags kept changing under a MATCH_ALL access */
    GM_ERR_VIRTQ = -5,       /* a malformed virtqueue: the queue says what */
    GM_MISS = 1              /* gm_hot_*: not a case for the fast path; nothing was done */
};

enum gm_mode {
    GM_MODE_NONE = 0,
    GM_MODE_SOFTWARE = 1,
    GM_MODE_HARDWARE = 2,
    GM_MODE_KVM = 3          /* tags through KVM; the VMM's mapping is untagged */
};

#endif
