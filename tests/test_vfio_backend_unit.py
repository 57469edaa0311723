"""Fast checks of the VFIO backend against a stateful fake of the kernel seam.

Not the proof (tests/test_vfio_relay.py runs the real kernel); these pin the
relay-side bookkeeping: splitting, limits before the ioctl, rollback, config.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostrelay import GuestMemory, Relay
from hostrelay.kernel import ioctl as k
from hostrelay.kernel.errors import vfio_error
from fake_vfio import fake_vfio_host
from hostrelay.model.wire import TAIL_SIZE, AttachRequest, MapRequest, ResvMemType, Status, UnmapRequest

PAGE = 0x1000
MIB = 1 << 20
BDFS = {"0000:00:03.0": 5, "0000:00:04.0": 6, "0000:00:04.1": 6}


class FakeKernel:
    """type1v2 as the relay relies on it: per-container vfio_dma list, entry limit, bisect rule."""

    def __init__(self, limit: int = 8) -> None:
        self.dmas: dict[int, dict[int, int]] = {}  # container fd -> iova -> size
        self.limit = limit
        self.fail_fd: int | None = None
        self.calls = 0

    def iommu_get_info(self, fd: int, path: str | None = None) -> Any:
        return 1, 0x40201000, [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)], self.limit - len(self.dmas.get(fd, {})), False

    def map_dma(self, fd: int, iova: int, size: int, vaddr: int, flags: int, path: str | None = None) -> None:
        self.calls += 1
        d = self.dmas.setdefault(fd, {})
        if fd == self.fail_fd:
            raise vfio_error(errno.EIO, "VFIO_IOMMU_MAP_DMA", fd=fd)
        if any(s < iova + size and iova < s + n for s, n in d.items()):
            raise vfio_error(errno.EEXIST, "VFIO_IOMMU_MAP_DMA", fd=fd)
        if len(d) >= self.limit:
            raise vfio_error(errno.ENOSPC, "VFIO_IOMMU_MAP_DMA", fd=fd)
        d[iova] = size

    def unmap_dma(self, fd: int, iova: int, size: int, flags: int = 0, path: str | None = None) -> int:
        d = self.dmas.setdefault(fd, {})
        if flags:
            total = sum(d.values())
            d.clear()
            return total
        end = iova + size
        if any(s < iova < s + n or s < end < s + n for s, n in d.items()):
            raise vfio_error(errno.EINVAL, "VFIO_IOMMU_UNMAP_DMA", fd=fd)
        gone = [s for s, n in d.items() if iova <= s and s + n <= end]
        return sum(d.pop(s) for s in gone)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeKernel, Path, Path]]:
    kern = FakeKernel()
    reserved = "0x00000000fee00000 0x00000000feefffff msi\n0x00000000000a0000 0x00000000000bffff direct\n"
    dev, sysfs = fake_vfio_host(tmp_path, monkeypatch, BDFS, kern, ("iommu_get_info", "map_dma", "unmap_dma"),
                                reserved=reserved)  # fmt: skip
    yield kern, dev, sysfs


def send(r: Relay, req: AttachRequest | MapRequest | UnmapRequest) -> Status:
    return Status(r.handle_request(req.pack(), TAIL_SIZE)[0])


def relay(fake: tuple[FakeKernel, Path, Path], mem: GuestMemory, bdfs: list[str], **opts: Any) -> Relay:
    _, dev, sysfs = fake
    r = Relay(mem, bypass=opts.pop("bypass", False), **opts)
    for i, bdf in enumerate(bdfs):
        r.add_vfio_endpoint(i + 1, bdf, dev_root=dev, sysfs_root=sysfs)
    return r


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory() as m:
        m.add_region(0, 4 * MIB)
        m.add_region(4 * MIB, 4 * MIB)
        yield m


def test_config_from_host(fake: tuple[FakeKernel, Path, Path], mem: GuestMemory) -> None:
    r = relay(fake, mem, ["0000:00:03.0"], page_size_mask=1)
    assert r.page_size_mask == 0x40201000
    assert (r.config().input_start, r.config().input_end) == (0, (1 << 39) - 1)
    resv = r.reserved_regions(1)
    assert [(x.subtype, x.start, x.end) for x in resv] == [
        (ResvMemType.MSI, 0xFEE00000, 0xFEEFFFFF),
        (ResvMemType.RESERVED, 0xA0000, 0xBFFFF),
    ]
    r.close()


def test_split_limits_and_siblings(fake: tuple[FakeKernel, Path, Path], mem: GuestMemory) -> None:
    kern = fake[0]
    r = relay(fake, mem, ["0000:00:03.0", "0000:00:04.0", "0000:00:04.1"])
    assert r.vfio_backend(2) is r.vfio_backend(3), "one container per group"
    assert send(r, AttachRequest(1, 2)) == Status.OK
    assert send(r, AttachRequest(2, 3)) == Status.UNSUPP, "group siblings stay together"
    assert send(r, AttachRequest(1, 3)) == Status.OK
    assert send(r, MapRequest(1, 0x100000, 0x101FFF, 4 * MIB - PAGE, 3)) == Status.OK
    fd = r.vfio_backend(2).container.fd
    assert kern.dmas[fd] == {0x100000: PAGE, 0x101000: PAGE}, "split at the region boundary"
    for i in range(6):
        assert send(r, MapRequest(1, 0x200000 + i * PAGE, 0x200FFF + i * PAGE, 0, 3)) == Status.OK
    calls = kern.calls
    assert send(r, MapRequest(1, 0x300000, 0x300FFF, 0, 3)) == Status.NOMEM
    assert kern.calls == calls, "entry limit checked before the ioctl"
    assert send(r, UnmapRequest(1, 0, 1 << 30)) == Status.OK
    assert kern.dmas[fd] == {} and r.vfio_backend(2).stats()["entries"] == 0
    r.close()


def test_fanout_failure_rolls_back_and_reports(fake: tuple[FakeKernel, Path, Path], mem: GuestMemory) -> None:
    kern = fake[0]
    r = relay(fake, mem, ["0000:00:03.0", "0000:00:04.0"])
    assert send(r, AttachRequest(1, 1)) == Status.OK
    assert send(r, AttachRequest(1, 2)) == Status.OK
    kern.fail_fd = r.vfio_backend(2).container.fd
    assert send(r, MapRequest(1, 0x100000, 0x100FFF, 0, 3)) == Status.DEVERR
    assert all(not d for d in kern.dmas.values()) and r.mappings(1) == []
    assert len(r.pop_events()) == 1
    r.close()


def test_bypass_identity(fake: tuple[FakeKernel, Path, Path], mem: GuestMemory) -> None:
    kern = fake[0]
    r = relay(fake, mem, ["0000:00:03.0"], bypass=True)
    fd = r.vfio_backend(1).container.fd
    assert kern.dmas[fd] == {0: 4 * MIB, 4 * MIB: 4 * MIB}
    assert send(r, AttachRequest(1, 1)) == Status.OK
    assert kern.dmas[fd] == {}
    assert send(r, MapRequest(1, 0x1000, 0x1FFF, 0, 3)) == Status.OK
    assert r.stats()["domains"][1] == {"mappings": 1, "containers": 1, "pinned_bytes": PAGE, "charged_bytes": PAGE}
    r.reset()
    assert kern.dmas[fd] == {0: 4 * MIB, 4 * MIB: 4 * MIB}
    r.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_failing_close_still_closes_every_fd(fake: tuple[FakeKernel, Path, Path], mem: GuestMemory) -> None:
    # Two containers, two groups (5 and 6), three devices: seven fds.  Whichever
    # close(2) fails, close() carries on and releases every one of them.
    base = _fds()
    r = relay(fake, mem, ["0000:00:03.0", "0000:00:04.0", "0000:00:04.1"])
    with k.counting():
        r.close()
    n = k.call_counts()[k.Op.CLOSE]
    assert n == 7 and _fds() == base
    for i in range(n):
        r = relay(fake, mem, ["0000:00:03.0", "0000:00:04.0", "0000:00:04.1"])
        with k.inject_failure(k.Op.CLOSE, nth=i, err=errno.EIO) as inj:
            r.close()  # logged, not raised: the fd is gone either way
        assert inj.fired and _fds() == base, f"close {i} failing leaked fds"


def test_a_failed_open_of_an_endpoint_leaks_no_fd(
    fake: tuple[FakeKernel, Path, Path], mem: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _fds()

    def no_info(fd: int, path: str | None = None) -> Any:
        raise vfio_error(errno.EIO, "VFIO_DEVICE_GET_INFO", fd=fd)

    monkeypatch.setattr(k, "device_get_info", no_info)
    with pytest.raises(OSError):
        relay(fake, mem, ["0000:00:03.0"])
    assert _fds() == base, "the device fd (and the group) were closed"
    monkeypatch.setattr(k, "group_get_status", lambda fd, path=None: 0)  # not viable
    with pytest.raises(OSError):
        relay(fake, mem, ["0000:00:03.0"])
    assert _fds() == base, "the group fd was closed"


def test_system_reset_gives_unattached_containers_the_restored_bypass(fake: tuple[FakeKernel, Path, Path],
                                                                      mem: GuestMemory) -> None:  # fmt: skip
    kern = fake[0]
    r = relay(fake, mem, ["0000:00:03.0"], bypass=True)
    fd = r.vfio_backend(1).container.fd
    r.write_config(36, b"\0")
    assert kern.dmas[fd] == {}, "bypass 0: no identity map"
    r.system_reset()  # bypass back to its initial 1 (D-04): the identity map comes back
    assert r.bypass and kern.dmas[fd] == {0: 4 * MIB, 4 * MIB: 4 * MIB}
    r.close()
