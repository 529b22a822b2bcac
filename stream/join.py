"""The join driver: raw records in, store updates and output records out. No Kafka in here.

``FunnelJoin.on_record`` parses a record, moves the partition watermark, applies the pure state
machine (``stream.funnel``) against a ``LabelStore`` (at most one state write per event) and
returns what to send. ``sweep`` pops the expiry index up to the watermark (first / final samples,
held events whose grace ran out, purges); the caller sends those outputs, waits for them, then
calls ``commit_sweep`` so that the swept watermark is stored only after its samples are out.
The faust joiner, the plain-loop bench and the tests all drive this one class.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from stream.clock import Clock
from stream.events import STEPS, InvalidEvent, dead_letter, parse_event
from stream.funnel import (
    NO_WATERMARK,
    FunnelConfig,
    FunnelState,
    Result,
    advance,
    decode_state,
    encode_state,
    next_due,
    sweep,
)
from stream.metrics import JoinerMetrics
from stream.samples import KINDS, sample_bytes
from stream.store import LabelStore
from stream.watermark import PartitionWatermark

SWEPT_KEY = b"swept"
_I64 = struct.Struct(">q")


class Output(NamedTuple):
    """A record to produce."""

    topic: str
    key: bytes
    value: bytes


@dataclass(frozen=True)
class JoinTopics:
    """Topic names: the five event topics in step order, samples and dead letters."""

    events: tuple[str, str, str, str, str]
    samples: str
    dead_letters: str


class _Partition:
    __slots__ = ("last_sweep_s", "pending_swept", "store", "swept", "wm")

    def __init__(self, store: LabelStore, lateness_ms: int, warmup_s: float) -> None:
        self.store = store
        raw = store.get_meta(SWEPT_KEY)
        self.swept = _I64.unpack(raw)[0] if raw else NO_WATERMARK
        self.wm = PartitionWatermark(lateness_ms, warmup_s, floor_ms=self.swept)
        self.last_sweep_s = float("-inf")
        self.pending_swept: int | None = None


class FunnelJoin:
    """Joins event records of many partitions; one ``LabelStore`` per partition."""

    def __init__(
        self,
        cfg: FunnelConfig,
        topics: JoinTopics,
        store_for: Callable[[int], LabelStore],
        clock: Clock,
        metrics: JoinerMetrics | None = None,
        lateness_ms: int = 30 * 60_000,
        sweep_interval_s: float = 0.25,
        warmup_s: float = 1.0,
    ) -> None:
        self.cfg = cfg
        self.topics = topics
        self.step_of = {t: i for i, t in enumerate(topics.events)}
        self._store_for = store_for
        self.clock = clock
        self.metrics = metrics
        self.lateness_ms = lateness_ms
        self.sweep_interval_s = sweep_interval_s
        self.warmup_s = warmup_s
        self.parts: dict[int, _Partition] = {}
        # metric children bound once: ``labels(...)`` is a locked dict lookup per call
        self._events_by_type = [metrics.events.labels(type=s) for s in STEPS] if metrics else None
        self._dups_by_type = [metrics.duplicates.labels(type=s) for s in STEPS] if metrics else None
        self._samples_by_kind = {k: metrics.samples.labels(kind=k) for k in KINDS} if metrics else None
        self._dead_by_reason: dict[str, Any] = {}

    def part(self, partition: int) -> _Partition:
        p = self.parts.get(partition)
        if p is None:
            p = self.parts[partition] = _Partition(self._store_for(partition), self.lateness_ms, self.warmup_s)
        return p

    def forget(self, partition: int) -> None:
        """Drop a revoked partition's in-memory state (its store stays where it is)."""
        self.parts.pop(partition, None)

    # --- per record -------------------------------------------------------------------------

    def on_record(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        behind: bool,
        out: list[Output],
        offset: int | None = None,
    ) -> None:
        """Process one event record; appends output records to ``out``."""
        step = self.step_of[topic]
        if self._events_by_type is not None:
            self._events_by_type[step].inc()
        p = self.part(partition)
        raw = value or b""
        try:
            event = parse_event(raw, expected_type=STEPS[step])
        except InvalidEvent as exc:
            self._dead(out, raw if value is not None else None, topic, exc.reason, exc.message, partition, offset, key)
            return
        wm = p.wm.event_watermark(step)
        p.wm.observe(step, event.event_time_ms, behind, self.clock.monotonic())
        store = p.store
        ikey = event.impression_id.encode()
        old = store.get(ikey)
        state = decode_state(old) if old is not None else None
        res = advance(state, event, raw, wm, p.swept, self.cfg)
        self._apply(p, ikey, event.impression_id, res, old is not None, wm, out, partition, key)
        if res.duplicate and self._dups_by_type is not None:
            self._dups_by_type[step].inc()

    def _apply(
        self,
        p: _Partition,
        ikey: bytes,
        iid: str,
        res: Result,
        existed: bool,
        wm: int,
        out: list[Output],
        partition: int,
        key: bytes | None,
        swept: int | None = None,
        prior: FunnelState | None = None,
    ) -> None:
        store = p.store
        after = p.swept if swept is None else swept
        if res.changed:
            if res.state is None:
                if existed:
                    store.delete(ikey)
            else:
                store.put(ikey, encode_state(res.state), next_due(res.state, after, self.cfg))
        elif swept is not None and res.state is not None:
            store.reschedule(ikey, next_due(res.state, after, self.cfg))
        for rej in res.rejects:
            self._dead(out, rej.raw, self.topics.events[rej.step], rej.reason, rej.detail, partition, None, ikey)
        if res.samples:
            st = res.state if res.state is not None else prior
            if st is None:
                raise AssertionError("a sample needs the funnel it describes")
            feats = st.features_json or b"{}"
            for s in res.samples:
                value = sample_bytes(
                    iid, st.bank_id, st.imp_ms, feats, s.labels, s.mature, s.kind, s.elapsed_ms, s.seq, wm,
                    self.cfg.policy,
                )
                out.append(Output(self.topics.samples, ikey, value))
                if self.metrics and self._samples_by_kind is not None:
                    self._samples_by_kind[s.kind].inc()
                    if s.kind == "final":
                        self.metrics.label_delay.observe(s.elapsed_ms / 1000.0)

    def _dead(
        self,
        out: list[Output],
        raw: bytes | None,
        topic: str,
        reason: str,
        detail: str,
        partition: int | None,
        offset: int | None,
        key: bytes | None,
    ) -> None:
        value = dead_letter(
            raw, source_topic=topic, reason=reason, detail=detail, partition=partition, offset=offset,
            key=key, time_ms=self.clock.now_ms(),
        )
        out.append(Output(self.topics.dead_letters, key or b"", value))
        if self.metrics:
            child = self._dead_by_reason.get(reason)
            if child is None:
                child = self._dead_by_reason[reason] = self.metrics.dead_letters.labels(reason=reason)
            child.inc()

    # --- time-driven ------------------------------------------------------------------------

    def sweep_due(self, partition: int, force: bool = False) -> bool:
        """Is a sweep of ``partition`` due (interval passed and the watermark moved)?"""
        p = self.part(partition)
        now = self.clock.monotonic()
        if not force and now - p.last_sweep_s < self.sweep_interval_s:
            return False
        p.last_sweep_s = now
        return p.wm.advance(now) > p.swept

    def sweep(self, partition: int, out: list[Output]) -> int:
        """Do everything due up to the watermark; returns how many states were visited.

        Call ``commit_sweep(partition)`` once the outputs are safely produced."""
        p = self.part(partition)
        wm = p.wm.value
        prev = p.swept
        n = 0
        for ikey in p.store.pop_due(wm):
            old = p.store.get(ikey)
            if old is None:
                continue
            n += 1
            state = decode_state(old)
            res = sweep(state, prev, wm, self.cfg)
            self._apply(p, ikey, ikey.decode(), res, True, wm, out, partition, ikey, swept=wm, prior=state)
        p.pending_swept = wm
        return n

    def take_sweep(self, partition: int) -> int | None:
        """Judge the records that follow against the sweep just done (in memory), as
        ``commit_sweep`` would, but leave the stored swept watermark alone: returns the value to
        store with ``persist_swept`` once the sweep's outputs are acknowledged (None: nothing)."""
        p = self.part(partition)
        wm, p.pending_swept = p.pending_swept, None
        if wm is None or wm <= p.swept:
            return None
        p.swept = wm
        return wm

    def persist_swept(self, partition: int, swept: int) -> None:
        """Store a swept watermark returned by ``take_sweep`` (its samples are out)."""
        p = self.parts.get(partition)
        if p is not None:  # not revoked meanwhile
            p.store.put_meta(SWEPT_KEY, _I64.pack(swept))

    def commit_sweep(self, partition: int) -> None:
        p = self.part(partition)
        if p.pending_swept is not None and p.pending_swept > p.swept:
            p.swept = p.pending_swept
            p.store.put_meta(SWEPT_KEY, _I64.pack(p.swept))
        p.pending_swept = None

    def watermark_lag_ms(self) -> int:
        lags = [lag for p in self.parts.values() if (lag := p.wm.lag_ms()) is not None]
        return max(lags, default=0)

    def open_funnels(self) -> int:
        return sum(len(p.store) for p in self.parts.values())
