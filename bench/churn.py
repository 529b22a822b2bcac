"""``aitm-stream bench churn --json FILE``: the embedding table under ID churn.

The simulator with churn (users and creatives retire and new ones appear every day) for at least
45 days; its records go through the joiner's ``FunnelJoin`` in process (no broker: the same
samples in the same order for every learner), and the samples through three learners at
test-then-train, with the trainer's default settings otherwise:

- ``fixed``: the old encoder at its old default capacity (8,192 ids per field, never recycled);
- ``unbounded``: every ID admitted keeps its own row (a table as large as the IDs ever seen, no
  expiry), with the same frequency filter as ``dynamic``;
- ``dynamic``: the trainer's table (``aitm.embedding_table``) at a budget of ``--budget-share`` of
  the unbounded table's rows used, with the default TTL.

Figures: ``auc_final`` {variant: {task: auc}} of the prediction made at each impression's first
sample against its final label (the simulator's answer key), over the impressions of the last 10
days; ``rows_used`` and ``memory_bytes`` per variant at the end (embedding rows with Adam's two
moments and the served average, plus the vocabulary's bookkeeping); ``oov_rate`` per variant (share
of training look-ups out of vocabulary); ``memory_bytes_by_day`` of ``dynamic``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aitm.embedding_table import DynamicTable, Encoder
from aitm.evaluate import auc
from aitm.features import FeatureEncoder
from bench.report import write_json
from simulators.faults import SimulatedStream
from simulators.funnel import DAY_MS, EPOCH_MS, TASKS, FunnelSimulator, SimConfig
from stream.contract.samples import Sample, parse_sample
from stream.learn.learner import OnlineLearner, model_options
from stream.learn.sample_batch import FIRST, SampleBatch, as_batch
from stream.learn.stabilisers import stabilisers_from
from stream.ops.settings import Settings

FIXED_CAPACITY = 8192  # the old TRAINER_FEATURE_CAPACITY default
VARIANTS = ("fixed", "unbounded", "dynamic")
LAST_DAYS = 10


def joined_samples(records: Iterable[Any], settings: Settings) -> list[Sample]:
    """The samples the joiner emits for ``records`` (in delivery order), joined in process on an
    in-memory store with a clock that follows delivery time (as ``bench chaos``'s real-time pace)."""
    from bench.paced_join import join_at_delivery_pace
    from stream.join.app import join_topics
    from stream.join.driver import Output

    topics = join_topics(settings)
    samples: list[Sample] = []

    def collect(out: list[Output]) -> None:
        samples.extend(parse_sample(o.value) for o in out if o.topic == topics.samples)

    join_at_delivery_pace(list(records), settings, collect)
    return samples


def table_bytes(learner: OnlineLearner) -> int:
    """Embedding rows (weights, Adam's two moments, the served average) + vocabulary bookkeeping."""
    copies = 3 + (learner.average is not None)
    emb = learner.model.embedding.table.weight
    return int(emb.numel() * emb.element_size() * copies + encoder_bytes(learner.encoder))


def encoder_bytes(enc: Encoder) -> int:
    if isinstance(enc, DynamicTable):
        return enc.memory_bytes()
    import sys

    dicts = [*enc.vocab, *enc.pending]
    return int(sum(sys.getsizeof(d) + sum(sys.getsizeof(k) for k in d) for d in dicts))


def rows_used(enc: Encoder) -> int:
    return enc.rows_used if isinstance(enc, DynamicTable) else sum(len(v) for v in enc.vocab)


def oov_rate(enc: Encoder) -> float:
    looked = int(enc.lookups.sum())
    return float(enc.misses.sum() / looked) if looked else float("nan")


def run_variant(name: str, encoder: Encoder, batches: list[SampleBatch], settings: Settings,
                days: int) -> dict[str, Any]:
    """Test-then-train over ``batches``; first-sample predictions and the table's figures by day."""
    torch.manual_seed(0)
    learner = OnlineLearner(encoder, settings.trainer_mode, settings.trainer_lr, eval_window=settings.trainer_eval_window,
                            one_pass=settings.trainer_one_pass, stabilisers=stabilisers_from(settings),
                            **model_options(settings))
    preds: dict[str, np.ndarray] = {}
    by_day: list[int] = []
    rows_by_day: list[int] = []
    t0 = time.monotonic()
    for b in batches:
        day = int((int(b.watermark_ms.max()) - EPOCH_MS) // DAY_MS)
        while len(by_day) < min(day, days):  # a day has ended: the table's size at its end
            by_day.append(table_bytes(learner))
            rows_by_day.append(rows_used(encoder))
        res = learner.step(b)
        done = learner.last_batch
        for i in np.flatnonzero(done.kind == FIRST).tolist():
            preds[done.impression_ids[i]] = res.scored_probs[i]
    while len(by_day) < days:
        by_day.append(table_bytes(learner))
        rows_by_day.append(rows_used(encoder))
    wall = time.monotonic() - t0
    print(f"{name}: {wall:.0f} s, rows used {rows_used(encoder):,}, OOV {oov_rate(encoder):.3f}", flush=True)
    return {"preds": preds, "memory_bytes_by_day": by_day, "rows_used_by_day": rows_by_day, "wall_s": wall,
            "rows_used": rows_used(encoder), "memory_bytes": table_bytes(learner), "oov_rate": oov_rate(encoder),
            "oov_rate_by_field": {f: float(encoder.misses[k] / max(1, encoder.lookups[k]))
                                  for k, f in enumerate(encoder.fields)},
            "rows_allocated": int(learner.model.embedding.table.weight.shape[0])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aitm-stream bench churn", description=__doc__)
    p.add_argument("--json", type=Path, required=True, help="write the figures here")
    p.add_argument("--days", type=int, default=50, help="simulated days (at least 45)")
    p.add_argument("--impressions-per-day", type=int, default=6000)
    p.add_argument("--churn", type=float, default=0.1, help="share of user and creative IDs retiring a day")
    p.add_argument("--budget-share", type=float, default=0.3,
                   help="dynamic's TRAINER_EMBEDDING_ROWS as a share of the rows the unbounded table used")
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args(argv)
    if args.days < LAST_DAYS + 1:
        p.error(f"--days must exceed the {LAST_DAYS} evaluated days")
    settings = Settings()
    torch.set_num_threads(settings.trainer_threads)
    t0 = time.monotonic()
    load0 = os.getloadavg()
    sim = FunnelSimulator(SimConfig(seed=args.seed, impressions_per_day=args.impressions_per_day, drift=0.0,
                                    churn=args.churn))
    stream = SimulatedStream(sim, args.days)
    samples = joined_samples(stream, settings)
    print(f"{len(samples):,} samples joined in {time.monotonic() - t0:.0f} s", flush=True)
    fields = tuple(sorted(samples[0].features))
    seen: dict[str, set[str]] = {f: set() for f in fields}
    active: list[int] = []  # distinct user and creative ids per day
    day_sets: dict[int, set[str]] = {}
    for s in samples:
        if s.kind != "first":
            continue
        for f in fields:
            seen[f].add(s.features[f])
        d = (s.event_time_ms - EPOCH_MS) // DAY_MS
        day_sets.setdefault(d, set()).update((s.features["user_id"], "c" + s.features["creative_id"]))
    active = [len(v) for _, v in sorted(day_sets.items())]
    ever = sum(len(seen[f]) for f in ("user_id", "creative_id"))
    ids_ever = sum(len(v) for v in seen.values())
    batches = [as_batch(samples[i : i + settings.trainer_batch_size])
               for i in range(0, len(samples), settings.trainer_batch_size)]
    min_count, ttl = settings.trainer_feature_min_count, settings.trainer_embedding_ttl_ms
    results: dict[str, dict[str, Any]] = {}
    results["fixed"] = run_variant("fixed", FeatureEncoder(fields, capacity=FIXED_CAPACITY, min_count=min_count),
                                   batches, settings, args.days)
    # the same admission rule, no budget and no expiry: until dynamic's budget fills, the two are the
    # same learner (same rows, same draws), so their gap is what the budget and the TTL cost
    results["unbounded"] = run_variant("unbounded", DynamicTable(fields, ids_ever + 1, min_count, 10**15),
                                       batches, settings, args.days)
    budget = max(1, int(results["unbounded"]["rows_used"] * args.budget_share))
    results["dynamic"] = run_variant("dynamic", DynamicTable(fields, budget, min_count, ttl), batches, settings,
                                     args.days)
    first_eval = EPOCH_MS + (args.days - LAST_DAYS) * DAY_MS
    truth = [r for r in stream.truth if not r.tail and r.final_labels is not None and r.event_time_ms >= first_eval]
    auc_final: dict[str, dict[str, float]] = {}
    for v in VARIANTS:
        preds = results[v]["preds"]
        rows = [r for r in truth if r.impression_id in preds]
        y = np.array([r.final_labels for r in rows], np.float64)  # (N, T)
        pr = np.stack([preds[r.impression_id] for r in rows]).astype(np.float64)  # (N, T)
        auc_final[v] = {task: round(float(auc(y[:, t], pr[:, t])), 4) for t, task in enumerate(TASKS)}
    report = {
        "auc_final": auc_final,
        "rows_used": {v: results[v]["rows_used"] for v in VARIANTS},
        "memory_bytes": {v: results[v]["memory_bytes"] for v in VARIANTS},
        "oov_rate": {v: round(results[v]["oov_rate"], 4) for v in VARIANTS},
        "memory_bytes_by_day": results["dynamic"]["memory_bytes_by_day"],
        "rows_used_by_day": {v: results[v]["rows_used_by_day"] for v in VARIANTS},
        "rows_allocated": {v: results[v]["rows_allocated"] for v in VARIANTS},
        "oov_rate_by_field": {v: {f: round(x, 4) for f, x in results[v]["oov_rate_by_field"].items()}
                              for v in VARIANTS},
        "dynamic_budget_rows": budget,
        "dynamic_budget_share_of_unbounded_rows": round(budget / max(1, results["unbounded"]["rows_used"]), 4),
        "gap_to_unbounded": {task: round(auc_final["dynamic"][task] - auc_final["unbounded"][task], 4)
                             for task in TASKS},
        "ids_ever_seen": ids_ever,
        "user_and_creative_ids_ever_seen": ever,
        "user_and_creative_ids_active_per_day_mean": round(float(np.mean(active)), 1),
        "evaluated_impressions": len(truth),
        "days": args.days, "impressions_per_day": args.impressions_per_day, "churn": args.churn, "seed": args.seed,
        "samples": len(samples),
        "seconds": {v: round(results[v]["wall_s"], 1) for v in VARIANTS} | {"total": round(time.monotonic() - t0, 1)},
        "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(write_json(args.json, report), end="")
    return 0
