"""A vhost-user relay that makes any backend one that does not log its writes.

It sits between a frontend (QEMU) and a backend on Unix sockets and passes
every message on, file descriptors included, except one: SET_LOG_BASE, whose
shared-memory log it replaces with a decoy of the same size. The backend then
marks the pages it writes in the decoy, and the frontend's migration never
learns of them: what a backend that ignores the dirty log does. The migration
test uses it to show that its guest notices (docs/interop/vhost-user.rst:
"Dirty pages logging").
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from socket import AF_UNIX, SOCK_STREAM, recv_fds, send_fds
from socket import socket as Socket

HEADER = struct.Struct("<III")  # request, flags, payload size
SET_LOG_BASE = 6
MAX_FDS = 8


class DecoyLogRelay:
    """Relay one frontend on ``listen`` to the backend on ``backend``, with a decoy log."""

    def __init__(self, listen: Path, backend: Path) -> None:
        self.backend = backend
        self.decoy_logs = 0  # SET_LOG_BASE messages whose log was replaced
        self.server = Socket(AF_UNIX, SOCK_STREAM)
        self.server.bind(str(listen))
        self.server.listen(1)
        self._sockets: list[Socket] = [self.server]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            frontend, _ = self.server.accept()
        except OSError:
            return
        backend = Socket(AF_UNIX, SOCK_STREAM)
        backend.connect(str(self.backend))
        self._sockets += [frontend, backend]
        threading.Thread(target=self._replies, args=(backend, frontend), daemon=True).start()
        self._requests(frontend, backend)

    def _requests(self, frontend: Socket, backend: Socket) -> None:
        try:
            while True:
                header, fds = receive(frontend, HEADER.size)
                request, _flags, size = HEADER.unpack(header)
                payload, more = receive(frontend, size)
                fds += more
                if request == SET_LOG_BASE and fds:
                    fds = [self._decoy(payload, fds)]
                send_fds(backend, [header + payload], fds)
                for fd in fds:
                    os.close(fd)
        except (OSError, EOFError):
            backend.close()

    def _decoy(self, payload: bytes, fds: list[int]) -> int:
        """A fresh memfd as large as the frontend's log, in place of the log's fd."""
        mmap_size, mmap_offset = struct.unpack_from("<QQ", payload)
        for fd in fds:
            os.close(fd)
        decoy = os.memfd_create("decoy-dirty-log")
        os.ftruncate(decoy, mmap_size + mmap_offset)
        self.decoy_logs += 1
        return decoy

    @staticmethod
    def _replies(backend: Socket, frontend: Socket) -> None:
        try:
            while True:
                data, fds, _, _ = recv_fds(backend, 65536, MAX_FDS)
                if not data:
                    break
                send_fds(frontend, [data], fds)
                for fd in fds:
                    os.close(fd)
        except OSError:
            pass
        frontend.close()

    def close(self) -> None:
        """Stop relaying."""
        for sock in self._sockets:
            sock.close()


def receive(sock: Socket, size: int) -> tuple[bytes, list[int]]:
    """Exactly ``size`` bytes from ``sock`` and the fds that came with them."""
    data = b""
    fds: list[int] = []
    while len(data) < size:
        chunk, more, _, _ = recv_fds(sock, size - len(data), MAX_FDS)
        if not chunk:
            raise EOFError("the peer closed the connection")
        data += chunk
        fds += more
    return data, fds
