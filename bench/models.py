"""``aitm-stream bench models``: AITM vs the paper's baselines vs the simulator's oracle.

Trains every model on time-ordered splits over several seeds and writes a Table-2-style
markdown report, a JSON summary and plots (AUC per task, learning curve). Then the same
models on each simulator family of ``simulators.families`` (docs/models.md says why these
four): JSON key ``families`` {family: {model: {task: {"mean", "std"}}}}.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aitm.baselines import NEURAL_MODELS, VARIANT_MODELS, LightGBMBaseline, build_model
from aitm.features import FeatureEncoder
from aitm.model import AITM
from aitm.train import Split, TrainConfig, fit, predict_proba, task_aucs
from bench.models_report import (
    FUNNEL_STEPS,
    ait_series,
    family_table,
    plot_ait_weights,
    plot_aucs,
    plot_curve,
    plot_families,
    render_families,
    render_markdown,
    summarise,
)
from bench.report import write_json
from stream.ops.command import command_parser

ALL_MODELS = ("LightGBM", *NEURAL_MODELS)
FAMILY_SEED = 7  # one world per family, as declared in docs/models.md


@dataclass(frozen=True)
class Data:
    """Encoded splits: ids (N, F) int64, labels (N, T) int8; test truth when simulated."""

    source: str
    tasks: tuple[str, ...]
    vocab_sizes: tuple[int, ...]
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    test_p_true: np.ndarray | None  # (N_test, T) true probabilities, None on real data
    # the data's task measuring each funnel step, None where the data has no such step
    funnel_steps: dict[str, str | None] | None = None


def _log(msg: str) -> None:
    print(f"[bench models {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def simulated_data(days: int, seed: int, min_count: int) -> Data:
    """``days`` simulated days split in time order: 70% train, 10% validation, 20% test."""
    from simulators.funnel import TASKS, FunnelSimulator, SimConfig

    sim = FunnelSimulator(SimConfig(seed=seed))
    batch = sim.dataset(days)
    n_train = max(1, round(days * 0.7))
    n_val = max(1, round(days * 0.1))
    if n_train + n_val >= days:
        raise ValueError(f"--days {days} is too few for train / validation / test splits")
    tr = batch.day < n_train
    va = (batch.day >= n_train) & (batch.day < n_train + n_val)
    te = batch.day >= n_train + n_val
    return _split_in_time(f"simulator (seed {seed}, {days} days x {len(batch) // days} impressions)", TASKS,
                          sim.field_names, batch.features, batch.labels, batch.p_true, (tr, va, te), min_count)


def _split_in_time(source: str, tasks: tuple[str, ...], field_names: Any, features: np.ndarray, labels: np.ndarray,
                   p_true: np.ndarray, parts: tuple[Any, Any, Any], min_count: int) -> Data:
    """Train / validation / test rows (``parts``: index arrays or slices), encoded with a
    vocabulary learnt on the training rows alone."""
    tr, va, te = parts
    encoder = FeatureEncoder(field_names, capacity=10**9, min_count=min_count)
    x_train = encoder.encode_array(features[tr], update=True)
    return Data(
        source=source,
        tasks=tasks,
        vocab_sizes=tuple(len(v) + 1 for v in encoder.vocab),
        train=(x_train, labels[tr]),
        val=(encoder.encode_array(features[va]), labels[va]),
        test=(encoder.encode_array(features[te]), labels[te]),
        test_p_true=p_true[te],
    )


def aliccp_data(root: Path, min_count: int, limit: int | None, seed: int) -> Data:
    """Ali-CCP train/test files under ``root``; 10% of train (random) is validation."""
    from simulators.replay import ALICCP_FIELDS, read_aliccp

    def load(split: str) -> tuple[list[dict[str, str]], np.ndarray]:
        rows, labels = [], []
        reader = read_aliccp(root / f"sample_skeleton_{split}.csv", root / f"common_features_{split}.csv")
        for i, row in enumerate(reader):
            if limit is not None and i >= limit:
                break
            rows.append(row.features)
            labels.append((row.click, row.purchase))
        return rows, np.asarray(labels, dtype=np.int8).reshape(-1, 2)

    train_rows, y_train = load("train")
    test_rows, y_test = load("test")
    encoder = FeatureEncoder(ALICCP_FIELDS, capacity=10**9, min_count=min_count)
    x_all = encoder.encode_dicts(train_rows, update=True)
    is_val = np.random.default_rng(seed).random(len(x_all)) < 0.1
    return Data(
        source=f"Ali-CCP ({root})",
        tasks=("click", "purchase"),
        vocab_sizes=tuple(len(v) + 1 for v in encoder.vocab),
        train=(x_all[~is_val], y_train[~is_val]),
        val=(x_all[is_val], y_train[is_val]),
        test=(encoder.encode_dicts(test_rows), y_test),
        test_p_true=None,
        # as the replay maps them (simulators.replay): purchase arrives as the application step
        funnel_steps={"click": "click", "application": "purchase", "approval": None, "activation": None},
    )


def family_data(family: str, n: int, seed: int, min_count: int) -> Data:
    """``n`` impressions of a simulator family in time order: 70% train, 10% validation, 20% test."""
    from simulators.families import TASKS, generate

    d = generate(family, n, seed)
    n_train, n_val = int(n * 0.7), int(n * 0.1)
    if n_train < 1 or n_val < 1 or n_train + n_val >= n:
        raise ValueError(f"{n} impressions are too few for train / validation / test splits")
    parts = (slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, n))
    return _split_in_time(f"family {family} (seed {seed}, {n} impressions)", TASKS, d.field_names, d.features,
                          d.labels, d.p_true, parts, min_count)


@torch.inference_mode()
def ait_weights_and_shares(model: AITM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per impression and transition t-1 -> t, (B, T-1) each: the AIT weight on p_{t-1}, and the
    share of p_{t-1} in z_t's make-up, |w_p h1(p)| / (|w_p h1(p)| + |w_q h1(q)|) (the weight alone
    says little when the two values differ in size)."""
    model.eval()
    v = model.embedding(ids)  # (B, F*d)
    q = model.towers(model.tower_inputs(v))  # (T, B, k)
    z, weights, shares = q[0], [], []
    for i in range(len(model.aits)):
        z, w, value = model.transfer_step(i, q[i + 1], z)  # (B, k), (B, 2), (B, 2, k)
        size = (w.unsqueeze(-1) * value).norm(dim=-1)  # (B, 2)
        weights.append(w[:, 1])
        shares.append(size[:, 1] / size.sum(1).clamp_min(1e-12))
    empty = v.new_zeros(v.shape[0], 0)
    return (torch.stack(weights, 1), torch.stack(shares, 1)) if weights else (empty, empty)


def ait_weight_by_stage(model: AITM, test: Split, tasks: tuple[str, ...]) -> dict[str, Any]:
    """Mean AIT weight on p_{t-1} (and its share, key ``share``) by (previous, current) test label:
    00, 10, 11 (the paper's Figure 6)."""
    parts = [ait_weights_and_shares(model, test.ids[i : i + 50_000]) for i in range(0, len(test), 50_000)]
    w_np = torch.cat([p[0] for p in parts]).numpy()
    share_np = torch.cat([p[1] for p in parts]).numpy()
    y = test.labels.numpy().astype(int)
    out: dict[str, Any] = {}
    for t in range(1, len(tasks)):
        stage = y[:, t - 1] * 10 + y[:, t]
        for key, arr in (("", w_np), ("share ", share_np)):
            out[f"{key}{tasks[t - 1]}->{tasks[t]}"] = {
                f"{s:02d}": float(arr[stage == s, t - 1].mean()) if (stage == s).any() else None
                for s in (0, 10, 11)
            }
    return out


def run_neural(name: str, data: Data, seed: int, cfg: TrainConfig, frac: float = 1.0) -> dict[str, Any]:
    """Train one network (on the first ``frac`` of the training days) and score the test split."""
    torch.manual_seed(seed)
    n = max(cfg.batch_size, int(len(data.train[0]) * frac))
    train = Split.from_numpy(data.train[0][:n], data.train[1][:n])
    val, test = Split.from_numpy(*data.val), Split.from_numpy(*data.test)
    model = build_model(name, data.vocab_sizes, len(data.tasks))
    alpha = cfg.alpha if name == "AITM" else 0.0  # the calibrator is AITM's
    res = fit(model, train, val, TrainConfig(**{**cfg.__dict__, "seed": seed, "alpha": alpha}))
    out: dict[str, Any] = {
        "test_auc": task_aucs(data.test[1], predict_proba(model, test.ids)),
        "epochs": res.steps * cfg.batch_size / len(train),
        "samples_per_s": res.steps * cfg.batch_size / max(res.train_seconds, 1e-9),
    }
    if isinstance(model, AITM):
        out["ait_weights"] = ait_weight_by_stage(model, test, data.tasks)
    return out


def run_lightgbm(data: Data, seed: int) -> dict[str, Any]:
    """One LightGBM per task, early-stopped on validation AUC."""
    model = LightGBMBaseline(seed=seed, num_threads=torch.get_num_threads())
    model.fit(data.train[0], data.train[1], data.val[0], data.val[1])
    return {"test_auc": task_aucs(data.test[1], model.predict_proba(data.test[0]))}


def run_models(
    data: Data, models: list[str], n_seeds: int, cfg: TrainConfig
) -> dict[str, list[dict[str, Any]]]:
    """Every model over ``n_seeds`` training seeds on ``data``."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in models:
        runs[name] = []
        for seed in range(n_seeds):
            t0 = time.perf_counter()
            r = run_lightgbm(data, seed) if name == "LightGBM" else run_neural(name, data, seed, cfg)
            runs[name].append(r)
            _log(
                f"{name} seed {seed}: test AUC {np.round(r['test_auc'], 4).tolist()} ({time.perf_counter() - t0:.0f}s)"
            )
    return runs


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser("bench models")
    p.add_argument("--json", type=Path, default=Path("reports/bench_models.json"))
    p.add_argument("--md", type=Path, default=None, help="markdown table (default: JSON path .md)")
    p.add_argument("--plot", type=Path, default=None, help="AUC plot (default: JSON path .png)")
    p.add_argument("--curve-plot", type=Path, default=None, help="learning curve PNG")
    p.add_argument("--quick", action="store_true", help="CI-size run: 10 days, 2 seeds, families of 50k")
    p.add_argument("--days", type=int, default=None, help="simulated days (default 20, quick 10)")
    p.add_argument("--seeds", type=int, default=None, help="training seeds (default 5, quick 2)")
    p.add_argument("--max-epochs", type=int, default=None, help="default 10, quick 6")
    p.add_argument("--models", default=",".join(m for m in ALL_MODELS if m not in VARIANT_MODELS),
                   help=f"comma-separated subset (by name only: {', '.join(VARIANT_MODELS)})")
    p.add_argument("--sim-seed", type=int, default=0, help="seed of the simulated world")
    p.add_argument("--min-count", type=int, default=10, help="rarer values map to OOV")
    p.add_argument("--curve-sizes", default="0.25,0.5,1.0", help="learning-curve train fractions")
    p.add_argument("--no-curve", action="store_true", help="skip the learning curve")
    p.add_argument("--aliccp", type=Path, default=None, help="Ali-CCP directory instead of the simulator")
    p.add_argument("--aliccp-limit", type=int, default=None, help="read at most this many rows per split")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--families",
        default="funnel,tanh_product,cascade,adverse",
        help="simulator families to compare the models on ('' for none)",
    )
    p.add_argument(
        "--family-n", type=int, default=None, help="impressions per family (default 400k, quick 50k)"
    )
    p.add_argument("--families-only", action="store_true", help="skip the simulator table and curve")
    p.add_argument("--families-plot", type=Path, default=None, help="PNG (default: JSON path _families.png)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write JSON, markdown and plots."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    n_seeds = args.seeds or (2 if args.quick else 5)
    cfg = TrainConfig(max_epochs=args.max_epochs or (6 if args.quick else 10), patience=2)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(ALL_MODELS)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {ALL_MODELS}")
    start = time.perf_counter()
    report: dict[str, Any] = {}
    if not args.families_only:
        report = _main_table(args, models, n_seeds, cfg)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if families and args.aliccp is None:
        fam_cfg = TrainConfig(**{**cfg.__dict__, "max_epochs": 4 if args.quick else cfg.max_epochs})
        n = args.family_n or (50_000 if args.quick else 400_000)
        tables: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for family in families:
            data = family_data(family, n, FAMILY_SEED, args.min_count)
            _log(
                f"{data.source}: train {len(data.train[0])}, val {len(data.val[0])}, test {len(data.test[0])}"
            )
            runs = run_models(data, models, n_seeds, fam_cfg)
            oracle = task_aucs(data.test[1], data.test_p_true) if data.test_p_true is not None else None
            full = summarise(data.tasks, runs, oracle, {})
            tables[family] = family_table(full)
            meta[family] = {
                "source": data.source,
                "sizes": {"train": len(data.train[0]), "val": len(data.val[0]), "test": len(data.test[0])},
                "oracle_auc": full["oracle_auc"],
                "auc_runs": {m: e["auc_runs"] for m, e in full["models"].items()},
                **(
                    {"ait_weight_by_stage": full["ait_weight_by_stage"]}
                    if "ait_weight_by_stage" in full
                    else {}
                ),
            }
        report["families"] = tables
        report["families_meta"] = {
            "seed": FAMILY_SEED,
            "seeds": n_seeds,
            "train_config": fam_cfg.__dict__,
            **meta,
        }
        plot_families(report, args.families_plot or args.json.with_name(args.json.stem + "_families.png"))
    series = ait_series(report)
    if series:  # the paper's Figure 6, per table: weight on p_(t-1) and its share of z_t, by labels
        plot_ait_weights(series, args.json.with_name(args.json.stem + "_ait.png"), "AITM: AIT on p_(t-1)")
    report.update(quick=args.quick, seconds=round(time.perf_counter() - start, 1))
    write_json(args.json, report, allow_nan=False)
    md = (render_markdown(report) if "models" in report else "") + render_families(report)
    (args.md or args.json.with_suffix(".md")).write_text(md)
    if "models" in report:
        plot_aucs(report, args.plot or args.json.with_suffix(".png"))
        if report.get("learning_curve"):
            plot_curve(report, args.curve_plot or args.json.with_name(args.json.stem + "_curve.png"))
    print(md)
    return 0


def _main_table(
    args: argparse.Namespace, models: list[str], n_seeds: int, cfg: TrainConfig
) -> dict[str, Any]:
    """The simulator (or Ali-CCP) table, with the learning curve on a full simulator run."""
    days = args.days or (10 if args.quick else 20)
    if args.aliccp is not None:
        data = aliccp_data(args.aliccp, args.min_count, args.aliccp_limit, args.sim_seed)
    else:
        data = simulated_data(days, args.sim_seed, args.min_count)
    _log(f"{data.source}: train {len(data.train[0])}, val {len(data.val[0])}, test {len(data.test[0])}")
    runs = run_models(data, models, n_seeds, cfg)
    curve: dict[str, Any] = {}
    if not (args.quick or args.no_curve or args.aliccp is not None):
        fracs = [float(f) for f in args.curve_sizes.split(",")]
        for name in ("AITM", "MLP"):
            curve[name] = []
            for frac in fracs:
                if frac >= 1.0 and name in runs:
                    aucs = [r["test_auc"] for r in runs[name]]
                else:
                    aucs = [run_neural(name, data, s, cfg, frac)["test_auc"] for s in range(min(2, n_seeds))]
                size = max(cfg.batch_size, int(len(data.train[0]) * frac))
                curve[name].append({"train_size": size, "auc_mean": np.mean(aucs, 0).tolist()})
                _log(f"curve {name} n={size}: {np.round(np.mean(aucs, 0), 4).tolist()}")
    oracle = None
    if data.test_p_true is not None:
        oracle = task_aucs(data.test[1], data.test_p_true)
    report = summarise(data.tasks, runs, oracle, curve)
    report.update(
        source=data.source,
        sizes={"train": len(data.train[0]), "val": len(data.val[0]), "test": len(data.test[0])},
        seeds=n_seeds,
        train_config=cfg.__dict__,
    )
    report["funnel_steps"] = data.funnel_steps or {t: t for t in FUNNEL_STEPS if t in data.tasks}
    return report


if __name__ == "__main__":
    raise SystemExit(main())
