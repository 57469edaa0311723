"""``hostrelay serve --record FILE``: a live guest's request stream, kept for replay.

The relay records every request it serves (:meth:`hostrelay.relay.Relay.start_recording`:
the C ring walker's MAP/UNMAP and the Python-served ATTACH, DETACH, PROBE
alike, in completion order); this module writes those records to a file as
they come and can feed a file back through
:meth:`~hostrelay.relay.Relay.handle_request` on a fresh relay, which must
answer every request byte for byte as the live one did and end with the same
table.

The file is JSON lines, one object per line, ``"kind"`` first; integers are
JSON numbers, byte strings lowercase hex:

``{"kind": "header", "format": "hostrelay-record", "version": 1, "bypass": B, "config": HEX, "endpoints": [ID, ...]}``
    first line: the relay's initial ``bypass`` and its 40 config bytes, and
    the endpoints it had when serving began (every ``--edu``).
``{"kind": "memory", "regions": [[GPA, SIZE], ...]}``
    guest RAM changed (vhost-user ``SET_MEM_TABLE``; ``[]`` at a
    disconnect): MAP refuses a GPA outside guest RAM, so a replay needs it.
``{"kind": "request", "request": HEX, "writable_len": N, "reply": HEX}``
    one request: the device-readable bytes, the size of the device-writable
    part, and exactly what the device wrote (``""``: used length 0).
``{"kind": "reset", "system": B, "table": TABLE}``
    a device reset (``system``: a system reset) with the table as it was
    just before it (vhost-user stops every ring on a driver reset or a VM
    stop, which resets the device: every domain goes).
``{"kind": "table", "table": TABLE}``
    last line, written when serving ends: the final table.

``TABLE`` is ``{"domains": [{"id": D, "bypass": B, "endpoints": [ID, ...],
"mappings": [[START, END, PHYS, FLAGS], ...]}, ...]}`` in domain-ID order,
mappings in IOVA order (``END`` inclusive): what the relay holds, which is
what a replay must hold too.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hostrelay.backends.memory import GuestMemory
from hostrelay.frontends.loop import Loop
from hostrelay.relay import RecordedRequest, Relay

__all__ = [
    "FORMAT",
    "RecordingLoop",
    "RecordingRelay",
    "ReplayResult",
    "VERSION",
    "open_record",
    "read_records",
    "replay",
    "table_of",
]

log = logging.getLogger(__name__)

FORMAT = "hostrelay-record"
VERSION = 1


def table_of(relay: Relay) -> dict[str, Any]:
    """The relay's domains and mappings as the file writes them (``TABLE`` above)."""
    return {"domains": [{"id": d, "bypass": relay.domain_is_bypass(d), "endpoints": relay.domain_endpoints(d),
                         "mappings": [list(m) for m in relay.mappings(d)]} for d in relay.domain_ids()]}  # fmt: skip


class RecordingRelay(Relay):
    """A :class:`Relay` that writes what it serves to a record file (the format above).

    Built like a ``Relay``, plus ``record``, an open text file (line
    buffered or flushed by :meth:`drain`).  Call :meth:`begin` once the
    endpoints are declared, :meth:`drain` now and then (the
    :class:`RecordingLoop` does it after each round of callbacks) and
    :meth:`finish` at the end.  Resets and guest-RAM changes write their
    lines themselves, after draining what was served before them.
    """

    def __init__(self, memory: GuestMemory, *, record: IO[str], **options: Any) -> None:
        super().__init__(memory, **options)
        self.record = record
        self.recorded = 0
        self._endpoints: list[int] = []
        self._begun = False
        self._in_system_reset = False

    def add_endpoint(self, endpoint_id: int, **kwargs: Any) -> None:
        """As :meth:`Relay.add_endpoint`; the endpoint goes into the header if added before :meth:`begin`."""
        super().add_endpoint(endpoint_id, **kwargs)
        self._endpoints.append(endpoint_id)
        if self._begun:
            # A replay would not have it: the file says so where it happened.
            self._write({"kind": "endpoint", "id": endpoint_id})

    def begin(self) -> None:
        """Write the header and start recording (idempotent)."""
        if self._begun:
            return
        self._begun = True
        self._write({"kind": "header", "format": FORMAT, "version": VERSION, "bypass": self.bypass,
                     "config": self.config_bytes().hex(), "endpoints": sorted(self._endpoints)})  # fmt: skip
        self.start_recording()

    def drain(self) -> int:
        """Write the requests served since the last drain; how many."""
        records = self.take_recording()
        for r in records:
            self._write({"kind": "request", "request": r.request.hex(), "writable_len": r.writable_len,
                         "reply": r.reply.hex()}, flush=False)  # fmt: skip
        if records:
            self.record.flush()
        self.recorded += len(records)
        return len(records)

    def finish(self) -> None:
        """Drain, write the final table, stop recording."""
        if not self._begun:
            return
        self.drain()
        for r in self.stop_recording():  # anything served between the drain and the stop
            self._write({"kind": "request", "request": r.request.hex(), "writable_len": r.writable_len,
                         "reply": r.reply.hex()}, flush=False)  # fmt: skip
            self.recorded += 1
        self._write({"kind": "table", "table": table_of(self)})
        self._begun = False

    def reset(self) -> None:
        """Device reset: the requests before it and the table it ends are written first."""
        self._before_reset(system=False)
        super().reset()

    def system_reset(self) -> None:
        """System reset (the table before it is written, then a device reset, then bypass restored)."""
        self._before_reset(system=True)
        # Relay.system_reset calls self.reset(): that would write a second line.
        self._in_system_reset = True
        try:
            super().system_reset()
        finally:
            self._in_system_reset = False

    def replace_memory(self, regions: Iterable[tuple[int, int, int, int]]) -> None:
        """As :meth:`Relay.replace_memory`; the new layout (GPA, size) is written once it took."""
        wanted = list(regions)
        self.drain()
        super().replace_memory(wanted)
        if self._begun:
            self._write({"kind": "memory", "regions": [[gpa, size] for gpa, size, _fd, _off in wanted]})

    def _before_reset(self, *, system: bool) -> None:
        if not self._begun or self._in_system_reset:
            return
        self.drain()
        self._write({"kind": "reset", "system": system, "table": table_of(self)})

    def _write(self, obj: dict[str, Any], *, flush: bool = True) -> None:
        self.record.write(json.dumps(obj, separators=(",", ":")) + "\n")
        if flush:
            self.record.flush()


class RecordingLoop(Loop):
    """The serve loop, draining a :class:`RecordingRelay` into its file after each round of callbacks."""

    def __init__(self, relay: RecordingRelay) -> None:
        super().__init__()
        self.relay = relay

    def run_once(self, timeout: float | None = None) -> int:
        """As :meth:`Loop.run_once`, then the requests those callbacks served go to the file."""
        ran = super().run_once(timeout)
        if ran:
            self.relay.drain()
        return ran


# --- reading and replaying -------------------------------------------------------------------


def read_records(lines: Iterable[str | bytes]) -> Iterator[dict[str, Any]]:
    """The objects of a record file, checked for shape: :class:`ValueError` names the bad line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"record line {n}: not JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
            raise ValueError(f"record line {n}: not an object with a 'kind'")
        if n == 1 and (obj["kind"] != "header" or obj.get("format") != FORMAT):
            raise ValueError(f"record line 1: not a {FORMAT} header")
        if n == 1 and obj.get("version") != VERSION:
            raise ValueError(f"record line 1: version {obj.get('version')!r}; this reads version {VERSION}")
        obj["_line"] = n
        yield obj


@dataclass
class ReplayResult:
    """What a replay saw: how many requests, which replies differed, the tables compared."""

    requests: int = 0
    resets: int = 0
    #: (line, request hex, recorded reply hex, replayed reply hex) of every request answered otherwise.
    mismatches: list[tuple[int, str, str, str]] = field(default_factory=list)
    #: (line, what) of every table that differed (at a reset, or the final one).
    table_mismatches: list[tuple[int, str]] = field(default_factory=list)
    final_table: dict[str, Any] | None = None  # the recorded final table
    replayed_table: dict[str, Any] | None = None  # the replaying relay's, at the end
    statuses: dict[int, int] = field(default_factory=dict)  # recorded tail status -> count

    @property
    def ok(self) -> bool:
        """Every reply and every table the same, and the file had its final table."""
        return not self.mismatches and not self.table_mismatches and self.final_table is not None


def replay(lines: Iterable[str | bytes], **options: Any) -> ReplayResult:
    """Feed a record file through ``handle_request`` on a fresh relay and compare.

    The fresh relay has the header's ``bypass`` and endpoints (``options``
    are further :class:`Relay` options, the live relay's if it had any:
    ``hostrelay serve`` uses the defaults) and must present the header's
    config bytes (:class:`ValueError` otherwise: it is not the same device).
    Guest RAM follows the ``memory`` lines (anonymous memory of those GPA
    ranges: MAP checks addresses against it, never contents); a ``reset``
    line first compares the table, then resets.
    """
    result = ReplayResult()
    memory = GuestMemory()
    relay: Relay | None = None
    fds: list[int] = []
    try:
        for obj in read_records(lines):
            kind, line = obj["kind"], obj["_line"]
            if kind == "header":
                relay = Relay(memory, bypass=bool(obj["bypass"]), **options)
                for ep in obj["endpoints"]:
                    relay.add_endpoint(int(ep))
                if relay.config_bytes().hex() != obj["config"]:
                    raise ValueError(f"the replaying relay's config {relay.config_bytes().hex()} is not the "
                                     f"recorded {obj['config']}: other options")  # fmt: skip
                continue
            if relay is None:
                raise ValueError(f"record line {line}: {kind} before the header")
            if kind == "request":
                rec = RecordedRequest(bytes.fromhex(obj["request"]), int(obj["writable_len"]), bytes.fromhex(obj["reply"]))
                got = relay.handle_request(rec.request, rec.writable_len)
                result.requests += 1
                if rec.reply:
                    status = rec.reply[-4]
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                if got != rec.reply:
                    result.mismatches.append((line, obj["request"], obj["reply"], got.hex()))
            elif kind == "memory":
                regions = []
                for f in fds:
                    os.close(f)
                fds = []
                for gpa, size in obj["regions"]:
                    fd = os.memfd_create("hostrelay-replay", os.MFD_CLOEXEC)
                    os.ftruncate(fd, int(size))  # sparse: replay reads no guest memory
                    fds.append(fd)
                    regions.append((int(gpa), int(size), fd, 0))
                relay.replace_memory(regions)
            elif kind == "reset":
                result.resets += 1
                here = table_of(relay)
                if here != obj["table"]:
                    result.table_mismatches.append((line, f"at reset: replayed {here} recorded {obj['table']}"))
                (relay.system_reset if obj.get("system") else relay.reset)()
            elif kind == "endpoint":
                relay.add_endpoint(int(obj["id"]))
            elif kind == "table":
                result.final_table = obj["table"]
                result.replayed_table = table_of(relay)
                if result.replayed_table != result.final_table:
                    result.table_mismatches.append((line, f"final: replayed {result.replayed_table} "
                                                          f"recorded {result.final_table}"))  # fmt: skip
            else:
                raise ValueError(f"record line {line}: unknown kind {kind!r}")
    finally:
        if relay is not None:
            relay.close()
        memory.close()
        for f in fds:
            os.close(f)
    return result


def open_record(path: str | Path) -> IO[str]:
    """Open ``path`` for a recording (truncated; line-oriented text)."""
    return open(path, "w", encoding="ascii")  # noqa: SIM115 (the caller closes it)
