"""The data plane's Python side: wrappers over the C that does MAP and UNMAP.

The C mapping table (:mod:`~hostrelay.dataplane.table`), the relay handle
that owns C's view of domains, memory and limits
(:mod:`~hostrelay.dataplane.handle`), the per-request door
(:mod:`~hostrelay.dataplane.requests`) and the virtqueues walked in C
(:mod:`~hostrelay.dataplane.ring`).  The C itself is in ``cext/``.

May import: the device model, the backends' guest memory and type1 container
counters, the kernel seam's typed errors, and the compiled extension
``hostrelay._native``.
"""
