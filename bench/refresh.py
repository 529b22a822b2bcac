"""``aitm-stream bench refresh --json FILE``: model refresh by serving artifacts vs table size.

For each table size (``--sizes``, default 1M and 10M rows): a dynamic embedding table filled with
that many synthetic IDs (a ``user_id``-like field; 19 small fields beside it), the streaming
learner (``OnlineLearner``, the trainer's default settings: lazy row-wise Adam, served weight
average) stepping back to back on batches of ``TRAINER_BATCH_SIZE`` samples whose IDs are drawn
Zipf-like from the whole table (the trainer's rate under a backlog), published by the trainer's
own path (``Trainer._step`` and ``Trainer.checkpoint_async``: the publication gate, the serving
artifact built on the training thread, ``stream.learn.publisher.Publisher`` writing and
announcing it on its writer thread, the periodic full snapshot and the training checkpoint - every
``TRAINER_TRAINING_CHECKPOINT_INTERVAL_MS``, ~6 copies of the table and the encoder - on its
background writer) - a version every ``TRAINER_CHECKPOINT_INTERVAL_MS`` - and a scorer thread that
takes the announcements (a stand-in producer hands them over instead of Kafka) and applies each
version to its replica (``stream.serve.replica``). One process: training thread, two writer
threads, scorer thread.

Figures per size: ``version_bytes`` {full, delta (p50 and max)}, ``delta_apply_ms`` (p50, p95,
max: the scorer applying one delta in place), ``freshness_s`` p50/p95 (the oldest sample new in
a version consumed by the trainer -> the scorer serves that version), ``publish_ms`` (artifact
snapshot on the training thread + write, by kind), ``full_load_ms`` (a scorer's first load),
``rows_per_delta`` (rows a delta carries: those the steps since the previous version trained), the
training rate meanwhile, and the process's peak memory; ``stall_ms`` (p50/p95/max: the
training thread's time per version, snapshots included; ``with_training_checkpoint`` those of the
versions that took a training checkpoint), ``training_checkpoints`` (count, bytes, write seconds)
and ``refused_versions`` (the publication gate).
"""

from __future__ import annotations

import argparse
import os
import queue
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from aitm.embedding_table import DynamicTable
from bench.report import write_json
from stream.contract.versions import parse_version
from stream.learn.learner import OnlineLearner, model_options
from stream.learn.sample_batch import FINAL, SampleBatch
from stream.learn.stabilisers import stabilisers_from
from stream.learn.trainer import Trainer
from stream.ops.settings import Settings
from stream.serve.replica import ReplicaLoader

FIELDS = ("user_id", *(f"f{i:02d}" for i in range(19)))  # one big field, 19 small ones (50 values each)
SMALL = 50


def filled_table(rows: int) -> DynamicTable:
    """A table of ``rows`` pool rows: 19 x 50 small values, the rest ``user_id`` values u0, u1, ...
    (synthetic IDs, placed directly: counting 10M values through the sketch first would only time
    the frequency filter)."""
    t = DynamicTable(FIELDS, rows, min_count=1, ttl_ms=10**15)
    users = rows - (len(FIELDS) - 1) * SMALL
    if users < 1:
        raise ValueError(f"a table of {rows} rows is too small for the bench")
    row = t.n_fields
    for f in range(len(FIELDS)):
        n = users if f == 0 else SMALL
        prefix = "u" if f == 0 else "v"
        rng = np.arange(row, row + n, dtype=np.int64)
        t.vocab[f] = {f"{prefix}{i}": r - f for i, r in enumerate(rng.tolist())}
        t.row_field[row : row + n] = f
        t.row_value[row : row + n] = [f"{prefix}{i}" for i in range(n)]
        row += n
    t.last_seen[t.n_fields :] = 0
    t.row_seq[t.n_fields :] = np.arange(1, rows + 1)
    t.admissions = rows
    t.n_free = 0
    t.now_ms = 0
    t.next_expiry_ms = 10**15
    return t


class Traffic:
    """Batches whose ``user_id`` is Zipf-like over the table's users (rank 1 most seen), as the feed
    hands them over (columns); a pool of feature columns drawn up front, fresh impression ids and
    labels each batch (drawing 10,000 strings a batch would otherwise cost as much as training)."""

    def __init__(self, users: int, batch: int, seed: int = 0, pool: int = 64) -> None:
        rng = self.rng = np.random.default_rng(seed)
        self.batch, self.k = batch, 0
        self.columns = []
        for _ in range(pool):
            u = (rng.zipf(1.1, batch) - 1) % users
            cols = {"user_id": [f"u{x}" for x in u.tolist()]}
            for name in FIELDS[1:]:
                cols[name] = [f"v{x}" for x in rng.integers(0, SMALL, batch).tolist()]
            self.columns.append(cols)

    def next(self, now_ms: int) -> SampleBatch:
        n, k = self.batch, self.k
        self.k += 1
        labels = np.zeros((n, 4), np.int8)
        labels[:, 0] = self.rng.random(n) < 0.2
        return SampleBatch(
            impression_ids=[f"b{k}-{i}" for i in range(n)], bank_ids=["bank_1"] * n,
            event_time_ms=np.full(n, now_ms, np.int64), kind=np.full(n, FINAL, np.int8), seq=np.full(n, 5, np.int64),
            labels=labels, mature=np.ones((n, 4), bool), elapsed_ms=np.full(n, 1000, np.int64),
            watermark_ms=np.full(n, now_ms, np.int64), features=self.columns[k % len(self.columns)])


def _pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)), 3) if xs else float("nan")


class Announcer:
    """Stands in for the trainer's Kafka producer: hands each ``model-versions`` record to the scorer."""

    def __init__(self, topic: str, to: queue.Queue[Any]) -> None:
        self.topic, self.to = topic, to

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        if topic == self.topic:
            self.to.put(parse_version(value))

    def flush(self) -> None:
        pass


def run_size(rows: int, seconds: float, settings: Settings, root: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    table = filled_table(rows)
    torch.manual_seed(0)
    learner = OnlineLearner(table, "final-only", settings.trainer_lr, eval_window=settings.trainer_eval_window,
                            one_pass=settings.trainer_one_pass, stabilisers=stabilisers_from(settings),
                            **model_options(settings))
    fill_s = time.monotonic() - t0
    trainer = Trainer(settings.model_copy(update={"data_dir": root / f"rows{rows}", "model_store_dir": None}),
                      CollectorRegistry(), mode="final-only")
    trainer.learner = learner
    store = trainer.store
    loader = ReplicaLoader(store)
    traffic = Traffic(rows - (len(FIELDS) - 1) * SMALL, settings.trainer_batch_size)
    announced: queue.Queue[Any] = queue.Queue()  # announcements (ModelVersion), then None
    trainer._producer = Announcer(settings.topic_model_versions, announced)
    sizes: dict[str, list[int]] = {"full": [], "delta": [], "checkpoint": []}
    publish_ms: dict[str, list[float]] = {"full": [], "delta": [], "checkpoint": []}
    apply_ms: list[float] = []
    full_load_ms: list[float] = []
    freshness: list[float] = []
    served: list[int] = []
    timeline: list[tuple[int, int, float, float, bool]] = []  # announced, served, freshness s, load+apply ms, full

    def scorer() -> None:
        while (ann := announced.get()) is not None:
            if announced.qsize():  # a newer one waits: take the newest, as the follower does
                continue
            a = time.perf_counter()
            plan = loader.prepare(ann.version)
            if plan is None:
                continue
            b = time.perf_counter()
            m = loader.apply(plan)
            c = time.perf_counter()
            if plan.full is None:
                apply_ms.extend([(c - b) * 1000 / max(len(plan.deltas), 1)] * len(plan.deltas))
            else:
                full_load_ms.append((c - a) * 1000)
            fresh = time.time() - ann.min_new_sample_consumed_at_ms / 1000
            freshness.append(fresh)
            served.append(m.version)
            timeline.append((ann.version, m.version, round(fresh, 2), round((c - a) * 1000, 1), plan.full is not None))

    publish_artifact, publish_checkpoint = store.publish_artifact, store.publish

    def timed_artifact(art: Any) -> Any:  # the writer threads' writes, by kind
        a = time.perf_counter()
        path, size = publish_artifact(art)
        sizes[str(art["kind"])].append(size)
        publish_ms[str(art["kind"])].append((time.perf_counter() - a) * 1000)
        return path, size

    def timed_checkpoint(version: int, ckpt: Any) -> Any:
        a = time.perf_counter()
        path, digest = publish_checkpoint(version, ckpt)
        sizes["checkpoint"].append(path.stat().st_size)
        publish_ms["checkpoint"].append((time.perf_counter() - a) * 1000)
        return path, digest

    store.publish_artifact = timed_artifact  # type: ignore[method-assign,assignment]
    store.publish = timed_checkpoint  # type: ignore[method-assign,assignment]
    thread = threading.Thread(target=scorer, daemon=True)
    thread.start()
    for _ in range(3):  # warm-up steps (torch's first passes), not timed
        learner.step(traffic.next(0))
    # version 1, the writer's first: a full snapshot, loaded by the scorer before the timed run
    a = time.perf_counter()
    now_ms = int(time.time() * 1000)
    trainer._step(traffic.next(0), now_ms, now_ms)
    trainer.checkpoint_async()
    while not served:
        time.sleep(0.05)
    first_s = time.perf_counter() - a
    freshness.clear()
    stall_ms: list[float] = []
    stall_ckpt_ms: list[float] = []
    trained0 = learner.trained_samples
    start = last = time.monotonic()
    trainer.last_training_ckpt_s = start  # the training checkpoint's cadence counts from here
    interval = settings.trainer_checkpoint_interval_ms / 1000
    while True:
        now = time.monotonic()
        if trainer.new_min_ms is not None and now - last >= interval:
            before = trainer.ckpt_version
            a = time.perf_counter()
            trainer.checkpoint_async()  # the gate, the snapshots; waits while the previous version is announced
            stall_ms.append((time.perf_counter() - a) * 1000)
            if trainer.ckpt_version != before:
                stall_ckpt_ms.append(stall_ms[-1])
            last = now
            if now - start >= seconds:
                break
        now_ms = int(time.time() * 1000)
        trainer._step(traffic.next(0), now_ms, now_ms)
    train_s = time.monotonic() - start
    trained = learner.trained_samples - trained0
    trainer.publisher.close()
    announced.put(None)
    thread.join()
    rows_per_delta = [len(store.load_artifact(v, "delta")["rows"]) for v, kinds in store.artifacts().items()
                      if "delta" in kinds][-5:]
    return {
        "rows": rows,
        "fill_seconds": round(fill_s, 1),
        "first_full_seconds": round(first_s, 1),  # snapshot, write and a scorer's load of version 1
        "versions": trainer.version,
        "versions_served": len(served),
        "refused_versions": trainer.refused,
        "version_bytes": {"full": sizes["full"][0] if sizes["full"] else None,
                          "delta": {"p50": _pct([float(s) for s in sizes["delta"]], 50),
                                    "max": max(sizes["delta"], default=None)}},
        "delta_apply_ms": {"p50": _pct(apply_ms, 50), "p95": _pct(apply_ms, 95), "max": _pct(apply_ms, 100)},
        "freshness_s": {"p50": _pct(freshness, 50), "p95": _pct(freshness, 95), "max": _pct(freshness, 100)},
        "stall_ms": {"p50": _pct(stall_ms, 50), "p95": _pct(stall_ms, 95), "max": _pct(stall_ms, 100),
                     "with_training_checkpoint": [round(x, 1) for x in stall_ckpt_ms]},
        "training_checkpoints": {"count": len(sizes["checkpoint"]), "bytes": max(sizes["checkpoint"], default=None),
                                 "write_s": [round(x / 1000, 1) for x in publish_ms["checkpoint"]]},
        "publish_ms": {k: {"p50": _pct(v, 50), "max": _pct(v, 100)} for k, v in publish_ms.items()},
        "full_load_ms": {"p50": _pct(full_load_ms, 50), "max": _pct(full_load_ms, 100)},
        "rows_per_delta": {"last5": rows_per_delta},
        "trained_samples_per_s": round(trained / train_s),
        "timeline": [{"announced": a, "served": v, "freshness_s": f, "load_apply_ms": ms, "from_full": full}
                     for a, v, f, ms, full in timeline],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aitm-stream bench refresh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True, help="write the figures here")
    p.add_argument("--sizes", default="1000000,10000000", help="table sizes in rows, comma-separated")
    p.add_argument("--seconds", type=float, default=130.0,
                   help="training time per size (130 s: two periodic full snapshots and two training "
                        "checkpoints at the default settings)")
    args = p.parse_args(argv)
    settings = Settings()
    torch.set_num_threads(settings.trainer_threads)
    load0 = os.getloadavg()
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "command": "aitm-stream bench refresh " + " ".join(argv or []),
        "interval_s": settings.trainer_checkpoint_interval_ms / 1000,
        "full_every": settings.model_store_full_every,
        "training_checkpoint_interval_s": settings.trainer_training_checkpoint_interval_ms / 1000,
        "batch_size": settings.trainer_batch_size,
        "sizes": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-refresh-") as tmp:
        for rows in (int(x) for x in args.sizes.split(",") if x.strip()):
            fig = run_size(rows, args.seconds, settings, Path(tmp))
            report["sizes"][str(rows)] = fig
            print(f"{rows:,} rows: {fig}", flush=True)
    report["version_bytes"] = {k: v["version_bytes"] for k, v in report["sizes"].items()}
    report["delta_apply_ms"] = {k: v["delta_apply_ms"] for k, v in report["sizes"].items()}
    report["freshness_s"] = {k: v["freshness_s"] for k, v in report["sizes"].items()}
    report["stall_ms"] = {k: v["stall_ms"] for k, v in report["sizes"].items()}
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["load_average"] = {"start": [round(x, 2) for x in load0], "end": [round(x, 2) for x in os.getloadavg()]}
    report["wall_seconds"] = round(time.monotonic() - t0, 1)
    print(write_json(args.json, report), end="")
    return 0
