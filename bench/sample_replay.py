"""A kept run's sample stream replayed through the trainer core, for like-for-like ablations.

``aitm-stream bench serving --replay DIR`` reads the samples a ``--keep DIR`` run dumped (with
their Kafka record timestamps), cuts them into batches as the trainer does (``TRAINER_BATCH_SIZE``
samples, or what came within ``TRAINER_LINGER_MS`` of the first), steps an ``OnlineLearner`` with
the trainer's settings and stabilisers, and takes a version every
``TRAINER_CHECKPOINT_INTERVAL_MS`` of record time - all in one process, in about a minute. Every
setting comes from the environment as in the trainer, so an ablation is one variable away
(``TRAINER_EMA_HALF_LIFE_ROWS=0``, ``TRAINER_POSITIVE_SLACK=0``, ``TRAINER_PRIOR_RATES='[]'``...)
and every variant sees the very same samples. The publication gate is not replayed: every version
is "published", which is what the figures of a variant without the gate should show.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch

from aitm.embedding_table import DynamicTable
from bench.serving import FreshSets, VersionScore, report_of, score_version, simulator
from stream.contract.samples import Sample, parse_sample
from stream.learn.learner import OnlineLearner, fields_of, model_options
from stream.learn.sample_batch import SampleBatch
from stream.learn.stabilisers import stabilisers_from
from stream.ops.settings import load_settings
from stream.serve.scoring import ScoringModel


def read_samples(path: Path) -> list[tuple[int, Sample]]:
    """(record timestamp ms, sample) of a dump, in the order the trainer's feed would meet them."""
    rows = [json.loads(line) for line in path.open()]
    rows.sort(key=lambda r: (r["timestamp"], r["partition"], r["offset"]))
    return [(int(r["timestamp"]), parse_sample(r["value"])) for r in rows]


def replay(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Replay ``work``/samples.ndjson; the figures of the versions it takes, as ``bench serving``."""
    s = load_settings()
    torch.set_num_threads(s.trainer_threads)
    sim = simulator(args)
    fresh = FreshSets(sim, args.days, args.fresh)
    stream = read_samples(work / "samples.ndjson")
    fields = fields_of([stream[0][1]])
    torch.manual_seed(0)
    learner = OnlineLearner(DynamicTable(fields, s.trainer_embedding_rows, s.trainer_feature_min_count,
                                         s.trainer_embedding_ttl_ms),
                            s.trainer_mode, s.trainer_lr, eval_window=s.trainer_eval_window,
                            one_pass=s.trainer_one_pass, stabilisers=stabilisers_from(s),
                            alpha=s.trainer_calibrator_alpha, **model_options(s))
    scores: list[VersionScore] = []
    held: list[list[int]] = []  # per version: late positives waiting in the mixing buffer, per task
    served: list[tuple[list[float], list[float]]] = []  # ... and the served delay correction, bias shift
    levels: list[list[list[float]]] = []  # ... and the count's (rate, positives, sum of G) per task
    ratios: list[list[list[float]]] = []  # ... and the counted step rates' (ratio, positives, sum of G)
    rates: list[tuple[float, float | None]] = []  # ... and the learning rate, the volume it follows (a day)
    watermark = 0

    def take_version() -> None:
        m = ScoringModel(len(scores) + 1, copy.deepcopy(learner.served_model()).eval(),
                         copy.deepcopy(learner.encoder), 0)
        scores.append(score_version(m, fresh, watermark))
        held.append([sum(len(b) for b in q) for q in learner.mixer.held])
        served.append((learner.completeness.tolist(), learner.bias_shift.tolist()))
        levels.append([[round(float(v), 5) for v in row] for row in learner.served_level])
        ratios.append([[round(float(v), 4) for v in row] for row in learner.served_ratio])
        vol = learner.lr_rate.per_day if learner.lr_rate is not None else None
        rates.append((learner.optimizer.lr, None if vol is None or vol != vol else round(vol, 1)))

    batch: list[Sample] = []
    first_at = last_version_at = stream[0][0]
    for ts, sample in stream:
        if batch and (len(batch) >= s.trainer_batch_size or ts - first_at >= s.trainer_linger_ms):
            learner.step(SampleBatch.from_samples(batch))
            batch = []
            if ts - last_version_at >= s.trainer_checkpoint_interval_ms:
                take_version()
                last_version_at = ts
        if not batch:
            first_at = ts
        batch.append(sample)
        watermark = max(watermark, sample.watermark_ms)
    if batch:
        learner.step(SampleBatch.from_samples(batch))
    take_version()
    out = report_of(scores, fresh, args)
    for row, waiting, (factor, shift), level, ratio, (lr, vol) in zip(out["per_version"], held, served, levels,
                                                                       ratios, rates, strict=True):
        row["served_level"] = level
        row["served_ratio"] = ratio
        row["learning_rate"] = lr
        row["volume_per_day"] = vol  # TRAINER_LR_SCALE=volume: the impressions a day it measured
        row["held_late_positives"] = waiting
        row["delay_correction"] = [round(x, 3) for x in factor]
        row["bias_shift"] = [round(x, 3) for x in shift]
    lifetime = learner.metric_values()["lifetime"]
    out["prequential_auc_lifetime"] = [round(v["auc"], 4) for v in lifetime]
    out["stabilisers"] = {k: v for k, v in vars(stabilisers_from(s)).items()}
    return out
