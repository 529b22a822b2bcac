"""The funnel state's bytes in RocksDB and in the table's changelog: a documented struct layout.

States live for up to 27 days (``FunnelConfig.retention_ms``) in the local RocksDB and in the
changelog that restores it, so their format must not depend on the Python version that wrote
them (``marshal``'s may change between versions; it was the codec until version 3). Version 4
is a fixed layout of big-endian fields, ``struct`` format characters in brackets::

    offset  size  field
    0       1     version: 4 [B]
    1       8     impression event time ms, -1 for a stub (impression not seen) [q]
    9       32    click, application, approval, activation event times ms, -1 = not reached [4q]
    41      1     number of held events H [B]
    42      2     length of the bank id, UTF-8 [H]
    44      4     length of the features JSON; 0xFFFFFFFF: none (a stub) [I]
    48      ...   the bank id, then the features JSON (compact, spliced into samples)
    then H held events, each a 23-byte head and its two byte strings:
            1     step 1..4 [B]
            8     event time ms [q]
            8     its own topic's lane when it arrived (-2**62: unknown) [q]
            2     length of the event id, UTF-8 [H]
            4     length of the raw record [I]
            ...   the event id, then the raw record (kept for its dead letter)

Nothing follows the last held event. The first byte tells the versions apart: a state written by
the marshal codec (versions 1-3, still read, so a store migrates as its states are rewritten)
starts with marshal's tuple type code (``(`` or ``)``, with or without its reference flag 0x80),
which no struct version uses. Any other first byte is refused with a ``ValueError`` that names
it. Decoding is a few ``unpack_from`` calls and slices (about as fast as ``marshal``, see
docs/joiner.md).

>>> from stream.join.funnel import FunnelState
>>> s = FunnelState("bank_1", 1_767_225_600_000, b'{"f":"v"}')
>>> data = encode_state(s)
>>> data[0], len(data), decode_state(data) == s
(4, 63, True)
"""

from __future__ import annotations

import marshal
import struct
from typing import Final

from stream.join.funnel import FunnelState, Held, features_json, new_held, new_state

VERSION: Final = 4
_HEAD: Final = struct.Struct(">BqqqqqBHI")  # version, imp_ms, 4 times, n_held, bank len, features len
_HELD: Final = struct.Struct(">BqqHI")  # step, event time, arrival lane, id len, raw len
_NO_FEATURES: Final = 0xFFFFFFFF
# marshal's first byte for a tuple: TYPE_TUPLE "(" / TYPE_SMALL_TUPLE ")", maybe | FLAG_REF 0x80
_MARSHAL_TUPLE: Final = frozenset((0x28, 0x29, 0xA8, 0xA9))
_LEGACY_VERSIONS: Final = (1, 2, 3)
_UNKNOWN: Final = "funnel state was written by an unknown codec version; clear the store"


def encode_state(state: FunnelState) -> bytes:
    """The version-4 bytes of ``state`` (see the module doc)."""
    bank = state.bank_id.encode()
    feats = state.features_json
    t = state.times
    head = _HEAD.pack(VERSION, state.imp_ms, t[0], t[1], t[2], t[3], len(state.held), len(bank),
                      _NO_FEATURES if feats is None else len(feats))  # fmt: skip
    if not state.held:
        return b"".join((head, bank, feats or b""))
    parts = [head, bank, feats or b""]
    for h in state.held:
        eid = h.event_id.encode()
        parts += (_HELD.pack(h.step, h.event_time_ms, h.lane_ms, len(eid), len(h.raw)), eid, h.raw)
    return b"".join(parts)


def decode_state(data: bytes) -> FunnelState:
    """The state of bytes written by any codec version (4, or marshal's 1-3); ``ValueError`` for
    an unknown version or a corrupt value."""
    if not data:
        raise ValueError("funnel state is empty: " + _UNKNOWN)
    first = data[0]
    if first == VERSION:
        return _decode_v4(data)
    if first in _MARSHAL_TUPLE:
        return _decode_marshal(data)
    raise ValueError(
        f"funnel state was written by an unknown codec version (first byte 0x{first:02x}; this joiner "
        f"reads version {VERSION} and the marshal versions 1-3); clear the store"
    )


def _decode_v4(data: bytes) -> FunnelState:
    try:
        _, imp, t0, t1, t2, t3, n_held, n_bank, n_feats = _HEAD.unpack_from(data)
        pos = _HEAD.size
        bank = data[pos : pos + n_bank].decode()
        pos += n_bank
        feats: bytes | None = None
        if n_feats != _NO_FEATURES:
            feats = data[pos : pos + n_feats]
            pos += n_feats
        held: tuple[Held, ...] = ()
        if n_held:
            out = []
            for _ in range(n_held):
                step, t, lane, n_id, n_raw = _HELD.unpack_from(data, pos)
                pos += _HELD.size
                eid = data[pos : pos + n_id].decode()
                pos += n_id
                out.append(new_held(step, t, eid, data[pos : pos + n_raw], lane))
                pos += n_raw
            held = tuple(out)
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"funnel state (codec version {VERSION}) is corrupt: {exc}") from None
    if pos != len(data):
        raise ValueError(f"funnel state (codec version {VERSION}) is corrupt: {len(data)} bytes, its fields take {pos}")
    return new_state(bank, imp, feats, (t0, t1, t2, t3), held)


def _decode_marshal(data: bytes) -> FunnelState:
    """Versions 1-3 (marshal tuples): 3 keeps each held event's arrival lane, 2 stores the
    features as JSON bytes, 1 as a dict."""
    try:
        v = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        v = None
    if not isinstance(v, tuple) or len(v) != 6 or v[0] not in _LEGACY_VERSIONS:
        raise ValueError(_UNKNOWN)
    version, bank, imp, feats, times, held = v
    if version == 1 and feats is not None:
        feats = features_json(feats)
    return FunnelState(bank, imp, feats, times, tuple(Held(*h) for h in held) if held else ())


def encode_state_marshal(state: FunnelState) -> bytes:
    """The version-3 (marshal) bytes, as the joiner wrote them before version 4: for the
    migration tests and benchmarks only."""
    held = tuple((h.step, h.event_time_ms, h.event_id, h.raw, h.lane_ms) for h in state.held) if state.held else ()
    return marshal.dumps((3, state.bank_id, state.imp_ms, state.features_json, state.times, held))
