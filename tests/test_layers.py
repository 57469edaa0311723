"""The package's layers, as pyproject.toml's import-linter contracts state them."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hostrelay"
# The layers that may use the compiled extension: the data plane wraps its C,
# the backends hold a container's C counters, the kernel seam calls its ioctl
# wrappers.  Nothing else (the device model above all) sees C.
NATIVE_USERS = {"dataplane", "backends", "kernel"}


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed (pip install -e '.[test]' installs import-linter)")
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)})  # fmt: skip


def test_every_import_linter_contract_is_kept() -> None:
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path: Path) -> None:
    # The check must be able to fail: the same contracts over a copy of the
    # package in which the device model imports the facade above it.
    shutil.copytree(PACKAGE, tmp_path / "hostrelay", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    wire = tmp_path / "hostrelay" / "model" / "wire.py"
    wire.write_text(wire.read_text() + "\nimport hostrelay.relay  # noqa: E402  (an upward import)\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "BROKEN" in proc.stdout and "hostrelay.model.wire -> hostrelay.relay" in proc.stdout


def _imports_native(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module == "hostrelay._native" or (node.module == "hostrelay" and any(a.name == "_native" for a in node.names)):
                return True
        if isinstance(node, ast.Import) and any(a.name == "hostrelay._native" for a in node.names):
            return True
    return False


def test_only_the_c_facing_layers_import_the_extension() -> None:
    users = {p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if _imports_native(p)}
    assert users, "no module imports hostrelay._native: the check looks in the wrong place"
    outside = sorted(str(p) for p in users if p.parts[0] not in NATIVE_USERS)
    assert not outside, f"only {sorted(NATIVE_USERS)} may import hostrelay._native: {outside}"


def test_the_vfio_user_codec_checks_its_layouts_against_the_headers() -> None:
    """hostrelay.kernel.uapi.check_layout refuses a wire format the headers disagree with."""
    import struct

    import pytest

    from hostrelay.kernel import uapi

    uapi.check_layout(struct.Struct("<IIII"), "struct vfio_irq_info", ("argsz", "flags", "index", "count"))
    with pytest.raises(RuntimeError, match="index"):
        uapi.check_layout(struct.Struct("<IIQI"), "struct vfio_irq_info", ("argsz", "flags", "index", "count"))
    with pytest.raises(RuntimeError, match="sizeof"):
        uapi.check_layout(struct.Struct("<III"), "struct vfio_irq_info", ("argsz", "flags", "index"))
    uapi.check_layout(struct.Struct("<III"), "struct vfio_irq_info", ("argsz", "flags", "index"), prefix=True)
    with pytest.raises(RuntimeError, match="no field"):
        uapi.check_layout(struct.Struct("<I"), "struct vfio_irq_info", ("nope",), prefix=True)
