"""Backends: where a domain's mappings take effect.

Guest memory, GPA → host address (:mod:`~hostrelay.backends.memory`); the
type1 container of one VFIO group with its limits and identity map
(:mod:`~hostrelay.backends.type1`); and the first implementation of the
device model's "host address space of a domain" seam
(:class:`hostrelay.model.ports.HostAddressSpace`): a domain as the set of its
endpoints' type1 containers, with replay on attach
(:mod:`~hostrelay.backends.fanout`).  A second implementation (a domain as
one kernel address space its devices attach to) goes beside it.

May import: the device model, the kernel seam and the compiled extension
(a container's counters live in C, in ``struct hr_container``).
"""
