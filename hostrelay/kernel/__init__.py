"""The kernel seam: the only Python that calls the compiled ioctl wrappers.

Thin wrappers over ``cext/hr_vfio.c`` (:mod:`~hostrelay.kernel.ioctl`, which
also holds the failure-injection hook the fault tests use), the VFIO
container, group and device objects (:mod:`~hostrelay.kernel.vfio`), and the
typed ``OSError`` subclasses every kernel failure becomes
(:mod:`~hostrelay.kernel.errors`): errno, operation, node or fd, IOVA range.

May import: the compiled extension ``hostrelay._native`` and the standard
library; nothing else of hostrelay.
"""
