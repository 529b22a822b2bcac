"""The funnel state machine: pure functions of (state, event, swept watermarks) -> (state, emits).

No Kafka, RocksDB or clock in here. A funnel is keyed by impression id; steps are indexed as in
``stream.contract.events.STEPS`` (0 impression ... 4 activation) and count only in order::

    impression --1h--> click --3d--> application --1d--> approval --14d--> activation

A step counts when its predecessor counts and its event time is inside its window, measured
from the predecessor's event time (it may be stamped up to ``skew_ms`` *before* the predecessor:
sources' clocks differ). Time is *event time*, and each step's absence is judged by that step's
own topic: the caller passes ``swept``, one watermark per topic (a *lane*: 0 impressions,
1 clicks ... 4 activations) up to which time-driven emissions were made. A funnel that reached
step ``r`` waits for lane ``r+1``: it is final once ``swept[r+1] >= final_at(state)`` (the moment
the window of step ``r+1`` closes), or at once when activated. Final labels are a function of
the state alone. The rule the functions keep (README, "Label conservation"): every accepted
impression yields exactly one final sample, and every event that does not count is rejected
with a reason - ``late`` if it happened after its funnel's final time or arrived after its
final went out, ``illegal_sequence`` otherwise. The state is purged ``retention_ms`` after the
final time (kept so that replays and after-window events are recognised).
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from stream.contract.events import STEPS, Event
from stream.contract.frozen import fast_new

NONE: Final = -1  # "step not reached" in FunnelState.times
NEVER: Final = 2**62  # a due time that never comes
NO_WATERMARK: Final = -(2**62)
LANES: Final = 5  # one watermark per event topic: impressions, clicks, ..., activations
FIRST_SEQ: Final = 0  # corrections use the step index 1..4 as their seq
FINAL_SEQ: Final = 5
Policy = Literal["early", "matured"]
SampleKind = Literal["first", "correction", "final"]
Swept = tuple[int, int, int, int, int]  # per lane: the watermark time-driven work was done up to
Dues = tuple[int | None, int | None, int | None, int | None, int | None]  # per lane: next due time
NO_SWEPT: Final[Swept] = (NO_WATERMARK,) * 5
NO_DUES: Final[Dues] = (None,) * 5

ILLEGAL_SEQUENCE: Final = "illegal_sequence"
LATE: Final = "late"


@dataclass(frozen=True, slots=True)
class FunnelConfig:
    """Windows and policy. Defaults follow the paper (activation counted within T+14)."""

    # window of each task's step, measured from its predecessor's event time (click..activation)
    windows_ms: tuple[int, int, int, int] = (3_600_000, 3 * 86_400_000, 86_400_000, 14 * 86_400_000)
    # an event whose predecessor is missing is held until the predecessor's topic is this far
    # (event time) past it (plus ``skew_ms`` per missing step); then it is rejected
    grace_ms: int = 10 * 60_000
    # early policy: the first sample goes out this long after the impression (event time)
    observe_ms: int = 30 * 60_000
    # a final funnel is kept (not re-emitted) this long so replays/after-window events are "late";
    # 27 days after a final that waited for the activation window covers activations up to 41 days
    # after their approval; a funnel final early (no click in time) is purged 27 days after its
    # first hour, and an event read after the purge is an unknown impression's
    retention_ms: int = 27 * 86_400_000
    policy: Policy = "early"
    # a step stamped up to this long before its predecessor still counts (clocks of sources differ)
    skew_ms: int = 5 * 60_000

    def __post_init__(self) -> None:
        if len(self.windows_ms) != 4 or min(self.windows_ms) <= 0:
            raise ValueError("windows_ms needs four positive windows (click, application, approval, activation)")
        if min(self.grace_ms, self.observe_ms, self.retention_ms, self.skew_ms) < 0:
            raise ValueError("grace_ms, observe_ms, retention_ms and skew_ms must be >= 0")


@dataclass(frozen=True, slots=True)
class Held:
    """An event waiting for its predecessor (kept with its raw bytes for the dead-letter topic).
    ``lane_ms``: its own topic's lane when it arrived; if that was already past its funnel's
    final time once the predecessor comes, it arrived too late and does not count."""

    step: int
    event_time_ms: int
    event_id: str
    raw: bytes
    lane_ms: int = NO_WATERMARK


@dataclass(frozen=True, slots=True)
class FunnelState:
    """One impression's funnel. ``imp_ms == NONE`` is a stub: events held, impression not seen.

    ``features_json`` is the impression's feature map as compact JSON, encoded once when the
    impression arrives: the state stays small and cheap to (de)code, and every sample splices
    the bytes in instead of encoding the map again (``stream.contract.samples.sample_bytes``).
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
    watermark_ms: int  # the watermark of the lane that made it due


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


# the hot path builds its frozen dataclasses through these (all fields, positional): a frozen
# dataclass's own __init__ costs ~3x as much (stream/contract/frozen.py); same objects
new_state: Final = fast_new(FunnelState)  # (bank_id, imp_ms, features_json, times, held)
new_held: Final = fast_new(Held)  # (step, event_time_ms, event_id, raw, lane_ms)
_new_sample: Final = fast_new(SampleOut)
_new_result: Final = fast_new(Result)  # (state, changed, samples, rejects, duplicate): fresh lists each
_NO_TIMES: Final = (NONE, NONE, NONE, NONE)


def _with_held(state: FunnelState, held: tuple[Held, ...]) -> FunnelState:
    """``replace(state, held=held)`` without ``dataclasses.replace``'s field walk (the hot path)."""
    return new_state(state.bank_id, state.imp_ms, state.features_json, state.times, held)


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


def final_lane(state: FunnelState) -> int:
    """The lane whose watermark makes the funnel final: the first missing step's topic (0 for an
    activated funnel, final at once; 0 for a stub, which waits for its impression)."""
    r = reached(state)
    return 0 if r < 0 or r == 4 else r + 1


def is_final(state: FunnelState, swept: Swept, cfg: FunnelConfig) -> bool:
    """Has the final sample gone out (or is it due now)? Activated, or the first missing step's
    topic swept past the final time."""
    if state.imp_ms == NONE:
        return False
    t = state.times
    if NONE not in t:
        return True
    r = t.index(NONE)
    return swept[r + 1] >= (state.imp_ms if r == 0 else t[r - 1]) + cfg.windows_ms[r]


def labels(state: FunnelState) -> tuple[int, int, int, int]:
    t = state.times
    return (int(t[0] != NONE), int(t[1] != NONE), int(t[2] != NONE), int(t[3] != NONE))


def mature(state: FunnelState, swept: Swept, cfg: FunnelConfig) -> tuple[bool, bool, bool, bool]:
    """Per task: is its label settled (positive, or its window closed by its own topic's lane)?"""
    t = state.times
    if t == _NO_TIMES:  # the usual first sample: the click's window decides all four (the hot path)
        neg = state.imp_ms != NONE and state.imp_ms + cfg.windows_ms[0] <= swept[1]
        return (neg, neg, neg, neg)
    out: list[bool] = []
    settled_negative = False
    for k in range(4):
        if state.times[k] != NONE or settled_negative:
            out.append(True)
        else:
            pred = step_time(state, k)
            settled_negative = pred != NONE and pred + cfg.windows_ms[k] <= swept[k + 1]
            out.append(settled_negative)
    return (out[0], out[1], out[2], out[3])


def first_due(state: FunnelState, cfg: FunnelConfig) -> int:
    """When the early policy's first sample is due on the impressions lane (NEVER if not applicable)."""
    if cfg.policy != "early" or state.imp_ms == NONE:
        return NEVER
    due = state.imp_ms + cfg.observe_ms
    return due if due < final_at(state, cfg) else NEVER


def hold_due(h: Held, missing: int, cfg: FunnelConfig) -> int:
    """When a held event gives up on its missing predecessor ``missing`` (a step stamped up to
    ``skew_ms`` after it per step in between may still come): on lane ``missing``."""
    return h.event_time_ms + cfg.grace_ms + (h.step - missing) * cfg.skew_ms


def _lane_and_final(state: FunnelState, cfg: FunnelConfig) -> tuple[int, int]:
    """(final lane, final time) of a funnel that is not a stub, computed once (the hot path)."""
    t = state.times
    if NONE not in t:
        return 0, t[3]
    r = t.index(NONE)
    return r + 1, (state.imp_ms if r == 0 else t[r - 1]) + cfg.windows_ms[r]


def next_dues(state: FunnelState, swept: Swept, cfg: FunnelConfig) -> Dues:
    """Per lane, the next watermark value after ``swept`` at which ``sweep`` has work to do."""
    if state.imp_ms == NONE:
        return (min(hold_due(h, 0, cfg) for h in state.held) if state.held else None, None, None, None, None)
    lane, fa = _lane_and_final(state, cfg)
    if lane == 0:  # activated: final already out, only the purge is left
        return (fa + cfg.retention_ms, None, None, None, None)
    dues: list[int | None] = [None, None, None, None, None]
    if swept[lane] >= fa:
        dues[lane] = fa + cfg.retention_ms
    else:
        due = fa
        for h in state.held:
            d = hold_due(h, lane, cfg)
            if swept[lane] < d < due:
                due = d
        dues[lane] = due
        if cfg.policy == "early":
            fd = state.imp_ms + cfg.observe_ms
            if swept[0] < fd < fa:
                dues[0] = fd
    return (dues[0], dues[1], dues[2], dues[3], dues[4])


# --- reasons -------------------------------------------------------------------------------


def _reject(state: FunnelState, step: int, t: int, raw: bytes, cfg: FunnelConfig, arrived_late: bool) -> Reject:
    """Why an event of ``step`` at ``t`` does not count in ``state`` (see the module doc).
    ``arrived_late``: it arrives now, after the funnel's final went out."""
    if state.imp_ms == NONE:
        return Reject(ILLEGAL_SEQUENCE, step, raw, f"no impression for this {STEPS[step]} within the grace period")
    r = reached(state)
    fa = final_at(state, cfg)
    if step == r + 1:
        pred = step_time(state, r)
        if t < pred - cfg.skew_ms:
            return Reject(ILLEGAL_SEQUENCE, step, raw, f"{STEPS[step]} is older than its {STEPS[r]}")
        if t > pred + cfg.windows_ms[r]:
            return Reject(LATE, step, raw, f"{STEPS[step]} came after its {cfg.windows_ms[r]} ms window")
        if arrived_late:
            return Reject(LATE, step, raw, f"{STEPS[step]} arrived after its funnel's final (beyond the allowed lateness)")
    if t > fa:
        return Reject(LATE, step, raw, f"{STEPS[step]} happened after its funnel's final time (no {STEPS[r + 1]} in time)")
    return Reject(ILLEGAL_SEQUENCE, step, raw, f"no {STEPS[step - 1]} before this {STEPS[step]}")


def _reject_stub_event(step: int, t: int, raw: bytes, swept: Swept, cfg: FunnelConfig) -> Reject:
    if t + cfg.retention_ms <= swept[0]:
        return Reject(LATE, step, raw, f"{STEPS[step]} for an unknown impression older than the retention period")
    return Reject(ILLEGAL_SEQUENCE, step, raw, f"no impression for this {STEPS[step]} within the grace period")


# --- transitions ---------------------------------------------------------------------------


def _sample(
    state: FunnelState, kind: SampleKind, seq: int, at_ms: int, wm: int, swept: Swept, cfg: FunnelConfig
) -> SampleOut:
    ripe = (True, True, True, True) if kind == "final" else mature(state, swept, cfg)
    return _new_sample(kind, seq, labels(state), ripe, max(0, at_ms - state.imp_ms), wm)


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
        fa = pred + cfg.windows_ms[r]
        if h.event_time_ms < pred - cfg.skew_ms or h.event_time_ms > fa or h.lane_ms >= fa:
            res.rejects.append(_reject(state, h.step, h.event_time_ms, h.raw, cfg, h.lane_ms >= fa))
            state = _with_held(state, rest)
        else:
            times = list(state.times)
            times[h.step - 1] = h.event_time_ms
            state = new_state(state.bank_id, state.imp_ms, state.features_json, (times[0], times[1], times[2], times[3]), rest)
    return state


def _settle(state: FunnelState, swept: Swept, cfg: FunnelConfig, res: Result, created: bool) -> FunnelState:
    """After a change: the first sample of an impression that arrives when its first is already
    due, and the final at once (after any correction) of a funnel that is now final."""
    final = is_final(state, swept, cfg)
    if created and not final and first_due(state, cfg) <= swept[0]:
        res.samples.append(_sample(state, "first", FIRST_SEQ, swept[0], swept[0], swept, cfg))
    lane = final_lane(state)
    if state.held and not final:  # held events whose (new) missing step's topic is already past them
        keep = tuple(h for h in state.held if swept[lane] < hold_due(h, lane, cfg))
        for h in state.held:
            if h not in keep:
                res.rejects.append(_reject(state, h.step, h.event_time_ms, h.raw, cfg, False))
        state = _with_held(state, keep)
    if final:
        if state.held:
            for h in state.held:  # they can never count now
                res.rejects.append(_reject(state, h.step, h.event_time_ms, h.raw, cfg, False))
            state = _with_held(state, ())
        res.samples.append(_sample(state, "final", FINAL_SEQ, final_at(state, cfg), swept[lane], swept, cfg))
    return state


_FEATURES_ENCODER: Final = json.JSONEncoder(separators=(",", ":"))
# ``JSONEncoder.encode`` builds its C encoder anew on every call; this one is built once, with the
# same settings (compact separators, ASCII escapes, NaN allowed as ``json.dumps`` does)
_C_MAKE_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)  # CPython's C accelerator (untyped)
_C_ENCODE: Final = (
    _C_MAKE_ENCODER(None, _FEATURES_ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",", False,
                    False, True)
    if _C_MAKE_ENCODER is not None
    else None
)


_MSGSPEC_ENCODE: Final = msgspec.json.Encoder().encode


def features_json(features: Mapping[str, str] | None) -> bytes:
    """The compact JSON of a feature map, as ``json.dumps(..., separators=(",", ":"))`` writes it.

    msgspec's encoder is ~7x quicker than the json module's C encoder; it writes non-ASCII text
    and DEL as UTF-8 where ``json.dumps`` escapes them (``\\u00e9``), and refuses lone surrogates,
    so its bytes are taken only when they are printable ASCII - then they are ``json.dumps``'s
    byte for byte (tests/unit/test_join_batch.py) - and the json module writes the rest."""
    feats = features if type(features) is dict else dict(features or {})
    try:
        out = _MSGSPEC_ENCODE(feats)
    except (TypeError, UnicodeError):
        out = b"\x7f"  # not for msgspec: the json module decides (and words any error)
    if out.isascii() and b"\x7f" not in out:
        return out
    if _C_ENCODE is None:  # pragma: no cover - a Python without the json C accelerator
        return _FEATURES_ENCODER.encode(feats).encode()
    return "".join(_C_ENCODE(feats, 0)).encode()


def advance(state: FunnelState | None, event: Event, raw: bytes, swept: Swept, cfg: FunnelConfig) -> Result:
    """Apply one parsed event given the lanes' ``swept`` watermarks (what went out so far; for
    the event's own topic, the caller passes how far that topic had got before it: an event
    that arrives once its own topic is past its funnel's final time arrives too late).

    Duplicates (a step already recorded or held) change nothing; an event whose predecessor is
    missing is held; an event that cannot count is rejected (``late`` / ``illegal_sequence``).
    A funnel that becomes final emits its final sample at once.
    """
    s, t = event.step, event.event_time_ms
    if state is None:
        if s == 0:
            if t + cfg.retention_ms <= swept[0]:
                return Result(None, rejects=[Reject(LATE, 0, raw, "impression older than the retention period")])
            fresh = new_state(event.bank_id, t, features_json(event.features), _NO_TIMES, ())
            if not is_final(fresh, swept, cfg) and first_due(fresh, cfg) > swept[0]:
                # the usual impression: not final, no first sample due at once - ``_settle`` has nothing to do
                return _new_result(fresh, True, [], [], False)
            res = _new_result(None, True, [], [], False)
            res.state = _settle(fresh, swept, cfg, res, True)
            return res
        h = new_held(s, t, event.event_id, raw, swept[s])
        if swept[0] >= hold_due(h, 0, cfg):
            return Result(None, rejects=[_reject_stub_event(s, t, raw, swept, cfg)])
        return _new_result(new_state(event.bank_id, NONE, None, _NO_TIMES, (h,)), True, [], [], False)

    if any(h.step == s for h in state.held):
        return _new_result(state, False, [], [], True)
    if state.imp_ms == NONE:
        if s != 0:
            h = new_held(s, t, event.event_id, raw, swept[s])
            if swept[0] >= hold_due(h, 0, cfg):
                return Result(state, rejects=[_reject_stub_event(s, t, raw, swept, cfg)])
            return _new_result(_with_held(state, (*state.held, h)), True, [], [], False)
        if t + cfg.retention_ms <= swept[0]:
            return Result(state, rejects=[Reject(LATE, 0, raw, "impression older than the retention period")])
        res = _new_result(None, True, [], [], False)
        new = _apply_in_order(new_state(event.bank_id, t, features_json(event.features), _NO_TIMES, state.held), cfg, res)
        res.state = _settle(new, swept, cfg, res, True)
        return res

    if step_time(state, s) != NONE:
        return _new_result(state, False, [], [], True)
    if is_final(state, swept, cfg):
        return Result(state, rejects=[_reject(state, s, t, raw, cfg, True)])
    r = reached(state)
    if s > r + 1:  # predecessor missing: hold it (or give up if its topic is already past it)
        h = new_held(s, t, event.event_id, raw, swept[s])
        if swept[r + 1] >= hold_due(h, r + 1, cfg):
            return Result(state, rejects=[_reject(state, s, t, raw, cfg, False)])
        return _new_result(_with_held(state, (*state.held, h)), True, [], [], False)
    res = _new_result(state, True, [], [], False)
    new = _apply_in_order(_with_held(state, (new_held(s, t, event.event_id, raw, swept[s]), *state.held)), cfg, res)
    r_new = reached(new)
    if r_new == r:  # the event itself was rejected (out of its window / before its predecessor)
        res.changed = False
        return res
    if cfg.policy == "early" and first_due(state, cfg) <= swept[0]:  # the first sample went out
        res.samples.append(_sample(new, "correction", r_new, step_time(new, r_new), swept[0], swept, cfg))
    res.state = _settle(new, swept, cfg, res, False)
    return res


def sweep(state: FunnelState, prev: Swept, now: Swept, cfg: FunnelConfig) -> Result:
    """Time-driven work due as the lanes move from ``prev`` to ``now``: held events that gave up on
    their predecessor, the first sample, the final sample, and the purge (``state=None``)."""
    res = _new_result(state, False, [], [], False)
    if state.imp_ms == NONE:
        keep = tuple(h for h in state.held if now[0] < hold_due(h, 0, cfg))
        for h in state.held:
            if h not in keep:
                res.rejects.append(_reject_stub_event(h.step, h.event_time_ms, h.raw, now, cfg))
        if len(keep) != len(state.held):
            res.state, res.changed = (_with_held(state, keep) if keep else None), True
        return res
    lane, fa = _lane_and_final(state, cfg)
    final_now = lane == 0 or now[lane] >= fa
    if state.held and not final_now:
        keep = tuple(h for h in state.held if now[lane] < hold_due(h, lane, cfg))
        if len(keep) != len(state.held):
            for h in state.held:
                if h not in keep:
                    res.rejects.append(_reject(state, h.step, h.event_time_ms, h.raw, cfg, False))
            state = _with_held(state, keep)
            res.state, res.changed = state, True
    fd = state.imp_ms + cfg.observe_ms
    if not final_now and cfg.policy == "early" and prev[0] < fd <= now[0] and fd < fa:
        res.samples.append(_sample(state, "first", FIRST_SEQ, now[0], now[0], now, cfg))
    if final_now and lane and prev[lane] < fa:  # (an activated funnel's final went out at once)
        held = bool(state.held)
        state = _settle(state, now, cfg, res, False)
        if held:
            res.state, res.changed = state, True
    if final_now and now[lane] >= fa + cfg.retention_ms:
        res.state, res.changed = None, True
    return res


# --- the state codec ---------------------------------------------------------------------------


def __getattr__(name: str) -> Any:
    """``encode_state`` / ``decode_state``: the state codec lives in ``stream.join.state_codec`` (a
    versioned struct layout); still found here, its old home."""
    if name in ("encode_state", "decode_state"):
        from stream.join import state_codec

        return getattr(state_codec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
