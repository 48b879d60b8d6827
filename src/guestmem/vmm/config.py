"""What machine to build: :class:`MachineConfig` and its :class:`Disk` entries, checked."""

from __future__ import annotations

from dataclasses import dataclass

import guestmem as gm
from guestmem.vmm import layout

TAG_MODES = (gm.TagMode.HARDWARE, gm.TagMode.KVM)


@dataclass(frozen=True)
class Disk:
    """A disk image file, served as virtio-blk (read-only with ``read_only``)."""

    path: str
    read_only: bool = False


@dataclass(frozen=True)
class MachineConfig:
    """What to run: kernel and initrd (bytes), command line, RAM, vCPUs, tag mode, disks.

    ``kernel`` None builds the machine empty, for a saved state to be loaded
    into (:mod:`machine_state`): a snapshot's, or a live migration's.
    """

    kernel: bytes | None
    command_line: str = "console=ttyAMA0"
    initrd: bytes | None = None
    memory: int = 256 << 20
    cpus: int = 1
    tags: gm.TagMode = gm.TagMode.HARDWARE
    disks: tuple[Disk, ...] = ()
    virtio_console: bool = False  # a virtio-console (hvc0) beside the UART
    eventfds: bool = True  # ioeventfd kicks and irqfd interrupts, where KVM offers them


def check(config: MachineConfig) -> None:
    """Refuse (UsageError) a config no machine can be built from, before any is."""
    if config.tags not in TAG_MODES:
        raise gm.UsageError(f"the VMM's guest RAM is HARDWARE or KVM tagged, not {config.tags}")
    if not 1 <= config.cpus <= layout.MAX_CPUS:
        raise gm.UsageError(f"--cpus must be 1 to {layout.MAX_CPUS}, not {config.cpus}")
    if config.memory <= 0 or config.memory % gm.HOST_PAGE:
        raise gm.UsageError(
            f"guest memory must be a positive multiple of the host page "
            f"({gm.HOST_PAGE} bytes), not {config.memory}"
        )
    if len(config.disks) + config.virtio_console > layout.MAX_VIRTIO:
        raise gm.UsageError(f"at most {layout.MAX_VIRTIO} virtio devices")
