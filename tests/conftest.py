"""Shared fixtures; the VFIO tier plumbing lives in tests/testbed_plugin.py."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest_plugins = ["testbed_plugin"]


@pytest.fixture(scope="session")
def edu_bdfs() -> list[str]:
    """Every edu function, bound to vfio-pci (skips where there is none)."""
    from edu_host import bind_every_edu

    found = bind_every_edu()
    if not found:
        pytest.skip("no QEMU edu device (1234:11e8) on this VFIO host; the testbed has one")
    return found


@pytest.fixture(scope="session")
def vfio_bdf(request: pytest.FixtureRequest) -> str:
    """A function bound to vfio-pci: $HOSTRELAY_VFIO_DEVICE on a real host, else the first edu."""
    named = os.environ.get("HOSTRELAY_VFIO_DEVICE")
    if named:
        return named
    edu: list[str] = request.getfixturevalue("edu_bdfs")
    return edu[0]


@pytest.fixture
def container(vfio_bdf: str) -> Iterator["object"]:
    """A type1v2 container holding ``vfio_bdf``'s group; everything closed afterwards."""
    from hostrelay.kernel.vfio import Container, Group

    with Container() as c:
        c.attach(Group.for_device(vfio_bdf))
        yield c


@pytest.fixture(params=["handle_request", "ring"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Parametrize a test over the two ways requests reach the relay.

    ``ring`` replaces ``Relay.handle_request`` with a driver that sends the
    request through the request virtqueue and the C walker (tests/ring_transport.py),
    so the same assertions check both paths.
    """
    if request.param == "ring":
        from ring_transport import use_ring

        use_ring(monkeypatch)
    return str(request.param)


@pytest.fixture
def loop() -> Iterator[Any]:
    """A front-end event loop (hostrelay.frontends.loop.Loop), closed afterwards."""
    from hostrelay.frontends.loop import Loop

    lp = Loop()
    yield lp
    lp.close()
