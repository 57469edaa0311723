"""The iommufd testbed kernel's build recipe (hostrelay.testbed.build), without building."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hostrelay.cli import main
from hostrelay.testbed import build
from hostrelay.testbed.kernel import TestbedSetupError


def _config(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def test_a_config_that_kept_the_fragment_passes(tmp_path: Path) -> None:
    lines = []
    for line in build.FRAGMENT.splitlines():
        name, value = line.split("=", 1)
        lines.append(f"# {name} is not set" if value == "n" else line)
    (tmp_path / ".config").write_text(_config(lines))
    build._check_config(tmp_path / ".config")


@pytest.mark.parametrize("lost", ["CONFIG_IOMMUFD=y", "CONFIG_VFIO_DEVICE_CDEV=y", "CONFIG_MODULES=n"])
def test_a_config_that_dropped_a_fragment_line_is_refused(tmp_path: Path, lost: str) -> None:
    name, value = lost.split("=", 1)
    lines = []
    for line in build.FRAGMENT.splitlines():
        n, v = line.split("=", 1)
        if n == name:
            lines.append(f"{n}=y" if value == "n" else f"# {n} is not set")
        else:
            lines.append(f"# {n} is not set" if v == "n" else line)
    (tmp_path / ".config").write_text(_config(lines))
    with pytest.raises(TestbedSetupError, match=lost):
        build._check_config(tmp_path / ".config")


def _fake_build(cache: Path, stamp: str) -> Path:
    target = cache / "iommufd" / "6.12.95"
    (target / "modules" / "6.12.95").mkdir(parents=True)
    (target / "bzImage").write_bytes(b"MZ")
    (target / "modules" / "6.12.95" / "modules.builtin").write_text("kernel/drivers/vfio/vfio.ko\n")
    (target / "build.json").write_text(json.dumps({"package": build.SOURCE_PACKAGE, "version": "6.12.95-1",
                                                   "release": "6.12.95", "stamp": stamp}))  # fmt: skip
    return target


def test_a_build_with_todays_recipe_is_reused(tmp_path: Path) -> None:
    target = _fake_build(tmp_path, build._stamp())
    found = build.cached_iommufd_kernel(tmp_path)
    assert found is not None and found.vmlinuz == target / "bzImage" and found.release == "6.12.95"
    assert "vfio" in found.builtin()


def test_a_build_with_another_recipe_is_not_reused(tmp_path: Path) -> None:
    _fake_build(tmp_path, "0" * 16)
    assert build.cached_iommufd_kernel(tmp_path) is None


def test_testbed_run_iommufd_reaches_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run(cmd: tuple[str, ...], config: object, **kw: object) -> object:
        seen["config"] = config
        raise TestbedSetupError("stop here")

    import hostrelay.testbed as testbed

    monkeypatch.setattr(testbed, "run", fake_run)
    result = CliRunner().invoke(main, ["testbed", "run", "--iommufd", "--", "true"])
    assert result.exit_code != 0 and "stop here" in result.output
    assert getattr(seen["config"], "iommufd") is True
