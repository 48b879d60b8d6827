"""The vhost-user protocol's numbers (QEMU docs/interop/vhost-user.rst): requests, flags, bits."""

from __future__ import annotations

import enum
import struct

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

HEADER = struct.Struct("=III")  # request, flags, size (native byte order)
MAX_PAYLOAD = 4096  # larger than any request this backend serves
MAX_FDS = 8  # fds one message may carry (VHOST_MEMORY_BASELINE_NREGIONS)
MAX_REGIONS = 8  # regions of one SET_MEM_TABLE
MAX_MEM_SLOTS = 32  # regions ADD_MEM_REG may build up (GET_MAX_MEM_SLOTS)
MAX_CONFIG = 256  # VHOST_USER_MAX_CONFIG_SIZE
MAX_QUEUE_SIZE = 32768
LOG_PAGE = 0x1000  # VHOST_LOG_PAGE: a bit of the dirty log covers 4 KiB of GPA

U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")  # index, num
VRING_ADDR = struct.Struct("=IIQQQQ")  # index, flags, desc, used, avail, log (user addresses)
MEMORY_HEADER = struct.Struct("=II")  # nregions, padding
REGION = struct.Struct("=QQQQ")  # guest address, size, user address, mmap offset
LOG = struct.Struct("=QQ")  # size, offset
CONFIG_HEADER = struct.Struct("=III")  # offset, size, flags

VRING_INDEX_MASK = 0xFF  # bits 0..7 of SET_VRING_KICK/CALL/ERR's u64
VRING_NOFD = 1 << 8  # ... bit 8: no fd (polling)
VRING_F_LOG = 1 << 0  # SET_VRING_ADDR flags: log the used ring's writes


class Request(enum.IntEnum):
    """Frontend message types (ids as in the specification)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


def request_name(code: int) -> str:
    """``SET_MEM_TABLE`` for 5; ``request 99`` for a code this backend does not know."""
    try:
        return Request(code).name
    except ValueError:
        return f"request {code}"


# Virtio feature bits the transport (not the device) decides.
F_LOG_ALL = 1 << 26  # VHOST_F_LOG_ALL: the frontend may ask for dirty logging
F_PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES


class ProtocolFeature(enum.IntFlag):
    """Protocol feature bits (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


OFFERED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIG
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
)
"""What this backend offers: queue count, a shared dirty log, acks, config space, reset,
regions added and removed one at a time."""
