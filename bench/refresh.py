"""``aitm-stream bench refresh --json FILE``: model refresh by serving artifacts vs table size.

For each table size (``--sizes``, default 1M and 10M rows): a dynamic embedding table filled with
that many synthetic IDs (a ``user_id``-like field; 19 small fields beside it), the streaming
learner (``OnlineLearner``, the trainer's default settings: lazy row-wise Adam, served weight
average) stepping back to back on batches of ``TRAINER_BATCH_SIZE`` samples whose IDs are drawn
Zipf-like from the whole table (the trainer's rate under a backlog), a version every
``TRAINER_CHECKPOINT_INTERVAL_MS`` - its serving artifact built on the training thread (a
snapshot) and written by a writer thread into a model store, as the trainer does - and a scorer
thread that follows the store as a scorer follows ``model-versions`` and applies each version
to its replica (``stream.serve.replica``). One process, three threads; the training checkpoint
itself is not written (at 10M rows it holds ~6 copies of the table: docs/embedding_table.md).

Figures per size: ``version_bytes`` {full, delta (p50 and max)}, ``delta_apply_ms`` (p50, p95,
max: the scorer applying one delta in place), ``freshness_s`` p50/p95 (the oldest sample new in
a version consumed by the trainer -> the scorer serves that version), ``publish_ms`` (artifact
snapshot on the training thread + write, by kind), ``full_load_ms`` (a scorer's first load),
``rows_per_delta`` (rows a delta carries: those the steps since the previous version trained), the
training rate meanwhile, and the process's peak memory.
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

from aitm.embedding_table import DynamicTable
from bench.report import write_json
from stream.learn.learner import OnlineLearner
from stream.learn.refresh import ServingWriter
from stream.learn.sample_batch import FINAL, SampleBatch
from stream.learn.stabilisers import stabilisers_from
from stream.ops.model_store import ModelStore
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


def run_size(rows: int, seconds: float, settings: Settings, root: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    table = filled_table(rows)
    torch.manual_seed(0)
    learner = OnlineLearner(table, "final-only", settings.trainer_lr, eval_window=settings.trainer_eval_window,
                            one_pass=settings.trainer_one_pass, stabilisers=stabilisers_from(settings))
    fill_s = time.monotonic() - t0
    store = ModelStore(root / f"rows{rows}", keep=settings.model_store_keep)
    writer = ServingWriter(settings.model_store_full_every)
    loader = ReplicaLoader(store)
    traffic = Traffic(rows - (len(FIELDS) - 1) * SMALL, settings.trainer_batch_size)
    announced: queue.Queue[tuple[int, float] | None] = queue.Queue()  # (version, oldest new sample consumed at)
    sizes: dict[str, list[int]] = {"full": [], "delta": []}
    publish_ms: dict[str, list[float]] = {"full": [], "delta": []}
    apply_ms: list[float] = []
    full_load_ms: list[float] = []
    freshness: list[float] = []
    served: list[int] = []
    timeline: list[tuple[int, int, float, float, bool]] = []  # announced, served, freshness s, load+apply ms, full

    def scorer() -> None:
        while (item := announced.get()) is not None:
            version, oldest = item
            if announced.qsize():  # a newer one waits: take the newest, as the follower does
                continue
            a = time.perf_counter()
            plan = loader.prepare(version)
            if plan is None:
                continue
            b = time.perf_counter()
            m = loader.apply(plan)
            c = time.perf_counter()
            if plan.full is None:
                apply_ms.extend([(c - b) * 1000 / max(len(plan.deltas), 1)] * len(plan.deltas))
            else:
                full_load_ms.append((c - a) * 1000)
            freshness.append(time.time() - oldest)
            served.append(m.version)
            timeline.append((version, m.version, round(time.time() - oldest, 2), round((c - a) * 1000, 1),
                             plan.full is not None))

    pub_q: queue.Queue[tuple[int, list[dict[str, Any]], float, float] | None] = queue.Queue(maxsize=1)

    def publisher() -> None:
        while (item := pub_q.get()) is not None:
            version, arts, oldest, snap_ms = item
            # as the trainer's publisher: a full snapshot beside a delta is written after the announcement
            deltas = [a for a in arts if a["kind"] == "delta"]
            for art in deltas if deltas else arts:
                write(art, snap_ms)
            announced.put((version, oldest))
            for art in [a for a in arts if a["kind"] == "full"] if deltas else []:
                write(art, snap_ms)

    def write(art: dict[str, Any], snap_ms: float) -> None:
        a = time.perf_counter()
        _, size = store.publish_artifact(art)
        kind = str(art["kind"])
        sizes[kind].append(size)
        publish_ms[kind].append(snap_ms + (time.perf_counter() - a) * 1000)  # snapshot (all kinds) + this write

    threads = [threading.Thread(target=scorer, daemon=True), threading.Thread(target=publisher, daemon=True)]
    for th in threads:
        th.start()
    for _ in range(3):  # warm-up steps (torch's first passes), not timed
        learner.step(traffic.next(0))
    # version 1, the writer's first: a full snapshot, loaded by the scorer before the timed run
    a = time.perf_counter()
    pub_q.put((1, writer.artifacts(1, learner.served_model(), table, learner.take_changed_rows()), time.time(),
               0.0))
    while not served:
        time.sleep(0.05)
    first_s = time.perf_counter() - a
    freshness.clear()
    rows_per_delta: list[int] = []
    version, trained, oldest = 1, 0, None
    start = last = time.monotonic()
    interval = settings.trainer_checkpoint_interval_ms / 1000
    while True:
        now = time.monotonic()
        if oldest is not None and now - last >= interval:
            a = time.perf_counter()
            version += 1
            arts = writer.artifacts(version, learner.served_model(), table, learner.take_changed_rows())
            rows_per_delta.extend(len(art["rows"]) for art in arts if art["kind"] == "delta")
            pub_q.put((version, arts, oldest, (time.perf_counter() - a) * 1000))  # waits while one is written
            oldest, last = None, now
            if now - start >= seconds:
                break
        if oldest is None:
            oldest = time.time()
        trained += learner.step(traffic.next(0)).trained_rows
    train_s = time.monotonic() - start
    pub_q.put(None)
    threads[1].join()
    announced.put(None)
    threads[0].join()
    return {
        "rows": rows,
        "fill_seconds": round(fill_s, 1),
        "first_full_seconds": round(first_s, 1),  # snapshot, write and a scorer's load of version 1
        "versions": version,
        "versions_served": len(served),
        "version_bytes": {"full": sizes["full"][0] if sizes["full"] else None,
                          "delta": {"p50": _pct([float(s) for s in sizes["delta"]], 50),
                                    "max": max(sizes["delta"], default=None)}},
        "delta_apply_ms": {"p50": _pct(apply_ms, 50), "p95": _pct(apply_ms, 95), "max": _pct(apply_ms, 100)},
        "freshness_s": {"p50": _pct(freshness, 50), "p95": _pct(freshness, 95), "max": _pct(freshness, 100)},
        "publish_ms": {k: {"p50": _pct(v, 50), "max": _pct(v, 100)} for k, v in publish_ms.items()},
        "full_load_ms": {"p50": _pct(full_load_ms, 50), "max": _pct(full_load_ms, 100)},
        "rows_per_delta": {"p50": _pct([float(r) for r in rows_per_delta], 50), "max": max(rows_per_delta, default=0)},
        "trained_samples_per_s": round(trained / train_s),
        "timeline": [{"announced": a, "served": v, "freshness_s": f, "load_apply_ms": ms, "from_full": full}
                     for a, v, f, ms, full in timeline],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aitm-stream bench refresh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True, help="write the figures here")
    p.add_argument("--sizes", default="1000000,10000000", help="table sizes in rows, comma-separated")
    p.add_argument("--seconds", type=float, default=70.0,
                   help="training time per size (70 s: one periodic full snapshot at the default settings)")
    args = p.parse_args(argv)
    settings = Settings()
    torch.set_num_threads(settings.trainer_threads)
    load0 = os.getloadavg()
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "command": "aitm-stream bench refresh " + " ".join(argv or []),
        "interval_s": settings.trainer_checkpoint_interval_ms / 1000,
        "full_every": settings.model_store_full_every,
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
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["load_average"] = {"start": [round(x, 2) for x in load0], "end": [round(x, 2) for x in os.getloadavg()]}
    report["wall_seconds"] = round(time.monotonic() - t0, 1)
    print(write_json(args.json, report), end="")
    return 0
