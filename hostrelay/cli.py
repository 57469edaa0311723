"""The ``hostrelay`` command line (click).  Front end only: no business logic here."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hostrelay import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hostrelay")
def main() -> None:
    """hostrelay: the host side of a paravirtualized IOMMU (virtio-iommu → VFIO)."""


@main.group()
def testbed() -> None:
    """The built-in VFIO testbed: a QEMU VM with an emulated IOMMU and DMA devices."""


@testbed.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--iommu", type=click.Choice(["intel", "virtio"]), default="intel", show_default=True,
              help="Emulated IOMMU: Intel VT-d with interrupt remapping, or virtio-iommu.")
@click.option("--edu", type=click.IntRange(0, 8), default=1, show_default=True, help="Number of edu DMA devices.")
@click.option("--nvme", type=click.IntRange(0, 8), default=0, show_default=True, help="Number of nvme controllers.")
@click.option("--bridged-edu", type=click.IntRange(0, 8), default=0, show_default=True,
              help="edu devices behind one pcie-pci-bridge (they share an IOMMU group).")
@click.option("--hotplug-ports", type=click.IntRange(0, 8), default=0, show_default=True,
              help="Empty PCIe root ports hp0.. for QMP device_add.")
@click.option("--kernel-arg", "kernel_args", multiple=True, metavar="ARG",
              help="Extra kernel command line argument; module.param=value applies to the modules the testbed loads.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds before the VM is killed (exit 124).")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Kernel image to boot.")
@click.option("--modules", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The /lib/modules/<release> directory that goes with --kernel.")
@click.option("--memory", "memory_mb", type=click.IntRange(256, 16384), default=2048, show_default=True, help="Guest RAM in MiB.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def testbed_run(iommu: str, edu: int, nvme: int, bridged_edu: int, hotplug_ports: int, kernel_args: tuple[str, ...], timeout: float, kernel: Path | None,
                modules: Path | None, memory_mb: int, quiet: bool, cmd: tuple[str, ...]) -> None:  # fmt: skip
    """Boot the testbed, run CMD as root in it, power off; exit with CMD's status.

    The guest sees the host's root filesystem read-only with a writable
    overlay, so the host's Python and virtualenv run unchanged.  Put `--`
    before CMD when it has options of its own.
    """
    from hostrelay.testbed import TestbedConfig, TestbedSetupError, run

    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def log(text: str) -> None:
        if not quiet:
            click.echo(text, err=True)

    config = TestbedConfig(iommu=iommu, edu=edu, nvme=nvme, bridged_edu=bridged_edu, hotplug_ports=hotplug_ports,
                           kernel_args=kernel_args, kernel=kernel,
                           modules=modules, memory_mb=memory_mb)  # fmt: skip
    try:
        result = run(cmd, config, timeout=timeout, on_output=out, log=log)
    except TestbedSetupError as exc:
        click.echo(f"hostrelay testbed: {exc}", err=True)
        sys.exit(1)
    if result.timed_out:
        log(f"testbed: timed out after {timeout:.0f} s")
    else:
        log(f"testbed: {shlex_join(cmd)} exited {result.returncode} (boot {result.boot_seconds or 0:.1f} s, "
            f"total {result.wall_seconds:.1f} s)")  # fmt: skip
    sys.exit(result.returncode)


def shlex_join(cmd: tuple[str, ...]) -> str:
    import shlex

    return shlex.join(cmd)


if __name__ == "__main__":
    main()
