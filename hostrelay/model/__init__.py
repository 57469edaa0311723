"""The device model: what a virtio-iommu device means, sans-IO.

The wire codec (:mod:`~hostrelay.model.wire`), the one error→status table
(:mod:`~hostrelay.model.status`), the config space and features
(:mod:`~hostrelay.model.config`), host reality as arithmetic
(:mod:`~hostrelay.model.reality`), domains and endpoints with ATTACH/DETACH
(:mod:`~hostrelay.model.topology`), request dispatch and PROBE
(:mod:`~hostrelay.model.control`), fault records
(:mod:`~hostrelay.model.events`) and emulated DMA translation
(:mod:`~hostrelay.model.translate`).  What it needs from below is written as
protocols in :mod:`~hostrelay.model.ports`.

May import: the standard library only.  No cffi, no kernel, no other
hostrelay layer (the import-linter contract in ``pyproject.toml`` checks it).
"""
