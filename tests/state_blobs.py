"""Saved-state blobs for the tests: well-formed lies (re-sealed) and every refusal case.

Shared by tests/test_state.py (emulated endpoints) and tests/test_state_vfio.py (the kernel).
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from collections.abc import Iterator

from hostrelay.model import state as st

PAGE = 0x1000
MIB = 1 << 20


def reseal(blob: bytes, *, header: dict[str, object] | None = None, version: int | None = None,
           body: bytes | None = None) -> bytes:  # fmt: skip
    """A blob with parts replaced and a valid checksum again (a well-formed lie)."""
    h, b = st.header_of(blob)
    text = json.dumps(h if header is None else header).encode()
    raw_body = bytes(b) if body is None else body
    prefix = struct.pack("<16sIIQ", st.MAGIC, st.FORMAT_VERSION if version is None else version, len(text), len(raw_body))
    out = prefix + text + raw_body
    return out + hashlib.sha256(out).digest()


def refusals(blob: bytes, *, ram: int = 16 * MIB) -> Iterator[tuple[str, bytes, str]]:
    """``(name, blob, what the error says)`` for each way a state must be refused."""
    h, body = st.header_of(blob)
    yield "truncated", blob[:-1], "truncated"
    yield "truncated to nothing", blob[:10], "truncated"
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10
    yield "bit flip", bytes(flipped), "checksum"
    yield "unknown version", reseal(blob, version=2), "unknown state version 2"
    # Overlapping mappings: domain 1's second record moved onto its first.
    recs = bytearray(body)
    first = h["domains"][0]["mappings"][0]  # type: ignore[index]
    start = struct.unpack_from("<Q", recs, first * 32)[0]
    struct.pack_into("<QQ", recs, (first + 1) * 32, start, start + PAGE - 1)
    yield "overlapping mappings", reseal(blob, body=bytes(recs)), "overlaps"
    # A mapping outside guest memory.
    recs = bytearray(body)
    struct.pack_into("<Q", recs, first * 32 + 16, 4 * ram)
    yield "mapping outside guest memory", reseal(blob, body=bytes(recs)), "outside guest memory"
    # Different endpoints: the state names one this relay does not have.
    h2 = dict(h)
    h2["endpoints"] = [*h["endpoints"], {"id": 0x99, "kind": "emulated", "bdf": None, "backend": None}]  # type: ignore[misc]
    yield "different endpoints", reseal(blob, header=h2), "different endpoints"
    h3 = dict(h)
    h3["endpoints"] = [dict(e, kind="emulated", bdf=None, backend=None) for e in h["endpoints"]]  # type: ignore[union-attr]
    yield "an endpoint of another kind", reseal(blob, header=h3), "different endpoints"
    h4 = dict(h, config=dict(h["config"], probe_size=h["config"]["probe_size"] + 8))  # type: ignore[arg-type]
    yield "different config", reseal(blob, header=h4), "probe_size differs"
    h5 = dict(h, config=dict(h["config"], page_size_mask=0x200000))  # type: ignore[arg-type]
    yield "another granule", reseal(blob, header=h5), "page_size_mask differs"


def mutate(blob: bytes, rng: random.Random) -> bytes:
    """A damaged copy of ``blob``: truncated, bits flipped, or flipped and re-sealed (the checksum passes)."""
    kind = rng.randrange(4)
    if kind == 0:  # truncation
        return blob[: rng.randrange(len(blob))]
    data = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    if kind == 1:
        return bytes(data)  # the checksum must refuse it
    # Re-sealed: the checksum passes, the structure must be checked.
    if kind == 2:
        end = len(data) - 32
        return bytes(data[:end]) + hashlib.sha256(bytes(data[:end])).digest()
    # A JSON-aware edit: one number in the header changed, then re-sealed.
    h, _ = st.header_of(blob)
    path = rng.choice(["domains", "queues", "config", "memory"])
    text = json.dumps(h[path])
    nums = [i for i, ch in enumerate(text) if ch.isdigit()]
    if not nums:
        return bytes(data)
    i = rng.choice(nums)
    edited = text[:i] + str(rng.randrange(10)) + text[i + 1:]
    try:
        h2 = dict(h, **{path: json.loads(edited)})
    except ValueError:
        return bytes(data)
    return reseal(blob, header=h2)
