"""The captured nvme strict-mode request stream: the corpus, and its replay through the ring.

The corpus (tests/data/nvme_strict_stream.txt.gz) is what tests/stream_capture.py
recorded from QEMU 7.2's virtio-iommu trace events while Linux 6.12's nvme
driver did direct I/O under iommu.strict=1; tests/bench_stream.py replays it.
No timing here: the replay test checks that the relay answers every request
of a real driver OK and ends with nothing mapped, on both backends.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stream_capture import (  # noqa: E402
    DEFAULT_CORPUS,
    MAP,
    UNMAP,
    Op,
    check_stream,
    close_stream,
    parse_trace,
    read_corpus,
    write_corpus,
)


def _size(op: Op) -> int:
    return op.virt_end - op.virt_start + 1


def test_the_corpus_parses_with_enough_maps_and_balanced_unmaps() -> None:
    ops = read_corpus(DEFAULT_CORPUS)
    maps = [op for op in ops if op.op == MAP]
    unmaps = [op for op in ops if op.op == UNMAP]
    assert len(maps) >= 15_000
    assert len({op.domain for op in ops}) == 1, "one endpoint's domain"
    # Every request is one the device accepts: no MAP over a live mapping,
    # no UNMAP splitting one or removing nothing (check_stream raises).
    left = check_stream(ops)
    # Balanced: what is left mapped is the nvme driver's few long-lived
    # coherent buffers (queues, PRP pools), and the UNMAPs removed every
    # other byte the MAPs mapped.
    assert len(left) <= 16, left
    assert sum(map(_size, unmaps)) == sum(map(_size, maps)) - sum(map(_size, left.values()))
    assert check_stream(ops + close_stream(ops)) == {}
    # A real driver's stream: page-granular and page-aligned, mostly single
    # pages, some multi-page MAPs and some UNMAPs spanning several MAPs.
    assert all(op.virt_start % 4096 == 0 and _size(op) % 4096 == 0 for op in ops)
    assert all(op.phys_start % 4096 == 0 and op.flags in (1, 2, 3) for op in maps)
    assert sum(_size(op) == 4096 for op in maps) > len(maps) // 2
    assert any(_size(op) > 4096 for op in maps)
    assert len(unmaps) < len(maps), "some UNMAPs cover several MAPs (scatter-gather)"


def test_trace_lines_parse_into_the_endpoints_requests(tmp_path: Path) -> None:
    # QEMU 7.2's log trace backend, hw/virtio/trace-events formats.
    trace = """\
virtio_iommu_attach domain=0 endpoint=24
virtio_iommu_attach domain=3 endpoint=16
virtio_iommu_map domain=0 virt_start=0x1000 virt_end=0x1fff phys_start=0x5000 flags=3
virtio_iommu_map domain=3 virt_start=0xfffff000 virt_end=0xffffffff phys_start=0x3d5b8000 flags=3
virtio_iommu_get_endpoint ep=16
12345@1700000000.000001:virtio_iommu_map domain=3 virt_start=0xffffd000 virt_end=0xffffefff phys_start=0x2880000 flags=2
virtio_iommu_unmap domain=3 virt_start=0xffffd000 virt_end=0xffffefff
virtio_iommu_unmap domain=0 virt_start=0x1000 virt_end=0x1fff
""".splitlines()
    ops = parse_trace(trace, endpoint=16)
    assert ops == [
        Op(MAP, 3, 0xFFFFF000, 0xFFFFFFFF, 0x3D5B8000, 3),
        Op(MAP, 3, 0xFFFFD000, 0xFFFFEFFF, 0x2880000, 2),
        Op(UNMAP, 3, 0xFFFFD000, 0xFFFFEFFF),
    ]
    path = tmp_path / "s.txt.gz"
    write_corpus(path, ops, ["a header"])
    assert read_corpus(path) == ops
    assert gzip.open(path, "rt").readline() == "# a header\n"
    assert close_stream(ops) == [Op(UNMAP, 3, 0xFFFFF000, 0xFFFFFFFF)]


@pytest.mark.parametrize(
    ("ops", "why"),
    [
        ([Op(MAP, 1, 0x1000, 0x2FFF, 0, 3), Op(MAP, 1, 0x2000, 0x2FFF, 0, 3)], "overlaps"),
        ([Op(MAP, 1, 0x1000, 0x2FFF, 0, 3), Op(UNMAP, 1, 0x1000, 0x1FFF)], "splits"),
        ([Op(UNMAP, 1, 0x1000, 0x1FFF)], "removes nothing"),
    ],
)
def test_check_stream_names_what_the_device_would_refuse(ops: list[Op], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_stream(ops)


@pytest.mark.vfio(edu=1, iommufd=True)
@pytest.mark.parametrize("backend", ["type1", "iommufd"])
def test_replay_through_the_ring_answers_every_request_ok(edu_bdfs: list[str], backend: str) -> None:
    from bench_stream import Replay, load_stream, statuses

    if backend == "iommufd":
        from hostrelay.kernel import iommufd

        if not iommufd.AVAILABLE or not Path("/dev/iommu").exists():
            pytest.skip("no iommufd here (the --iommufd testbed kernel and a build with its uapi have it)")
    stream = load_stream(limit=3000)
    assert stream.maps > 1000
    replay = Replay(edu_bdfs[0], backend, stream, batch=64)
    try:
        for _ in range(2):  # the second pass starts from what the first left: nothing
            replay.raw()  # checks the kernel's space is empty afterwards
            _, refused = replay.ring()  # idem, and the relay's table
            assert refused == 0, statuses(replay)
            assert statuses(replay) == {0: len(stream.ops)}  # every reply VIRTIO_IOMMU_S_OK
            assert replay.relay.mapping_count(1) == 0
            replay.check_kernel_empty("the test")
    finally:
        replay.close()
