"""Where the join core's time goes, in process (no Kafka): ``python -m bench.join_profile``.

The bench joiner's records (same simulator, seed and faults) are cut into fetches of up to
``--fetch`` records of one partition, in delivery order, as a consumer reads them, and fed to
``FunnelJoin`` either a record at a time (``on_record``, the old path) or a fetch at a time
(``on_batch``), with a sweep and commit of every partition every ``--flush-every`` records (the
joiner flushes once per interval). The store is the joiner's own ``FaustTableStore`` logic over
a plain rocksdict (outbox, drain, one ``WriteBatch`` per flush). Prints microseconds of CPU per
event and, with ``--profile``, cProfile's top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

from stream.contract.samples import ENCODINGS, SampleEncoding
from stream.join.driver import BatchRecord, FunnelJoin, JoinTopics, Output
from stream.join.faust_store import FaustTableStore
from stream.join.funnel import FunnelConfig, next_dues
from stream.join.state_codec import decode_state
from stream.ops.clock import FakeClock

TOPICS = ("impressions", "clicks", "applications", "approvals", "activations")


class _Table:
    """What ``FaustTableStore`` reads of a faust Table: ``data._db_for_partition``."""

    def __init__(self, root: Path) -> None:
        from rocksdict import Options, Rdict

        self.dbs: dict[int, Any] = {}
        self.root = root
        self.data = self
        self._opts = Options(raw_mode=True)
        self._opts.create_if_missing(True)
        self._rdict = Rdict

    def _db_for_partition(self, p: int) -> Any:
        if p not in self.dbs:
            self.dbs[p] = self._rdict(str(self.root / f"p{p}"), options=self._opts)
        return self.dbs[p]


def fetches(per_day: int, days: int, seed: int, fetch: int, partitions: int = 4) -> list[list[BatchRecord]]:
    """The bench's records as fetches: (topic, partition, key, value, offset), one partition each."""
    from simulators.faults import FaultConfig, SimulatedStream, kafka_partition
    from simulators.funnel import FunnelSimulator, SimConfig

    sim = FunnelSimulator(SimConfig(seed=seed, impressions_per_day=per_day))
    recs = list(SimulatedStream(sim, days=days, faults=FaultConfig.uniform(0.002)))
    offsets: dict[tuple[str, int], int] = {}
    out: list[list[BatchRecord]] = []
    current: dict[int, list[BatchRecord]] = {}
    for r in recs:
        topic = TOPICS[["impression", "click", "application", "approval", "activation"].index(r.step)]
        p = kafka_partition(r.key, partitions)
        off = offsets.get((topic, p), 0)
        offsets[(topic, p)] = off + 1
        batch = current.setdefault(p, [])
        batch.append((topic, p, r.key, r.value, off, True))
        if len(batch) >= fetch:
            out.append(batch)
            current[p] = []
    out.extend(b for b in current.values() if b)
    return out


def run(batches: list[list[BatchRecord]], mode: str, flush_every: int, root: Path, fast_core: bool = True,
        encoding: SampleEncoding = "json") -> tuple[int, int]:
    """Feed every fetch; returns (events, outputs)."""
    cfg = FunnelConfig()
    clock = FakeClock(1_767_225_600_000)
    table = _Table(root)

    def due_of(value: bytes, swept: Any) -> Any:
        return next_dues(decode_state(value), swept, cfg)

    join = FunnelJoin(cfg, JoinTopics(TOPICS, "samples", "dead-letters", encoding),
                      lambda p: FaustTableStore(table, p, due_of), clock, max_future_ms=0, fast_core=fast_core)
    n = outputs = since = 0
    for batch in batches:
        out: list[Output] = []
        if mode == "batch":
            join.on_batch(batch, out)
        else:
            for topic, p, key, value, off, behind in batch:
                join.on_record(topic, p, key, value, behind, out, off)
        n += len(batch)
        since += len(batch)
        clock.advance(len(batch) // 10 + 1)
        outputs += len(out)
        if since >= flush_every:
            since = 0
            for p in list(join.parts):
                if join.sweep_due(p, force=True):
                    sweep_out: list[Output] = []
                    join.sweep(p, sweep_out)
                    outputs += len(sweep_out)
                    wm = join.take_sweep(p)
                    if wm is not None:
                        join.persist_swept(p, wm)
                store = join.parts[p].store
                assert isinstance(store, FaustTableStore)
                store.settle(store.drain())
    return n, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.join_profile", description=__doc__)
    parser.add_argument("--mode", choices=("record", "batch"), default="batch")
    parser.add_argument("--per-day", type=int, default=20000)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fetch", type=int, default=500, help="records per fetch (one partition)")
    parser.add_argument("--flush-every", type=int, default=2500, help="records between two flushes")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    parser.add_argument("--python-core", action="store_true", help="the Python core alone (no compiled path)")
    parser.add_argument("--encoding", choices=ENCODINGS, default="msgpack", help="the samples' encoding")
    args = parser.parse_args(argv)
    batches = fetches(args.per_day, args.days, args.seed, args.fetch)
    with tempfile.TemporaryDirectory(prefix="aitm-join-profile-") as tmp:
        prof = cProfile.Profile() if args.profile else None
        t0 = time.process_time()
        if prof:
            prof.enable()
        n, outputs = run(batches, args.mode, args.flush_every, Path(tmp), not args.python_core, args.encoding)
        if prof:
            prof.disable()
        cpu = time.process_time() - t0
    core = "python core" if args.python_core else "fast core"
    print(f"{args.mode}, {core}, {args.encoding}: {n} events, {outputs} outputs, {cpu * 1e6 / n:.1f} us CPU per event"
          f"{' (under cProfile)' if prof else ''}")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
