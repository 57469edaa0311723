"""Random request sequences through ``handle_request`` against a plain model.

The model below is written straight from the spec text (5.13.6.3–5.13.6.7)
over dicts and lists, with the relay's documented check order where the spec
leaves the order open.  After every request the status, the PROBE reply and
the whole state (domains, members, mappings) must agree; translations of
random spans must agree too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from hostrelay import GuestMemory, Relay
from hostrelay.model.wire import (
    AttachRequest,
    DetachRequest,
    MapRequest,
    ProbeRequest,
    ResvMem,
    Status,
    UnmapRequest,
    pack_properties,
)
from hostrelay.relay import TranslationFault

U64_MAX = (1 << 64) - 1
PAGE = 0x1000
RAM = 1 << 20  # guest RAM: [0, 1 MiB)
MSI = (0xFEE00000, 0xFEEFFFFF)
COMMON_RESERVED = (0xE000, 0xEFFF)
EP2_RESERVED = (0x3000, 0x3FFF)
ENDPOINTS = (0, 1, 2)
PROBE_SIZE = 128


@dataclass
class MDomain:
    bypass: bool
    members: set[int] = field(default_factory=set)
    maps: list[tuple[int, int, int, int]] = field(default_factory=list)  # (start, end, phys, flags)


class Model:
    def __init__(self) -> None:
        self.domains: dict[int, MDomain] = {}
        self.ep_domain: dict[int, int] = {}

    @staticmethod
    def resv(ep: int) -> list[tuple[int, int]]:
        return [MSI, COMMON_RESERVED] + ([EP2_RESERVED] if ep == 2 else [])

    def _detach(self, ep: int) -> None:
        d = self.ep_domain.pop(ep)
        self.domains[d].members.discard(ep)
        if not self.domains[d].members:
            del self.domains[d]  # the domain dies with its last endpoint

    def attach(self, q: AttachRequest) -> Status:
        if q.reserved != bytes(4) or q.flags & ~1:
            return Status.INVAL
        if q.endpoint not in ENDPOINTS:
            return Status.NOENT
        bypass = bool(q.flags & 1)
        dom = self.domains.get(q.domain)
        if dom is not None:
            if dom.bypass != bypass:
                return Status.INVAL
            if self.ep_domain.get(q.endpoint) == q.domain:
                return Status.OK
            for rs, re in self.resv(q.endpoint):
                if any(s <= re and rs <= e for s, e, _, _ in dom.maps):
                    return Status.UNSUPP
        if q.endpoint in self.ep_domain:
            self._detach(q.endpoint)
        self.domains.setdefault(q.domain, MDomain(bypass)).members.add(q.endpoint)
        self.ep_domain[q.endpoint] = q.domain
        return Status.OK

    def detach(self, q: DetachRequest) -> Status:
        if q.endpoint not in ENDPOINTS:
            return Status.NOENT
        if self.ep_domain.get(q.endpoint) != q.domain:
            return Status.INVAL
        self._detach(q.endpoint)
        return Status.OK

    def map(self, q: MapRequest) -> Status:
        if q.flags & ~0x7:
            return Status.INVAL
        s, e, p = q.virt_start, q.virt_end, q.phys_start
        if e < s:
            return Status.INVAL
        if s % PAGE or p % PAGE or (e + 1) % PAGE:
            return Status.RANGE
        size = e - s + 1
        if p + size - 1 > U64_MAX:
            return Status.RANGE
        dom = self.domains.get(q.domain)
        if dom is None:
            return Status.NOENT
        if dom.bypass:
            return Status.INVAL
        for ep in dom.members:
            for rs, re in self.resv(ep):
                if s <= re and rs <= e:
                    return Status.INVAL
        if not q.flags & 0x4 and p + size > RAM:
            return Status.FAULT
        if any(ms <= e and s <= me for ms, me, _, _ in dom.maps):
            return Status.INVAL
        dom.maps.append((s, e, p, q.flags))
        return Status.OK

    def unmap(self, q: UnmapRequest) -> Status:
        if q.reserved != bytes(4):
            return Status.INVAL
        s, e = q.virt_start, q.virt_end
        if e < s:
            return Status.INVAL
        dom = self.domains.get(q.domain)
        if dom is None:
            return Status.NOENT
        if dom.bypass:
            return Status.INVAL
        hit = [m for m in dom.maps if m[0] <= e and s <= m[1]]
        if any(m[0] < s or m[1] > e for m in hit):
            return Status.RANGE
        for m in hit:
            dom.maps.remove(m)
        return Status.OK

    def translate(self, ep: int, iova: int, size: int, write: bool) -> int | None:
        d = self.ep_domain.get(ep)
        if d is None:
            return iova  # config bypass = 1 in this test
        dom = self.domains[d]
        if dom.bypass:
            return iova
        last = iova + size - 1
        if MSI[0] <= iova and last <= MSI[1]:
            return iova
        need = 2 if write else 1
        cur = iova
        result: int | None = None
        expect_phys: int | None = None
        while True:
            m = next((m for m in dom.maps if m[0] <= cur <= m[1]), None)
            if m is None or not m[3] & need:
                return None
            if expect_phys is not None and m[2] != expect_phys:
                return None
            if result is None:
                result = m[2] + (cur - m[0])
            if last <= m[1]:
                return result
            expect_phys = m[2] + (m[1] - m[0]) + 1
            cur = m[1] + 1


# --- strategies ---------------------------------------------------------------------

# Mostly well-formed requests (so sequences get deep into the state space),
# with a steady trickle of every kind of malformed field.
domains = st.sampled_from([1, 1, 1, 2, 2, 0])
eps = st.sampled_from([0, 0, 1, 1, 2, 2, 3])  # endpoint 3 does not exist
# sampled_from draws uniformly, so repeating an entry weights it.
PAGE_ADDRS = [n * PAGE for n in range(17)]
ODD_ADDRS = [0x10, 0x7FF, 0xFEE00000, U64_MAX - 0xFFF, 0x4000 - 1]
vstart = st.sampled_from(PAGE_ADDRS * 3 + ODD_ADDRS)
lengths = st.sampled_from([PAGE, PAGE, PAGE, 2 * PAGE, 3 * PAGE, 4 * PAGE, 1, 0x800])
flags = st.sampled_from([1, 2, 3, 3, 5] * 4 + [0, 8, 0x10, 0x80, 0xFF])
phys = st.sampled_from([a * 8 for a in PAGE_ADDRS] + PAGE_ADDRS + [RAM - PAGE, RAM, 1 << 40, 0x800])
reserved4 = st.sampled_from([bytes(4)] * 12 + [b"\1\0\0\0", b"\0\0\0\x80"])


@st.composite
def map_req(draw: st.DrawFn) -> MapRequest:
    s = draw(vstart)
    e = min(U64_MAX, s + draw(lengths) - 1)
    return MapRequest(draw(domains), s, e, draw(phys), draw(flags))


@st.composite
def unmap_req(draw: st.DrawFn) -> UnmapRequest:
    s = draw(vstart)
    span = draw(st.sampled_from([PAGE, 2 * PAGE, 5 * PAGE, 16 * PAGE, 1, 0x800, 1 << 64]))
    e = min(U64_MAX, s + span - 1)
    if draw(st.integers(0, 9)) == 0:
        s, e = e, s  # occasionally inverted
    return UnmapRequest(draw(domains), s, e, draw(reserved4))


attach_flags = st.sampled_from([0] * 12 + [1, 2, 3])
attach_req = st.builds(AttachRequest, domains, eps, attach_flags, reserved4)
detach_req = st.builds(DetachRequest, domains, eps)
probe_req = st.builds(ProbeRequest, eps)
translate_op = st.tuples(
    st.just("translate"), st.sampled_from(ENDPOINTS), vstart, st.integers(1, 3 * PAGE), st.booleans()
)

_KINDS = {
    "attach": attach_req,
    "detach": detach_req,
    "map": map_req(),
    "unmap": unmap_req(),
    "probe": probe_req,
    "translate": translate_op,
}
one_op = st.sampled_from(
    ["attach"] * 2 + ["detach"] + ["map"] * 6 + ["unmap"] * 3 + ["probe"] + ["translate"] * 3
).flatmap(lambda kind: _KINDS[kind])
ops = st.lists(one_op, min_size=4, max_size=50)
# Every sequence starts from two live domains so MAPs have somewhere to go.
SETUP = [AttachRequest(1, 0), AttachRequest(2, 1)]


def make_relay(memory: GuestMemory) -> Relay:
    r = Relay(memory, probe_size=PROBE_SIZE, reserved_regions=[COMMON_RESERVED])
    for ep in ENDPOINTS:
        r.add_endpoint(ep, reserved=[EP2_RESERVED] if ep == 2 else [])
    return r


def state_of(r: Relay) -> dict[int, tuple[bool, set[int], list[tuple[int, int, int, int]]]]:
    return {
        d: (r.domain_is_bypass(d), set(r.domain_endpoints(d)), [tuple(m) for m in r.mappings(d)])
        for d in r.domain_ids()
    }


def model_state(m: Model) -> dict[int, tuple[bool, set[int], list[tuple[int, int, int, int]]]]:
    return {d: (dom.bypass, set(dom.members), sorted(dom.maps)) for d, dom in m.domains.items()}


MEMORY = GuestMemory()
MEMORY.add_region(0, RAM)


@settings(max_examples=250, deadline=None)
@given(ops)
def test_relay_matches_model(script: list[object]) -> None:
    relay = make_relay(MEMORY)
    model = Model()
    for op in SETUP + script:
        if isinstance(op, tuple):
            _, ep, iova, size, write = op
            if iova + size - 1 > U64_MAX:
                continue
            expected = model.translate(ep, iova, size, write)
            try:
                got: int | None = relay.translate(ep, iova, size, write=write)
            except TranslationFault:
                got = None
            assert got == expected, op
            continue
        if isinstance(op, ProbeRequest):
            out = relay.handle_request(op.pack(), PROBE_SIZE + 4)
            assert len(out) == PROBE_SIZE + 4
            if op.endpoint in ENDPOINTS:
                regions = [ResvMem(1, *MSI), ResvMem(0, *COMMON_RESERVED)]
                if op.endpoint == 2:
                    regions.append(ResvMem(0, *EP2_RESERVED))
                assert out == pack_properties(regions, PROBE_SIZE) + bytes(4)
            else:
                assert out == bytes(PROBE_SIZE) + bytes([Status.NOENT, 0, 0, 0])
            continue
        assert isinstance(op, (AttachRequest, DetachRequest, MapRequest, UnmapRequest))
        handler = {
            AttachRequest: model.attach,
            DetachRequest: model.detach,
            MapRequest: model.map,
            UnmapRequest: model.unmap,
        }[type(op)]
        expected_status = handler(op)  # type: ignore[operator]
        out = relay.handle_request(op.pack(), 4)
        assert out == bytes([expected_status, 0, 0, 0]), (op, Status(out[0]), expected_status)
        assert state_of(relay) == model_state(model), op
