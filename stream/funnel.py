"""The funnel state machine: pure functions of (state, event, watermark) -> (state, emits).

No Kafka, RocksDB or clock in here. A funnel is keyed by impression id; steps are indexed as in
``stream.events.STEPS`` (0 impression ... 4 activation) and count only in order::

    impression --1h--> click --3d--> application --1d--> approval --14d--> activation

A step counts when its predecessor happened and it arrives within its window (measured from the
predecessor's event time). Time is *event time*: the caller passes the partition watermark
``wm`` (no event older than it is expected any more) and ``swept`` (the watermark up to which
time-driven emissions were already made). A funnel is final at ``final_at(state)``: the
activation time, or the moment the next step's window closes. Final labels are a function of
the state alone, so finalising needs no write; the state is purged ``retention_ms`` later (kept
so that replays and after-window events are recognised as ``late``).
"""

from __future__ import annotations

import json
import marshal
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final, Literal

from stream.events import STEPS, Event

NONE: Final = -1  # "step not reached" in FunnelState.times
NEVER: Final = 2**62  # a due time that never comes
NO_WATERMARK: Final = -(2**62)
FIRST_SEQ: Final = 0  # corrections use the step index 1..4 as their seq
FINAL_SEQ: Final = 5
Policy = Literal["early", "matured"]
SampleKind = Literal["first", "correction", "final"]

ILLEGAL_SEQUENCE: Final = "illegal_sequence"
LATE: Final = "late"


@dataclass(frozen=True, slots=True)
class FunnelConfig:
    """Windows and policy. Defaults follow the paper (activation counted within T+14)."""

    # window of each task's step, measured from its predecessor's event time (click..activation)
    windows_ms: tuple[int, int, int, int] = (3_600_000, 3 * 86_400_000, 86_400_000, 14 * 86_400_000)
    # an event whose predecessor is missing is held this long (event time) before it is illegal
    grace_ms: int = 10 * 60_000
    # early policy: the first sample goes out this long after the impression (event time)
    observe_ms: int = 30 * 60_000
    # a final funnel is kept (not re-emitted) this long so replays/after-window events are "late";
    # 27 days covers activations up to 41 days after approval
    retention_ms: int = 27 * 86_400_000
    policy: Policy = "early"

    def __post_init__(self) -> None:
        if len(self.windows_ms) != 4 or min(self.windows_ms) <= 0:
            raise ValueError("windows_ms needs four positive windows (click, application, approval, activation)")
        if self.grace_ms < 0 or self.observe_ms < 0 or self.retention_ms < 0:
            raise ValueError("grace_ms, observe_ms and retention_ms must be >= 0")


@dataclass(frozen=True, slots=True)
class Held:
    """An event waiting for its predecessor (kept with its raw bytes for the dead-letter topic)."""

    step: int
    event_time_ms: int
    event_id: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class FunnelState:
    """One impression's funnel. ``imp_ms == NONE`` is a stub: events held, impression not seen.

    ``features_json`` is the impression's feature map as compact JSON, encoded once when the
    impression arrives: the state stays small and cheap to (de)code, and every sample splices
    the bytes in instead of encoding the map again (``stream.samples.sample_bytes``).
    """

    bank_id: str
    imp_ms: int
    features_json: bytes | None
    times: tuple[int, int, int, int] = (NONE, NONE, NONE, NONE)  # click..activation event times
    held: tuple[Held, ...] = ()

    @property
    def is_stub(self) -> bool:
        return self.imp_ms == NONE


@dataclass(frozen=True, slots=True)
class SampleOut:
    """A sample to emit (the joiner adds id, bank and features)."""

    kind: SampleKind
    seq: int
    labels: tuple[int, int, int, int]
    mature: tuple[bool, bool, bool, bool]
    elapsed_ms: int


@dataclass(frozen=True, slots=True)
class Reject:
    """An event to dead-letter, with its reason code and a sentence."""

    reason: str
    step: int
    raw: bytes
    detail: str


@dataclass(slots=True)
class Result:
    """What ``advance``/``sweep`` decided. ``changed`` with ``state=None`` means delete."""

    state: FunnelState | None
    changed: bool = False
    samples: list[SampleOut] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    duplicate: bool = False


# --- derived quantities -------------------------------------------------------------------


def step_time(state: FunnelState, step: int) -> int:
    """Event time of ``step`` (0 = impression), or NONE."""
    return state.imp_ms if step == 0 else state.times[step - 1]


def reached(state: FunnelState) -> int:
    """The last step reached in order (0 = impression only, 4 = activated); -1 for a stub."""
    if state.imp_ms == NONE:
        return -1
    t = state.times
    return t.index(NONE) if NONE in t else 4  # steps reached in order = leading recorded times


def final_at(state: FunnelState, cfg: FunnelConfig) -> int:
    """Event time at which the labels become final (NEVER for a stub)."""
    if state.imp_ms == NONE:
        return NEVER
    t = state.times
    if NONE not in t:
        return t[3]
    r = t.index(NONE)
    return (state.imp_ms if r == 0 else t[r - 1]) + cfg.windows_ms[r]


def labels(state: FunnelState) -> tuple[int, int, int, int]:
    t = state.times
    return (int(t[0] != NONE), int(t[1] != NONE), int(t[2] != NONE), int(t[3] != NONE))


def mature(state: FunnelState, wm: int, cfg: FunnelConfig) -> tuple[bool, bool, bool, bool]:
    """Per task: is its label settled at watermark ``wm`` (positive, or its window closed)?"""
    out: list[bool] = []
    settled_negative = False
    for k in range(4):
        if state.times[k] != NONE or settled_negative:
            out.append(True)
        else:
            pred = step_time(state, k)
            settled_negative = pred != NONE and pred + cfg.windows_ms[k] <= wm
            out.append(settled_negative)
    return (out[0], out[1], out[2], out[3])


def first_due(state: FunnelState, cfg: FunnelConfig) -> int:
    """When the early policy's first sample is due (NEVER if not applicable)."""
    if cfg.policy != "early" or state.imp_ms == NONE:
        return NEVER
    return _first_due(state, final_at(state, cfg), cfg)


def _first_due(state: FunnelState, fa: int, cfg: FunnelConfig) -> int:
    """``first_due`` for a non-stub state whose ``final_at`` is ``fa``."""
    due = state.imp_ms + cfg.observe_ms
    return due if cfg.policy == "early" and due < fa else NEVER


def next_due(state: FunnelState, after: int, cfg: FunnelConfig) -> int | None:
    """The next watermark value > ``after`` at which ``sweep`` has something to do."""
    best = NEVER
    for h in state.held:
        d = h.event_time_ms + cfg.grace_ms
        if after < d < best:
            best = d
    if state.imp_ms != NONE:
        fa = final_at(state, cfg)
        for d in (_first_due(state, fa, cfg), fa, fa + cfg.retention_ms):  # increasing, but for NEVER
            if after < d < NEVER:
                if d < best:
                    best = d
                break
    return best if best < NEVER else None


# --- transitions ---------------------------------------------------------------------------


def _sample(state: FunnelState, kind: SampleKind, seq: int, at_ms: int, wm: int, cfg: FunnelConfig) -> SampleOut:
    return SampleOut(kind, seq, labels(state), mature(state, wm, cfg), max(0, at_ms - state.imp_ms))


def _apply_in_order(state: FunnelState, cfg: FunnelConfig, res: Result) -> FunnelState:
    """Apply held events whose predecessor is now present, in step order."""
    while state.held:
        r = reached(state)
        nxt = [h for h in state.held if h.step == r + 1]
        if not nxt or r == 4:
            return state
        h = nxt[0]
        rest = tuple(x for x in state.held if x is not h)
        pred = step_time(state, r)
        if h.event_time_ms < pred:
            res.rejects.append(Reject(ILLEGAL_SEQUENCE, h.step, h.raw, f"{STEPS[h.step]} is older than its {STEPS[r]}"))
            state = replace(state, held=rest)
        elif h.event_time_ms - pred > cfg.windows_ms[r]:
            res.rejects.append(
                Reject(LATE, h.step, h.raw, f"{STEPS[h.step]} came after its {cfg.windows_ms[r]} ms window")
            )
            state = replace(state, held=rest)
        else:
            times = list(state.times)
            times[h.step - 1] = h.event_time_ms
            state = replace(state, times=(times[0], times[1], times[2], times[3]), held=rest)
    return state


_FEATURES_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))


def features_json(features: Mapping[str, str] | None) -> bytes:
    """The compact JSON of a feature map, as ``json.dumps(..., separators=(",", ":"))`` writes it."""
    return _FEATURES_ENCODER.encode(features if type(features) is dict else dict(features or {})).encode()


def advance(
    state: FunnelState | None, event: Event, raw: bytes, wm: int, swept: int, cfg: FunnelConfig
) -> Result:
    """Apply one parsed event at watermark ``wm`` (``swept`` <= ``wm``: time emissions done so far).

    Duplicates (a step already recorded or held) change nothing; an event whose predecessor is
    missing is held; events for final funnels, or outside their window, are rejected ``late``.
    """
    s, t = event.step, event.event_time_ms
    if state is None:
        if s == 0:
            if t + cfg.windows_ms[0] <= wm:
                return Result(None, rejects=[Reject(LATE, 0, raw, "impression came after its click window closed")])
            new = FunnelState(event.bank_id, t, features_json(event.features))
            return Result(new, changed=True)
        if t + cfg.grace_ms <= wm:
            return Result(None, rejects=[Reject(LATE, s, raw, f"{STEPS[s]} for an unknown impression, past grace")])
        return Result(FunnelState(event.bank_id, NONE, None, held=(Held(s, t, event.event_id, raw),)), changed=True)

    if any(h.step == s for h in state.held):
        return Result(state, duplicate=True)
    if state.imp_ms == NONE:
        if s != 0:
            if t + cfg.grace_ms <= wm:
                return Result(state, rejects=[Reject(LATE, s, raw, f"{STEPS[s]} for an unknown impression, past grace")])
            return Result(replace(state, held=(*state.held, Held(s, t, event.event_id, raw))), changed=True)
        if t + cfg.windows_ms[0] <= wm:
            return Result(state, rejects=[Reject(LATE, 0, raw, "impression came after its click window closed")])
        res = Result(None, changed=True)
        new = FunnelState(event.bank_id, t, features_json(event.features), held=state.held)
        res.state = _apply_in_order(new, cfg, res)
        return res

    if step_time(state, s) != NONE:
        return Result(state, duplicate=True)
    fa = final_at(state, cfg)
    if fa <= wm:
        return Result(state, rejects=[Reject(LATE, s, raw, f"{STEPS[s]} for a funnel already final")])
    r = reached(state)
    if s > r + 1:  # predecessor missing: hold it (or give up if grace is already over)
        if t + cfg.grace_ms <= wm:
            return Result(state, rejects=[Reject(ILLEGAL_SEQUENCE, s, raw, f"no {STEPS[s - 1]} before this {STEPS[s]}")])
        return Result(replace(state, held=(*state.held, Held(s, t, event.event_id, raw))), changed=True)
    res = Result(state, changed=True)
    held = replace(state, held=(Held(s, t, event.event_id, raw), *state.held))
    new = _apply_in_order(held, cfg, res)
    res.state = new
    r_new = reached(new)
    if r_new == r:  # the event itself was rejected (out of its window / before its predecessor)
        res.changed = False
        return res
    if r_new > r and cfg.policy == "early" and first_due(state, cfg) <= swept:
        res.samples.append(_sample(new, "correction", r_new, step_time(new, r_new), wm, cfg))
    return res


def sweep(state: FunnelState, prev: int, wm: int, cfg: FunnelConfig) -> Result:
    """Time-driven work due in the watermark interval (``prev``, ``wm``]: held events whose grace
    is over, the first sample, the final sample, and the purge (``state=None``)."""
    res = Result(state)
    fa = final_at(state, cfg)
    keep: list[Held] = []
    for h in state.held:
        if h.event_time_ms + cfg.grace_ms <= wm or fa <= wm:
            pred = STEPS[h.step - 1]
            res.rejects.append(Reject(ILLEGAL_SEQUENCE, h.step, h.raw, f"no {pred} within the grace period"))
        else:
            keep.append(h)
    if len(keep) != len(state.held):
        state = replace(state, held=tuple(keep))
        res.state, res.changed = state, True
    if state.is_stub:
        if not state.held:
            res.state, res.changed = None, True
        return res
    fd = _first_due(state, fa, cfg)
    if prev < fd <= wm and fa > wm:
        res.samples.append(_sample(state, "first", FIRST_SEQ, wm, wm, cfg))
    if prev < fa <= wm:
        res.samples.append(_sample(state, "final", FINAL_SEQ, fa, wm, cfg))
    if fa + cfg.retention_ms <= wm:
        res.state, res.changed = None, True
    return res


# --- compact codec (marshal: fast, small; version byte first) ------------------------------

# version 2 stores the features as JSON bytes; version 1 (a dict) is still read
_CODEC_VERSION: Final = 2


def encode_state(state: FunnelState) -> bytes:
    held = tuple((h.step, h.event_time_ms, h.event_id, h.raw) for h in state.held) if state.held else ()
    return marshal.dumps((_CODEC_VERSION, state.bank_id, state.imp_ms, state.features_json, state.times, held))


def decode_state(data: bytes) -> FunnelState:
    try:
        v = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        v = None
    if not isinstance(v, tuple) or len(v) != 6 or v[0] not in (1, _CODEC_VERSION):
        raise ValueError("funnel state was written by an unknown codec version; clear the store")
    version, bank, imp, feats, times, held = v
    if version == 1 and feats is not None:
        feats = features_json(feats)
    return FunnelState(bank, imp, feats, times, tuple(Held(*h) for h in held) if held else ())
