"""``aitm-stream bench feed``: how fast one trainer feed turns ``samples`` records into columns, per encoding.

What is timed is ``stream.learn.feed.parse_chunk``, the feed process's whole per-record work
(decode + validate + the ``SampleBatch`` columns), on chunks of realistic samples (simulator
features, every kind) already fetched: Kafka's fetch is left out, so the figure is what one
feed process can hand a trainer at most. Both encodings must give identical columns (checked).
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
import numpy as np

from bench.report import write_json
from stream.contract.samples import ENCODINGS, KINDS, SAMPLE_ENCODERS, Sample
from stream.learn.feed import parse_chunk
from stream.learn.sample_batch import SampleBatch
from stream.ops.command import command_parser

TARGET_SAMPLES_PER_S: Final = 250_000  # the binary encoding's target (issue 15)


@dataclass(frozen=True)
class Record:
    """The fields of a fetched Kafka record that ``parse_chunk`` reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class TopicPart:
    topic: str
    partition: int


def simulated_samples(n: int, seed: int = 0) -> list[Sample]:
    """``n`` samples with the simulator's features and labels, kinds in the joiner's proportions."""
    from simulators.funnel import FunnelSimulator, SimConfig

    sim = FunnelSimulator(SimConfig(seed=seed))
    data = sim.dataset(max(1, -(-n // 10_000)))
    dicts = sim.feature_dicts(data)
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(KINDS), size=n, p=[0.45, 0.1, 0.45])
    out = []
    for i in range(n):
        r = i % len(data)
        t = int(data.event_time_ms[r])
        labels = tuple(int(x) for x in data.labels[r])
        kind = KINDS[int(kinds[i])]
        mature = (True,) * 4 if kind == "final" else (bool(labels[0]), False, False, False)
        out.append(Sample(
            f"imp-{seed}-{i:09d}", f"bank_{int(data.bank[r])}", t, dicts[r],
            (labels[0], labels[1], labels[2], labels[3]), (mature[0], mature[1], mature[2], mature[3]),
            kind, 1_800_000 if kind == "first" else 86_400_000 * 15, 0 if kind == "first" else 5,  # type: ignore[arg-type]
            t + 1_800_000, "early",
        ))  # fmt: skip
    return out


def chunks_of(values: list[bytes], chunk_size: int, partitions: int = 4) -> list[Mapping[Any, list[Any]]]:
    """``values`` as fetched chunks: ``chunk_size`` records, spread over ``partitions``."""
    out: list[Mapping[Any, list[Any]]] = []
    tps = [TopicPart("samples", p) for p in range(partitions)]
    for start in range(0, len(values), chunk_size):
        polled: dict[Any, list[Any]] = {tp: [] for tp in tps}
        for off, v in enumerate(values[start : start + chunk_size], start):
            tp = tps[off % partitions]
            polled[tp].append(Record(tp.topic, tp.partition, off, None, v))
        out.append(polled)
    return out


def feed_rate(values: list[bytes], chunk_size: int = 500, repeats: int = 3) -> tuple[float, float, SampleBatch]:
    """Samples per CPU second and per wall second that ``parse_chunk`` turns ``values`` into
    columns (best of ``repeats`` each), and the columns. CPU time is the figure that counts: the
    feed has a core of its own in the trainer, and on a shared machine wall time mostly measures
    the neighbours."""
    chunks = chunks_of(values, chunk_size)
    best, best_wall = float("inf"), float("inf")
    batches: list[SampleBatch] = []
    got = [parse_chunk(c) for c in chunks]  # untimed: the columns to compare, and a warm-up
    refused = [r for c in got for r in c.invalid]
    if refused:
        raise AssertionError(f"bench samples were refused: {refused[0]}")
    batches = [c.samples for c in got]
    del got
    # timed passes drop each chunk once parsed, as the feed does once it has queued it; the bench's
    # own data (samples, records, the columns above) is moved out of the collector's way: a feed
    # process holds none of it, and full collections walking it would be charged to the feed
    gc.collect()
    gc.freeze()
    for _ in range(repeats):
        start, start_wall = time.process_time(), time.perf_counter()
        for c in chunks:
            parse_chunk(c)
        best = min(best, time.process_time() - start)
        best_wall = min(best_wall, time.perf_counter() - start_wall)
    gc.unfreeze()
    return len(values) / best, len(values) / best_wall, SampleBatch.concat(batches)


def same_columns(a: SampleBatch, b: SampleBatch) -> bool:
    arrays = ("event_time_ms", "kind", "seq", "labels", "mature", "elapsed_ms", "watermark_ms")
    return (
        a.impression_ids == b.impression_ids and a.bank_ids == b.bank_ids and a.features == b.features
        and all(np.array_equal(getattr(a, n), getattr(b, n)) for n in arrays)
    )  # fmt: skip


def measure(samples: list[Sample], encoding: str, chunk_size: int = 500, repeats: int = 3) -> dict[str, Any]:
    values = [SAMPLE_ENCODERS[encoding](s) for s in samples]
    rate, wall_rate, batch = feed_rate(values, chunk_size, repeats)
    return {
        "feed_samples_per_s": round(rate, 1),
        "feed_samples_per_wall_s": round(wall_rate, 1),
        "bytes_per_sample": round(sum(map(len, values)) / len(values), 1),
        "us_per_sample": round(1e6 / rate, 3),
        "_batch": batch,
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser("bench feed")
    p.add_argument("--json", type=Path, default=Path("reports/bench_feed.json"))
    p.add_argument("--samples", type=int, default=60_000, help="samples per encoding")
    p.add_argument("--chunk", type=int, default=500, help="records per fetched chunk (the trainer's batch)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per encoding; the best counts")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Time the feed on both encodings; write the JSON report."""
    args = _parse(argv)
    samples = simulated_samples(args.samples, args.seed)
    results = {enc: measure(samples, enc, args.chunk, args.repeats) for enc in ENCODINGS}
    batches = [r.pop("_batch") for r in results.values()]
    if not same_columns(batches[0], batches[1]):
        raise AssertionError("the two encodings decoded to different columns")
    old, new = results["json"], results["msgpack"]
    report = {
        "encodings": results,
        "new_encoding": "msgpack",
        "feed_speedup": round(new["feed_samples_per_s"] / old["feed_samples_per_s"], 2),
        "bytes_ratio": round(new["bytes_per_sample"] / old["bytes_per_sample"], 3),
        "target_feed_samples_per_s": TARGET_SAMPLES_PER_S,
        "meets_target": new["feed_samples_per_s"] >= TARGET_SAMPLES_PER_S,
        "same_columns": True,
        "samples": args.samples,
        "chunk_size": args.chunk,
        "features_per_sample": len(samples[0].features),
        "timing": "feed_samples_per_s: per CPU second of the one feed process (best of --repeats)",
        "msgspec": msgspec.__version__,
        "python": platform.python_version(),
    }
    print(write_json(args.json, report), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
