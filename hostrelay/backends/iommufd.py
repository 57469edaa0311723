"""The iommufd backend: one kernel address space (IOAS) per guest domain.

With VFIO device cdevs and ``/dev/iommu`` (Linux >= 6.6 ``CONFIG_IOMMUFD`` +
``CONFIG_VFIO_DEVICE_CDEV``) a guest domain is one IOAS that every device of
the domain is attached to, instead of one type1 container per group:

- MAP is one ``IOMMU_IOAS_MAP`` (fixed IOVA) and UNMAP one ``IOMMU_IOAS_UNMAP``
  whatever the number of devices; the kernel shares one hardware page table
  among them where the IOMMU allows (the page-table id each attach returns
  says so), and pins and charges each page once per IOAS.
- ATTACH of an attached device to another domain is a *replace*
  (``VFIO_DEVICE_ATTACH_IOMMUFD_PT`` on an attached device, Linux >= 6.9):
  the device goes from the old page table to the new one in one step, so
  there is no moment where it reaches neither domain, and nothing is
  replayed.  A failed replace leaves the old attachment in place
  (``iommufd_device_replace``, Linux 6.12).
- DETACH is ``VFIO_DEVICE_DETACH_IOMMUFD_PT``: the kernel puts the group in
  its blocking domain (VFIO claimed DMA ownership at bind, so
  ``iommu_detach_group`` falls back to ``group->blocking_domain``, Linux
  6.12), so the device reaches nothing.  Chosen over an empty IOAS because a
  detach cannot fail for lack of memory and needs no page table of its own.
- Bypass (a bypass domain, or config ``bypass`` for unattached endpoints):
  one identity IOAS (guest RAM at IOVA = GPA) that every such device shares,
  pinned once.

IOASes live only while a device is attached to them: the last device leaving
one destroys it (``IOMMU_DESTROY`` unmaps and unpins what it held), so what
is pinned is what some device can reach.

:class:`IommufdAddressSpace` is the :class:`~hostrelay.model.ports.HostAddressSpace`
of a relay: it serves the iommufd groups itself and hands every other backend
(type1 containers, a VMM's own) to the :class:`~hostrelay.backends.fanout.FanOutAddressSpace`
it wraps, so one domain may hold both kinds.

Accounting (Linux 6.12 ``drivers/iommu/iommufd/pages.c`` and
``io_pagetable.c``): a process with CAP_IPC_LOCK is not charged; otherwise
every ``IOMMU_IOAS_MAP`` creates its own pinned-pages object, charged to
``user->locked_vm`` (per user, the default ``IOMMU_OPTION_RLIMIT_MODE`` 0)
or, in per-process mode (mode 1, settable with CAP_SYS_RESOURCE), to
``mm->locked_vm`` (``VmLck``), the counter type1 charges too.  The relay
asks for per-process mode when it may, so one budget (``VmLck`` against
``RLIMIT_MEMLOCK``) predicts both kernels; in per-user mode it can only count
its own charges.  Either way a page is charged once per IOAS, not once per
device.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hostrelay._native import ffi, lib
from hostrelay.backends.fanout import FanOutAddressSpace
from hostrelay.backends.memory import GuestMemory
from hostrelay.backends.space import MappedSpace
from hostrelay.backends.type1 import (
    HostReserved,
    MemlockBudget,
    has_cap_ipc_lock,
    has_capability,
    read_reserved_regions,
)
from hostrelay.kernel import iommufd as k
from hostrelay.kernel.errors import VfioError
from hostrelay.kernel.vfio import DEFAULT_DEV_ROOT, DEFAULT_SYSFS_ROOT, IovaRange
from hostrelay.model.mapping import Mapping
from hostrelay.model.ports import Backend

if TYPE_CHECKING:
    from collections.abc import Sequence

    from hostrelay.model.topology import Domain

__all__ = ["AVAILABLE", "IoasSpace", "IommufdAddressSpace", "IommufdGroup", "iommufd_usable"]

log = logging.getLogger("hostrelay.relay")

#: True if this build of hostrelay can drive iommufd at all.
AVAILABLE = k.AVAILABLE

U64_MAX = (1 << 64) - 1
CAP_SYS_RESOURCE = 24  # include/uapi/linux/capability.h

#: ``report(backend, exc, what, address, write=...)``: a backend refused a step.
Report = Callable[..., None]


def iommufd_usable(bdf: str, *, dev_root: Path = DEFAULT_DEV_ROOT, sysfs_root: Path = DEFAULT_SYSFS_ROOT,
                   iommu: Path = k.DEFAULT_IOMMU) -> str | None:  # fmt: skip
    """``None`` if ``bdf`` can be driven through iommufd here, else why not (for ``backend="auto"``)."""
    if not AVAILABLE:
        return "this build of hostrelay has no iommufd (its kernel headers lack <linux/iommufd.h>)"
    if not iommu.exists():
        return f"{iommu} does not exist (kernel without CONFIG_IOMMUFD)"
    try:
        name = k.cdev_of(bdf, sysfs_root)
    except VfioError:
        return f"{bdf} has no VFIO device cdev (kernel without CONFIG_VFIO_DEVICE_CDEV, or not bound to vfio-pci)"
    if not (dev_root / "devices" / name).exists():
        return f"{dev_root / 'devices' / name} does not exist"
    return None


class IoasSpace(MappedSpace):
    """One IOAS: a guest domain's mappings, or guest RAM for bypass, for every device attached.

    A :class:`~hostrelay.model.ports.Backend` for the fan-out (replay, MAP and
    UNMAP of domains the C data plane does not serve) and, through ``c``, a
    container of the C data plane (``HR_CONT_IOAS``), which then issues
    ``IOMMU_IOAS_MAP``/``UNMAP`` itself.
    """

    def __init__(self, iommufd: k.Iommufd, memory: GuestMemory, budget: MemlockBudget, label: str) -> None:
        self.memory = memory
        self.budget = budget
        self.ioas = iommufd.ioas()
        self.label = f"{label} (IOAS {self.ioas.id})"
        # iommufd has no per-IOAS entry limit like type1's dma_entry_limit:
        # areas are bounded by memory, which the kernel answers with ENOMEM.
        self.entry_limit = 0xFFFFFFFF
        self.c = ffi.new("struct hr_container *")
        self.c.kind = lib.HR_CONT_IOAS
        self.c.fd = iommufd.fd
        self.c.ioas = self.ioas.id
        self.c.avail = self.entry_limit
        self._identity = None
        self.ranges: tuple[IovaRange, ...] = ()
        self.destroyed = False

    def refresh_ranges(self) -> None:
        """Re-read the usable IOVA ranges: they narrow as devices attach (Linux 6.12 ``iopt_table_add_domain``)."""
        self.ranges, _ = self.ioas.iova_ranges()

    # -- the kernel calls MappedSpace is built on ---------------------------------------
    def _kmap(self, iova: int, size: int, hva: int, *, read: bool, write: bool) -> None:
        self.ioas.map(iova, size, hva, read=read, write=write)

    def _kunmap(self, iova: int, size: int) -> int:
        return self.ioas.unmap(iova, size)

    def _in_ranges(self, iova: int, size: int) -> bool:
        if not self.ranges:
            return True
        end = iova + size - 1
        return any(r.start <= iova and end <= r.end for r in self.ranges)

    def _usable(self) -> list[tuple[int, int]]:
        return [(r.start, r.end) for r in self.ranges]

    def unmap_all(self) -> int:
        """Unmap everything (iova 0, length 2^64 - 1, Linux >= 6.2); return the bytes the kernel removed.

        For inspection and teardown, like type1's ``unmap_all``: the relay's
        tables are not told.
        """
        try:
            got = self.ioas.unmap(0, U64_MAX)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: nothing was mapped (Linux 6.12 iopt_unmap_all)
                raise
            got = 0
        self.budget.account(self.c, -self.entries, -self.charged)
        self._identity = None
        return got

    def destroy(self) -> None:
        """``IOMMU_DESTROY``: the kernel unmaps and unpins everything it held."""
        if self.destroyed:
            return
        self.ioas.destroy()
        self.destroyed = True
        self.budget.account(self.c, -self.entries, -self.charged)
        self._identity = None

    def stats(self) -> dict[str, Any]:
        """Counters of this IOAS (what the kernel holds for it)."""
        return {"ioas": self.ioas.id, "entries": self.entries, "charged_bytes": self.charged,
                "identity_bytes": sum(size for _, size in self.identity_pieces())}  # fmt: skip


class IommufdGroup:
    """The backend of every endpoint of one host IOMMU group, opened through VFIO cdevs.

    Its devices are bound to the relay's iommufd and always attached to the
    same thing (an IOAS, or nothing): a group is the unit of isolation, so it
    moves as one.  It holds no mappings itself: MAP and UNMAP go to the
    IOAS of its domain (:meth:`IommufdAddressSpace.targets`).
    """

    def __init__(self, space: IommufdAddressSpace, group_id: int, *, dev_root: Path = DEFAULT_DEV_ROOT,
                 sysfs_root: Path = DEFAULT_SYSFS_ROOT) -> None:  # fmt: skip
        self.space = space
        self.group_id = group_id
        self.label = f"group {group_id}"
        self.dev_root = dev_root
        self.sysfs_root = sysfs_root
        self.devices: dict[str, k.IommufdDevice] = {}
        self.host_reserved: list[HostReserved] = read_reserved_regions(group_id, sysfs_root)
        self.attached: IoasSpace | None = None
        #: What the group's IOMMU reports: page sizes (from the IOAS alignment)
        #: and usable IOVA ranges, read from a probe IOAS at open.
        self.page_sizes = 0
        self.iova_ranges: tuple[IovaRange, ...] = ()

    # -- devices -------------------------------------------------------------------
    def open_device(self, bdf: str) -> k.IommufdDevice:
        """Open ``bdf``'s cdev, bind it, and attach it where its group is (kept open, as a VMM does)."""
        dev = self.devices.get(bdf)
        if dev is not None:
            return dev
        dev = k.IommufdDevice(bdf, self.space.iommufd(), cdev_root=self.dev_root / "devices", sysfs_root=self.sysfs_root)
        try:
            if not self.devices:
                self._probe(dev)
            if self.attached is not None:
                dev.attach(self.attached.ioas.id)
        except BaseException:
            dev.close()
            raise
        self.devices[bdf] = dev
        return dev

    def _probe(self, dev: k.IommufdDevice) -> None:
        # The IOMMU's limits as iommufd sees them: attach to a scratch IOAS,
        # read its ranges (the intersection of the attached devices', so
        # this group's) and alignment (the smallest page the IOMMU maps;
        # iommufd maps any multiple of it), detach, destroy.
        probe = self.space.iommufd().ioas()
        attached = False
        try:
            dev.attach(probe.id)
            attached = True
            ranges, align = probe.iova_ranges()
            dev.detach()
            attached = False
        finally:
            if attached:
                # The range read or the detach failed: the device is still on
                # the probe, which IOMMU_DESTROY would refuse (EBUSY) in place
                # of the real error.  Closing the device detaches it (the
                # caller closes it on this failure anyway).
                try:
                    dev.close()
                except OSError as exc:
                    log.warning("%s: closing %s: %s", self.label, dev.name, exc)
            self.space.destroy_ioas(probe)
        align = max(align, 1)
        self.page_sizes = ~(align - 1) & U64_MAX
        self.iova_ranges = ranges

    @property
    def pt_ids(self) -> dict[str, int | None]:
        """The hardware page table each device is attached to (``None``: detached)."""
        return {bdf: d.pt_id for bdf, d in self.devices.items()}

    # -- moves (all or nothing) ----------------------------------------------------
    def attach(self, target: IoasSpace) -> None:
        """Every device to ``target``, replacing any attachment; on failure as before."""
        if target is self.attached:
            return
        done: list[k.IommufdDevice] = []
        try:
            for d in self.devices.values():
                d.attach(target.ioas.id)
                done.append(d)
            # Part of the attach: a group is not where it was told to be
            # until the relay knows the ranges it narrowed the IOAS to.
            target.refresh_ranges()
        except BaseException:
            for d in done:
                try:
                    if self.attached is not None:
                        d.attach(self.attached.ioas.id)
                    else:
                        d.detach()
                except Exception:
                    log.exception("%s: could not put %s back", self.label, d.name)
            raise
        self.attached = target

    def detach(self) -> None:
        """Every device reaches nothing (its group's blocking domain)."""
        if self.attached is None:
            return
        for d in self.devices.values():
            d.detach()
        self.attached = None

    def close(self) -> None:
        """Close the device fds: the kernel detaches and unbinds them (Linux 6.12 ``vfio_df_unbind_iommufd``)."""
        first: OSError | None = None
        for d in self.devices.values():
            try:
                d.close()
            except OSError as exc:
                first = first or exc
        self.devices.clear()
        self.attached = None
        if first is not None:
            raise first

    # -- the Backend protocol: never a target ------------------------------------------
    def map(self, mapping: Mapping) -> None:
        """Not used: a domain's mappings go to its IOAS (an :class:`IoasSpace`)."""
        raise TypeError(f"{self.label}: iommufd groups hold no mappings, their domain's IOAS does")

    def unmap(self, mappings: Sequence[Mapping]) -> None:
        """Not used (see :meth:`map`)."""
        raise TypeError(f"{self.label}: iommufd groups hold no mappings, their domain's IOAS does")


class IommufdAddressSpace:
    """Each guest domain as one IOAS for its iommufd groups; other backends fan out as before.

    ``report`` is called for every refusal; ``budget`` returns the relay's
    memlock budget (shared with type1: see the module docstring).
    """

    def __init__(self, fanout: FanOutAddressSpace, memory: GuestMemory, report: Report,
                 budget: Callable[[], MemlockBudget], *, iommu: Path = k.DEFAULT_IOMMU) -> None:  # fmt: skip
        self.fanout = fanout
        self.memory = memory
        self.report = report
        self.budget = budget
        self.iommu_path = iommu
        self._fd: k.Iommufd | None = None
        self.groups: list[IommufdGroup] = []
        self.domains: dict[int, IoasSpace] = {}  # domain id -> its IOAS, while a group is attached
        self.identity: IoasSpace | None = None  # guest RAM at IOVA = GPA, while a group is in bypass
        #: IOASes no device uses whose IOMMU_DESTROY failed: emptied, destroyed at the next collect.
        self.stale: list[k.Ioas] = []
        self.per_process = False

    def iommufd(self) -> k.Iommufd:
        """The relay's ``/dev/iommu``, opened on first use."""
        if self._fd is None:
            fd = k.Iommufd(self.iommu_path)
            if not has_cap_ipc_lock() and has_capability(CAP_SYS_RESOURCE):
                # Charge mm->locked_vm like type1, so one budget predicts
                # both (IOMMU_OPTION_RLIMIT_MODE, Linux >= 6.2).
                try:
                    fd.set_rlimit_mode(True)
                    self.per_process = True
                except OSError as exc:
                    log.warning("iommufd: per-process memlock accounting refused: %s", exc)
            self._fd = fd
        return self._fd

    def add_group(self, group_id: int, *, dev_root: Path, sysfs_root: Path) -> IommufdGroup:
        """The backend of host IOMMU group ``group_id`` (new; the caller opens its devices)."""
        g = IommufdGroup(self, group_id, dev_root=dev_root, sysfs_root=sysfs_root)
        self.groups.append(g)
        return g

    def drop_group(self, group: IommufdGroup) -> None:
        """Forget ``group`` (closed by the caller), and what only it used."""
        if group in self.groups:
            self.groups.remove(group)
        self._collect()

    # -- the HostAddressSpace protocol ------------------------------------------------
    def join(self, domain: Domain, backend: Backend) -> None:
        """``backend`` joins ``domain``: an iommufd group is attached (replaced) to the domain's IOAS."""
        if not isinstance(backend, IommufdGroup):
            self.fanout.join(domain, backend)
            return
        try:
            backend.attach(self._identity() if domain.bypass else self._domain_ioas(domain))
        except BaseException as exc:
            self.report(backend, exc, "ATTACH", 0, write=True)
            raise
        finally:
            self._collect()
        if self.fanout.dirty is not None:
            self.fanout.dirty.exposed(domain, backend)  # the dirty log: it may write there now

    def leave(self, domain: Domain, backend: Backend, *, bypass: bool | None) -> None:
        """``backend`` leaves ``domain``; an iommufd group then follows ``bypass``.

        With ``bypass`` ``None`` (an ATTACH elsewhere follows) the group stays
        where it is until :meth:`join` replaces its attachment, so it never
        reaches neither domain; a failed join is settled by the topology.
        """
        if not isinstance(backend, IommufdGroup):
            self.fanout.leave(domain, backend, bypass=bypass)
            return
        if bypass is None:
            return
        try:
            self.follow(backend, bypass)
        except BaseException as exc:
            self.report(backend, exc, "DETACH", 0, write=True)
            raise
        finally:
            self._collect()

    def settle(self, backend: Backend, bypass: bool) -> None:
        """An unattached ``backend`` follows config ``bypass``; a failure is reported."""
        if not isinstance(backend, IommufdGroup):
            self.fanout.settle(backend, bypass)
            return
        try:
            self.follow(backend, bypass)
        except Exception as exc:
            self.report(backend, exc, "bypass identity attach" if bypass else "detach", 0, write=True)
        finally:
            self._collect()

    def targets(self, domain: Domain) -> tuple[Backend, ...]:
        """The domain's type1 containers (and custom backends), and its IOAS once."""
        out: list[Backend] = [b for b in self.fanout.targets(domain) if not isinstance(b, IommufdGroup)]
        ioas = self.domains.get(domain.id)
        if ioas is not None and not domain.bypass and any(isinstance(b, IommufdGroup) for b in domain.backends):
            out.append(ioas)
        return tuple(out)

    def map(self, domain: Domain, mapping: Mapping, commit: Callable[[], None] = lambda: None) -> None:
        """MAP into every target of ``domain`` (the IOAS once), then ``commit``; all or none."""
        self.fanout.map(domain, mapping, commit)

    def unmap(self, domain: Domain, covered: Sequence[Mapping], address: int) -> None:
        """UNMAP ``covered`` from every target of ``domain``; all or none."""
        self.fanout.unmap(domain, covered, address)

    # -- IOASes ---------------------------------------------------------------------
    def _domain_ioas(self, domain: Domain) -> IoasSpace:
        ioas = self.domains.get(domain.id)
        if ioas is None:
            ioas = IoasSpace(self.iommufd(), self.memory, self.budget(), f"domain {domain.id}")
            try:
                # The domain's mappings so far (an emulated or type1 member
                # made them), before any device can reach the IOAS.
                FanOutAddressSpace.replay(ioas, domain)
            except BaseException:
                self._destroy(ioas)
                raise
            self.domains[domain.id] = ioas
        return ioas

    def _identity(self) -> IoasSpace:
        if self.identity is None:
            ioas = IoasSpace(self.iommufd(), self.memory, self.budget(), "bypass")
            # Guest RAM clipped to what every iommufd group can reach.
            ioas.ranges = _intersect([g.iova_ranges for g in self.groups if g.iova_ranges])
            try:
                ioas.set_identity(True)
            except BaseException:
                self._destroy(ioas)
                raise
            self.identity = ioas
        return self.identity

    def follow(self, group: IommufdGroup, bypass: bool) -> None:
        """An unattached ``group`` to the identity IOAS (``bypass``) or to nothing; raises."""
        if bypass:
            group.attach(self._identity())
            if self.fanout.dirty is not None:
                self.fanout.dirty.exposed(None, group)  # the dirty log: all of guest RAM
        else:
            group.detach()

    def _collect(self) -> None:
        """Destroy every IOAS no group is attached to (what no device reaches stays unpinned)."""
        for old in list(self.stale):
            try:
                old.destroy()
            except OSError:
                continue
            self.stale.remove(old)
        used = {id(g.attached) for g in self.groups if g.attached is not None}
        for dom_id, ioas in list(self.domains.items()):
            if id(ioas) not in used:
                del self.domains[dom_id]
                self._destroy(ioas)
        if self.identity is not None and id(self.identity) not in used:
            ioas, self.identity = self.identity, None
            self._destroy(ioas)

    def _destroy(self, ioas: IoasSpace) -> None:
        try:
            ioas.destroy()
        except OSError as exc:
            # Nothing is attached, so the kernel has no reason to refuse.  If
            # it does, the operation this cleans up after has still happened
            # (no refusal): the IOAS is emptied, so it holds nothing the
            # relay's tables do not say, and kept to be destroyed later (at
            # the latest the fd's close at relay close frees it).
            log.error("%s: IOMMU_DESTROY failed: %s", ioas.label, exc)
            try:
                ioas.unmap_all()
            except OSError as exc2:
                log.error("%s: emptying it failed too: %s", ioas.label, exc2)
            self.stale.append(ioas.ioas)

    def destroy_ioas(self, ioas: k.Ioas) -> None:
        """``IOMMU_DESTROY`` of an empty IOAS no device uses; a failure keeps it in :attr:`stale`."""
        try:
            ioas.destroy()
        except OSError as exc:
            log.error("IOAS %d: IOMMU_DESTROY failed: %s", ioas.id, exc)
            self.stale.append(ioas)

    def stats(self) -> dict[str, Any]:
        """Per IOAS counters, and the page tables each group's devices are attached to."""
        return {
            "per_process_accounting": self.per_process,
            "domains": {dom: ioas.stats() for dom, ioas in self.domains.items()},
            "bypass": self.identity.stats() if self.identity is not None else None,
            "groups": {g.group_id: g.pt_ids for g in self.groups},
        }

    def close(self) -> None:
        """Close every group's devices, then ``/dev/iommu`` (the kernel frees every IOAS)."""
        first: OSError | None = None
        for g in self.groups:
            try:
                g.close()
            except OSError as exc:
                first = first or exc
        for ioas in [*self.domains.values(), *([self.identity] if self.identity else [])]:
            ioas.budget.account(ioas.c, -ioas.entries, -ioas.charged)
        self.groups.clear()
        self.domains.clear()
        self.identity = None
        self.stale.clear()
        if self._fd is not None:
            self._fd.close()
            self._fd = None
        if first is not None:
            raise first


def _intersect(sets: Iterable[tuple[IovaRange, ...]]) -> tuple[IovaRange, ...]:
    out: list[tuple[int, int]] | None = None
    for ranges in sets:
        cur = [(r.start, r.end) for r in ranges]
        if out is None:
            out = cur
            continue
        out = [(max(a, c), min(b, d)) for a, b in out for c, d in cur if max(a, c) <= min(b, d)]
    return tuple(IovaRange(a, b) for a, b in out or ())

