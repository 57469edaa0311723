"""pytest tiers: unit tests run anywhere; ``@pytest.mark.vfio`` tests need VFIO.

Where VFIO tests run:
- inside the testbed (``HOSTRELAY_TESTBED`` is set by it) or on a real VFIO
  host (``HOSTRELAY_VFIO_DEVICE=<BDF>`` names a function bound to vfio-pci):
  directly, as ordinary tests;
- anywhere else: the run boots the testbed once per distinct configuration
  (IOMMU flavour, device counts, kernel arguments), runs that configuration's
  VFIO tests inside it with this same plugin, and reports each one here as an
  ordinary pytest result (pass, fail with the guest's traceback, or skip).

If the testbed cannot start (no qemu, no kernel), VFIO tests are skipped with
the reason, except under ``CI=true`` or ``HOSTRELAY_REQUIRE_VFIO=1``, where
that is a failure: CI must run them.

Marker: ``@pytest.mark.vfio(iommu=("intel", "virtio"), edu=1, nvme=0,
bridged_edu=0, hotplug_ports=0, kernel_args=(...), icount=False, iommufd=False,
backend=("type1",), qemu="host", served_iommu=False, served_edu=1)`` (see ``TestbedConfig``;
``qemu="newer"`` boots the newer QEMU, provisioned on first use like the iommufd kernel
is built; ``served_iommu=True`` makes ``hostrelay serve`` the guest's only IOMMU with
``served_edu`` edu endpoints behind it, on the newer QEMU: ``iommu``, ``qemu`` and
``edu`` are then implied, see ``hostrelay.testbed.served``).  A test listing several IOMMUs takes a ``vfio_iommu``
argument and is parametrized over them.  A test (or fixture) taking ``vfio_backend``
is parametrized over ``backend`` (the relay's ``backend=`` for VFIO endpoints);
its ``"iommufd"`` case runs in the iommufd kernel's boot (``iommufd=True``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPORT_NAME = "pytest-report.jsonl"
GROUP_TIMEOUT = float(os.environ.get("HOSTRELAY_TESTBED_TIMEOUT", "1500"))


def in_testbed() -> str | None:
    """The IOMMU flavour when running inside the testbed, else None."""
    return os.environ.get("HOSTRELAY_TESTBED") or None


def on_vfio_host() -> bool:
    return bool(in_testbed() or os.environ.get("HOSTRELAY_VFIO_DEVICE"))


def _must_run() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("HOSTRELAY_REQUIRE_VFIO") == "1"


@dataclass(frozen=True)
class GroupKey:
    iommu: str
    edu: int
    nvme: int
    bridged_edu: int
    hotplug_ports: int
    kernel_args: tuple[str, ...]
    icount: bool = False
    iommufd: bool = False
    qemu: str = "host"
    served_iommu: bool = False
    served_edu: int = 0

    def describe(self) -> str:
        if self.served_iommu:
            extra = "".join(f" --kernel-arg {a}" for a in self.kernel_args)
            return f"--served-iommu --served-edu {self.served_edu} --nvme {self.nvme}{extra}"
        extra = f" --bridged-edu {self.bridged_edu}" if self.bridged_edu else ""
        extra += f" --hotplug-ports {self.hotplug_ports}" if self.hotplug_ports else ""
        extra += "".join(f" --kernel-arg {a}" for a in self.kernel_args)
        extra += " --icount" if self.icount else ""
        extra += " --iommufd" if self.iommufd else ""
        extra += f" --qemu {self.qemu}" if self.qemu != "host" else ""
        return f"--iommu {self.iommu} --edu {self.edu} --nvme {self.nvme}{extra}"

    def testbed_config(self) -> Any:
        from hostrelay.testbed import TestbedConfig

        if self.served_iommu:
            return TestbedConfig.served(self.served_edu, nvme=self.nvme, hotplug_ports=self.hotplug_ports,
                                        kernel_args=self.kernel_args, icount=self.icount)  # fmt: skip
        return TestbedConfig(iommu=self.iommu, edu=self.edu, nvme=self.nvme, bridged_edu=self.bridged_edu,
                             hotplug_ports=self.hotplug_ports, kernel_args=self.kernel_args,
                             icount=self.icount, iommufd=self.iommufd, qemu=self.qemu)  # fmt: skip


def _marker_iommus(marker: pytest.Mark) -> tuple[str, ...]:
    iommu = marker.kwargs.get("iommu", ("intel",))
    return (iommu,) if isinstance(iommu, str) else tuple(iommu)


def group_key(item: pytest.Item) -> GroupKey:
    marker = item.get_closest_marker("vfio")
    assert marker is not None
    callspec = getattr(item, "callspec", None)
    iommu = callspec.params.get("vfio_iommu") if callspec is not None else None
    iommus = _marker_iommus(marker)
    args = tuple(marker.kwargs.get("kernel_args", ()))
    iommu = iommu or iommus[0]
    if iommu == "virtio":
        # virtio-iommu has no interrupt remapping: type1 refuses groups unless
        # allow_unsafe_interrupts=1 (Linux 6.12 vfio_iommu_type1).
        args = tuple(sorted(set(args) | {"vfio_iommu_type1.allow_unsafe_interrupts=1"}))
    kw = marker.kwargs
    if kw.get("served_iommu", False):
        # hostrelay is the only IOMMU (hostrelay.testbed.served): the newer QEMU,
        # the virtio flavour's kernel, no QEMU edu; type1 needs unsafe interrupts
        # there as well (the testbed adds the argument itself).
        return GroupKey("virtio", 0, int(kw.get("nvme", 0)), 0, int(kw.get("hotplug_ports", 0)), tuple(sorted(args)),
                        bool(kw.get("icount", False)), False, "newer", True, int(kw.get("served_edu", 1)))  # fmt: skip
    backend = callspec.params.get("vfio_backend") if callspec is not None else None
    iommufd = bool(kw.get("iommufd", False)) or backend == "iommufd"
    return GroupKey(iommu, int(kw.get("edu", 1)), int(kw.get("nvme", 0)), int(kw.get("bridged_edu", 0)),
                    int(kw.get("hotplug_ports", 0)), tuple(sorted(args)), bool(kw.get("icount", False)),
                    iommufd, str(kw.get("qemu", "host")))  # fmt: skip


def _marker_backends(marker: pytest.Mark) -> tuple[str, ...]:
    backend = marker.kwargs.get("backend", ("type1",))
    return (backend,) if isinstance(backend, str) else tuple(backend)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("vfio")
    if marker is not None and "vfio_iommu" in metafunc.fixturenames:
        metafunc.parametrize("vfio_iommu", _marker_iommus(marker))
    if "vfio_backend" in metafunc.fixturenames:
        metafunc.parametrize("vfio_backend", _marker_backends(marker) if marker is not None else ("type1",))


# ---------------------------------------------------------------- guest side
class _GuestReporter:
    """Inside the testbed: write each test's phases to the xfer share."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed at session end)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2])
        record = {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "longrepr": "" if report.passed or report.skipped else report.longreprtext,
            "reason": reason,
            "duration": report.duration,
            "sections": [[k, v] for k, v in report.sections],
        }
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def pytest_sessionfinish(self) -> None:
        self.file.close()


# ----------------------------------------------------------------- host side
class RemoteFailure(Exception):
    """A VFIO test failed inside the testbed; carries the guest's report."""


class RemoteTestbedItem(pytest.Item):
    """Stands in for a VFIO test on a host without VFIO: its result comes from the testbed."""

    def __init__(self, *, original_nodeid: str, key: GroupKey, runner: TestbedRunner, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._nodeid = original_nodeid
        self.key = key
        self.runner = runner

    def runtest(self) -> None:
        result = self.runner.result_for(self)
        for name, text in result.get("sections", []):
            self.add_report_section("call", f"testbed {name}", text)
        outcome = result["outcome"]
        if outcome == "skipped":
            pytest.skip(result.get("reason") or "skipped in the testbed")
        if outcome != "passed":
            raise RemoteFailure(result.get("longrepr") or "failed in the testbed")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, RemoteFailure):
            return f"[in testbed {self.key.describe()}]\n{excinfo.value}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.name} [testbed {self.key.iommu}]"


class TestbedRunner:
    """Boots the testbed once per configuration and collects the guest's results."""

    __test__ = False

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.groups: dict[GroupKey, list[RemoteTestbedItem]] = {}
        self.results: dict[GroupKey, dict[str, dict[str, Any]]] = {}
        self.errors: dict[GroupKey, str] = {}
        self.timings: list[str] = []
        # The files each boot returned (TestbedResult.files): a host-side test
        # reads what the guest's tests left, or what the served IOMMU recorded.
        self.files: dict[GroupKey, dict[str, bytes]] = {}

    def files_for(self, key: GroupKey) -> dict[str, bytes]:
        """The files of the boot for ``key`` (booting it now if its tests have not run yet)."""
        if key not in self.results and key not in self.errors:
            self._run_group(key)
        if key in self.errors:
            if _must_run():
                pytest.fail(self.errors[key], pytrace=False)
            pytest.skip(self.errors[key])
        return self.files.get(key, {})

    def result_for(self, item: RemoteTestbedItem) -> dict[str, Any]:
        if item.key not in self.results and item.key not in self.errors:
            self._run_group(item.key)
        if item.key in self.errors:
            message = self.errors[item.key]
            if _must_run():
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        return self.results[item.key].get(item.nodeid) or {
            "outcome": "failed",
            "longrepr": "the testbed run produced no result for this test (crash or timeout; see the testbed output section)",
        }

    def _run_group(self, key: GroupKey) -> None:
        from hostrelay.testbed import TestbedBootError, TestbedSetupError, run

        items = self.groups[key]
        nodeids = [i.nodeid for i in items]
        rootdir = Path(str(self.config.rootpath))
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rN", "--no-header", *nodeids]
        os.environ["HOSTRELAY_TESTBED_REPORT"] = "1"
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\n[testbed] booting {key.describe()} for {len(nodeids)} VFIO tests", yellow=True)
        # Progress of what the testbed prepares first (a kernel fetched or,
        # for --iommufd, built: ~11 min the first time; for --qemu newer, the
        # newer QEMU's root: ~1 min) shows as it happens.
        capture = self.config.pluginmanager.getplugin("capturemanager")

        def log(line: str) -> None:
            # Past pytest's output capture (the group runs inside a test's
            # runtest, where fd 2 is captured) and flushed, so a terminal or
            # a CI log shows it as it happens.
            with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
                print(f"[testbed] {line}", file=sys.stderr, flush=True)

        started = time.monotonic()
        retried = ""
        try:
            try:
                result = run(cmd, key.testbed_config(), timeout=GROUP_TIMEOUT, cwd=rootdir, log=log)
            except TestbedBootError as exc:
                if exc.command_started:
                    raise
                # The guest died while booting, before any test ran: that is
                # the emulator, not the code under test.  One more boot, and
                # the summary says so.
                retried = f" (second boot; the first died booting: {str(exc).splitlines()[0]})"
                result = run(cmd, key.testbed_config(), timeout=GROUP_TIMEOUT, cwd=rootdir, log=log)
        except TestbedSetupError as exc:
            self.errors[key] = f"VFIO test needs the testbed, which cannot start here: {exc}"
            return
        finally:
            os.environ.pop("HOSTRELAY_TESTBED_REPORT", None)
        outcomes: dict[str, dict[str, Any]] = {}
        for line in result.files.get(REPORT_NAME, b"").decode().splitlines():
            rec = json.loads(line)
            current = outcomes.setdefault(rec["nodeid"], {"outcome": "passed", "sections": []})
            if rec["outcome"] == "failed" and current["outcome"] != "failed":
                current["outcome"] = "failed"
                current["longrepr"] = f"({rec['when']}) " + rec["longrepr"]
            elif rec["outcome"] == "skipped" and current["outcome"] == "passed":
                current["outcome"] = "skipped"
                current["reason"] = rec["reason"]
            if rec["when"] == "call" or rec["outcome"] == "failed":
                current["sections"] += rec["sections"]
        missing = [n for n in nodeids if n not in outcomes]
        if missing or result.returncode not in (0, 1):
            tail = result.output[-4000:]
            for n in missing:
                outcomes[n] = {"outcome": "failed", "longrepr": f"no result from the testbed (exit {result.returncode}, "
                               f"timed out: {result.timed_out}).\nOutput tail:\n{tail}\nConsole tail:\n{result.console[-2000:]}"}  # fmt: skip
        self.results[key] = outcomes
        self.files[key] = result.files
        self.timings.append(
            f"{key.describe()}: {len(nodeids)} tests, boot {result.boot_seconds or 0:.1f} s, "
            f"total {time.monotonic() - started:.1f} s, kernel {result.kernel}, QEMU {result.qemu}{retried}"
        )


def pytest_configure(config: pytest.Config) -> None:
    report = os.environ.get("HOSTRELAY_TESTBED_REPORT")
    xfer = os.environ.get("HOSTRELAY_TESTBED_XFER")
    if in_testbed() and report and xfer:
        config.pluginmanager.register(_GuestReporter(Path(xfer) / REPORT_NAME), "hostrelay-guest-reporter")
    if not on_vfio_host():
        config.pluginmanager.register(TestbedRunner(config), "hostrelay-testbed-runner")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    runner: TestbedRunner | None = config.pluginmanager.get_plugin("hostrelay-testbed-runner")
    if runner is None:
        flavour = in_testbed()
        for item in items:
            if item.get_closest_marker("vfio") is None:
                continue
            key = group_key(item)
            served = int(os.environ.get("HOSTRELAY_TESTBED_SERVED_EDU", "0") or 0)
            if flavour and key.served_iommu != bool(served):
                item.add_marker(pytest.mark.skip(reason="needs the testbed with hostrelay serving the IOMMU "
                                                        "(testbed run --served-iommu)" if key.served_iommu else
                                                        "needs the testbed's own QEMU IOMMU, this boot serves hostrelay's"))  # fmt: skip
            elif key.served_iommu and served < key.served_edu:
                item.add_marker(pytest.mark.skip(reason=f"needs {key.served_edu} served edu, this boot has {served}"))
            elif flavour and key.iommu != flavour:
                item.add_marker(pytest.mark.skip(reason=f"needs the {key.iommu} testbed, this is {flavour}"))
            elif key.qemu == "newer" and not (flavour and os.environ.get("HOSTRELAY_TESTBED_QEMU") == "newer"):
                # Only a requirement for the newer QEMU skips: the other tests
                # run on whichever QEMU the testbed was booted with.
                item.add_marker(pytest.mark.skip(reason="needs the testbed on the newer QEMU (testbed run --qemu newer)"))
            elif key.iommufd and not Path("/dev/iommu").exists():
                item.add_marker(pytest.mark.skip(reason="needs a kernel with IOMMUFD (/dev/iommu): testbed run --iommufd"))
            elif not flavour and key.iommu != "intel" and "vfio_iommu" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.skip(reason=f"the {key.iommu} IOMMU flavour exists only in the testbed"))
        return
    new_items: list[pytest.Item] = []
    for item in items:
        if item.get_closest_marker("vfio") is None:
            new_items.append(item)
            continue
        key = group_key(item)
        remote = RemoteTestbedItem.from_parent(
            item.parent, name=item.name, original_nodeid=item.nodeid, key=key, runner=runner
        )
        remote.own_markers.extend(item.iter_markers())
        new_items.append(remote)
    items[:] = new_items


def pytest_collection_finish(session: pytest.Session) -> None:
    # Group after every plugin's deselection (-k, -m) so a boot runs only selected tests.
    runner: TestbedRunner | None = session.config.pluginmanager.get_plugin("hostrelay-testbed-runner")
    if runner is not None:
        for item in session.items:
            if isinstance(item, RemoteTestbedItem):
                runner.groups.setdefault(item.key, []).append(item)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    runner: TestbedRunner | None = terminalreporter.config.pluginmanager.get_plugin("hostrelay-testbed-runner")
    if runner is not None and runner.timings:
        terminalreporter.section("hostrelay testbed boots")
        for line in runner.timings:
            terminalreporter.write_line(line)

