"""Host reality: what the host's IOMMU allows, turned into config and PROBE properties.

A passed-through device can only be given what its host IOMMU can do, and the
guest must know it before it maps anything: ``page_size_mask`` becomes the
intersection of the host page sizes (narrowed by the configured mask where
that keeps the granule), ``input_range`` the intersection of the configured
range with the span of the usable host IOVA ranges, and each endpoint reports
RESV_MEM for its group's reserved regions and for the holes between the usable
ranges (type1 refuses MAPs there), the MSI window as the MSI subtype.
Everything here is arithmetic on what the backends read from the kernel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hostrelay.model.wire import RESV_MEM_SIZE, U64_MAX, ResvMem, ResvMemType

# x86 MSI doorbell window; reporting it as an MSI region stops the Linux
# virtio-iommu driver from adding its own software MSI window at 0x8000000
# (viommu_get_resv_regions, Linux 5.3+).
DEFAULT_MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)
# The Linux virtio-iommu driver refuses a granule larger than the guest's
# PAGE_SIZE (viommu_domain_finalise, Linux 5.3+), 4 KiB
# on x86 guests.
MAX_GUEST_GRANULE = 0x1000


@dataclass(frozen=True)
class HostIommu:
    """What one host IOMMU unit (a type1 container) reports.

    ``page_sizes`` is the bitmap of IOVA page sizes, ``iova_ranges`` the
    usable inclusive ranges (empty: the kernel reports none, Linux < 5.4),
    ``reserved`` the group's reserved regions as ``(start, end, is_msi)``.
    """

    page_sizes: int
    iova_ranges: tuple[tuple[int, int], ...]
    reserved: tuple[tuple[int, int, bool], ...]


def as_regions(ranges: Iterable[tuple[int, int] | ResvMem], subtype: int) -> list[ResvMem]:
    """``ranges`` as RESV_MEM regions of ``subtype`` (checked)."""
    out = []
    for r in ranges:
        region = r if isinstance(r, ResvMem) else ResvMem(subtype, int(r[0]), int(r[1]))
        if not 0 <= region.start <= region.end <= U64_MAX:
            raise ValueError(f"bad reserved region [{region.start:#x}, {region.end:#x}]")
        out.append(region)
    return out


def union(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge inclusive intervals into disjoint sorted ones (touching ones join)."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def subtract(intervals: Iterable[tuple[int, int]], holes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive ``intervals`` minus every interval of ``holes``."""
    out = []
    for s, e in intervals:
        pieces = [(s, e)]
        for hs, he in holes:
            nxt = []
            for ps, pe in pieces:
                if he < ps or hs > pe:
                    nxt.append((ps, pe))
                    continue
                if ps < hs:
                    nxt.append((ps, hs - 1))
                if he < pe:
                    nxt.append((he + 1, pe))
            pieces = nxt
        out += pieces
    return out


def check_disjoint(regions: Sequence[ResvMem]) -> None:
    """Refuse overlapping regions (D-43) and more than one MSI region (D-42)."""
    ordered = sorted(regions, key=lambda r: r.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start <= a.end:
            raise ValueError(f"reserved regions overlap: {a} and {b}")
    if sum(1 for r in regions if r.subtype == ResvMemType.MSI) > 1:
        raise ValueError("more than one MSI region")


class HostReality:
    """The configured limits and reserved regions, and what the host narrows them to."""

    def __init__(self, *, page_size_mask: int, input_range: tuple[int, int], probe_size: int | None,
                 msi_window: tuple[int, int] | None, reserved_regions: Iterable[tuple[int, int]]) -> None:  # fmt: skip
        self.page_size_mask = page_size_mask
        self.input_range = (input_range[0], input_range[1])
        self.probe_size = probe_size  # None: no PROBE, so any number of regions fits
        self.user_reserved = as_regions(reserved_regions, ResvMemType.RESERVED)
        resv: list[ResvMem] = []
        if msi_window is not None:
            resv += as_regions([msi_window], ResvMemType.MSI)
        resv += self.user_reserved
        check_disjoint(resv)
        self.check_fits(resv)
        # Every endpoint's regions: the MSI window first, as QEMU lists it.
        self.common = tuple(sorted(resv, key=lambda r: (r.subtype != ResvMemType.MSI, r.start)))

    def check_fits(self, regions: Sequence[ResvMem]) -> None:
        """Refuse more RESV_MEM properties than PROBE's ``probe_size`` holds."""
        if self.probe_size is not None and len(regions) * RESV_MEM_SIZE > self.probe_size:
            raise ValueError(f"{len(regions)} RESV_MEM properties do not fit probe_size {self.probe_size}")

    def emulated_regions(self, reserved: Iterable[tuple[int, int]]) -> tuple[ResvMem, ...]:
        """An emulated endpoint's regions: the common ones plus its own RESERVED ones."""
        regions = list(self.common) + as_regions(reserved, ResvMemType.RESERVED)
        check_disjoint(regions)
        self.check_fits(regions)
        return tuple(regions)

    def config(self, hosts: Sequence[HostIommu]) -> tuple[int, tuple[int, int]]:
        """``page_size_mask`` and ``input_range`` for these host IOMMUs (Linux >= 5.4 reports ranges)."""
        sizes = U64_MAX
        start, end = self.input_range
        for h in hosts:
            sizes &= h.page_sizes
            if h.iova_ranges:
                start = max(start, min(s for s, _ in h.iova_ranges))
                end = min(end, max(e for _, e in h.iova_ranges))
        if not sizes:
            raise ValueError("the host IOMMUs have no page size in common")
        granule = sizes & -sizes
        if granule > MAX_GUEST_GRANULE:
            raise ValueError(
                f"host IOMMU granule {granule:#x} is larger than {MAX_GUEST_GRANULE:#x}: "
                "an x86 guest's virtio-iommu driver cannot use it"
            )
        narrowed = sizes & self.page_size_mask
        mask = narrowed if narrowed and narrowed & -narrowed == granule else sizes
        if start > end:
            raise ValueError("the host IOMMUs have no usable IOVA range in common with input_range")
        return mask, (start, end)

    def regions(self, host: HostIommu, input_range: tuple[int, int]) -> tuple[ResvMem, ...]:
        """RESV_MEM regions of an endpoint behind ``host``: configured + host reserved + range holes."""
        lo, hi = input_range
        msi = [(r.start, r.end) for r in self.common if r.subtype == ResvMemType.MSI]
        msi += [(s, e) for s, e, is_msi in host.reserved if is_msi]
        reserved = [(r.start, r.end) for r in self.user_reserved]
        reserved += [(s, e) for s, e, is_msi in host.reserved if not is_msi]
        ranges = sorted(host.iova_ranges)
        # Holes between usable ranges: type1 refuses MAPs there (EINVAL).
        reserved += [(a[1] + 1, b[0] - 1) for a, b in zip(ranges, ranges[1:]) if b[0] > a[1] + 1]
        msi_u = union(msi)
        if len(msi_u) > 1:  # D-42: one MSI property per endpoint; the rest stays reserved
            reserved += msi_u[1:]
            msi_u = msi_u[:1]
        clipped = [(max(s, lo), min(e, hi)) for s, e in union(reserved) if s <= hi and e >= lo]
        out = [ResvMem(ResvMemType.MSI, s, e) for s, e in msi_u]
        out += [ResvMem(ResvMemType.RESERVED, s, e) for s, e in subtract(clipped, msi_u)]
        check_disjoint(out)
        self.check_fits(out)
        return tuple(out)
