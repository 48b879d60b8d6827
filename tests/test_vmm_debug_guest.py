"""GDB run control over a real guest: the reference VMM under KVM (arm64-kernel lane).

The guest's MTE probe tags a page and then spins, as the running task,
until a debugger writes a release word into that page. Over the Remote
Serial Protocol the test stops the guest, finds the vCPU running the probe,
reads its registers and the page's bytes and allocation tags by the
probe's *virtual* address, single-steps it, stops it on a hardware and on a
software breakpoint, releases it by writing memory, and detaches; the guest
then finds its tags and bytes unchanged and powers off.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import guestmem as gm
from conftest import LANE
from test_vmm_boot import APPEND, DONE, READY, Console, UnixClient, guest_file
from test_vmm_debug import Client

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        LANE != "arm64-kernel",
        reason="needs /dev/kvm with MTE and a guest kernel: the arm64-kernel lane runs these",
    ),
]

RELEASE_OFFSET, RELEASE = 2048, 0x60D60D  # tests/guest/mte_probe.c
PC = 32


def registers(client: Client, tid: int) -> list[int]:
    assert client.ask(b"Hg%x" % tid) == b"OK"
    raw = bytes.fromhex(client.ask(b"g").decode())
    return [int.from_bytes(raw[8 * i : 8 * i + 8], "little") for i in range(33)]


def is_user(address: int) -> bool:
    return address < 1 << 48


def stop_reply(client: Client) -> dict[bytes, bytes]:
    reply = client.reply()
    assert reply[:1] == b"T", reply
    fields = dict(f.split(b":", 1) for f in reply[3:].split(b";") if b":" in f)
    return {b"signal": reply[1:3], **fields}


def find_the_probe(client: Client, cpus: int) -> tuple[int, int]:
    """The thread whose pc is in user space (the spinning probe), and that pc."""
    for _ in range(30):
        for tid in range(1, cpus + 1):
            pc = registers(client, tid)[PC]
            if is_user(pc):
                return tid, pc
        client.send(b"c")  # let it run a little, then stop it again
        time.sleep(0.3)
        client.sock.sendall(b"\x03")
        assert stop_reply(client)[b"signal"] == b"02"
    pytest.fail("no vCPU was running the probe in user space")


@pytest.mark.parametrize("tags", [gm.TagMode.HARDWARE, gm.TagMode.KVM], ids=lambda m: m.name)
def test_gdb_stops_steps_and_breaks_the_guest_and_reads_its_tags_by_virtual_address(
    tags: gm.TagMode, tmp_path: Path
) -> None:
    from guestmem.gdbstub import GuestDebugServer
    from guestmem.vmm.machine import Machine, MachineConfig, Outcome
    from guestmem.vmm.run_control import KvmRunControl
    from guestmem.vmm.vcpu import install_kick_handler

    kernel, initrd = guest_file("GUESTMEM_GUEST_KERNEL"), guest_file("GUESTMEM_GUEST_INITRD")
    console = Console()
    config = MachineConfig(
        kernel, APPEND + " probe.wait=memory", initrd, memory=256 << 20, cpus=2, tags=tags
    )
    install_kick_handler()
    with Machine(config, console.write) as machine:
        assert machine.memory is not None
        outcome: list[Outcome] = []
        runner = threading.Thread(target=lambda: outcome.append(machine.run()), daemon=True)
        runner.start()
        where = str(tmp_path / "gdb.sock")
        server = GuestDebugServer(machine.memory, KvmRunControl(machine), unix_path=where)
        serving = threading.Thread(target=server.serve, daemon=True)
        serving.start()
        try:
            ready = console.wait_for(READY)
            va, granules = int(ready[1], 16), int(ready[3])
            expected_tags = bytes(int(c, 16) for c in ready[4].decode())
            client = UnixClient(where)
            assert b"hwbreak+" in client.ask(b"qSupported:swbreak+;hwbreak+")
            assert client.ask(b"?")[:1] == b"T"
            assert client.ask(b"qfThreadInfo") == b"m1,2"
            tid, pc = find_the_probe(client, 2)

            # Memory and tags through the probe's own virtual address.
            data = bytes.fromhex(client.ask(b"m%x,%x" % (va, 32)).decode())
            assert data == b"\x40" * 16 + b"\x41" * 16
            tag_reply = client.ask(b"qMemTags:%x,%x:1" % (va, granules * 16))
            assert tag_reply[:1] == b"m" and bytes.fromhex(tag_reply[1:].decode()) == expected_tags
            tagged_va = va | expected_tags[1] << 56 | 16  # a tagged pointer to granule 1
            assert bytes.fromhex(client.ask(b"m%x,10" % tagged_va).decode()) == b"\x41" * 16

            # One instruction on the probe's vCPU alone: the next one of its
            # loop, or, if an interrupt was pending, the kernel's vector (KVM
            # does not mask interrupts for a single step).
            client.send(b"vCont;s:%x" % tid)
            stepped = stop_reply(client)
            assert stepped[b"signal"] == b"05" and int(stepped[b"thread"], 16) == tid
            after = registers(client, tid)[PC]
            assert after != pc and (not is_user(after) or abs(after - pc) <= 64)

            # A hardware breakpoint at the loop's pc is hit as the loop comes round.
            assert client.ask(b"Z1,%x,4" % pc) == b"OK"
            client.send(b"c")
            hit = stop_reply(client)
            assert b"hwbreak" in hit and registers(client, int(hit[b"thread"], 16))[PC] == pc
            assert client.ask(b"z1,%x,4" % pc) == b"OK"

            # A software breakpoint: BRK written through the DEBUG route, taken out again.
            ipa_word = client.ask(b"m%x,4" % pc)
            assert client.ask(b"Z0,%x,4" % pc) == b"OK"
            client.send(b"c")
            hit = stop_reply(client)
            assert b"swbreak" in hit and registers(client, int(hit[b"thread"], 16))[PC] == pc
            assert client.ask(b"z0,%x,4" % pc) == b"OK"
            assert client.ask(b"m%x,4" % pc) == ipa_word

            # Release the probe by writing its page, and let the guest go.
            release = RELEASE.to_bytes(4, "little").hex().encode()
            assert client.ask(b"M%x,4:%s" % (va + RELEASE_OFFSET, release)) == b"OK"
            assert client.ask(b"D") == b"OK"
            client.close()
            done = console.wait_for(DONE)
            assert done[1] == b"yes", "the guest's tags or bytes changed under the debugger"
        except BaseException:
            machine.stop("error", "the test failed")
            raise
        finally:
            runner.join(timeout=300)
            server.close()
            serving.join(timeout=30)
    assert [o.reason for o in outcome] == ["power-off"], (outcome, console.text)
