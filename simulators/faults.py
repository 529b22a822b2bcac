"""The simulated event stream in delivery order, with faults injected and marked in the truth.

Faults are drawn per impression (at most one each), among the kinds its events allow:

- ``duplicate``: one event is delivered twice (same event id) - harmless if dedupe works;
- ``out_of_order``: an event's predecessor is held up and delivered after it (a click before
  its impression) - harmless if the joiner holds it;
- ``malformed``: one event's bytes are broken (expected reason: the parse error code);
- ``illegal``: a predecessor is dropped, so the next step is illegal (``illegal_sequence``);
- ``late``: one event is delivered 20 days after it happened (``late``).

The last three corrupt the impression: its labels cannot be recovered and are not compared.
Activations that really happen more than 14 days after approval are not faults but are
listed as ``after_window`` (expected reason ``late``); their label is 0 in the truth.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from simulators.funnel import DAY_MS, TASKS, WINDOWS_MS, FunnelSimulator, ImpressionBatch

STEPS = ("impression", *TASKS)
FAULT_KINDS = ("duplicate", "out_of_order", "malformed", "illegal", "late")
CORRUPTING = frozenset({"malformed", "illegal", "late"})
LATE_DELIVERY_MS = 20 * DAY_MS
OUT_OF_ORDER_MAX_GAP_MS = 10 * 60_000


@dataclass(frozen=True)
class FaultConfig:
    """Per-impression probability of each fault kind (0 disables it)."""

    duplicate: float = 0.0
    out_of_order: float = 0.0
    malformed: float = 0.0
    illegal: float = 0.0
    late: float = 0.0

    @classmethod
    def uniform(cls, rate: float) -> FaultConfig:
        return cls(*(rate,) * len(FAULT_KINDS))

    def rates(self) -> tuple[float, ...]:
        return (self.duplicate, self.out_of_order, self.malformed, self.illegal, self.late)


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record to deliver: its topic's step, key, value and times."""

    step: str
    key: bytes
    value: bytes
    timestamp_ms: int  # event time: the Kafka record timestamp
    deliver_ms: int  # simulated time at which the record is delivered


@dataclass(frozen=True, slots=True)
class TruthRow:
    impression_id: str
    bank_id: str
    event_time_ms: int
    p_true: tuple[float, ...]
    labels: tuple[int, ...]
    corrupted: bool
    faults: tuple[str, ...]
    tail: bool


@dataclass(frozen=True, slots=True)
class FaultRow:
    kind: str
    impression_id: str
    step: str
    event_id: str
    expected_reason: str | None


def _event_value(
    step: int, event_id: str, iid: str, ts: int, bank: str, feats: dict[str, str] | None
) -> dict:
    d: dict = {
        "schema_version": 1,
        "event_type": STEPS[step],
        "event_id": event_id,
        "impression_id": iid,
        "event_time_ms": ts,
        "bank_id": bank,
    }
    if feats is not None:
        d["features"] = feats
    return d


def _dumps(d: dict) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


def _malform(d: dict, rng: np.random.Generator) -> tuple[bytes, str]:
    """Break one event's value; returns the bytes and the parse reason a reader must give."""
    variant = int(rng.integers(5))
    if variant == 0:
        raw = _dumps(d)
        return raw[: len(raw) // 2], "malformed_json"
    if variant == 1:
        d = {k: v for k, v in d.items() if k != "event_time_ms"}
        return _dumps(d), "missing_field"
    if variant == 2:
        return _dumps({**d, "event_time_ms": "yesterday"}), "invalid_field"
    if variant == 3:
        return _dumps({**d, "schema_version": 99}), "unsupported_schema"
    return b"\xff\xfe" + _dumps(d)[2:], "malformed_json"


class SimulatedStream:
    """Iterate the records of ``days`` simulated days (then a low-rate tail) in delivery order.

    ``truth`` and ``faults`` are filled as days are generated (complete after iteration).
    """

    def __init__(
        self,
        sim: FunnelSimulator,
        days: int,
        faults: FaultConfig | None = None,
        tail_days: int = 0,
        tail_impressions_per_day: int = 200,
        start_day: int = 0,
    ) -> None:
        self.sim = sim
        self.days = days
        self.fault_config = faults or FaultConfig()
        self.tail_days = tail_days
        self.tail_impressions_per_day = tail_impressions_per_day
        self.start_day = start_day
        self.truth: list[TruthRow] = []
        self.faults: list[FaultRow] = []
        self._seq = itertools.count()

    def __iter__(self) -> Iterator[Record]:
        heap: list[tuple[int, int, Record]] = []
        last = self.start_day + self.days + self.tail_days
        for day in range(self.start_day, last):
            tail = day >= self.start_day + self.days
            batch = self.sim.day_batch(day, self.tail_impressions_per_day if tail else None)
            self._push_day(heap, batch, day, tail)
            horizon = self.sim_start_ms(day + 1)
            while heap and heap[0][0] < horizon:
                yield heapq.heappop(heap)[2]
        while heap:
            yield heapq.heappop(heap)[2]

    @staticmethod
    def sim_start_ms(day: int) -> int:
        from simulators.funnel import EPOCH_MS

        return EPOCH_MS + day * DAY_MS

    def _push_day(
        self, heap: list[tuple[int, int, Record]], batch: ImpressionBatch, day: int, tail: bool
    ) -> None:
        rng = np.random.default_rng([self.sim.config.seed, day, 104729])
        rates = np.zeros(len(FAULT_KINDS)) if tail else np.array(self.fault_config.rates())
        feats = self.sim.feature_dicts(batch)
        times = np.zeros(len(STEPS), dtype=np.int64)
        jitter = rng.integers(0, 500, size=(len(batch), len(STEPS)))
        fault_draw = rng.random(len(batch))
        happened, delays, labels = (
            batch.happened.tolist(),
            batch.delays_ms.tolist(),
            batch.labels.tolist(),
        )
        for i, iid in enumerate(batch.impression_ids):
            bank = self.sim.bank_name(int(batch.bank[i]))
            n_events = 1 + sum(happened[i])
            times[0] = batch.event_time_ms[i]
            for t in range(1, n_events):
                times[t] = times[t - 1] + delays[i][t - 1]
            values = [
                _event_value(s, f"{iid}/{STEPS[s]}", iid, int(times[s]), bank, feats[i] if s == 0 else None)
                for s in range(n_events)
            ]
            raws: list[bytes | None] = [_dumps(v) for v in values]
            deliver = [int(times[s] + jitter[i, s]) for s in range(n_events)]
            kind: str | None = self._pick_fault(fault_draw[i], rates, n_events)
            kinds: tuple[str, ...] = ()
            extra: list[tuple[int, bytes, int]] = []
            if kind is not None:
                applied = self._apply_fault(kind, rng, iid, values, raws, deliver)
                if applied is None:
                    kind = None  # no event of this impression allows that fault
                else:
                    kinds, extra = (kind,), applied
            if n_events == 5 and not labels[i][3] and kind not in CORRUPTING:
                self.faults.append(FaultRow("after_window", iid, "activation", f"{iid}/activation", "late"))
            key = iid.encode()
            for s, raw in enumerate(raws):
                if raw is not None:
                    rec = Record(STEPS[s], key, raw, int(times[s]), deliver[s])
                    heapq.heappush(heap, (deliver[s], next(self._seq), rec))
            for s, raw, at in extra:
                heapq.heappush(heap, (at, next(self._seq), Record(STEPS[s], key, raw, int(times[s]), at)))
            self.truth.append(
                TruthRow(
                    impression_id=iid,
                    bank_id=bank,
                    event_time_ms=int(times[0]),
                    p_true=tuple(float(p) for p in batch.p_true[i]),
                    labels=tuple(labels[i]),
                    corrupted=kind in CORRUPTING,
                    faults=kinds,
                    tail=tail,
                )
            )

    @staticmethod
    def _pick_fault(u: float, rates: np.ndarray, n_events: int) -> str | None:
        """At most one fault per impression, among the kinds its events allow."""
        allowed = [True, n_events > 1, True, n_events > 1, n_events > 1]
        acc = 0.0
        for kind, rate, ok in zip(FAULT_KINDS, rates, allowed, strict=True):
            if ok:
                acc += rate
                if u < acc:
                    return kind
        return None

    def _apply_fault(
        self,
        kind: str,
        rng: np.random.Generator,
        iid: str,
        values: list[dict],
        raws: list[bytes | None],
        deliver: list[int],
    ) -> list[tuple[int, bytes, int]] | None:
        """Mutate the impression's records in place; return extra records (step, raw, deliver_ms),
        or None when no event allows the fault."""
        n = len(values)
        first = 0 if kind in ("duplicate", "malformed") else 1
        s = int(rng.integers(first, n))
        if kind == "out_of_order":
            # the step that follows its predecessor most closely, if within 10 minutes
            gaps = [values[k]["event_time_ms"] - values[k - 1]["event_time_ms"] for k in range(1, n)]
            s = 1 + min(range(len(gaps)), key=gaps.__getitem__)
            if gaps[s - 1] > OUT_OF_ORDER_MAX_GAP_MS:
                return None
        event_id = values[s]["event_id"]
        reason: str | None = None
        extra: list[tuple[int, bytes, int]] = []
        if kind == "duplicate":
            raw = raws[s]
            assert raw is not None
            extra.append((s, raw, deliver[s] + int(rng.integers(1_000, 600_000))))
        elif kind == "out_of_order":
            # the predecessor is held up and arrives after this event (never before it happened)
            deliver[s - 1] = deliver[s] + int(rng.integers(1_000, 30_000))
        elif kind == "malformed":
            raws[s], reason = _malform(values[s], rng)
        elif kind == "illegal":
            raws[s - 1] = None  # the predecessor never arrives
            reason = "illegal_sequence"
            # ... unless the funnel is final before this event happens: the dropped step's window
            # closed first (an activation weeks after an application whose approval was lost)
            if s >= 2 and values[s]["event_time_ms"] > values[s - 2]["event_time_ms"] + WINDOWS_MS[s - 2]:
                reason = "late"
        elif kind == "late":
            deliver[s] = values[s]["event_time_ms"] + LATE_DELIVERY_MS
            reason = "late"
        self.faults.append(FaultRow(kind, iid, STEPS[s], event_id, reason))
        return extra
