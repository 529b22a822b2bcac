"""The simulated event stream in delivery order, with faults injected and marked in the truth.

Faults are drawn per impression (at most one each), among the kinds its events allow:

- ``duplicate``: one event is delivered twice (same event id) - harmless if dedupe works;
- ``out_of_order``: an event's predecessor is held up and delivered after it (a click before
  its impression) - harmless if the joiner holds it;
- ``malformed``: one event's bytes are broken (expected reason: the parse error code);
- ``illegal``: a predecessor is dropped, so the next step is illegal (``illegal_sequence``);
- ``late``: one event is delivered 20 days after it happened (``late``).

The last three corrupt the impression: its world labels (``TruthRow.labels``) are not what the
joiner can see. Steps that really happen after their window (an activation more than 14 days
after approval) are not faults but are listed as ``after_window`` (expected reason ``late``).

Records are delivered as a ``DeliveryProfile`` says (``simulators.delivery``: real time, partner
batch files, lagging sources). The answer key is computed from the delivered records with the
joiner's documented rules (``simulators.rules``), never from the joiner: each truth row has the
final labels the joiner must emit (``final_labels``) and ``dead_letters`` lists every record the
joiner must dead-letter, with its reason.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from simulators.delivery import DeliveryProfile, profile
from simulators.funnel import DAY_MS, EPOCH_MS, HOUR_MS, TASKS, FunnelSimulator, ImpressionBatch
from simulators.rules import Delivered, JoinRules, Outcome, outcome

STEPS = ("impression", *TASKS)
FAULT_KINDS = ("duplicate", "out_of_order", "malformed", "illegal", "late")
CORRUPTING = frozenset({"malformed", "illegal", "late"})
LATE_DELIVERY_MS = 20 * DAY_MS
OUT_OF_ORDER_MAX_GAP_MS = 10 * 60_000
# an impression's final is certainly out once the impressions are this much past its final time
# plus its lane's allowed lateness (the topic's frontier, sweeps, the last impressions' spacing)
END_MARGIN_MS = 3 * HOUR_MS
# ... and what the answer key *requires* by the stream's end waits longer: a partition's clock is
# its second-newest impression, and in a tail of 100 impressions a day over 4 partitions the last
# two can lie more than 3 h before the end (about one partition in six); a final due in that gap
# is rightly never sent (seen in `bench rebalance`). 12 h in all makes that about 1e-4.
REQUIRED_EXTRA_MS = 9 * HOUR_MS


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
    """One impression. ``labels``: what happened in the world, within the windows. ``final_labels``:
    what the joiner must emit, by the documented rules, from the records as delivered (None: no
    impression to label); the final is due once the ``final_lane`` step's topic has passed
    ``final_at_ms`` by its allowed lateness."""

    impression_id: str
    bank_id: str
    event_time_ms: int
    p_true: tuple[float, ...]
    labels: tuple[int, ...]
    corrupted: bool
    faults: tuple[str, ...]
    tail: bool
    final_labels: tuple[int, ...] | None = None
    final_at_ms: int | None = None
    final_lane: int | None = None
    final_required: bool = False  # the stream runs long enough for the final to be due


@dataclass(frozen=True, slots=True)
class FaultRow:
    kind: str
    impression_id: str
    step: str
    event_id: str
    expected_reason: str | None


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """A record the joiner must dead-letter (``required``: the stream runs long enough that it must
    have done so by the end; otherwise it may still be waiting for its funnel's final)."""

    impression_id: str
    step: str
    reason: str
    cause: str  # the impression's fault kind, or "rules" (a window edge, clock skew, ...)
    event_time_ms: int
    required: bool
    # other reasons the rules allow it: read after its funnel's retention, it may meet the state
    # kept or purged (simulators/rules.py, rule 4); ``required`` asks for one of them
    alt_reasons: tuple[str, ...] = ()

    @property
    def reasons(self) -> tuple[str, ...]:
        """Every reason the rules allow it."""
        return (self.reason, *self.alt_reasons)


DeadKey = tuple[str, str, str]  # (impression id, step, reason) of a dead letter


def expected_dead_letters(rows: Iterable[DeadLetterRow]) -> set[DeadKey]:
    """Every dead letter the answer key allows, under each reason it may have."""
    return {(d.impression_id, d.step, reason) for d in rows for reason in d.reasons}


def missing_dead_letters(rows: Iterable[DeadLetterRow], seen: set[DeadKey]) -> list[DeadKey]:
    """The required dead letters not seen under any of their reasons, sorted."""
    return sorted({
        (d.impression_id, d.step, d.reason) for d in rows
        if d.required and not any((d.impression_id, d.step, r) in seen for r in d.reasons)
    })  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Applied:
    """A fault applied to an impression's records."""

    kind: str
    step: int
    extra: list[tuple[int, bytes, int]]  # extra records (step, raw, deliver_ms)
    parse_reason: str | None = None


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
        delivery: DeliveryProfile | str = "realtime",
        partitions: int = 4,
        rules: JoinRules | None = None,
    ) -> None:
        self.sim = sim
        self.days = days
        self.fault_config = faults or FaultConfig()
        self.tail_days = tail_days
        self.tail_impressions_per_day = tail_impressions_per_day
        self.start_day = start_day
        self.delivery = profile(delivery) if isinstance(delivery, str) else delivery
        self.partitions = partitions  # of the event topics: where a partition stall applies
        self.rules = rules or JoinRules()
        self.truth: list[TruthRow] = []
        self.faults: list[FaultRow] = []
        self.dead_letters: list[DeadLetterRow] = []
        self._seq = itertools.count()
        # the impressions' event time at the end of the stream: the joiner's clock stops there
        self.clock_end_ms = self.sim_start_ms(start_day + days + tail_days)

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
        return EPOCH_MS + day * DAY_MS

    def final_due_ms(self, final_at_ms: int, lane: int) -> int:
        """The impressions' event time by which a final is certainly out, once every record has
        been delivered: its lane's topic is then idle and follows the impressions, less its
        allowed lateness."""
        return final_at_ms + self.rules.lateness_ms[lane] + END_MARGIN_MS

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
        prof, parts = self.delivery, self.partitions
        stall = prof.stall is not None
        for i, iid in enumerate(batch.impression_ids):
            bank_ix = int(batch.bank[i])
            bank = self.sim.bank_name(bank_ix)
            n_events = 1 + sum(happened[i])
            times[0] = batch.event_time_ms[i]
            for t in range(1, n_events):
                times[t] = times[t - 1] + delays[i][t - 1]
            stamped = [prof.stamp(s, bank_ix, int(times[s])) for s in range(n_events)]
            values = [
                _event_value(s, f"{iid}/{STEPS[s]}", iid, stamped[s], bank, feats[i] if s == 0 else None)
                for s in range(n_events)
            ]
            raws: list[bytes | None] = [_dumps(v) for v in values]
            key = iid.encode()
            part = kafka_partition(key, parts) if stall else 0
            deliver = [prof.deliver(s, bank_ix, part, parts, int(times[s]), int(jitter[i, s])) for s in range(n_events)]
            kind: str | None = self._pick_fault(fault_draw[i], rates, n_events)
            applied: _Applied | None = None
            if kind is not None:
                applied = self._apply_fault(kind, rng, values, raws, deliver, [int(x) for x in times[:n_events]])
                if applied is None:
                    kind = None  # no event of this impression allows that fault
                elif stall:  # a copy or a held-up record of a stalled partition waits for the stall's end too
                    deliver = [prof.hold(s, part, parts, at) for s, at in enumerate(deliver)]
                    applied.extra[:] = [(s, raw, prof.hold(s, part, parts, at)) for s, raw, at in applied.extra]
            delivered = [
                Delivered(
                    s, stamped[s], deliver[s],
                    applied.parse_reason if applied is not None and applied.step == s else None,
                    applied is not None and applied.kind == "late" and applied.step == s,
                )
                for s in range(n_events)
                if raws[s] is not None
            ]
            extra = applied.extra if applied is not None else []
            delivered += [Delivered(s, stamped[s], at) for s, _, at in extra]
            out = outcome(delivered, self.rules)
            fates = dict(zip(((d.step, d.deliver_ms) for d in delivered), out.fates, strict=True))
            if applied is not None:
                # the reason the rules give the faulted record (for ``illegal``: the record whose
                # predecessor was dropped)
                reason = fates.get((applied.step, deliver[applied.step]))
                event_id = values[applied.step]["event_id"]
                self.faults.append(FaultRow(applied.kind, iid, STEPS[applied.step], event_id, reason))
            for s in range(1, n_events):  # steps that happened after their window (not a fault)
                if kind not in CORRUPTING and not labels[i][s - 1] and (s == 1 or labels[i][s - 2]):
                    reason = fates.get((s, deliver[s]))
                    self.faults.append(FaultRow("after_window", iid, STEPS[s], f"{iid}/{STEPS[s]}", reason))
            self._expect(iid, out, delivered, kind)
            for s, raw in enumerate(raws):
                if raw is not None:
                    rec = Record(STEPS[s], key, raw, stamped[s], deliver[s])
                    heapq.heappush(heap, (deliver[s], next(self._seq), rec))
            for s, raw, at in extra:
                heapq.heappush(heap, (at, next(self._seq), Record(STEPS[s], key, raw, stamped[s], at)))
            self.truth.append(
                TruthRow(
                    impression_id=iid,
                    bank_id=bank,
                    event_time_ms=stamped[0],
                    p_true=tuple(float(p) for p in batch.p_true[i]),
                    labels=tuple(labels[i]),
                    corrupted=kind in CORRUPTING,
                    faults=(kind,) if kind is not None else (),
                    tail=tail,
                    final_labels=out.labels,
                    final_at_ms=out.final_at_ms,
                    final_lane=out.lane,
                    final_required=(
                        out.final_at_ms is not None
                        and out.lane is not None
                        and self.final_due_ms(out.final_at_ms, out.lane) + REQUIRED_EXTRA_MS <= self.clock_end_ms
                    ),
                )
            )

    def _expect(self, iid: str, out: Outcome, delivered: list[Delivered], kind: str | None) -> None:
        """The impression's expected dead letters, from the rules' outcome."""
        seen: set[tuple[int, str]] = set()
        alt_reasons: tuple[str, ...]
        for rec, kept, at, purged in zip(delivered, out.fates, out.resolved_at, out.purged_fates, strict=True):
            reason, alt_reasons = kept, ()
            if purged is not None:  # read after the retention: the state kept, or purged (rule 4)
                reasons = tuple(dict.fromkeys(x for x in (kept, *purged) if x is not None))
                reason, alt_reasons = reasons[0], reasons[1:]
            if reason is None or (rec.step, reason) in seen:
                continue
            seen.add((rec.step, reason))
            if at is not None:
                required = True  # decided when it (and its predecessors) arrive
            elif out.final_at_ms is not None and out.lane is not None:
                required = self.final_due_ms(out.final_at_ms, out.lane) + REQUIRED_EXTRA_MS <= self.clock_end_ms
            else:
                required = self._unknown_decided(rec)
            if purged is not None:  # a kept state's duplicate has no dead letter; a purged one waits
                required = kept is not None and required and self._unknown_decided(rec)
            self.dead_letters.append(
                DeadLetterRow(iid, STEPS[rec.step], reason, kind or "rules", rec.time_ms, required, alt_reasons)
            )

    def _unknown_decided(self, rec: Delivered) -> bool:
        """Is an event of an unknown impression (none came, or its state was purged) surely
        dead-lettered by the end? Once the impressions' topic is past its grace."""
        rules = self.rules
        wait = rules.grace_ms + rec.step * rules.skew_ms + rules.lateness_ms[0]
        return rec.time_ms + wait + self.delivery.max_delay_ms(0) + END_MARGIN_MS <= self.clock_end_ms

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
        values: list[dict],
        raws: list[bytes | None],
        deliver: list[int],
        true_ms: list[int],
    ) -> _Applied | None:
        """Mutate the impression's records in place; None when no event allows the fault."""
        n = len(values)
        first = 0 if kind in ("duplicate", "malformed") else 1
        s = int(rng.integers(first, n))
        if kind == "out_of_order":
            # the step that follows its predecessor most closely, if within 10 minutes
            gaps = [values[k]["event_time_ms"] - values[k - 1]["event_time_ms"] for k in range(1, n)]
            s = 1 + min(range(len(gaps)), key=gaps.__getitem__)
            if gaps[s - 1] > OUT_OF_ORDER_MAX_GAP_MS:
                return None
        extra: list[tuple[int, bytes, int]] = []
        parse_reason: str | None = None
        if kind == "duplicate":
            raw = raws[s]
            assert raw is not None
            extra.append((s, raw, deliver[s] + int(rng.integers(1_000, 600_000))))
        elif kind == "out_of_order":
            # the predecessor is held up and arrives after this event (never before it happened) -
            # but within its topic's allowed lateness (half of it: clocks are skewed): after a
            # lagging topic's event (applications 3 h behind) it would be late, another fault
            held = deliver[s] + int(rng.integers(1_000, 30_000))
            if held - true_ms[s - 1] > self.rules.lateness_ms[s - 1] // 2:
                return None
            deliver[s - 1] = held
        elif kind == "malformed":
            raws[s], parse_reason = _malform(values[s], rng)
        elif kind == "illegal":
            raws[s - 1] = None  # the predecessor never arrives
        elif kind == "late":
            # delivered 20 days after it happened: only where the stream runs long enough that the
            # funnel's final (without this event) is certainly out before it arrives
            at = true_ms[s] + LATE_DELIVERY_MS
            without = outcome(
                [Delivered(k, values[k]["event_time_ms"], deliver[k], after_final=k == s) for k in range(n)],
                self.rules,
            )
            if without.final_at_ms is None or without.lane is None:
                return None
            sure = self.final_due_ms(without.final_at_ms, without.lane) + self.delivery.max_delay_ms(without.lane)
            if sure > min(at, self.clock_end_ms):
                return None
            deliver[s] = at
        return _Applied(kind, s, extra, parse_reason)


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` (murmur2, as the Java client)."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions
