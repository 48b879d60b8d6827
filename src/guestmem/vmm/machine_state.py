"""A paused machine's state beside its RAM: vCPUs, vGIC, timers, UART and virtio devices.

:func:`save` runs inside :meth:`Machine.paused` (no vCPU in KVM_RUN, no
device handler serving); :func:`load` into a machine built from the same
configuration (no kernel loaded) whose RAM already holds the saved pages,
before it runs. The sections (:mod:`state_codec` frames them):

``machine``
    what must match: RAM base and size, vCPU count, the devices' ids in
    transport order (the tag mode may differ: a HARDWARE source may go to a
    KVM target, the stream carries the tags either way).
``cpu<N>``
    :mod:`vcpu_state` (registers, timers, power state, pending events).
``gic``
    :mod:`gic_state`.
``uart``, ``virtio<N>``
    each device's own payload (its ``save_state``).

:func:`load` is all-or-nothing: it decodes and checks every section
(:func:`decode`: the description, every vCPU against the target's registers
and ID registers, the vGIC against the vCPUs' affinities, the UART, every
transport with its rings and its device's blob) before it writes anything
(:func:`apply`). A refused state is a :class:`StateError` at its offset in
the whole state and leaves the target as it was; what KVM then refuses (it
should not, on the same kernel) leaves the target unfit to run, and the
target is a fresh process that exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import guestmem as gm
from guestmem.devices.pl011 import Pl011State
from guestmem.devices.virtio_mmio_state import TransportState
from guestmem.saved_state import Reader, StateError, Writer
from guestmem.vmm import gic_state, layout, state_codec, vcpu_state
from guestmem.vmm.gic_state import GicState
from guestmem.vmm.vcpu import Vcpu
from guestmem.vmm.vcpu_state import VcpuState

if TYPE_CHECKING:
    from guestmem.vmm.machine import Machine

VERSION = 1
# The tag modes a VMM's RAM may have (machine.TAG_MODES), as the description's byte.
SOURCE_TAG_MODES = {list(gm.TagMode).index(m): m for m in (gm.TagMode.HARDWARE, gm.TagMode.KVM)}


@dataclass(frozen=True)
class MachineState:
    """A machine's state, decoded and checked against a target, not written yet."""

    cpus: tuple[VcpuState, ...]
    gic: GicState
    uart: Pl011State
    transports: tuple[TransportState, ...]


def describe(machine: Machine) -> bytes:
    """The ``machine`` section: what a target must be to take this machine's state."""
    config = machine.config
    out = Writer().u8(VERSION).u64(layout.RAM).u64(config.memory).u32(config.cpus)
    out.u8(list(type(config.tags)).index(config.tags))
    out.u32(len(machine.transports))
    for transport in machine.transports:
        out.u32(transport.device.device_id)
    return out.bytes()


def check_description(machine: Machine, reader: Reader) -> None:
    """Refuse a ``machine`` section that does not describe ``machine``.

    The tag mode may differ (a HARDWARE source may go to a KVM target), but
    it must be one a VMM's RAM has.
    """
    reader.version("the machine", VERSION)
    reader.expect("the RAM base", reader.u64(), layout.RAM)
    reader.expect("the RAM size", reader.u64(), machine.config.memory)
    reader.expect("the vCPU count", reader.u32(), machine.config.cpus)
    mode = reader.u8("the tag mode")
    if mode not in SOURCE_TAG_MODES:
        names = ", ".join(f"{m.name} ({i})" for i, m in SOURCE_TAG_MODES.items())
        raise reader.error(f"the tag mode is {mode}, not one a VMM's RAM has: {names}")
    reader.expect("the virtio device count", reader.u32(), len(machine.transports))
    for index, transport in enumerate(machine.transports):
        reader.expect(f"virtio device {index}'s id", reader.u32(), transport.device.device_id)
    reader.end()


def save(machine: Machine) -> bytes:
    """The machine's whole state but RAM (call inside ``machine.paused()``)."""
    events = machine.has_vcpu_events
    sections = [("machine", describe(machine))]
    for vcpu in machine.vcpus:
        sections.append((f"cpu{vcpu.index}", vcpu_state.save(vcpu, events=events).encode()))
    sections.append(("gic", gic_state.save(machine.gic, machine.vcpus).encode()))
    sections.append(("uart", machine.uart.save_state()))
    for index, transport in enumerate(machine.transports):
        sections.append((f"virtio{index}", transport.save_state()))
    return state_codec.encode(sections)


def decode(machine: Machine, data: bytes) -> MachineState:
    """Decode ``data`` and check every section against ``machine``, writing nothing.

    Reads the target's vCPUs (their register lists, ID registers and
    affinities); StateError, at its offset in ``data``, for anything
    corrupt, truncated or not this machine's.
    """
    sections = state_codec.decode(data)
    names = [f"cpu{v.index}" for v in machine.vcpus] + ["gic", "uart"]
    names += [f"virtio{index}" for index in range(len(machine.transports))]
    for name, reader in sections.items():
        if name not in {"machine", *names}:
            raise StateError(reader.offset, f"section {name!r} is not this machine's")
    check_description(machine, state_codec.section(sections, "machine"))
    cpus = []
    for vcpu in machine.vcpus:
        state = VcpuState.decode(
            state_codec.section(sections, f"cpu{vcpu.index}"), events=machine.has_vcpu_events
        )
        vcpu_state.check_fits(vcpu, state)
        cpus.append(state)
    affinities = [_affinity(vcpu, cpu) for vcpu, cpu in zip(machine.vcpus, cpus, strict=True)]
    gic = GicState.decode(state_codec.section(sections, "gic"), affinities)
    uart = machine.uart.decode_state(state_codec.section(sections, "uart"))
    transports = tuple(
        transport.decode_state(state_codec.section(sections, f"virtio{index}"))
        for index, transport in enumerate(machine.transports)
    )
    return MachineState(tuple(cpus), gic, uart, transports)


def _affinity(vcpu: Vcpu, state: VcpuState) -> int:
    """The vCPU's affinity once ``state`` is loaded: the saved MPIDR_EL1's, or its own."""
    saved = dict(state.registers).get(gic_state.MPIDR_EL1)
    if saved is None:
        return gic_state.mpidr_of(vcpu)
    return gic_state.affinity(int.from_bytes(saved, "little"))


def apply(machine: Machine, state: MachineState) -> None:
    """Write a state :func:`decode` checked against ``machine`` (nothing is refused)."""
    for vcpu, cpu in zip(machine.vcpus, state.cpus, strict=True):
        vcpu_state.load(vcpu, cpu)
    gic_state.load(machine.gic, state.gic)
    machine.uart.apply_state(state.uart)
    for transport, saved in zip(machine.transports, state.transports, strict=True):
        transport.apply_state(saved)
    for transport in machine.transports:
        transport.serve_queues()  # a kick pending in an eventfd at the save is not state


def load(machine: Machine, data: bytes) -> None:
    """Put a saved state into ``machine`` (built without a kernel, RAM already restored).

    All or nothing: :func:`decode` checks every section before :func:`apply`
    writes any.
    """
    apply(machine, decode(machine, data))
