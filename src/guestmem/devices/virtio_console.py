"""virtio-console (virtio 1.x, section 5.3), one port: the guest's ``hvc0``.

The transmit queue carries what the guest writes: each chain's readable
bytes are read through the DMA access class and handed to ``output`` at
once. The receive queue holds buffers the guest posted for input: typed
bytes go into them as they come (:meth:`VirtioConsole.receive`, from any
thread); what finds no buffer waits in a backlog until the guest posts more.
No MULTIPORT, no SIZE: the configuration space is all zeros.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import guestmem as gm
from guestmem.devices.interrupt import UsedBuffers
from guestmem.saved_state import Reader, Writer
from guestmem.virtio import SplitQueue, chain_read, chain_write

DEVICE_ID = 3
RECEIVE, TRANSMIT = 0, 1
STATE_VERSION = 1
BACKLOG_MAX = 1 << 20  # bytes typed and not delivered yet that a saved state may carry


@dataclass(frozen=True)
class ConsoleState:
    """The typed input a virtio-console had not delivered yet."""

    backlog: bytes


class VirtioConsole:
    """A virtio-console device: ``output`` gets the guest's bytes as it writes them.

    Input that lands outside a guest's kick is reported through the
    :class:`UsedBuffers` its transport gave :meth:`activate`.
    """

    device_id = DEVICE_ID
    features = 0
    queue_count = 2

    def __init__(self, memory: gm.GuestMemory, output: Callable[[bytes], None]) -> None:
        """A console port with nothing typed yet."""
        self._memory = memory
        self._output = output
        self._lock = threading.Lock()
        self._backlog: deque[bytes] = deque()
        self._queues: Sequence[SplitQueue] = ()
        self._used: UsedBuffers = _nobody

    def config(self) -> bytes:
        """cols, rows, max_nr_ports, emerg_wr: unused without SIZE and MULTIPORT."""
        return bytes(12)

    def write_config(self, offset: int, data: bytes) -> None:
        """Ignored: emerg_wr needs EMERG_WRITE, which is not offered."""

    def activate(self, queues: Sequence[SplitQueue], features: int, used: UsedBuffers) -> None:
        """Serve the receive and transmit queues; ``used`` reports input delivered later."""
        with self._lock:
            self._queues = queues
            self._used = used

    def reset(self) -> None:
        """Forget the queues; typed input waits for the next driver."""
        with self._lock:
            self._queues = ()
            self._used = _nobody

    def notify(self, queue: int) -> bool:
        """The guest wrote (transmit) or posted input buffers (receive)."""
        with self._lock:
            if not self._queues:
                return False
            if queue == TRANSMIT:
                return self._transmit(self._queues[TRANSMIT])
            return self._deliver(self._queues[RECEIVE])

    def receive(self, data: bytes) -> None:
        """Bytes typed at the console, for the guest to read from hvc0 (any thread)."""
        with self._lock:
            self._backlog.append(data)
            delivered = bool(self._queues) and self._deliver(self._queues[RECEIVE])
            used = self._used
        if delivered:
            used()

    def save_state(self) -> bytes:
        """The typed input not delivered yet (versioned)."""
        with self._lock:
            return Writer().u8(STATE_VERSION).blob(b"".join(self._backlog)).bytes()

    def decode_state(self, reader: Reader) -> ConsoleState:
        """Read the saved backlog; StateError if it is not one."""
        reader.version("virtio-console", STATE_VERSION)
        backlog = reader.blob("the input backlog", BACKLOG_MAX)
        reader.end()
        return ConsoleState(backlog)

    def apply_state(self, state: ConsoleState) -> None:
        """Take the saved backlog in place of this one."""
        with self._lock:
            self._backlog = deque([state.backlog] if state.backlog else [])

    def load_state(self, data: bytes) -> None:
        """Decode ``data`` and apply it: a StateError, and nothing changed, if it is bad."""
        self.apply_state(self.decode_state(Reader(data)))

    def _transmit(self, ring: SplitQueue) -> bool:
        interrupt = False
        while (chain := ring.pop()) is not None:
            data = chain_read(self._memory, chain)
            if data:
                self._output(data)
            interrupt |= ring.push(chain.head, 0)
        return interrupt

    def _deliver(self, ring: SplitQueue) -> bool:
        """Fill posted buffers from the backlog; True if any was returned to the guest."""
        interrupt = False
        while self._backlog and (chain := ring.pop()) is not None:
            room = chain.writable_len
            data = b"".join(self._backlog)
            now, rest = data[:room], data[room:]
            self._backlog.clear()
            if rest:
                self._backlog.append(rest)
            interrupt |= ring.push(chain.head, chain_write(self._memory, chain, now))
        return interrupt


def _nobody() -> None:
    """No driver to tell: the device is not active."""
