"""QEMU's monitor (QMP) for the testbed, reachable from inside the guest.

The host runner owns the QMP socket.  A command running in the guest asks for a
QMP command by writing ``qmp/<n>.req`` (JSON) into the xfer share; the runner
executes it and writes ``qmp/<n>.resp``.  This is how tests hot-plug devices
(``device_add``/``device_del``) while they run inside the VM.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["QmpClient", "QmpError", "guest_qmp", "serve_requests"]


class QmpError(RuntimeError):
    """QEMU answered a QMP command with an error."""


class QmpClient:
    """A minimal QMP client over a UNIX socket (capabilities negotiated on connect)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise QmpError("QMP connection closed")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:  # events are not answers
                return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``command`` and return its ``return`` value; raise :class:`QmpError` on error."""
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        self.file.write(json.dumps(req).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def serve_requests(xfer: Path, qmp_socket: Path, client: QmpClient | None) -> QmpClient | None:
    """Host side: answer every pending ``qmp/*.req`` in ``xfer``; returns the (lazily made) client."""
    qdir = xfer / "qmp"
    if not qdir.is_dir():
        return client
    for req in sorted(qdir.glob("*.req")):
        resp = req.with_suffix(".resp")
        if resp.exists():
            continue
        try:
            body = json.loads(req.read_text())
        except (OSError, ValueError):
            continue  # still being written
        try:
            if client is None:
                client = QmpClient(qmp_socket)
            answer: dict[str, Any] = {"return": client.execute(body["execute"], body.get("arguments"))}
        except (QmpError, OSError, KeyError) as exc:
            answer = {"error": str(exc)}
        tmp = resp.with_suffix(".tmp")
        tmp.write_text(json.dumps(answer))
        tmp.replace(resp)
    return client


def guest_qmp(command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 30.0) -> Any:
    """Guest side: run a QMP command on the testbed's QEMU (only inside the testbed)."""
    xfer = os.environ.get("HOSTRELAY_TESTBED_XFER")
    if not xfer:
        raise QmpError("guest_qmp works only inside the testbed (HOSTRELAY_TESTBED_XFER unset)")
    qdir = Path(xfer) / "qmp"
    qdir.mkdir(exist_ok=True)
    name = f"{time.monotonic_ns()}-{os.getpid()}"
    tmp = qdir / f"{name}.tmp"
    tmp.write_text(json.dumps({"execute": command, "arguments": arguments or {}}))
    tmp.replace(qdir / f"{name}.req")
    resp = qdir / f"{name}.resp"
    deadline = time.monotonic() + timeout
    while not resp.exists():
        if time.monotonic() > deadline:
            raise QmpError(f"no QMP answer for {command} within {timeout} s")
        time.sleep(0.02)
    answer: dict[str, Any] = json.loads(resp.read_text())
    if "error" in answer:
        raise QmpError(answer["error"])
    return answer.get("return")
