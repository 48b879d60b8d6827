"""A paused machine's state beside its RAM: vCPUs, vGIC, timers, UART and virtio devices.

:func:`save` runs inside :meth:`Machine.paused` (no vCPU in KVM_RUN, no
device handler serving); :func:`load` into a machine built from the same
configuration (no kernel loaded) whose RAM already holds the saved pages,
before it runs. Each stateful part of the machine has the same shape
(:class:`~guestmem.saved_state.Stateful`: save, a decode that checks and
changes nothing, apply) and is one section of the state, in this order
(:func:`sections` lists them from the machine's parts; :mod:`state_codec`
frames them):

``machine``
    :class:`Description`: what must match: RAM base and size, vCPU count,
    the devices' ids in transport order (the tag mode may differ: a
    HARDWARE source may go to a KVM target, the stream carries the tags
    either way).
``cpu<N>``
    :class:`~guestmem.vmm.vcpu_state.VcpuPart` (registers, timers, power
    state, pending events).
``gic``
    :class:`~guestmem.vmm.gic_state.GicPart`, whose affinities are checked
    against the vCPU sections before it.
``uart``, ``virtio<N>``
    each device's own payload (the PL011's, each virtio-mmio transport's).

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import guestmem as gm
from guestmem.saved_state import Reader, StateError, Stateful, Writer
from guestmem.vmm import layout, state_codec
from guestmem.vmm.gic_state import GicPart
from guestmem.vmm.vcpu_state import VcpuPart, VcpuState

if TYPE_CHECKING:
    from guestmem.vmm.machine import Machine

VERSION = 1
# The tag modes a VMM's RAM may have (machine.TAG_MODES), as the description's byte.
SOURCE_TAG_MODES = {list(gm.TagMode).index(m): m for m in (gm.TagMode.HARDWARE, gm.TagMode.KVM)}
Earlier = Mapping[str, object]  # the values of the sections decoded so far, by name


def _nothing() -> None:
    """What a section does once every section is applied, if nothing."""


@dataclass(frozen=True)
class Section:
    """One section of a machine's state: its name and how its part saves, decodes, applies it.

    ``decode`` also sees the values of the sections decoded before it
    (:data:`Earlier`): the vGIC's affinities are checked against the vCPUs'
    to be loaded. ``settle`` runs once every section is applied.
    """

    name: str
    save: Callable[[], bytes]
    decode: Callable[[Reader, Earlier], object]
    apply: Callable[[Any], None]
    settle: Callable[[], None] = _nothing

    @classmethod
    def of(cls, name: str, part: Stateful[Any], settle: Callable[[], None] = _nothing) -> Section:
        """The section ``name`` of a part whose decode needs no other section."""
        return cls(
            name,
            part.save_state,
            lambda reader, _earlier: part.decode_state(reader),
            part.apply_state,
            settle,
        )


@dataclass(frozen=True)
class MachineState:
    """A machine's state, decoded and checked against a target, not written yet.

    Each section's decoded value, in the order of the state.
    """

    values: tuple[tuple[Section, object], ...]


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


class Description:
    """The ``machine`` section as a stateful part: what a target must be to take the state.

    Its decode checks, its apply has nothing to write.
    """

    def __init__(self, machine: Machine) -> None:
        """The description of ``machine``."""
        self.machine = machine

    def save_state(self) -> bytes:
        """The section's payload (:func:`describe`)."""
        return describe(self.machine)

    def decode_state(self, reader: Reader) -> None:
        """Refuse a description that is not the machine's (:func:`check_description`)."""
        check_description(self.machine, reader)

    def apply_state(self, state: None) -> None:
        """Nothing: a description is checked, not written."""

    def load_state(self, data: bytes) -> None:
        """Check ``data`` against the machine: a StateError if it is not the machine's."""
        self.decode_state(Reader(data))


def sections(machine: Machine) -> list[Section]:
    """The machine's stateful parts as the sections of its state, in the state's order."""
    cpus = [VcpuPart(vcpu, events=machine.has_vcpu_events) for vcpu in machine.vcpus]
    gic = GicPart(machine.gic, machine.vcpus)

    def decode_gic(reader: Reader, earlier: Earlier) -> object:
        return gic.decode_state(reader, [cast(VcpuState, earlier[cpu.section]) for cpu in cpus])

    return [
        Section.of("machine", Description(machine)),
        *(Section.of(cpu.section, cpu) for cpu in cpus),
        Section(gic.section, gic.save_state, decode_gic, gic.apply_state),
        Section.of("uart", machine.uart),
        *(
            # a kick pending in an eventfd at the save is not state
            Section.of(f"virtio{index}", transport, settle=transport.serve_queues)
            for index, transport in enumerate(machine.transports)
        ),
    ]


def save(machine: Machine) -> bytes:
    """The machine's whole state but RAM (call inside ``machine.paused()``)."""
    return state_codec.encode([(section.name, section.save()) for section in sections(machine)])


def decode(machine: Machine, data: bytes) -> MachineState:
    """Decode ``data`` and check every section against ``machine``, writing nothing.

    Reads the target's vCPUs (their register lists, ID registers and
    affinities); StateError, at its offset in ``data``, for anything
    corrupt, truncated or not this machine's.
    """
    readers = state_codec.decode(data)
    parts = sections(machine)
    names = {section.name for section in parts}
    for name, reader in readers.items():
        if name not in names:
            raise StateError(reader.offset, f"section {name!r} is not this machine's")
    earlier: dict[str, object] = {}
    for section in parts:
        earlier[section.name] = section.decode(state_codec.section(readers, section.name), earlier)
    return MachineState(tuple((section, earlier[section.name]) for section in parts))


def apply(machine: Machine, state: MachineState) -> None:
    """Write a state :func:`decode` checked against ``machine`` (nothing is refused).

    Every section in the state's order, then each one's ``settle``.
    """
    for section, value in state.values:
        section.apply(value)
    for section, _ in state.values:
        section.settle()


def load(machine: Machine, data: bytes) -> None:
    """Put a saved state into ``machine`` (built without a kernel, RAM already restored).

    All or nothing: :func:`decode` checks every section before :func:`apply`
    writes any.
    """
    apply(machine, decode(machine, data))
