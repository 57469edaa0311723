"""Every error the embedding API raises, in one place.

Kernel failures are typed ``OSError`` subclasses carrying errno, operation,
node/fd and IOVA range (:mod:`hostrelay.kernel.errors`); a refused request
inside the device model is a :class:`RelayError` (its status from the one
table in :mod:`hostrelay.model.status`); a saved state a relay cannot take
is a :class:`StateError`.
"""

from hostrelay.kernel import errors as _kernel_errors
from hostrelay.kernel.errors import *  # noqa: F403  (the kernel's typed errors, as they are)
from hostrelay.model.status import (
    BadAddress,
    DeviceFailure,
    InvalidRequest,
    NoEntry,
    NoResources,
    OutOfRange,
    RelayError,
    TranslationFault,
    UnmapMismatch,
    Unsupported,
)
from hostrelay.model.state import StateError

__all__ = [
    "BadAddress",
    "DeviceFailure",
    "InvalidRequest",
    "NoEntry",
    "NoResources",
    "OutOfRange",
    "RelayError",
    "StateError",
    "TranslationFault",
    "UnmapMismatch",
    "Unsupported",
]
__all__ += _kernel_errors.__all__
