"""The join core's compiled common path (stream/join/_fastjoin.c) against the Python it copies.

Each compiled piece must give the Python core's results exactly - the same sample bytes, dues,
purges and due order - or decline (None) so that the Python core decides. These tests fail, not
skip, when the module was not built: every install here compiles it (setup.py).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from stream.contract.samples import KINDS, SAMPLE_WRITERS, SampleEncoding, decode_record
from stream.join import fast
from stream.join.funnel import (
    NO_WATERMARK,
    NONE,
    FunnelConfig,
    FunnelState,
    Held,
    features_json,
    next_dues,
    sweep,
)
from stream.join.state_codec import decode_state, encode_state, encode_state_marshal
from stream.join.store import DueIndex, InMemoryStore, new_due_index


def test_the_module_is_built() -> None:
    assert fast.AVAILABLE, "stream/join/_fastjoin.c was not compiled: run `make install` (needs gcc)"


def _twin() -> fast._fastjoin.DueIndex:
    assert fast.AVAILABLE
    return fast._fastjoin.DueIndex()


# --- DueIndex -----------------------------------------------------------------------------------

_KEYS = [b"", b"a", b"ab", b"b", b"i-1", b"i-10", b"i-2", b"\xff", b"a\x00"]
_DUES = st.one_of(
    st.none(),
    st.tuples(*[st.one_of(st.none(), st.integers(-5, 30)) for _ in range(5)]),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.sampled_from(_KEYS), _DUES, st.integers(0, 4), st.integers(-6, 32)),
                    max_size=80))
def test_the_c_due_index_pops_what_the_python_one_pops(ops: list) -> None:
    py, c = DueIndex(), _twin()
    for is_set, key, dues, lane, until in ops:
        if is_set:
            py.set(key, dues)
            c.set(key, dues)
        else:
            assert c.pop_due(lane, until) == py.pop_due(lane, until)
        assert len(c) == len(py)
    for lane in range(5):
        assert c.pop_due(lane, 2**62) == py.pop_due(lane, 2**62)


def test_the_c_due_index_stays_equal_through_compaction() -> None:
    """Many reschedules of few keys: the heaps are rebuilt (more than 4 entries a key + 1024)."""
    rng = random.Random(5)
    py, c = DueIndex(), _twin()
    keys = [f"k{i}".encode() for i in range(50)]
    for step in range(20_000):
        key = rng.choice(keys)
        dues = tuple(rng.choice([None, rng.randrange(0, 10_000)]) for _ in range(5))
        py.set(key, dues)  # type: ignore[arg-type]
        c.set(key, dues)  # type: ignore[arg-type]
        if step % 997 == 0:
            lane, until = rng.randrange(5), rng.randrange(0, 10_000)
            assert c.pop_due(lane, until) == py.pop_due(lane, until)
    assert len(c) == len(py)
    assert [c.pop_due(k, 10**6) for k in range(5)] == [py.pop_due(k, 10**6) for k in range(5)]


def test_the_c_due_index_refuses_what_it_cannot_hold() -> None:
    c = _twin()
    with pytest.raises(TypeError, match="keys are bytes"):
        c.set("text", (1, None, None, None, None))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tuple of 5"):
        c.set(b"k", (1, 2))  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        c.pop_due(5, 0)
    c.set(b"k", None)
    assert len(c) == 0


def test_stores_use_the_c_due_index() -> None:
    assert type(new_due_index()) is fast._fastjoin.DueIndex
    s = InMemoryStore()
    s.put(b"i-1", b"state", (10, None, 20, None, None))
    assert (s.pop_due(0, 9), s.pop_due(0, 10), s.pop_due(2, 30)) == ([], [b"i-1"], [b"i-1"])


# --- sweep_states -------------------------------------------------------------------------------

CFGS = [
    FunnelConfig(),
    FunnelConfig(policy="matured"),
    FunnelConfig(windows_ms=(7, 11, 5, 13), grace_ms=2, observe_ms=3, retention_ms=40, skew_ms=1),
    FunnelConfig(windows_ms=(7, 11, 5, 13), grace_ms=0, observe_ms=0, retention_ms=0, skew_ms=0, policy="matured"),
    FunnelConfig(windows_ms=(4, 9, 3, 6), grace_ms=1, observe_ms=6, retention_ms=20, skew_ms=2),  # observe > click window
]
_SMALL = st.integers(-3, 120)
# MessagePack's integer forms change at these: each side of every boundary
_EDGES = st.sampled_from([b + d for b in (0, 128, 256, 65_536, 2**32, 2**53 - 1, -32, -128, -32_768, -(2**31))
                          for d in (-1, 0, 1)])
_TIME = st.one_of(_SMALL, _EDGES, st.integers(-(2**53), 2**53))
_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
# short strings, and each side of MessagePack's string-form boundaries (fixstr 31, str8 255)
_PLAIN = st.one_of(st.text(_PRINTABLE, min_size=1, max_size=40),
                   st.sampled_from([31, 32, 255, 256]).flatmap(lambda n: st.text(_PRINTABLE, min_size=n, max_size=n)))
_ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
_FEATURES = st.one_of(
    st.dictionaries(_PLAIN, st.one_of(_PLAIN, st.just("")), max_size=20),
    st.dictionaries(st.one_of(_PLAIN, _ANY_TEXT), st.one_of(_PLAIN, _ANY_TEXT, st.just("")), max_size=20),
)


@st.composite
def _states(draw: st.DrawFn) -> FunnelState:
    """Mostly the usual state (impression seen, steps in order, nothing held); some the compiled
    path must decline (a stub, held events, odd banks)."""
    imp = draw(_TIME.filter(lambda t: 0 <= t < 2**53 - 200) if draw(st.integers(0, 9)) else _TIME)
    n = draw(st.integers(0, 4))
    times = [NONE] * 4
    t = imp
    for k in range(n):
        t = max(0, t + draw(st.integers(-2, 40)))  # (a step stamped before its predecessor: the skew)
        times[k] = t
    held: tuple[Held, ...] = ()
    if draw(st.integers(0, 9)) == 0:
        held = (Held(draw(st.integers(n + 2, 4)) if n < 3 else 4, draw(_SMALL), "e", b"{}", NO_WATERMARK),)
    bank = draw(_ANY_TEXT if draw(st.integers(0, 9)) == 0 else _PLAIN)
    if draw(st.integers(0, 19)) == 0:
        return FunnelState(bank, NONE, None, (NONE,) * 4, held or (Held(1, 5, "e", b"{}", NO_WATERMARK),))
    return FunnelState(bank, imp, features_json(draw(_FEATURES)), (times[0], times[1], times[2], times[3]), held)




def _python_sweep(ikey: bytes, state: FunnelState, prev: tuple, now: tuple, cfg: FunnelConfig,
                  encoding: SampleEncoding) -> tuple:
    """What ``FunnelJoin.sweep`` does with a usual state, by the Python core."""
    res = sweep(state, prev, now, cfg)
    assert not res.rejects
    purge = res.changed and res.state is None
    assert res.changed == purge and (purge or res.state == state)
    write = SAMPLE_WRITERS[encoding]
    samples = [
        (KINDS.index(s.kind), s.elapsed_ms,
         write(ikey.decode(), state.bank_id, state.imp_ms, state.features_json or b"{}", s.labels, s.mature,
               s.kind, s.elapsed_ms, s.seq, s.watermark_ms, cfg.policy))
        for s in res.samples
    ]  # fmt: skip
    return (purge, None if purge else next_dues(state, now, cfg), samples)


def _usual(state: FunnelState) -> bool:
    """Impression seen, nothing held, event times in the event contract's range."""
    in_range = all(0 <= t < 2**53 for t in (state.imp_ms, *state.times) if t != NONE)
    return state.imp_ms != NONE and not state.held and in_range


def _lanes_near(data: st.DataObject, state: FunnelState, cfg: FunnelConfig) -> tuple[tuple, tuple]:
    """Lanes (prev, now) around the funnel's own times, where its first, final and purge fall."""
    base = state.imp_ms if state.imp_ms != NONE else 0
    span = max(cfg.windows_ms) + cfg.retention_ms + 2 * cfg.observe_ms + 10
    if span > 1000:  # the paper's windows: offsets at their scale
        offsets = st.sampled_from([0, cfg.observe_ms, cfg.windows_ms[0], cfg.windows_ms[1], cfg.retention_ms,
                                   cfg.windows_ms[0] + cfg.retention_ms, 40 * 86_400_000]).flatmap(
            lambda o: st.integers(o - 2, o + 2))  # fmt: skip
    else:
        offsets = st.integers(-5, span)
    def lane() -> int:
        return NO_WATERMARK if data.draw(st.integers(0, 7)) == 0 else base + data.draw(offsets)

    prev = tuple(lane() for _ in range(5))
    now = tuple(lane() for _ in range(5))
    return prev, tuple(max(a, b) for a, b in zip(prev, now, strict=True))  # lanes never go back


@settings(max_examples=500, deadline=None)
@given(
    state=_states(), data=st.data(), cfg=st.sampled_from(CFGS), encoding=st.sampled_from(["json", "msgpack"]),
    ikey=st.integers(0, 9).flatmap(lambda i: _ANY_TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")) if i == 0
                                   else _PLAIN.map(str.encode)),
)
def test_sweep_states_is_the_python_sweep_or_declines(state: FunnelState, data: st.DataObject, cfg: FunnelConfig,
                                                      encoding: SampleEncoding, ikey: bytes) -> None:
    prev, now = _lanes_near(data, state, cfg)
    got = fast._fastjoin.sweep_states([ikey], [encode_state(state)], prev, now, fast.fast_cfg(cfg),
                                      encoding == "msgpack", cfg.policy)[0]
    if not _usual(state):
        assert got is None, "a stub, held events or times out of range are the Python core's"
        event("not the usual state")
        return
    if got is None:  # declined: only for text JSON would escape or features it cannot pack
        event("declined")
        plain = ikey.decode("utf-8", "replace") + state.bank_id
        assert not (plain.isascii() and plain.isprintable() and '"' not in plain and "\\" not in plain) or (
            encoding == "msgpack" and b"\\" in (state.features_json or b"")
        )
        return
    assert got == _python_sweep(ikey, state, prev, now, cfg, encoding)
    event(f"decided: purge {got[0]}, sample kinds {sorted(k for k, _, _ in got[2])}")
    for _, _, value in got[2]:
        decode_record(value)  # and readers take it


def test_sweep_states_takes_the_usual_states_of_a_real_stream() -> None:
    """The simulator's impressions at their first and final sweeps: decided in C, as Python would."""
    cfg = FunnelConfig()
    states = [FunnelState(f"bank_{i % 7}", 1_767_225_600_000 + i * 1000, features_json({"f": str(i), "g": "x y"}),
                          (1_767_225_600_000 + i * 1000 + 5,) + (NONE,) * 3 if i % 5 == 0 else (NONE,) * 4)
              for i in range(200)]  # fmt: skip
    keys = [f"imp-{i}".encode() for i in range(200)]
    t0 = 1_767_225_600_000
    for prev, now in [((NO_WATERMARK,) * 5, (t0 + 31 * 60_000,) * 5), ((t0,) * 5, (t0 + 4 * 86_400_000,) * 5),
                      ((t0,) * 5, (t0 + 40 * 86_400_000,) * 5)]:  # fmt: skip
        for encoding in ("json", "msgpack"):
            got = fast._fastjoin.sweep_states(keys, [encode_state(s) for s in states], prev, now, fast.fast_cfg(cfg),
                                              encoding == "msgpack", cfg.policy)  # fmt: skip
            assert None not in got
            assert got == [_python_sweep(k, s, prev, now, cfg, encoding)  # type: ignore[arg-type]
                           for k, s in zip(keys, states, strict=True)]  # fmt: skip


def test_sweep_states_when_the_observe_time_comes_after_the_click_window() -> None:
    """No first sample then (the final comes first); lanes each side of both times."""
    cfg = CFGS[4]
    state = FunnelState("b", 1000, b'{"a":"b"}')
    fd, fa = 1000 + cfg.observe_ms, 1000 + cfg.windows_ms[0]
    for lane0 in (fd - 1, fd, fd + 1):
        for lane1 in (fa - 1, fa, fa + 1):
            prev, now = (900, 900, 0, 0, 0), (lane0, lane1, 0, 0, 0)
            for encoding in ("json", "msgpack"):
                got = fast._fastjoin.sweep_states([b"k"], [encode_state(state)], prev, now, fast.fast_cfg(cfg),
                                                  encoding == "msgpack", cfg.policy)  # fmt: skip
                assert got == [_python_sweep(b"k", state, prev, now, cfg, encoding)]  # type: ignore[arg-type]


def test_sweep_states_declines_other_codec_versions_and_corrupt_bytes() -> None:
    s = FunnelState("b", 5, b'{"a":"b"}')
    data = encode_state(s)
    olds = [encode_state_marshal(s), data[:-1], data + b"x", bytes([5]) + data[1:], None]
    got = fast._fastjoin.sweep_states([b"k"] * 5, olds, (0,) * 5, (10**9,) * 5, fast.fast_cfg(FunnelConfig()),
                                      True, "early")  # fmt: skip
    assert got == [None] * 5
    assert decode_state(olds[0]) == s  # the Python core reads the old version


@pytest.mark.parametrize("n", [1, 31, 32, 255, 256, 65_535, 65_536])
@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_sweep_states_at_the_encodings_edges(n: int, encoding: SampleEncoding) -> None:
    """Texts and integers each side of MessagePack's form changes; lanes exactly at a final time."""
    cfg = FunnelConfig()
    w = cfg.windows_ms[0]
    for imp in (0, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1 - w, 2**32 - w, 2**32 - 1, 2**32, 2**53 - 2 * w):
        state = FunnelState("b" * min(n, 65_535), imp, features_json({"f" * min(n, 256): "v" * min(n, 256), "g": ""}))
        key = b"k" * n
        for prev, now in [((imp + w - 1,) * 5, (imp + w,) * 5), ((imp + w,) * 5, (imp + w + 1,) * 5),
                          ((imp,) * 5, (imp + cfg.observe_ms,) * 5), ((imp + cfg.observe_ms,) * 5, (imp + w - 1,) * 5)]:
            got = fast._fastjoin.sweep_states([key], [encode_state(state)], prev, now, fast.fast_cfg(cfg),
                                              encoding == "msgpack", cfg.policy)  # fmt: skip
            assert got == [_python_sweep(key, state, prev, now, cfg, encoding)]


# --- parse_records, advance_impression and advance_step --------------------------------------------

_FIELDS = ("schema_version", "event_type", "event_id", "impression_id", "event_time_ms", "bank_id", "features")


_JSON_SAFE = st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters='"\\')  # no escape needed
_ID = st.text(_JSON_SAFE, min_size=1, max_size=128)
_BAD: dict[str, list[str]] = {  # each field's ways of breaking the contract (or its compact form)
    "schema_version": ["2", "1.0", "true", '"1"', " 1", "01"],
    "event_type": ['"click"', '"Impression"', "null", '"impression "'],
    "event_id": ['""', '"' + "x" * 129 + '"', '"\x7f"', "5", '"a\\"b"'],
    "impression_id": ['""', '"' + "i" * 129 + '"', '"\\u0041"', '"\\u00e9"', "null"],
    "event_time_ms": ["-0", "-1", "01", "1.0", "1e3", str(2**53), str(10**17), '"5"', "null", "1 "],
    "bank_id": ['""', "[]", '"b\tc"'],
    "features": ["null", '{"a":"b","a":"c"}', '{"a":1}', '{"":"x"}', '{"a":"' + "v" * 257 + '"}', '{"a":{"b":"c"}}',
                 '{"a":"b",}', '{"a" :"b"}', '{"a":"\\u0062"}', "[]", '{"a":"b" }', '{"a":"\x01"}'],
}


@st.composite
def _impression_records(draw: st.DrawFn) -> bytes:
    """Impression records: mostly the contract's compact form (fields in any order), and every
    way of leaving it - other types, bounds, repeats, unknown or missing fields, whitespace,
    escapes, numbers spelt otherwise, trailing bytes, a byte changed anywhere."""
    fields = {
        "schema_version": "1",
        "event_type": '"impression"',
        "event_id": f'"{draw(_ID)}"',
        "impression_id": f'"{draw(st.one_of(_ID, st.sampled_from(["i" * 128, "x"])))}"',
        "event_time_ms": str(draw(st.one_of(st.integers(0, 2**53 - 1), st.sampled_from([0, 2**53 - 1])))),
        "bank_id": f'"{draw(_ID)}"',
        "features": "{" + ",".join(f'"{k}":"{v}"' for k, v in draw(st.dictionaries(
            st.text(_JSON_SAFE, min_size=1, max_size=256), st.text(_JSON_SAFE, max_size=256), max_size=12)).items()) + "}",
    }  # fmt: skip
    edit = draw(st.integers(0, 9))
    if edit == 1:
        name = draw(st.sampled_from(sorted(_BAD)))
        fields[name] = draw(st.sampled_from(_BAD[name]))
    order = draw(st.permutations(_FIELDS))
    pairs = [f'"{k}":{fields[k]}' for k in order]
    if edit == 2:
        pairs.pop(draw(st.integers(0, len(pairs) - 1)))
    elif edit == 3:
        pairs.append(pairs[draw(st.integers(0, len(pairs) - 1))])
    elif edit == 4:
        pairs.insert(draw(st.integers(0, len(pairs))), '"extra":"x"')
    text = "{" + ",".join(pairs) + "}"
    if edit == 5:
        text = text.replace(draw(st.sampled_from([",", ":", "{"])), draw(st.sampled_from([", ", " :", "{\n"])), 1)
    elif edit == 6:
        text += draw(st.sampled_from([" ", "x", "{}", "\n", "}"]))
    raw = text.encode()
    if edit == 7:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    elif edit == 8:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    return raw


@settings(max_examples=700, deadline=None)
@given(raw=_impression_records())
def test_parse_records_vouches_only_for_what_the_decoder_takes_and_agrees_with_it(raw: bytes) -> None:
    from stream.contract.events import Event, InvalidEvent, parse_event, parse_events

    got = fast._fastjoin.parse_records([raw, raw], [0, 1])
    assert got[1] is None, "only the impressions topic's records"
    expected = parse_events([raw], ["impression"])[0]
    if got[0] is None:
        event("declined" if isinstance(expected, Event) else "declined (invalid)")
        return
    assert isinstance(expected, Event), f"vouched for a record the decoder refuses: {expected}"
    assert isinstance(parse_event(raw, "impression"), Event) and not isinstance(expected, InvalidEvent)
    event("vouched")
    ikey, t, state = got[0]
    assert (ikey, t) == (expected.impression_id.encode(), expected.event_time_ms)
    assert state == encode_state(FunnelState(expected.bank_id, t, features_json(expected.features)))


_GOOD = {"schema_version": "1", "event_type": '"impression"', "event_id": '"e-1"', "impression_id": '"i-1"',
         "event_time_ms": "1767225600000", "bank_id": '"bank_1"', "features": '{"a":"b","c":""}'}


@pytest.mark.parametrize(("name", "bad"), [(k, v) for k, vs in _BAD.items() for v in vs])
def test_parse_records_declines_each_way_out_of_the_compact_contract(name: str, bad: str) -> None:
    good = "{" + ",".join(f'"{k}":{v}' for k, v in _GOOD.items()) + "}"
    assert fast._fastjoin.parse_records([good.encode()], [0])[0] is not None
    raw = ("{" + ",".join(f'"{k}":{bad if k == name else v}' for k, v in _GOOD.items()) + "}").encode()
    assert fast._fastjoin.parse_records([raw], [0]) == [None]


def test_parse_records_declines_a_byte_out_of_printable_ascii_anywhere_in_a_string() -> None:
    """Strings are checked eight bytes at a time, then the tail: a control byte, DEL or a
    non-ASCII byte at any position of an id, a feature name or value is declined (the strict
    decoder then words it), and the strings around it are still read."""
    def record(iid: bytes, name: bytes, value: bytes) -> bytes:
        return (b'{"schema_version":1,"event_type":"impression","event_id":"e","impression_id":"' + iid +
                b'","event_time_ms":1,"bank_id":"b","features":{"' + name + b'":"' + value + b'","z":"1"}}')  # fmt: skip

    plain = b"abcdefghijklmnopqrstu"  # 21 bytes: two words of eight and a tail
    assert fast._fastjoin.parse_records([record(plain, plain, plain)], [0])[0] is not None
    for bad in (0x00, 0x1F, 0x7F, 0x80, 0xC3, 0xFF):
        for at in range(len(plain)):
            s = plain[:at] + bytes([bad]) + plain[at + 1:]
            for rec in (record(s, plain, plain), record(plain, s, plain), record(plain, plain, s)):
                assert fast._fastjoin.parse_records([rec], [0]) == [None], (bad, at)
    for edge in (0x20, 0x7E, 0x21, 0x7D):  # the range's own edges are text
        s = bytes([edge]) * 9
        assert fast._fastjoin.parse_records([record(b"i", s, s)], [0])[0] is not None


def test_parse_records_declines_a_repeated_feature_name_among_many() -> None:
    """A repeated name anywhere among up to 256 features is declined (msgspec would keep the last;
    the strict decoder refuses it); names alike but for one byte - in their first or last eight
    bytes, or in the middle of long ones - are distinct."""
    base = {f"user_feature_{i:03d}_x": str(i) for i in range(40)}

    def record(names: list[str]) -> bytes:
        feats = ",".join(f'"{n}":"v"' for n in names)
        return ('{"schema_version":1,"event_type":"impression","event_id":"e","impression_id":"i",'
                '"event_time_ms":1,"bank_id":"b","features":{' + feats + "}}").encode()  # fmt: skip

    names = list(base)
    assert fast._fastjoin.parse_records([record(names)], [0])[0] is not None
    for i, j in [(0, 1), (0, 39), (17, 18), (38, 39), (5, 30)]:
        repeated = [*names[:j], names[i], *names[j + 1:]]
        assert fast._fastjoin.parse_records([record(repeated)], [0]) == [None], (i, j)
    alike = ["a" * 20 + c + "b" * 20 for c in "xyz"] + ["k", "kk", "k" * 8, "k" * 9, "k" * 16, "k" * 17]
    assert fast._fastjoin.parse_records([record(alike)], [0])[0] is not None
    many = [f"f{i}" for i in range(256)]
    assert fast._fastjoin.parse_records([record(many)], [0])[0] is not None
    assert fast._fastjoin.parse_records([record([*many, "f999"])], [0]) == [None]  # past the contract's 256
    assert fast._fastjoin.parse_records([record([*many[:255], "f3"])], [0]) == [None]


def test_parse_records_takes_the_simulators_records() -> None:
    from simulators.faults import FaultConfig, SimulatedStream
    from simulators.funnel import FunnelSimulator, SimConfig

    recs = [r.value for r in SimulatedStream(FunnelSimulator(SimConfig(seed=3, impressions_per_day=300)), days=1,
                                             faults=FaultConfig()) if r.step == "impression"]  # fmt: skip
    got = fast._fastjoin.parse_records(recs, [0] * len(recs))
    assert len(recs) > 200 and None not in got


@st.composite
def _stubs(draw: st.DrawFn, base: int) -> FunnelState:
    """A stub as the Python core writes it - one to four held events of distinct steps, stamped
    around ``base`` (in and out of their windows, before their predecessor), each with its own
    topic's lane when it came - and now and then text the compiled path leaves to Python."""
    in_order = draw(st.integers(0, 3)) > 0  # mostly the steps from the click on, each soon after the last
    if in_order:
        steps = list(range(1, draw(st.integers(1, 4)) + 1))
        times, t = [], base
        for _ in steps:
            t += draw(st.integers(-1, 6))
            times.append(t)
    else:
        steps = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4, unique=True))
        times = [base + draw(st.integers(-8, 60)) for _ in steps]
    odd = draw(st.integers(0, 9)) == 0
    held = tuple(
        Held(k, max(0, min(2**53 - 1, t)), draw(_ANY_TEXT if odd else _ID), draw(st.binary(max_size=8)),
             NO_WATERMARK if draw(st.booleans()) else base + draw(st.integers(-5, 70)))
        for k, t in zip(steps, times, strict=True)
    )  # fmt: skip
    return FunnelState(draw(_ANY_TEXT if odd else _PLAIN), NONE, None, (NONE,) * 4, held)


def _odd_stub(stub: FunnelState | None) -> bool:
    """A stub the joiner never writes - features, none or more than four held events, two of one step - or
    whose text is not ASCII or whose held times are out of the event contract's range: the
    compiled path leaves it to the Python core."""
    if stub is None:
        return False
    steps = [h.step for h in stub.held]
    return stub.features_json is not None or not (
        1 <= len(steps) <= 4 and len(set(steps)) == len(steps) and stub.bank_id.isascii() and all(
        h.event_id.isascii() and 0 <= h.event_time_ms < 2**53 for h in stub.held))  # fmt: skip


def _plain(text: str) -> bool:
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


@settings(max_examples=900, deadline=None)
@given(t=_TIME, data=st.data(), cfg=st.sampled_from(CFGS), encoding=st.sampled_from(["json", "msgpack"]),
       feats=_FEATURES, bank=_PLAIN, on_stub=st.integers(0, 2))
def test_advance_impression_is_advance_of_an_impression_on_no_state_or_a_stub_or_declines(
    t: int, data: st.DataObject, cfg: FunnelConfig, encoding: SampleEncoding, feats: dict[str, str], bank: str,
    on_stub: int,
) -> None:
    base = t if 0 <= t < 2**53 else 0
    stub = data.draw(_stubs(base)) if on_stub else None
    swept, pswept = _lanes_near(data, FunnelState(bank, base, b"{}"), cfg)
    _check_advance_impression(t, feats, bank, stub, swept, pswept, cfg, encoding)


def _check_advance_impression(t: int, feats: dict[str, str], bank: str, stub: FunnelState | None, swept: tuple,
                              pswept: tuple, cfg: FunnelConfig, encoding: SampleEncoding) -> None:
    from stream.contract.events import Event
    from stream.join.funnel import advance

    imp = FunnelState(bank, t, features_json(feats))
    got = fast._fastjoin.advance_impression(b"imp-1", encode_state(imp),
                                            encode_state(stub) if stub is not None else None, swept, pswept,
                                            fast.fast_cfg(cfg), encoding == "msgpack", cfg.policy)  # fmt: skip
    if not (0 <= t < 2**53 and _usual(imp)):
        assert got is None
        return
    res = advance(stub, Event(0, "e", "imp-1", t, bank, feats), b"{}", swept, cfg)
    if got is None:
        # a dead letter (older than the retention, a held event that does not count), one left
        # held, or what the sample writer or the stub's codec leaves to Python
        held = res.state is not None and bool(res.state.held)
        odd_stub = _odd_stub(stub)
        escaped = encoding == "msgpack" and b"\\" in (imp.features_json or b"")
        _note(f"declined: rejects {bool(res.rejects)} held {held} odd stub {odd_stub}")
        assert res.rejects or held or odd_stub or escaped or not _plain(bank)
        return
    assert not res.rejects and res.changed and res.state is not None and not res.state.held
    assert got[0] == encode_state(res.state) and got[1] == next_dues(res.state, pswept, cfg)
    write = SAMPLE_WRITERS[encoding]
    st_ = res.state
    samples = [(KINDS.index(s.kind), s.elapsed_ms,
                write("imp-1", bank, t, st_.features_json or b"{}", s.labels, s.mature, s.kind, s.elapsed_ms, s.seq,
                      s.watermark_ms, cfg.policy)) for s in res.samples]  # fmt: skip
    _note(f"{'on a stub' if stub else 'fresh'}: steps {sum(x != NONE for x in st_.times)} samples "
          f"{[k for k, _, _ in samples]}")
    assert got[2] == samples


def test_advance_impression_joins_the_clicks_a_backlog_read_held_for_it() -> None:
    """The common case the stub path is for: a click read before its impression (the clicks'
    topic ahead in a backlog), joined in C with the same state, dues and samples as in Python."""
    cfg = FunnelConfig()
    stub = FunnelState("bank_1", NONE, None, (NONE,) * 4, (Held(1, 1_000_060_000, "c-1", b"{...}", NO_WATERMARK),))
    imp = FunnelState("bank_1", 1_000_000_000, b'{"a":"b"}')
    swept = (1_000_000_000 + cfg.observe_ms, NO_WATERMARK, NO_WATERMARK, NO_WATERMARK, NO_WATERMARK)
    got = fast._fastjoin.advance_impression(b"imp-1", encode_state(imp), encode_state(stub), swept, swept,
                                            fast.fast_cfg(cfg), False, cfg.policy)  # fmt: skip
    assert got is not None, "a click in its window joins its impression in the compiled path"
    state = decode_state(got[0])
    assert state.times == (1_000_060_000, NONE, NONE, NONE) and not state.held and state.imp_ms == 1_000_000_000
    assert [k for k, _, _ in got[2]] == [0], "its first sample (due at once), with the click in its labels"
    assert b'"labels":[1,0,0,0]' in got[2][0][2]


def test_advance_impression_at_the_edges_of_a_held_events_window() -> None:
    """A held click stamped at the edges of its window and of the skew, and whose own topic's lane
    when it came was at the edge of the funnel's final time (arrived too late at fa, not at fa - 1)."""
    for cfg in (FunnelConfig(), CFGS[2]):
        imp, w, skew = 1_000_000, cfg.windows_ms[0], cfg.skew_ms
        for click in (imp - skew - 1, imp - skew, imp + w, imp + w + 1):
            for lane in (NO_WATERMARK, imp + w - 1, imp + w):
                for lane0 in (NO_WATERMARK, imp + cfg.observe_ms):
                    stub = FunnelState("b", NONE, None, (NONE,) * 4, (Held(1, click, "c", b"{}", lane),))
                    swept = (lane0, NO_WATERMARK, NO_WATERMARK, NO_WATERMARK, NO_WATERMARK)
                    for encoding in ("json", "msgpack"):
                        _check_advance_impression(imp, {"a": "b"}, "b", stub, swept, swept, cfg, encoding)  # type: ignore[arg-type]


@settings(max_examples=800, deadline=None)
@given(step=st.integers(1, 4), eid=_ID, iid=_ID, bank=_ID, t=st.one_of(st.integers(0, 2**53 - 1), _EDGES),
       extra=st.sampled_from(["", ',"features":null', ',"features":{}', ',"x":1', ' ']))
def test_parse_records_reads_a_steps_record_as_the_decoder_does(step: int, eid: str, iid: str, bank: str, t: int,
                                                                 extra: str) -> None:
    from stream.contract.events import STEPS, Event, parse_events

    raw = (f'{{"schema_version":1,"event_type":"{STEPS[step]}","event_id":"{eid}","impression_id":"{iid}",'
           f'"event_time_ms":{t},"bank_id":"{bank}"{extra}}}').encode()  # fmt: skip
    got = fast._fastjoin.parse_records([raw] * 5, [0, 1, 2, 3, 4])
    assert [g is None for i, g in enumerate(got) if i != step] == [True] * 4, "only its own topic's"
    expected = parse_events([raw], [STEPS[step]])[0]
    if got[step] is None:
        event("declined")
        return
    event("vouched")
    assert isinstance(expected, Event) and extra == ""
    assert got[step] == (iid.encode(), t, None) == (expected.impression_id.encode(), expected.event_time_ms, None)


def _step_raw(step: int, t: int, iid: str = "imp-1", bank: str = "b") -> bytes:
    from stream.contract.events import Event, encode_event

    return encode_event(Event(step, f"e-{step}", iid, t, bank))


@st.composite
def _step_cases(draw: st.DrawFn) -> tuple:
    """An event of a step on no state, a stub, or a usual state at any point of its funnel."""
    state = draw(st.one_of(st.none(), _states()))
    base = state.imp_ms if state is not None and state.imp_ms != NONE else draw(st.integers(0, 2**40))
    if state is not None and state.imp_ms == NONE and draw(st.booleans()):
        state = draw(_stubs(base))  # a stub of several held events
    step = draw(st.integers(1, 4))
    if state is not None and state.imp_ms != NONE and NONE in state.times and draw(st.integers(0, 9)) < 7:
        step = state.times.index(NONE) + 1  # mostly the next step in order
    if state is not None and state.imp_ms != NONE and 0 <= base < 2**53:
        pred = max([base, *[x for x in state.times if x != NONE]])
        t = max(0, pred + draw(st.integers(-8, 50)))
    else:
        t = max(0, base + draw(st.integers(-8, 50)))
    return state, step, min(t, 2**53 - 1)


@settings(max_examples=1200, deadline=None)
@given(case=_step_cases(), data=st.data(), cfg=st.sampled_from(CFGS), encoding=st.sampled_from(["json", "msgpack"]))
def test_advance_step_is_advance_or_declines(case: tuple, data: st.DataObject, cfg: FunnelConfig,
                                             encoding: SampleEncoding) -> None:
    state, step, t = case
    probe = state if state is not None and state.imp_ms != NONE else FunnelState("b", t, b"{}")
    swept, pswept = _lanes_near(data, probe, cfg)
    _check_advance_step(state, step, t, swept, pswept, cfg, encoding)


def _note(text: str) -> None:
    """hypothesis's ``event`` inside a hypothesis test; nothing in a plain one."""
    from hypothesis.control import currently_in_test_context

    if currently_in_test_context():
        event(text)


def test_advance_step_at_the_edges_of_the_first_sample() -> None:
    """A click after the first sample went out (a correction), and after an observe time that comes
    only once the click window closed (no first sample, so no correction)."""
    for cfg in (FunnelConfig(), CFGS[4]):
        state = FunnelState("b", 1000, b'{"a":"b"}')
        fd, fa = 1000 + cfg.observe_ms, 1000 + cfg.windows_ms[0]
        for lane0 in (fd - 1, fd, fd + 1, fa + 5):
            for encoding in ("json", "msgpack"):
                swept = (lane0, fa - 1, 0, 0, 0)
                _check_advance_step(state, 1, fa - 2, swept, swept, cfg, encoding)  # type: ignore[arg-type]


def _check_advance_step(state: FunnelState | None, step: int, t: int, swept: tuple, pswept: tuple, cfg: FunnelConfig,
                        encoding: SampleEncoding) -> None:
    from stream.contract.events import parse_event
    from stream.join.funnel import advance

    raw = _step_raw(step, t)
    old = encode_state(state) if state is not None else None
    got = fast._fastjoin.advance_step(b"imp-1", old, raw, step, swept, pswept, fast.fast_cfg(cfg), encoding == "msgpack",
                                      cfg.policy)  # fmt: skip
    stub = state is not None and state.imp_ms == NONE
    if state is not None and not stub and not _usual(state):
        assert got is None
        _note("declined: not the usual state")
        return
    res = advance(state, parse_event(raw, None), raw, swept, cfg)
    if got is None:
        _note("declined")
        # only what would be rejected, held behind a missing step, or written in a form it leaves to Python
        held = state is not None and not stub and res.state is not None and bool(res.state.held)
        bank = state.bank_id if state is not None and not stub else "b"
        features_escaped = state is not None and b"\\" in (state.features_json or b"")
        odd_stub = stub and _odd_stub(state)
        assert res.rejects or held or odd_stub or not _plain(bank) or (encoding == "msgpack" and features_escaped), res
        return
    changed, new, dues, samples, duplicate = got
    assert not res.rejects
    assert (changed, duplicate) == (res.changed, res.duplicate)
    if changed:
        assert res.state is not None
        assert new == encode_state(res.state) and dues == next_dues(res.state, pswept, cfg)
    st_ = res.state if res.state is not None else state
    write = SAMPLE_WRITERS[encoding]
    assert samples == [
        (KINDS.index(x.kind), x.elapsed_ms,
         write("imp-1", st_.bank_id, st_.imp_ms, st_.features_json or b"{}", x.labels, x.mature, x.kind, x.elapsed_ms,
               x.seq, x.watermark_ms, cfg.policy)) for x in res.samples]  # fmt: skip
    _note(f"decided: changed {changed} dup {duplicate} samples {[k for k, _, _ in samples]}")


# --- the batch entry points: the per-event calls over a partition's groups -----------------------


class _Out(tuple):  # a tuple type as the join's Output (a NamedTuple) is
    __slots__ = ()


def _groups_by_calls(keys: list[bytes], olds: list, groups: list, pswept: tuple, cfg: FunnelConfig,
                     msgpack: bool) -> tuple:
    """What ``FunnelJoin.on_batch`` did with ``advance_impression`` / ``advance_step`` one call per
    event before ``advance_groups``: the reference it must equal."""
    fcfg = fast.fast_cfg(cfg)
    out: list = []
    delays: list = []
    puts, rest, kinds, dups = [], [], [0, 0, 0], [0] * 5
    for i, (ikey, old, group) in enumerate(zip(keys, olds, groups, strict=True)):
        state, changed, dues, done = old, False, None, 0
        for step, _, raw, swept, vouched in group:
            if vouched is None:
                break
            if step == 0:
                r = fast._fastjoin.advance_impression(ikey, vouched[2], state, swept, pswept, fcfg, msgpack,
                                                      cfg.policy)  # fmt: skip
                if r is None:
                    break
                state, dues, samples = r
                changed = True
            else:
                r2 = fast._fastjoin.advance_step(ikey, state, raw, step, swept, pswept, fcfg, msgpack, cfg.policy)
                if r2 is None:
                    break
                if r2[0]:
                    state, dues, changed = r2[1], r2[2], True
                samples = r2[3]
                dups[step] += r2[4]
            for kind, elapsed, value in samples:
                out.append(_Out((b"samples", ikey, value)))
                kinds[kind] += 1
                if kind == 2:
                    delays.append(elapsed)
            done += 1
        if done < len(group):
            rest.append((i, done, state, changed))
        elif changed:
            puts.append((ikey, state, dues))
    return (puts, rest, tuple(kinds), tuple(dups)), out, delays


@st.composite
def _partition_batches(draw: st.DrawFn) -> tuple:
    """A partition's batch as on_batch groups it: a few impressions' events (their impression, its
    steps, repeats) in any order, each with the lanes it was judged against; some not vouched for
    (vouched None), some old states (a stub, a usual state, one to decline)."""
    from stream.contract.events import Event, encode_event

    base = draw(st.integers(0, 2**41))
    keys, olds, groups = [], [], []
    for n in range(draw(st.integers(1, 4))):
        iid = f"imp-{n}-{draw(st.integers(0, 10**6))}"  # (text the compiled path declines: its own tests)
        t0 = base + draw(st.integers(0, 50))
        old = None
        kind = draw(st.integers(0, 5))
        if kind == 1:
            old = encode_state(draw(_stubs(t0)))
        elif kind == 2:
            old = encode_state(FunnelState("b", t0, features_json({"f": "x"}), (t0 + 3, NONE, NONE, NONE)))
        elif kind == 3:
            old = encode_state(draw(_states()))
        group = []
        if draw(st.integers(0, 3)):  # mostly a funnel in order: its impression, then its steps (a repeat now and then)
            steps = [0, *range(1, draw(st.integers(0, 4)) + 1)]
            if draw(st.integers(0, 3)) == 0:
                steps.insert(draw(st.integers(0, len(steps))), draw(st.sampled_from(steps)))
        else:
            steps = draw(st.lists(st.sampled_from([0, 1, 1, 2, 3, 4]), min_size=1, max_size=6))
        for step in steps:
            t = max(0, t0 + step * draw(st.integers(-2, 9)))
            feats = {"f": draw(st.text("abxyz 0", max_size=4))} if step == 0 else None
            raw = encode_event(Event(step, f"e-{step}-{draw(st.integers(0, 2))}", iid, t, "b", feats))
            vouched = fast._fastjoin.parse_records([raw], [step])[0] if draw(st.integers(0, 19)) else None
            lanes = tuple(NO_WATERMARK if draw(st.integers(0, 5)) == 0 else t0 + draw(st.integers(-5, 60))
                          for _ in range(5))  # fmt: skip
            group.append((step, None, raw, lanes, vouched))
        keys.append(iid.encode())
        olds.append(old)
        groups.append(group)
    pswept = tuple(NO_WATERMARK if draw(st.integers(0, 5)) == 0 else base + draw(st.integers(-5, 60))
                   for _ in range(5))  # fmt: skip
    return keys, olds, groups, pswept


@settings(max_examples=600, deadline=None)
@given(batch=_partition_batches(), cfg=st.sampled_from(CFGS), msgpack=st.booleans())
def test_advance_groups_is_the_per_event_calls_over_each_group(batch: tuple, cfg: FunnelConfig,
                                                               msgpack: bool) -> None:
    """The same puts, groups left to the Python core (where and on which state), samples (in
    order, as the output type), counts and final delays as one call per event."""
    keys, olds, groups, pswept = batch
    want, want_out, want_delays = _groups_by_calls(keys, olds, groups, pswept, cfg, msgpack)
    out: list = [_Out((b"before", b"", b""))]
    delays: list = [-1]
    got = fast._fastjoin.advance_groups(keys, olds, groups, pswept, fast.fast_cfg(cfg), msgpack, cfg.policy, _Out,
                                        b"samples", out, delays)  # fmt: skip
    assert got == want
    assert out[1:] == want_out and all(type(o) is _Out for o in out)
    assert delays == [-1, *want_delays]
    event("took all" if not got[1] else "left some to Python")
    event("with samples" if want_out else "no samples")
    # without delays (no metrics): the same, none counted
    assert fast._fastjoin.advance_groups(keys, olds, groups, pswept, fast.fast_cfg(cfg), msgpack, cfg.policy, _Out,
                                         b"samples", [], None) == want  # fmt: skip


def test_advance_groups_refuses_what_is_not_a_batch() -> None:
    cfg = FunnelConfig()
    args = ([b"k"], [None], [[(0, None, b"{}", (0,) * 5, None)]], (0,) * 5, fast.fast_cfg(cfg), True, cfg.policy,
            _Out, b"s", [], None)  # fmt: skip
    assert fast._fastjoin.advance_groups(*args)[1] == [(0, 0, None, False)]  # not vouched for: all Python's
    for i, bad in [(2, [[(0, None)]]), (2, [None]), (1, []), (7, dict), (9, ()), (10, ())]:
        with pytest.raises(TypeError):
            fast._fastjoin.advance_groups(*args[:i], bad, *args[i + 1:])


@settings(max_examples=400, deadline=None)
@given(states=st.lists(st.one_of(st.none(), _states()), min_size=1, max_size=6), data=st.data(),
       cfg=st.sampled_from(CFGS), msgpack=st.booleans())  # fmt: skip
def test_sweep_out_is_sweep_states_with_its_results_handled(states: list, data: st.DataObject, cfg: FunnelConfig,
                                                             msgpack: bool) -> None:
    """Purges, reschedules, the states left to the Python core and the samples (in key order) as
    ``FunnelJoin.sweep`` made of ``sweep_states``'s results; missing states neither visited nor
    declined."""
    probe = next((s for s in states if s is not None), FunnelState("b", 0, b"{}"))
    prev, now = _lanes_near(data, probe, cfg)
    keys = [f"imp-{i}".encode() for i in range(len(states))]
    olds = [None if s is None else encode_state(s) for s in states]
    fcfg = fast.fast_cfg(cfg)
    per_key = fast._fastjoin.sweep_states(keys, olds, prev, now, fcfg, msgpack, cfg.policy)
    want_out, want_delays, purges, rescheduled, declined, kinds = [], [], [], [], [], [0, 0, 0]
    for i, (key, old, r) in enumerate(zip(keys, olds, per_key, strict=True)):
        if old is None:
            continue
        if r is None:
            declined.append(i)
            continue
        purge, dues, samples = r
        for kind, elapsed, value in samples:
            want_out.append(_Out((b"samples", key, value)))
            kinds[kind] += 1
            if kind == 2:
                want_delays.append(elapsed)
        if purge:
            purges.append(key)
        else:
            rescheduled.append((key, dues))
    out: list = []
    delays: list = []
    got = fast._fastjoin.sweep_out(keys, olds, prev, now, fcfg, msgpack, cfg.policy, _Out, b"samples", out, delays)
    visited = sum(old is not None for old in olds)
    assert got == (visited, purges, rescheduled, declined, tuple(kinds))
    assert out == want_out and all(type(o) is _Out for o in out) and delays == want_delays


def test_store_lookup_and_put_many_are_faust_stores_python_loops() -> None:
    """``store_lookup`` / ``store_put_many`` against ``FaustTableStore.get_many`` / ``put_many``'s
    Python loops on random keys: a key not held has no state (even if a layer has it), a held key
    takes its newest layer's value (a delete's None included), the rest are asked of RocksDB; the
    writes land in the outbox, the held keys and the due index alike (both due indexes)."""
    rng = random.Random(4)
    c = fast._fastjoin
    for _ in range(300):
        universe = [b"i%d" % i for i in range(rng.randint(1, 40))]
        held = {k for k in universe if rng.random() < 0.6}
        layers = [{k: rng.choice([None, b"v%d" % rng.randint(0, 9)]) for k in universe if rng.random() < 0.3}
                  for _ in range(rng.randint(0, 4))]  # fmt: skip
        keys = [rng.choice(universe) for _ in range(rng.randint(0, 30))]
        want: list[bytes | None] = [None] * len(keys)
        ask: list[int] = []
        for i, key in enumerate(keys):
            if key in held:
                found = [layer[key] for layer in layers if key in layer]
                if found:
                    want[i] = found[0]
                else:
                    ask.append(i)
        assert c.store_lookup(keys, held, layers) == (want, ask)
        items = [(k, b"s%d" % rng.randint(0, 9), rng.choice([None, (5, None, None, 7, None), (1, 2, 3, 4, 5)]))
                 for k in (rng.choice(universe) for _ in range(rng.randint(0, 20)))]  # fmt: skip
        for index_kind in (c.DueIndex, DueIndex):
            outs, helds, indexes = [{}, {}], [set(held), set(held)], [index_kind(), index_kind()]
            c.store_put_many(items, outs[0], helds[0], indexes[0])
            for key, value, dues in items:  # FaustTableStore.put_many's loop
                outs[1][key] = value
                helds[1].add(key)
                indexes[1].set(key, dues)
            assert outs[0] == outs[1] and helds[0] == helds[1]
            popped = [[index.pop_due(lane, 10) for lane in range(5)] for index in indexes]
            assert popped[0] == popped[1] and len(indexes[0]) == len(indexes[1])
