"""One single-threaded event loop for every front end of a relay process.

The vhost-user device and the vfio-user endpoints share one
:class:`~hostrelay.relay.Relay`: an endpoint's DMA fault must reach the
device's event queue, and a guest MAP must be in the table before the
endpoint's next DMA.  Serving them all from one thread keeps that ordering
without locks beyond the relay's own.  The loop is :mod:`selectors` with
callbacks, nothing more: a callback that raises stops :meth:`Loop.run` with
that exception (a front end turns protocol errors into a disconnect itself).
"""

from __future__ import annotations

import selectors
import time
from collections.abc import Callable


class Loop:
    """File-descriptor readiness → callbacks, until stopped."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._stopped = False

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (replaces an earlier one)."""
        if fd in self._selector.get_map():
            self._selector.modify(fd, selectors.EVENT_READ, callback)
        else:
            self._selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd``; nothing if it was not watched."""
        if fd in self._selector.get_map():
            self._selector.unregister(fd)

    def watching(self, fd: int) -> bool:
        """Whether ``fd`` has a callback."""
        return fd in self._selector.get_map()

    def stop(self) -> None:
        """Make :meth:`run` return after the callbacks of this round."""
        self._stopped = True

    def run_once(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` seconds, run the ready callbacks; return how many ran."""
        ran = 0
        for key, _ in self._selector.select(timeout):
            callback: Callable[[], None] = key.data
            callback()
            ran += 1
        return ran

    def run(self, until: Callable[[], bool] | None = None, *, timeout: float | None = None) -> None:
        """Serve callbacks until :meth:`stop`, ``until()`` is true, or ``timeout`` seconds pass."""
        self._stopped = False
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopped and not (until is not None and until()):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            self.run_once(0.1 if left is None else min(left, 0.1))

    def close(self) -> None:
        """Forget every fd (closes none of them: their owners do)."""
        self._selector.close()
