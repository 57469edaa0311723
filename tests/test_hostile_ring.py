"""A hostile guest's ring costs the host a bounded amount of memory.

The guest chooses every descriptor length.  A chain may claim gigabytes of
readable or writable guest RAM; no virtio-iommu request is longer than a few
dozen bytes and no reply longer than ``probe_size`` + 4, so the device reads
and writes no more than that, whatever the chain claims.  Peak RSS is measured
in a fresh process (``ru_maxrss`` is a high-water mark: one earlier test that
used memory would hide a regression here).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from hostrelay.relay import MAX_READABLE, MAX_WRITABLE

# What the child runs: a 4 GiB sparse guest, a requestq, and one chain whose
# readable (or writable) part is three descriptors of 1 GiB each.
_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from hostrelay import GuestMemory, Relay
    from hostrelay.model.wire import AttachRequest, MapFlag, MapRequest
    from hostrelay.drivers.virtqueue import DESC_F_NEXT, DESC_F_WRITE, DriverQueue

    kind, big = sys.argv[1], sys.argv[2] == "readable"
    GIB = 1 << 30
    with GuestMemory() as memory:
        memory.add_region(0, 4 * GIB)  # memfd: sparse, costs nothing until touched
        relay = Relay(memory)
        relay.add_endpoint(1)
        q = DriverQueue(memory, 0x100000, 16, data_size=1 << 16)
        relay.set_queue(0, size=q.size, desc=q.desc, avail=q.avail, used=q.used_ring)
        relay.handle_request(AttachRequest(3, 1).pack(), 4)
        req = (AttachRequest(3, 1) if kind == "attach" else MapRequest(3, 0, 0xFFF, 0, int(MapFlag.READ))).pack()
        head = q.alloc(64)
        memory.write(head, req)
        tail = q.alloc(4)
        d = q.reserve(5)
        segs = [(head, len(req), 0)]
        if big:
            segs += [(GIB * (i + 1), GIB, 0) for i in range(3)] + [(tail, 4, DESC_F_WRITE)]
        else:
            segs += [(GIB * (i + 1), GIB, DESC_F_WRITE) for i in range(3)] + [(tail, 4, DESC_F_WRITE)]
        for i, (gpa, n, flags) in enumerate(segs):
            last = i == len(segs) - 1
            q.write_desc(d[i], gpa, n, flags | (0 if last else DESC_F_NEXT), 0 if last else d[i + 1])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        q.publish(d[0])
        done = relay.process_queue()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        (used,) = q.used()
        print(json.dumps({"done": done, "used_len": used.len, "status": memory.read(tail, 1)[0],
                          "grew_kib": after - before, "mappings": relay.mapping_count(3)}))
    """
)


def _run(kind: str, part: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, kind, part], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("kind", ["attach", "map"])  # the Python path and the C path
def test_three_gib_readable_chain_costs_no_memory(kind: str) -> None:
    r = _run(kind, "readable")
    assert r["done"] == 1
    # Readable part longer than any request: INVAL over the whole writable
    # part, exactly as for any other size mismatch; nothing mapped.
    assert r["used_len"] == 4
    assert r["status"] == 4  # VIRTIO_IOMMU_S_INVAL
    assert r["mappings"] == 0
    assert r["grew_kib"] < 4096, f"peak RSS grew by {r['grew_kib']} KiB for one hostile chain"


@pytest.mark.parametrize("kind", ["attach", "map"])
def test_three_gib_writable_chain_is_not_answered(kind: str) -> None:
    r = _run(kind, "writable")
    assert r["done"] == 1
    # A writable part longer than MAX_WRITABLE cannot be a reply: used length
    # 0, nothing written (the tail, the last writable byte range, stays 0).
    assert r["used_len"] == 0
    assert r["status"] == 0
    assert r["mappings"] == 0
    assert r["grew_kib"] < 4096, f"peak RSS grew by {r['grew_kib']} KiB for one hostile chain"


def test_bounds_are_those_of_the_protocol() -> None:
    from hostrelay.model.wire import REQUEST_CLASSES, ProbeRequest

    assert MAX_READABLE == ProbeRequest.readable_size() == 72
    assert all(cls.readable_size() <= MAX_READABLE for cls in REQUEST_CLASSES.values())
    assert MAX_WRITABLE == 64 << 10


def test_a_domain_holds_at_most_default_max_mappings() -> None:
    """Without a limit a guest could grow an emulated domain's table until
    the host runs out of memory; by default it gets NOMEM at 2^20."""
    import struct

    from hostrelay import GuestMemory, Relay
    from hostrelay.model.wire import AttachRequest, MapFlag, MapRequest, Status
    from hostrelay.relay import DEFAULT_MAX_MAPPINGS

    with GuestMemory() as memory:
        memory.add_region(0, 1 << 20)
        relay = Relay(memory)
        relay.add_endpoint(1)
        assert relay.handle_request(AttachRequest(1, 1).pack(), 4) == bytes(4)
        req = bytearray(MapRequest(1, 0, 0xFFF, 0, int(MapFlag.READ)).pack())
        first = 1 << 20  # pages above 4 GiB: clear of the MSI window
        statuses = []
        for i in range(first, first + DEFAULT_MAX_MAPPINGS + 2):
            struct.pack_into("<QQ", req, 8, i << 12, (i << 12) + 0xFFF)
            statuses.append(relay.handle_request(bytes(req), 4)[0])
        assert statuses[:DEFAULT_MAX_MAPPINGS] == [Status.OK] * DEFAULT_MAX_MAPPINGS
        assert statuses[DEFAULT_MAX_MAPPINGS:] == [Status.NOMEM, Status.NOMEM]
        assert relay.mapping_count(1) == DEFAULT_MAX_MAPPINGS
