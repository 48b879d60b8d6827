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

:func:`load` decodes and checks every section before it writes anything;
what KVM then refuses (it should not, on the same kernel) leaves the target
unfit to run, and the target is a fresh process that exits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guestmem.vmm import gic_state, layout, state_codec, vcpu_state
from guestmem.vmm.state_codec import Reader, StateError, Writer

if TYPE_CHECKING:
    from guestmem.vmm.machine import Machine

VERSION = 1


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
    """Refuse a ``machine`` section that does not describe ``machine`` (tag mode aside)."""
    reader.version("the machine", VERSION)
    reader.expect("the RAM base", reader.u64(), layout.RAM)
    reader.expect("the RAM size", reader.u64(), machine.config.memory)
    reader.expect("the vCPU count", reader.u32(), machine.config.cpus)
    reader.u8("the tag mode")
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


def load(machine: Machine, data: bytes) -> None:
    """Put a saved state into ``machine`` (built without a kernel, RAM already restored)."""
    sections = state_codec.decode(data)
    check_description(machine, state_codec.section(sections, "machine"))
    cpus = []
    for vcpu in machine.vcpus:
        state = vcpu_state.VcpuState.decode(state_codec.section(sections, f"cpu{vcpu.index}"))
        if bool(state.events) != machine.has_vcpu_events:
            raise StateError(0, f"vCPU {vcpu.index}: pending events saved by one KVM, not both")
        vcpu_state.check_fits(vcpu, state)
        cpus.append(state)
    gic = gic_state.GicState.decode(state_codec.section(sections, "gic"), len(machine.vcpus))
    devices = [("uart", machine.uart)] + [
        (f"virtio{index}", transport) for index, transport in enumerate(machine.transports)
    ]
    known = {"machine", "gic", *(f"cpu{v.index}" for v in machine.vcpus), *(n for n, _ in devices)}
    if set(sections) != known:
        raise StateError(0, f"sections {sorted(set(sections) - known)} are not this machine's")
    payloads = [(part, state_codec.section(sections, name).whole()) for name, part in devices]
    for vcpu, state in zip(machine.vcpus, cpus, strict=True):
        vcpu_state.load(vcpu, state)
    gic_state.load(machine.gic, machine.vcpus, gic)
    for part, payload in payloads:
        part.load_state(payload)
    for transport in machine.transports:
        transport.serve_queues()  # a kick pending in an eventfd at the save is not state
