"""A guest for the GDB tests, in its own process: guest memory served by
GdbStub on a thread, and a line protocol on stdin through which the test
reads memory and tags with the Python API (not through the stub).

    python gdb_target.py MODE        prints "listening ADDRESS", then answers
    tags GPA LENGTH   -> the allocation tags as hex
    read GPA LENGTH   -> the bytes as hex
"""

from __future__ import annotations

import sys
import threading

import numpy as np

import guestmem as gm
from guestmem.gdbstub import GdbStub

BASE = 0x4000_0000
SIZE = 0x10000


def main() -> int:
    mem = gm.GuestMemory.anonymous(SIZE, gpa=BASE, tags=sys.argv[1])
    mem.write(BASE, bytes(range(256)))
    if mem.tag_mode is not gm.TagMode.NONE:
        mem.set_tags(BASE, 256, np.arange(16, dtype=np.uint8))
    stub = GdbStub(mem)
    threading.Thread(target=stub.serve, daemon=True).start()
    print("listening", stub.address, flush=True)
    for line in sys.stdin:
        verb, gpa, length = line.split()
        if verb == "tags":
            print(mem.get_tags(int(gpa, 0), int(length, 0)).tobytes().hex(), flush=True)
        else:
            print(mem.read(int(gpa, 0), int(length, 0)).hex(), flush=True)
    stub.close()
    mem.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
