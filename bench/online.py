"""``aitm-stream bench online --json FILE``: AITM and its baselines through the same online learner.

The simulator's records for ``--days`` days go once through the joiner's ``FunnelJoin`` in process
(``bench.paced_join``: no broker, so every model sees the very same samples in the very same
order), then through one ``OnlineLearner`` per model and training seed - the trainer's core with
its settings from the environment (``TRAINER_MODE`` fnw by default, ``TRAINER_LR``, batch size,
stabilisers, ``TRAINER_DENSE_INIT`` unless ``--dense-init`` says otherwise), test-then-train. Only the network differs: AITM (the
product's AITM: the head and transfer of ``TRAINER_AITM_HEAD`` / ``TRAINER_AITM_TRANSFER``, by
default the conditional head with the gated transfer - what the product serves), AITM-joint (the
paper's: joint heads, AIT transfer), AITM-cond (the paper's transfer under step-conditional heads,
docs/models.md), ESMM, MMoE, PLE and the single-task MLP (``aitm.baselines``), each with its
output biases started at the funnel's prior rates as the product's AITM (``TRAINER_PRIOR_RATES``;
conditional heads - ESMM's, AITM-cond's - start at the conditional rates).

Figures: ``auc_final`` {model: {task: auc}}, the mean over ``seeds`` of the AUC of the prediction
made at each impression's first sample against its final label (the simulator's answer key), over
the impressions after ``--skip-days``; ``auc_final_std`` and ``auc_final_runs`` beside it;
``auc_frozen`` and ``auc_live_paired`` {model: {task: auc}}: a copy of the model frozen after
``TRAINER_FREEZE_AFTER_DAYS`` against the live model on the same finals (the trainer's own
comparison: what incremental training buys). ``auc_served`` {model: {task: auc}} (and its std and
runs): the same impressions judged on what a scorer would have served them - the version published
last before their first sample (every ``--version-every`` batches, the trainer's ``served_model()``:
the weight average with its re-centred output biases and the served step rates, snapshotted with
the embedding table's vocabulary of that moment), for the networks the product can serve (AITM and
its variants; ``null`` for the rest).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from aitm.baselines import ESMM, VARIANT_MODELS, TaskHeads, build_model
from aitm.embedding_table import DynamicTable
from aitm.evaluate import auc
from aitm.layers import DENSE_INITS
from aitm.model import AITM, AITMConfig
from bench.churn import joined_samples
from bench.report import write_with_markdown
from simulators.delivery import PROFILES as DELIVERY_PROFILES
from simulators.faults import SimulatedStream, TruthRow
from simulators.funnel import DAY_MS, EPOCH_MS, TASKS, FunnelSimulator, SimConfig
from stream.learn.learner import OnlineLearner, model_options
from stream.learn.sample_batch import FIRST, N_TASKS, SampleBatch, as_batch
from stream.learn.stabilisers import init_output_bias, stabilisers_from
from stream.ops.command import command_parser
from stream.ops.settings import Settings

# AITM: the product's (its settings' head and transfer); AITM-joint: the paper's; AITM-cond:
# step-conditional heads; AITM-gated, AITM-cond-gated: the transfer a gated residual from 0
MODELS = ("AITM", "AITM-joint", "AITM-cond", "AITM-gated", "AITM-cond-gated", "AITM-experts", "ESMM", "MMoE", "PLE",
          "MLP")
# run only when named (--models): the default list stays six long (AITM-cond, the paper's transfer
# under conditional heads, is the step between AITM-joint and the product's AITM)
BY_NAME_ONLY = ("AITM-cond", *VARIANT_MODELS)


def init_prior_bias(model: nn.Module, rates: Sequence[float]) -> None:
    """Start a network's output biases at the log-odds of the funnel's end-to-end ``rates``, as the
    trainer does for AITM (``init_output_bias``); ESMM's heads (and AITM-cond's) are step
    conditionals, so theirs start at the conditional rates ``rate_t / rate_{t-1}``.

    >>> m = build_model("ESMM", (3,), 2)
    >>> init_prior_bias(m, (0.5, 0.1))
    >>> [round(float(b), 4) for b in m.heads.b.flatten()]
    [0.0, -1.3863]
    """
    if isinstance(model, AITM):
        init_output_bias(model, rates)
        return
    p = np.clip(np.minimum.accumulate(np.asarray(rates, np.float64)), 1e-6, 1 - 1e-6)
    if isinstance(model, ESMM):
        p = p / np.concatenate(([1.0], p[:-1]))  # conditionals
    heads = [m for m in model.modules() if isinstance(m, TaskHeads)]
    if len(heads) != 1 or heads[0].b.shape[0] != len(p):
        raise ValueError(f"{type(model).__name__}: one TaskHeads with {len(p)} tasks expected")
    with torch.no_grad():
        heads[0].b.copy_(torch.as_tensor(np.log(p / (1 - p)), dtype=heads[0].b.dtype).view(-1, 1, 1))


def network_for(name: str, settings: Settings, vocab_sizes: Sequence[int]) -> nn.Module:
    """The network ``name``: "AITM" is the product's (``TRAINER_AITM_HEAD``, ``TRAINER_AITM_TRANSFER``),
    "AITM-joint" the paper's, the others ``build_model``'s."""
    if name == "AITM":
        return AITM(AITMConfig(vocab_sizes=tuple(vocab_sizes), n_tasks=N_TASKS, **model_options(settings)))
    return build_model("AITM" if name == "AITM-joint" else name, vocab_sizes, N_TASKS,
                       dense_init=settings.trainer_dense_init)


def learner_for(name: str, settings: Settings, fields: tuple[str, ...], seed: int) -> OnlineLearner:
    """The trainer's learner (its settings, a fresh embedding table) around the network ``name``."""
    s = settings
    table = DynamicTable(
        fields, s.trainer_embedding_rows, s.trainer_feature_min_count, s.trainer_embedding_ttl_ms
    )
    torch.manual_seed(seed)
    model = network_for(name, s, table.vocab_sizes)
    if s.trainer_prior_rates:
        init_prior_bias(model, s.trainer_prior_rates)
    freeze_ms = int(s.trainer_freeze_after_days * DAY_MS) if s.trainer_freeze_after_days else None
    # the learner needs of its network only forward(ids) -> (B, T) logits and ``embedding.table``
    # (the lazily trained table), which every baseline has; AITM is its annotated type
    return OnlineLearner(
        table,
        s.trainer_mode,
        s.trainer_lr,
        eval_window=s.trainer_eval_window,
        model=cast(AITM, model),
        seed=seed,
        freeze_after_ms=freeze_ms,
        one_pass=s.trainer_one_pass,
        stabilisers=stabilisers_from(s),
        alpha=s.trainer_calibrator_alpha,
    )


def run_model(name: str, seed: int, batches: list[SampleBatch], settings: Settings,
              version_every: int = 4) -> dict[str, Any]:
    """Test-then-train over ``batches``; the prediction at each impression's first sample, and
    (a servable network) the served version's at the same moment (module doc)."""
    learner = learner_for(name, settings, tuple(batches[0].features), seed)
    servable = hasattr(learner.model, "head_b")  # the served path re-centres AITM's output biases
    preds: dict[str, np.ndarray] = {}
    served: dict[str, np.ndarray] = {}
    version: tuple[torch.nn.Module, Any] | None = None  # (served model, its vocabulary), as published
    t0 = time.monotonic()
    for k, b in enumerate(batches):
        if version is not None:
            first = np.flatnonzero(b.kind == FIRST)
            if first.size:
                model, encoder = version
                ids = encoder.encode_columns(b.features, len(b))[first]  # unseen then: out of vocabulary
                with torch.inference_mode():
                    p = torch.sigmoid(model(torch.as_tensor(ids))).float().numpy()
                for j, i in enumerate(first.tolist()):
                    served[b.impression_ids[i]] = p[j]
        res = learner.step(b)
        done = learner.last_batch
        for i in np.flatnonzero(done.kind == FIRST).tolist():
            preds[done.impression_ids[i]] = res.scored_probs[i]
        if servable and (k + 1) % version_every == 0:
            version = (copy.deepcopy(learner.served_model()).eval(), copy.deepcopy(learner.encoder))
    frozen, paired = learner.frozen_metric_values(), learner.paired_metric_values()
    return {
        "preds": preds,
        "served": served if servable else None,
        "wall_s": round(time.monotonic() - t0, 1),
        "frozen": [round(v["auc"], 4) for v in frozen["lifetime"]] if frozen else None,
        "paired": [round(v["auc"], 4) for v in paired["lifetime"]] if paired else None,
    }


def final_aucs(preds: dict[str, np.ndarray], truth: list[TruthRow]) -> list[float]:
    """AUC per task of first-sample predictions against the final labels of ``truth``'s rows."""
    rows = [r for r in truth if r.impression_id in preds]
    y = np.array([r.final_labels for r in rows], np.float64)  # (N, T)
    p = np.stack([preds[r.impression_id] for r in rows]).astype(np.float64)  # (N, T)
    return [round(float(auc(y[:, t], p[:, t])), 4) for t in range(len(TASKS))]


def _by_task(values: Sequence[float | None] | np.ndarray) -> dict[str, float | None]:
    return {
        t: (None if v is None or np.isnan(v) else round(float(v), 4))
        for t, v in zip(TASKS, values, strict=True)
    }


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean and std (ddof 1) over seeds per model and task; the frozen comparison likewise."""
    out: dict[str, Any] = {
        "auc_final": {},
        "auc_final_std": {},
        "auc_final_runs": {},
        "auc_frozen": {},
        "auc_live_paired": {},
        "auc_served": {},
        "auc_served_std": {},
        "auc_served_runs": {},
    }
    for name, rs in runs.items():
        for key in ("auc_final", "auc_served"):
            if any(r.get(key) is None for r in rs):
                out[key][name] = out[key + "_std"][name] = out[key + "_runs"][name] = None
                continue
            a = np.array([r[key] for r in rs], np.float64)  # (S, T)
            out[key][name] = _by_task(a.mean(0))
            out[key + "_std"][name] = _by_task(a.std(0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1]))
            out[key + "_runs"][name] = [_by_task(row) for row in a]
        if all(r["frozen"] for r in rs):
            out["auc_frozen"][name] = _by_task(np.mean([r["frozen"] for r in rs], 0))
            out["auc_live_paired"][name] = _by_task(np.mean([r["paired"] for r in rs], 0))
    return out


def _model_table(cells: dict[str, list[str]]) -> list[str]:
    """Markdown rows: a header of the tasks, then one row of cells per model."""
    return [
        "| model | " + " | ".join(TASKS) + " |",
        "|---" * (len(TASKS) + 1) + "|",
        *(f"| {name} | " + " | ".join(row) + " |" for name, row in cells.items()),
    ]


def render(report: dict[str, Any]) -> str:
    """Markdown: auc_final mean ± std per model and task, and live vs frozen."""
    sd = report["auc_final_std"]
    lines = [f"# Online: {report['source']}", ""]
    lines += _model_table({name: [f"{m[t]:.4f} ± {sd[name][t]:.4f}" for t in TASKS]
                           for name, m in report["auc_final"].items()})
    served, ssd = report.get("auc_served") or {}, report.get("auc_served_std") or {}
    if any(v is not None for v in served.values()):
        lines += ["", "Served: the same impressions scored by the version published before their first sample:", ""]
        lines += _model_table({name: [f"{m[t]:.4f} ± {ssd[name][t]:.4f}" for t in TASKS]
                               for name, m in served.items() if m is not None})
    if report["auc_frozen"]:
        live = report["auc_live_paired"]
        lines += ["", "Live vs frozen on the same finals (lifetime AUC after the freeze):", ""]
        lines += _model_table({name: [f"{live[name][t]:.4f} vs {fz[t]:.4f}" for t in TASKS]
                               for name, fz in report["auc_frozen"].items()})
    return "\n".join(lines) + "\n"


def _carry(text: str) -> tuple[float, float, float]:
    try:
        a, b, c = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--carry takes three comma-separated numbers, got {text!r}") from None
    return a, b, c


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("bench online")
    p.add_argument("--json", type=Path, default=Path("reports/bench_online.json"))
    p.add_argument("--days", type=int, default=14, help="simulated days of impressions")
    p.add_argument("--impressions-per-day", type=int, default=4000)
    p.add_argument("--skip-days", type=float, default=2.0, help="impressions before this day are not judged")
    p.add_argument("--seeds", type=int, default=5, help="training seeds per model")
    p.add_argument("--models", default=",".join(m for m in MODELS if m not in BY_NAME_ONLY),
                   help=f"comma-separated (by name only: {', '.join(BY_NAME_ONLY)})")
    p.add_argument("--sim-seed", type=int, default=0)
    p.add_argument("--drift", type=float, default=0.03, help="radians/day of concept drift")
    p.add_argument("--version-every", type=int, default=4,
                   help="batches between two served versions (auc_served; the product: every 3 s)")
    p.add_argument("--delivery", choices=DELIVERY_PROFILES, default="realtime",
                   help="how the simulator delivers the later steps (batch-feeds: each bank's daily files)")
    p.add_argument("--carry", type=_carry, default=(0.0, 0.0, 0.0),
                   help="three weights: step t's conditional logit carries weight x step t-1's (simulators.funnel "
                        "SimConfig.carry; '0.5,-0.8,0.5' is docs/models.md's adverse world)")
    p.add_argument("--dense-init", choices=DENSE_INITS, default=None,
                   help="how the networks' dense layers start (default: the product's TRAINER_DENSE_INIT)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    if args.version_every < 1:
        p.error("--version-every must be at least 1")
    if not 0 <= args.skip_days < args.days:
        p.error("--skip-days must be at least 0 and below --days")
    settings = Settings()
    if args.dense_init is not None:
        settings = settings.model_copy(update={"trainer_dense_init": args.dense_init})
    torch.set_num_threads(settings.trainer_threads)
    t0, load0 = time.monotonic(), os.getloadavg()
    sim = FunnelSimulator(
        SimConfig(seed=args.sim_seed, impressions_per_day=args.impressions_per_day, drift=args.drift,
                  carry=args.carry)
    )
    stream = SimulatedStream(sim, args.days, delivery=args.delivery)
    samples = joined_samples(stream, settings)
    batches = [
        as_batch(samples[i : i + settings.trainer_batch_size])
        for i in range(0, len(samples), settings.trainer_batch_size)
    ]
    first_eval = EPOCH_MS + int(args.skip_days * DAY_MS)
    truth = [
        r for r in stream.truth if not r.tail and r.final_labels is not None and r.event_time_ms >= first_eval
    ]
    print(
        f"{len(samples):,} samples joined in {time.monotonic() - t0:.0f} s; {len(truth):,} judged", flush=True
    )
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in models:
        for seed in range(args.seeds):
            r = run_model(name, seed, batches, settings, args.version_every)
            r["auc_final"] = final_aucs(r.pop("preds"), truth)
            served = r.pop("served")
            r["auc_served"] = final_aucs(served, truth) if served is not None else None
            runs.setdefault(name, []).append(r)
            print(f"{name} seed {seed}: {r['auc_final']} ({r['wall_s']} s)", flush=True)
    world = (f"seed {args.sim_seed}" + (f", carry {list(args.carry)}" if any(args.carry) else "")
             + (f", {args.delivery}" if args.delivery != "realtime" else ""))
    report: dict[str, Any] = {
        "source": f"funnel simulator ({world}), {args.days} days x {args.impressions_per_day} "
        f"impressions, {settings.trainer_mode}, lr {settings.trainer_lr} ({settings.trainer_lr_scale})",
        **summarise(runs),
        "seeds": list(range(args.seeds)),
        "tasks": list(TASKS),
        "days": args.days,
        "impressions_per_day": args.impressions_per_day,
        "skip_days": args.skip_days,
        "sim_seed": args.sim_seed,
        "drift": args.drift,
        "carry": list(args.carry),
        "delivery": args.delivery,
        "dense_init": settings.trainer_dense_init,
        "samples": len(samples),
        "judged_impressions": len(truth),
        "settings": {
            "trainer_mode": settings.trainer_mode,
            "trainer_lr": settings.trainer_lr,
            "trainer_lr_scale": settings.trainer_lr_scale,
            "trainer_lr_ref_impressions": settings.trainer_lr_ref_impressions,
            "trainer_lr_volume_power": settings.trainer_lr_volume_power,
            "trainer_batch_size": settings.trainer_batch_size,
            "trainer_freeze_after_days": settings.trainer_freeze_after_days,
            "trainer_ema_half_life_rows": settings.trainer_ema_half_life_rows,
        },
        "version_every": args.version_every,
        "wall_s": {name: [r["wall_s"] for r in rs] for name, rs in runs.items()},
        "seconds": round(time.monotonic() - t0, 1),
        "load_avg_1m": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
    }
    write_with_markdown(args.json, report, render(report), allow_nan=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
