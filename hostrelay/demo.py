"""``hostrelay demo``: a guest's virtio-iommu session, relayed to a real IOMMU.

Run inside the testbed (``hostrelay demo`` boots it) or on a VFIO host with
``--device``.  It binds the devices with the CLI, builds a :class:`Relay` over
memfd guest memory, and plays what a guest's virtio-iommu driver sends, through
the request virtqueue exactly as a guest would: PROBE, ATTACH, MAP, device DMA
that lands, UNMAP, the same DMA blocked by the IOMMU, a second domain with an
NVMe controller, DETACH.  Every step prints the request, its status, what the
device did and how long it took; the exit status says whether every check held.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

from hostrelay.drivers.edu import DEVICE_ID as EDU_DEVICE
from hostrelay.drivers.edu import VENDOR_ID as EDU_VENDOR
from hostrelay.drivers.edu import Edu
from hostrelay.drivers.nvme import CLASS_NVME, AdminQueues, Nvme, NvmeError
from hostrelay.backends.memory import GuestMemory
from hostrelay.model.wire import (
    AttachRequest,
    DetachRequest,
    MapFlag,
    MapRequest,
    ProbeRequest,
    ResvMemType,
    Status,
    UnmapRequest,
    parse_properties,
    unpack_resv_mem,
)
from hostrelay.relay import Relay
from hostrelay.host.sysfs import find_pci
from hostrelay.drivers.virtqueue import DriverQueue

__all__ = ["Demo", "main"]

RAM = 64 << 20
RING_GPA = 0x3000000
EVENT_GPA = 0x3800000
PAGE = 0x1000
RW = int(MapFlag.READ | MapFlag.WRITE)
EP_EDU, EP_NVME = 0x08, 0x10
EDU_IOVA, EDU_GPA = 0x100000, 0x200000
NVME_IOVA = {"sq": 0x400000, "cq": 0x401000, "data": 0x410000}
NVME_GPA = {"sq": 0x600000, "cq": 0x601000, "data": 0x700000}
TRANSFER = 2048


@dataclass
class Demo:
    """One demo run: where it prints, and what it found."""

    out: TextIO = sys.stdout
    checks: list[tuple[str, bool]] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def check(self, what: str, ok: bool) -> bool:
        self.checks.append((what, ok))
        self.say(f"      {'ok  ' if ok else 'FAIL'} {what}")
        return ok

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.say(f"\n== {title}")
        t = time.perf_counter()
        yield
        self.say(f"      ({(time.perf_counter() - t) * 1000:.1f} ms)")


class GuestDriver:
    """The guest's side of the request queue: write a request, kick, read the tail."""

    def __init__(self, relay: Relay, memory: GuestMemory, demo: Demo) -> None:
        self.relay = relay
        self.memory = memory
        self.demo = demo
        self.q = DriverQueue(memory, RING_GPA, 64, data_size=1 << 20)
        relay.set_queue(0, size=self.q.size, desc=self.q.desc, avail=self.q.avail, used=self.q.used_ring)
        self.events = DriverQueue(memory, EVENT_GPA, 16, data_size=4096)
        relay.set_queue(1, size=self.events.size, desc=self.events.desc, avail=self.events.avail,
                        used=self.events.used_ring)  # fmt: skip
        for _ in range(8):
            self.events.add([], [24])

    def send(self, req: AttachRequest | DetachRequest | MapRequest | UnmapRequest | ProbeRequest,
             writable: int = 4) -> tuple[Status, bytes]:  # fmt: skip
        _, (out,) = self.q.add([req.pack()], [writable])
        t = time.perf_counter()
        done = self.relay.process_queue(0)
        spent = time.perf_counter() - t
        used = self.q.used()
        reply = self.memory.read(out, used[0].len) if done and used and used[0].len else b""
        status = Status(reply[-4]) if len(reply) >= 4 else Status.IOERR
        self.demo.say(f"   -> {type(req).__name__.removesuffix('Request').upper():6} {_describe(req)}: "
                      f"{status.name} ({spent * 1e6:.0f} us through the ring)")  # fmt: skip
        return status, reply


def _describe(req: object) -> str:
    if isinstance(req, MapRequest):
        return f"domain {req.domain} IOVA [{req.virt_start:#x}, {req.virt_end:#x}] -> GPA {req.phys_start:#x}"
    if isinstance(req, UnmapRequest):
        return f"domain {req.domain} IOVA [{req.virt_start:#x}, {req.virt_end:#x}]"
    if isinstance(req, (AttachRequest, DetachRequest)):
        return f"endpoint {req.endpoint:#x} {'to' if isinstance(req, AttachRequest) else 'from'} domain {req.domain}"
    if isinstance(req, ProbeRequest):
        return f"endpoint {req.endpoint:#x}"
    return ""


def _dmesg_iommu_faults() -> list[str]:
    try:
        lines = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return []
    return [ln for ln in lines if ("DMAR" in ln and "fault" in ln.lower()) or "page fault from EP" in ln]


def bind_with_cli(demo: Demo, addresses: list[str]) -> bool:
    """``hostrelay bind ADDR... --json``, exactly as an operator would run it."""
    cmd = [sys.executable, "-m", "hostrelay.cli", "bind", *addresses, "--json"]
    demo.say(f"   $ hostrelay bind {' '.join(addresses)} --json")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        doc = json.loads(proc.stdout)
        for d in doc.get("devices", []):
            demo.say(f"     {d['address']}: {d.get('from') or 'no driver'} -> {d.get('to')} "
                     f"(group {d.get('iommu_group')}, {d.get('vfio_node')})")  # fmt: skip
    except ValueError:
        demo.say(proc.stdout + proc.stderr)
    return demo.check("devices bound to vfio-pci", proc.returncode == 0)


def edu_session(demo: Demo, relay: Relay, memory: GuestMemory, guest: GuestDriver, device_name: str) -> None:
    """PROBE, ATTACH, MAP, DMA that lands, UNMAP, the same DMA blocked."""
    edu = Edu(relay.vfio_device(EP_EDU))
    with demo.step(f"PROBE the edu DMA engine {device_name} (endpoint {EP_EDU:#x})"):
        status, reply = guest.send(ProbeRequest(EP_EDU), writable=relay.config().probe_size + 4)
        for prop in parse_properties(reply[:-4]):
            r = unpack_resv_mem(prop)
            kind = "MSI doorbell" if r.subtype == ResvMemType.MSI else "reserved"
            demo.say(f"      RESV_MEM {kind:12} [{r.start:#x}, {r.end:#x}]")
        demo.check("PROBE answers OK with the host's reserved regions", status == Status.OK)
    with demo.step("ATTACH it to domain 1 and MAP a guest buffer"):
        demo.check("ATTACH OK", guest.send(AttachRequest(1, EP_EDU))[0] == Status.OK)
        demo.check("MAP OK", guest.send(MapRequest(1, EDU_IOVA, EDU_IOVA + 2 * PAGE - 1, EDU_GPA, RW))[0] == Status.OK)
    pattern = os.urandom(TRANSFER)
    memory.write(EDU_GPA, pattern)
    memory.write(EDU_GPA + PAGE, bytes(TRANSFER))
    with demo.step("Device DMA through the mapping: RAM -> edu -> RAM"):
        t1 = edu.to_device(EDU_IOVA, TRANSFER)
        t2 = edu.from_device(EDU_IOVA + PAGE, TRANSFER)
        landed = memory.read(EDU_GPA + PAGE, TRANSFER) == pattern
        demo.say(f"      edu read {TRANSFER} bytes at IOVA {EDU_IOVA:#x} ({t1 * 1000:.0f} ms) and wrote them to "
                 f"IOVA {EDU_IOVA + PAGE:#x} ({t2 * 1000:.0f} ms)")  # fmt: skip
        demo.check(f"the DMA landed in guest memory at GPA {EDU_GPA + PAGE:#x}", landed)
    with demo.step("UNMAP the buffer"):
        demo.check("UNMAP OK", guest.send(UnmapRequest(1, EDU_IOVA, EDU_IOVA + 2 * PAGE - 1))[0] == Status.OK)
    memory.write(EDU_GPA + PAGE, bytes(TRANSFER))
    before = len(_dmesg_iommu_faults())
    with demo.step("The same device write again, after UNMAP"):
        edu.from_device(EDU_IOVA + PAGE, TRANSFER)
        blocked = memory.read(EDU_GPA + PAGE, TRANSFER) == bytes(TRANSFER)
        demo.check("the DMA did not land (the IOMMU blocked it)", blocked)
        deadline = time.monotonic() + 2
        faults = _dmesg_iommu_faults()[before:]
        while not faults and time.monotonic() < deadline:  # the kernel logs faults from a thread
            time.sleep(0.05)
            faults = _dmesg_iommu_faults()[before:]
        if faults:
            demo.say(f"      kernel: {faults[-1].strip()}")
        demo.check("the host IOMMU reported the fault", bool(faults))


def nvme_session(demo: Demo, relay: Relay, memory: GuestMemory, guest: GuestDriver, device_name: str) -> None:
    """A second domain: an NVMe controller runs Identify through relay mappings only."""
    with demo.step(f"Second domain: ATTACH the NVMe controller {device_name} (endpoint {EP_NVME:#x}) to domain 2"):
        demo.check("ATTACH OK", guest.send(AttachRequest(2, EP_NVME))[0] == Status.OK)
        for name, iova in NVME_IOVA.items():
            ok = guest.send(MapRequest(2, iova, iova + PAGE - 1, NVME_GPA[name], RW))[0] == Status.OK
            demo.check(f"MAP of the {name} page OK", ok)

    def to_gpa(iova: int) -> int:
        for name, base in NVME_IOVA.items():
            if base <= iova < base + PAGE:
                return NVME_GPA[name] + (iova - base)
        raise ValueError(f"IOVA {iova:#x} is not mapped by the demo")

    with demo.step("NVMe Identify Controller: queues and data buffer reached only through the relay"):
        nvme = Nvme(relay.vfio_device(EP_NVME), lambda i, n: memory.read(to_gpa(i), n),
                    lambda i, d: memory.write(to_gpa(i), d))  # fmt: skip
        try:
            nvme.enable(AdminQueues(NVME_IOVA["sq"], NVME_IOVA["cq"], NVME_IOVA["data"]))
            ident = nvme.identify_controller()
            demo.say(f"      controller: vendor {ident.vid:#06x}, model {ident.model!r}, serial {ident.serial!r}")
            demo.check("Identify completed and its data landed in guest memory", bool(ident.serial))
        except NvmeError as exc:
            demo.check(f"Identify completed ({exc})", False)
    with demo.step("DETACH the controller: its domain dies with its last endpoint"):
        demo.check("DETACH OK", guest.send(DetachRequest(2, EP_NVME))[0] == Status.OK)
        demo.check("domain 2 is gone", 2 not in relay.domain_ids())


def run_session(demo: Demo, edu_bdf: str | None, nvme_bdf: str | None, *, bind: bool = True,
                backend: str = "type1") -> int:  # fmt: skip
    """The whole guest session over the devices given (VFIO ``backend``); returns the exit status."""
    addresses = [a for a in (edu_bdf, nvme_bdf) if a]
    if not addresses:
        demo.say("no device to drive: hostrelay demo knows QEMU's edu (1234:11e8) and NVMe controllers")
        return 2
    with demo.step("Hand the devices to vfio-pci with the CLI"):
        if bind and not bind_with_cli(demo, addresses):
            return 1
    with GuestMemory() as memory:
        memory.add_region(0, RAM)
        relay = Relay(memory, bypass=False, vfio_backend=backend)
        try:
            with demo.step(f"Build the relay over memfd guest memory ({backend} backend)"):
                if edu_bdf:
                    relay.add_vfio_endpoint(EP_EDU, edu_bdf)
                if nvme_bdf:
                    relay.add_vfio_endpoint(EP_NVME, nvme_bdf)
                cfg = relay.config()
                demo.say(f"      guest RAM {RAM >> 20} MiB (memfd); page_size_mask {cfg.page_size_mask:#x}; "
                         f"input_range [{cfg.input_start:#x}, {cfg.input_end:#x}]")  # fmt: skip
                for ep, bdf in ((EP_EDU, edu_bdf), (EP_NVME, nvme_bdf)):
                    if bdf:
                        demo.say(f"      {bdf}: {_opened_as(relay, ep)}")
                guest = GuestDriver(relay, memory, demo)
            if edu_bdf:
                edu_session(demo, relay, memory, guest, edu_bdf)
            if nvme_bdf:
                nvme_session(demo, relay, memory, guest, nvme_bdf)
            if edu_bdf and backend == "iommufd":
                with demo.step("Move the edu to domain 3 and back: each move is one replace of its IOAS attachment"):
                    demo.check("ATTACH the edu to domain 3 OK", guest.send(AttachRequest(3, EP_EDU))[0] == Status.OK)
                    demo.check("MAP in domain 3 OK", guest.send(MapRequest(3, EDU_IOVA, EDU_IOVA + PAGE - 1, EDU_GPA, RW))[0] == Status.OK)
                    ioas = relay.domain_ioas(3)
                    demo.say(f"      domain 3 is IOAS {ioas.ioas.id if ioas else '-'}; the edu is on page table "
                             f"{relay.iommufd_group(EP_EDU).pt_ids}")  # fmt: skip
                    demo.check("domain 3's mapping is in its IOAS", ioas is not None and ioas.entries == 1)
                    demo.check("DETACH from domain 3 OK", guest.send(DetachRequest(3, EP_EDU))[0] == Status.OK)
                    demo.check("domain 3's IOAS is gone with its last device", relay.domain_ioas(3) is None)
                    demo.check("back in domain 1", guest.send(AttachRequest(1, EP_EDU))[0] == Status.OK)
            if edu_bdf:
                with demo.step("DETACH the edu from domain 1"):
                    demo.check("DETACH OK", guest.send(DetachRequest(1, EP_EDU))[0] == Status.OK)
            stats = relay.stats()["total"]
            demo.say(f"\npinned now: {stats['pinned_bytes']} bytes, charged to RLIMIT_MEMLOCK: {stats['charged_bytes']} bytes")
        finally:
            relay.close()
    failed = [what for what, ok in demo.checks if not ok]
    demo.say(f"\n{len(demo.checks) - len(failed)} of {len(demo.checks)} checks passed" + (": FAILED" if failed else ""))
    return 1 if failed else 0


def _opened_as(relay: Relay, endpoint: int) -> str:
    dev = relay.vfio_device(endpoint)
    cdev = getattr(dev, "cdev", None)
    if cdev is not None:
        return f"VFIO device cdev {cdev}, bound to /dev/iommu (one IOAS per domain)"
    group = dev.group
    return f"VFIO group {group.path if group is not None else '?'} in its own type1 container"


def _kind(bdf: str) -> str:
    from pathlib import Path

    dev = Path("/sys/bus/pci/devices") / bdf
    vendor, device = (int((dev / f).read_text(), 16) for f in ("vendor", "device"))
    if (vendor, device) == (EDU_VENDOR, EDU_DEVICE):
        return "edu"
    if int((dev / "class").read_text(), 16) == CLASS_NVME:
        return "nvme"
    return "unknown"


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    """Entry point inside the testbed (or on a VFIO host with ``--device``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m hostrelay.demo")
    ap.add_argument("--device", action="append", default=[], help="PCI address of an edu or NVMe function")
    ap.add_argument("--backend", choices=("type1", "iommufd", "auto"), default="type1",
                    help="how the relay drives VFIO (see Relay.add_vfio_endpoint)")
    args = ap.parse_args(argv)
    demo = Demo(out)
    edu: str | None = None
    nvme: str | None = None
    if args.device:
        for bdf in args.device:
            kind = _kind(bdf)
            if kind == "edu":
                edu = bdf
            elif kind == "nvme":
                nvme = bdf
            else:
                demo.say(f"{bdf}: hostrelay demo has no driver for this device (it knows edu and NVMe)")
                return 2
    else:
        edus = find_pci(EDU_VENDOR, EDU_DEVICE)
        nvmes = find_pci(0x1B36, 0x0010, class_prefix=CLASS_NVME >> 8)
        edu = edus[0] if edus else None
        nvme = nvmes[0] if nvmes else None
    demo.say(f"hostrelay demo: a guest's virtio-iommu session relayed to the host IOMMU through VFIO ({args.backend})")
    return run_session(demo, edu, nvme, backend=args.backend)


def launch(*, timeout: float, log: Callable[[str], None], out: Callable[[str], None], iommu: str = "intel",
           backend: str = "type1") -> int:  # fmt: skip
    """Boot the testbed and run the demo inside it (what ``hostrelay demo`` does).

    ``backend="iommufd"`` boots the testbed's iommufd kernel (built on first use).
    """
    from hostrelay.testbed import TestbedConfig, run

    kernel_args: tuple[str, ...] = ("vfio_iommu_type1.allow_unsafe_interrupts=1",) if iommu == "virtio" else ()
    if iommu == "virtio" and backend != "type1":
        kernel_args += ("iommufd.allow_unsafe_interrupts=1",)
    config = TestbedConfig(iommu=iommu, edu=1, nvme=1, kernel_args=kernel_args, iommufd=backend != "type1")
    result = run([sys.executable, "-m", "hostrelay.demo", "--backend", backend], config,
                 timeout=timeout, on_output=out, log=log)  # fmt: skip
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
