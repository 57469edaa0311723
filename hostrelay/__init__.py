"""hostrelay: the host side of a paravirtualized IOMMU.

A guest's virtio-iommu driver sends ATTACH / DETACH / MAP / UNMAP / PROBE
requests; hostrelay implements the device model and relays MAP/UNMAP for
passed-through devices to the physical IOMMU through Linux VFIO.

Public names are imported lazily so that ``import hostrelay`` stays cheap and
works before the native extension is built (the CLI's ``--help``, the testbed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Container": "hostrelay.kernel.vfio",
    "Group": "hostrelay.kernel.vfio",
    "Device": "hostrelay.kernel.vfio",
    "IommuInfo": "hostrelay.kernel.vfio",
    "VfioError": "hostrelay.kernel.errors",
    "Relay": "hostrelay.relay",
    "DirtyLogStatus": "hostrelay.model.dirty",
    "SpaceDirtyStatus": "hostrelay.model.dirty",
    "RecordedRequest": "hostrelay.relay",
    "GuestMemory": "hostrelay.backends.memory",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:
    from hostrelay.kernel.errors import VfioError
    from hostrelay.backends.memory import GuestMemory
    from hostrelay.relay import RecordedRequest, Relay
    from hostrelay.kernel.vfio import Container, Device, Group, IommuInfo
    from hostrelay.model.dirty import DirtyLogStatus, SpaceDirtyStatus


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hostrelay' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
