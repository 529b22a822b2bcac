"""The funnel state codec (``stream.join.state_codec``): version 4 is the documented struct layout,
the marshal versions 1-3 are still read (a store migrates as its states are rewritten), and an
unknown version is refused with an error that says so."""

from __future__ import annotations

import marshal
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream.join.driver import FunnelJoin, JoinTopics, Output
from stream.join.funnel import NO_WATERMARK, FunnelConfig, FunnelState, Held
from stream.join.state_codec import VERSION, decode_state, encode_state, encode_state_marshal
from stream.join.store import InMemoryStore
from stream.ops.clock import FakeClock
from tests.joinhelpers import event_bytes

T0 = 1_767_225_600_000
MIN = 60_000
STUB = FunnelState("bank_9", -1, None, held=(Held(2, T0 + MIN, "e/2", b'{"raw":1}', T0),))
OPEN = FunnelState("bank_1", T0, b'{"f":"v","\\u00e9":"x"}', (T0 + MIN, -1, -1, -1))
HELD = FunnelState(
    "bänk", T0, b"{}", (T0 + MIN, -1, -1, -1),
    (Held(3, T0 + 5 * MIN, "ïd/3", b"\xff\x00raw", NO_WATERMARK), Held(4, T0 + 9 * MIN, "id/4", b"", T0 + 2 * MIN)),
)  # fmt: skip
DONE = FunnelState("b", T0, b'{"a":"b"}', (T0 + 1, T0 + 2, T0 + 3, T0 + 4))


@pytest.mark.parametrize("state", [STUB, OPEN, HELD, DONE], ids=["stub", "open", "held", "activated"])
def test_every_kind_of_state_round_trips(state: FunnelState) -> None:
    data = encode_state(state)
    assert data[0] == VERSION == 4
    assert decode_state(data) == state


def test_version_4_is_the_documented_layout() -> None:
    data = encode_state(HELD)
    head = struct.unpack_from(">BqqqqqBHI", data)
    assert head == (4, T0, T0 + MIN, -1, -1, -1, 2, len("bänk".encode()), 2)
    pos = 48
    assert data[pos : pos + 5] == "bänk".encode() and data[pos + 5 : pos + 7] == b"{}"
    pos += 7
    step, t, lane, n_id, n_raw = struct.unpack_from(">BqqHI", data, pos)
    assert (step, t, lane, n_id, n_raw) == (3, T0 + 5 * MIN, NO_WATERMARK, len("ïd/3".encode()), 5)
    pos += 23
    assert data[pos : pos + n_id].decode() == "ïd/3" and data[pos + n_id : pos + n_id + n_raw] == b"\xff\x00raw"
    # a stub has no features: length 0xFFFFFFFF, no bytes
    assert struct.unpack_from(">I", encode_state(STUB), 44) == (0xFFFFFFFF,)


def _v1(s: FunnelState, feats: dict[str, str] | None) -> bytes:
    held = tuple((h.step, h.event_time_ms, h.event_id, h.raw) for h in s.held)
    return marshal.dumps((1, s.bank_id, s.imp_ms, feats, s.times, held))


def _v2(s: FunnelState) -> bytes:
    held = tuple((h.step, h.event_time_ms, h.event_id, h.raw) for h in s.held)
    return marshal.dumps((2, s.bank_id, s.imp_ms, s.features_json, s.times, held))


def test_reads_every_old_version() -> None:
    assert decode_state(encode_state_marshal(HELD)) == HELD  # v3: held events keep their lane
    assert marshal.loads(encode_state_marshal(HELD))[0] == 3
    v2 = decode_state(_v2(HELD))  # v2: no arrival lane
    assert v2.times == HELD.times and [h.lane_ms for h in v2.held] == [NO_WATERMARK, NO_WATERMARK]
    assert [(h.step, h.event_time_ms, h.event_id, h.raw) for h in v2.held] == [
        (h.step, h.event_time_ms, h.event_id, h.raw) for h in HELD.held
    ]
    assert decode_state(_v1(OPEN, {"f": "v", "é": "x"})) == OPEN  # v1: features as a dict
    assert decode_state(_v1(STUB, None)).held[0].raw == b'{"raw":1}'
    assert decode_state(encode_state_marshal(DONE)) == DONE


@pytest.mark.parametrize("first", [0, 1, 2, 3, 5, 0x7F, 0xFF])
def test_an_unknown_version_byte_is_refused_naming_it(first: int) -> None:
    data = bytes((first,)) + encode_state(OPEN)[1:]
    with pytest.raises(ValueError, match=rf"unknown codec version \(first byte 0x{first:02x}; this joiner reads version 4"):
        decode_state(data)


def test_an_unknown_marshal_version_and_corrupt_values_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^funnel state was written by an unknown codec version; clear the store$"):
        decode_state(marshal.dumps((7, "b", T0, None, (-1, -1, -1, -1), ())))
    with pytest.raises(ValueError, match="unknown codec version"):
        decode_state(b"")
    data = encode_state(HELD)
    with pytest.raises(ValueError, match=r"codec version 4\) is corrupt"):
        decode_state(data[:-1])  # truncated
    with pytest.raises(ValueError, match=rf"codec version 4\) is corrupt: {len(data) + 1} bytes, its fields take {len(data)}"):
        decode_state(data + b"x")  # trailing bytes
    with pytest.raises(ValueError, match=r"codec version 4\) is corrupt"):
        decode_state(data[:30])  # a cut header


ids = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
times = st.integers(-1, 2**53)


@given(
    bank=ids, imp=times, feats=st.one_of(st.none(), st.binary(max_size=300)), t=st.tuples(times, times, times, times),
    held=st.lists(st.builds(Held, st.integers(1, 4), times, ids, st.binary(max_size=200),
                            st.one_of(st.just(NO_WATERMARK), times)), max_size=4),
)  # fmt: skip
def test_any_state_round_trips(bank: str, imp: int, feats: bytes | None, t: tuple[int, int, int, int],
                               held: list[Held]) -> None:  # fmt: skip
    state = FunnelState(bank, imp, feats, t, tuple(held))
    assert decode_state(encode_state(state)) == state


def test_a_store_of_old_states_migrates_as_its_funnels_change() -> None:
    """A v3 state left by the previous joiner is read, advanced and written back as version 4."""
    store = InMemoryStore()
    old = FunnelState("bank_1", T0, b'{"f":"v"}')
    store.put(b"i1", encode_state_marshal(old), None)
    join = FunnelJoin(FunnelConfig(), JoinTopics(("imp", "clk", "app", "apr", "act"), "samples", "dead"),
                      lambda p: store, FakeClock(T0), lateness_ms=(0,) * 5, max_future_ms=0)  # fmt: skip
    out: list[Output] = []
    join.on_batch([("clk", 0, b"i1", event_bytes(1, "i1", T0 + MIN), 3, False)], out)
    data = store.get(b"i1")
    assert data is not None and data[0] == VERSION
    assert decode_state(data).times == (T0 + MIN, -1, -1, -1)
