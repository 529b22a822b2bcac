"""Summary, markdown table and plots of ``bench models`` results (kept apart from the training)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

SINGLE_TASK = ("LightGBM", "MLP")  # baselines that model each task alone
FUNNEL_STEPS = ("click", "application", "approval", "activation")


def _clean(x: float | None) -> float | None:
    """JSON-safe float: NaN becomes None (shown as "n/a")."""
    return None if x is None or math.isnan(x) else float(x)


def _share(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or abs(den) < 1e-12:
        return None
    return num / den


def summarise(
    tasks: tuple[str, ...],
    runs: dict[str, list[dict[str, Any]]],
    oracle: list[float] | None,
    curve: dict[str, Any],
) -> dict[str, Any]:
    """Per model and task: AUC mean/std, gain over LightGBM, share of the gap to the oracle closed."""
    oracle_auc = {t: (_clean(oracle[i]) if oracle else None) for i, t in enumerate(tasks)}
    models: dict[str, Any] = {}
    for name, rs in runs.items():
        a = np.array([r["test_auc"] for r in rs], dtype=float)  # (S, T)
        std = a.std(0, ddof=1) if len(a) > 1 else np.zeros(len(tasks))
        entry: dict[str, Any] = {
            "auc_mean": {t: _clean(a[:, i].mean()) for i, t in enumerate(tasks)},
            "auc_std": {t: _clean(std[i]) for i, t in enumerate(tasks)},
            "auc_runs": [[_clean(v) for v in row] for row in a.tolist()],
        }
        if "epochs" in rs[0]:
            entry["epochs_mean"] = float(np.mean([r["epochs"] for r in rs]))
            entry["train_samples_per_s"] = float(np.mean([r["samples_per_s"] for r in rs]))
        models[name] = entry
    best_single: dict[str, str | None] = {}
    for t in tasks:
        cands = [(models[m]["auc_mean"][t], m) for m in SINGLE_TASK if m in models]
        cands = [c for c in cands if c[0] is not None]
        best_single[t] = max(cands)[1] if cands else None
    for entry in models.values():
        gain, gap_lgb, gap_single = {}, {}, {}
        for t in tasks:
            auc, orc = entry["auc_mean"][t], oracle_auc[t]
            lgb = models["LightGBM"]["auc_mean"][t] if "LightGBM" in models else None
            bst = best_single[t]
            best = models[bst]["auc_mean"][t] if bst else None
            gain[t] = None if auc is None or lgb is None else auc - lgb
            gap_lgb[t] = _share(gain[t], None if orc is None or lgb is None else orc - lgb)
            over = None if auc is None or best is None else auc - best
            gap_single[t] = _share(over, None if orc is None or best is None else orc - best)
        entry["gain_vs_lightgbm"] = gain
        entry["gap_closed_vs_lightgbm"] = gap_lgb
        entry["gap_closed_vs_best_single_task"] = gap_single
    report: dict[str, Any] = {
        "tasks": list(tasks),
        "oracle_auc": oracle_auc,
        "constant_predictor_auc": 0.5,
        "best_single_task_baseline": best_single,
        "models": models,
    }
    weights = [r["ait_weights"] for r in runs.get("AITM", []) if "ait_weights" in r]
    if weights:
        report["ait_weight_by_stage"] = {
            pair: {
                s: _clean(float(np.mean([w[pair][s] for w in weights if w[pair][s] is not None])))
                if any(w[pair][s] is not None for w in weights)
                else None
                for s in stages
            }
            for pair, stages in weights[0].items()
        }
    if curve:
        report["learning_curve"] = {
            name: [{**p, "auc_mean": [_clean(v) for v in p["auc_mean"]]} for p in pts]
            for name, pts in curve.items()
        }
    return report


def family_table(report: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``summarise``'s models as {model: {task: {"mean", "std"}}} (the ``families`` JSON shape)."""
    return {
        name: {t: {"mean": m["auc_mean"][t], "std": m["auc_std"][t]} for t in m["auc_mean"]}
        for name, m in report["models"].items()
    }


def render_families(report: dict[str, Any]) -> str:
    """One markdown table per family: test AUC mean ± std, the best on each task in bold."""
    families = report.get("families")
    if not families:
        return ""
    meta = report.get("families_meta", {})
    lines = ["", "## Models by simulator family (docs/models.md)", ""]
    for family, table in families.items():
        info = meta.get(family, {})
        tasks = list(next(iter(table.values()))) if table else []
        lines += [f"### {family}: {info.get('source', '')}", ""]
        lines += ["| Model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        best = {
            t: max((m[t]["mean"] for m in table.values() if m[t]["mean"] is not None), default=None)
            for t in tasks
        }
        for name, m in table.items():
            cells = []
            for t in tasks:
                mean, std = m[t]["mean"], m[t]["std"]
                cell = f"{_f(mean)} ± {_f(std)}"
                cells.append(f"**{cell}**" if mean is not None and mean == best[t] else cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        oracle = info.get("oracle_auc")
        if oracle:
            lines.append("| Oracle (true p) | " + " | ".join(_f(oracle.get(t)) for t in tasks) + " |")
        lines.append("")
        weights = info.get("ait_weight_by_stage")
        if weights:
            lines += [
                "AITM's mean AIT weight on p_(t-1) (and its share of z_t) by (previous, current) label:",
                "",
            ]
            lines += ["| Transfer | 00 | 10 | 11 |", "|---|---|---|---|"]
            for pair, w in weights.items():
                lines.append(
                    f"| {pair} | {_f(w['00'], '.3f')} | {_f(w['10'], '.3f')} | {_f(w['11'], '.3f')} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def plot_families(report: dict[str, Any], path: Path) -> None:
    """A panel per family and task (approval, activation): each model's mean AUC ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = report.get("families") or {}
    tasks = ("approval", "activation")
    fig, axes = plt.subplots(
        len(tasks), max(1, len(families)), figsize=(4.2 * max(1, len(families)), 6.4), squeeze=False
    )
    meta = report.get("families_meta", {})
    for j, (family, table) in enumerate(families.items()):
        names = list(table)
        for i, t in enumerate(tasks):
            ax = axes[i][j]
            means = [table[n].get(t, {}).get("mean") or math.nan for n in names]
            stds = [table[n].get(t, {}).get("std") or 0.0 for n in names]
            colors = ["tab:red" if n == "AITM" else "tab:blue" for n in names]
            for x, (m, sd, c) in enumerate(zip(means, stds, colors, strict=True)):
                ax.errorbar(x, m, yerr=sd, fmt="o", capsize=3, color=c)
            oracle = (meta.get(family, {}).get("oracle_auc") or {}).get(t)
            if oracle is not None:
                ax.axhline(oracle, color="k", ls="--", lw=0.8, label="oracle")
                ax.legend(loc="lower right", fontsize=8)
            ax.set_xticks(range(len(names)), names, rotation=45, fontsize=8)
            ax.set_title(f"{family}: {t}", fontsize=10)
            ax.set_ylabel("test AUC")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def render_markdown(report: dict[str, Any]) -> str:
    """A Table-2-style markdown report plus the gap shares and the AIT weights."""
    tasks = report["tasks"]
    lines = [f"# Offline benchmark: {report.get('source', '')}", ""]
    steps = report.get("funnel_steps")
    if steps and any(v is None for v in steps.values()):
        lines += [
            "Funnel steps this data can measure: "
            + ", ".join(f"{k} = {v}" if v else f"{k} n/a (not in the data)" for k, v in steps.items())
            + ".",
            "",
        ]
    lines += ["Test AUC, mean ± std over seeds (gain over LightGBM in brackets).", ""]
    lines += ["| Model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name, m in report["models"].items():
        cells = []
        for t in tasks:
            g = m["gain_vs_lightgbm"][t]
            extra = f" ({g:+.4f})" if g is not None and name != "LightGBM" else ""
            cells.append(f"{_f(m['auc_mean'][t])} ± {_f(m['auc_std'][t])}{extra}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if any(v is not None for v in report["oracle_auc"].values()):
        lines.append("| Oracle (true p) | " + " | ".join(_f(report["oracle_auc"][t]) for t in tasks) + " |")
    lines.append("| Constant | " + " | ".join("0.5000" for _ in tasks) + " |")
    if any(v is not None for v in report["oracle_auc"].values()):
        best = report["best_single_task_baseline"]
        lines += [
            "",
            "Share of the AUC gap to the oracle closed, vs LightGBM / vs the best",
            f"single-task baseline ({', '.join(f'{t}: {best[t]}' for t in tasks)}).",
            "",
        ]
        lines += ["| Model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for name, m in report["models"].items():
            cells = [
                f"{_f(m['gap_closed_vs_lightgbm'][t], '.1%')} / "
                f"{_f(m['gap_closed_vs_best_single_task'][t], '.1%')}"
                for t in tasks
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "ait_weight_by_stage" in report:
        lines += ["", "Mean AIT weight on p_(t-1) by (previous, current) label (paper Figure 6).", ""]
        lines += ["| Transfer | 00 | 10 | 11 |", "|---|---|---|---|"]
        for pair, w in report["ait_weight_by_stage"].items():
            lines.append(f"| {pair} | {_f(w['00'])} | {_f(w['10'])} | {_f(w['11'])} |")
    if "learning_curve" in report:
        lines += ["", "Learning curve (test AUC against training-set size).", ""]
        lines += ["| Model | train size | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
        for name, pts in report["learning_curve"].items():
            for p in pts:
                lines.append(
                    f"| {name} | {p['train_size']} | " + " | ".join(_f(x) for x in p["auc_mean"]) + " |"
                )
    return "\n".join(lines) + "\n"


def plot_aucs(report: dict[str, Any], path: Path) -> None:
    """One panel per task: each model's mean AUC with a std bar; the oracle as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, names = report["tasks"], list(report["models"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        means = [report["models"][n]["auc_mean"][t] or math.nan for n in names]
        stds = [report["models"][n]["auc_std"][t] or 0.0 for n in names]
        ax.errorbar(range(len(names)), means, yerr=stds, fmt="o", capsize=3)
        if report["oracle_auc"][t] is not None:
            ax.axhline(report["oracle_auc"][t], color="k", ls="--", label="oracle")
            ax.legend(loc="lower right")
        ax.set_xticks(range(len(names)), names, rotation=45)
        ax.set_title(t)
        ax.set_ylabel("test AUC")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curve(report: dict[str, Any], path: Path) -> None:
    """Test AUC against training-set size per task for AITM and MLP, the oracle as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    for i, (ax, t) in enumerate(zip(axes[0], tasks, strict=True)):
        for name, pts in report["learning_curve"].items():
            ax.plot([p["train_size"] for p in pts], [p["auc_mean"][i] for p in pts], "o-", label=name)
        if report["oracle_auc"][t] is not None:
            ax.axhline(report["oracle_auc"][t], color="k", ls="--", label="oracle")
        ax.set_xscale("log")
        ax.set_title(t)
        ax.set_xlabel("training impressions")
        ax.set_ylabel("test AUC")
        ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ait_weights(
    series: dict[str, dict[str, dict[str, float | None]]], path: Path, title: str = ""
) -> None:
    """The paper's Figure 6: mean AIT weight on the transferred p_(t-1), by (previous, current)
    label (00, 10, 11), a panel per model and a group of bars per transition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ("00", "10", "11")
    colors = {"00": "tab:gray", "10": "tab:orange", "11": "tab:green"}
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.4), squeeze=False, sharey=True)
    for ax, (name, by_pair) in zip(axes[0], series.items(), strict=True):
        pairs = list(by_pair)
        for j, s in enumerate(stages):
            vals = [by_pair[p].get(s) for p in pairs]
            xs = [i + (j - 1) * 0.27 for i in range(len(pairs))]
            ax.bar(xs, [math.nan if v is None else v for v in vals], width=0.27, color=colors[s], label=s)
        ax.set_xticks(range(len(pairs)), pairs, fontsize=8)
        ax.set_ylim(0, 1)
        ax.axhline(0.5, color="k", lw=0.6, ls=":")
        ax.set_title(name, fontsize=10)
    axes[0][0].set_ylabel("mean weight on p_(t-1)")
    axes[0][-1].legend(title="labels (t-1, t)", fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ait_series(report: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """The AIT weights of every table in ``report`` (the simulator's and each family's), as
    ``plot_ait_weights`` takes them: a panel of weights and one of value shares per table."""
    tables: dict[str, dict[str, Any]] = {}
    if "ait_weight_by_stage" in report:
        tables["simulator"] = report["ait_weight_by_stage"]
    for family, meta in (report.get("families_meta") or {}).items():
        if isinstance(meta, dict) and "ait_weight_by_stage" in meta:
            tables[family] = meta["ait_weight_by_stage"]
    series: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, by_pair in tables.items():
        weights = {k: v for k, v in by_pair.items() if not k.startswith("share ")}
        shares = {k.removeprefix("share "): v for k, v in by_pair.items() if k.startswith("share ")}
        series[f"{name}: weight"] = weights
        if shares:
            series[f"{name}: value share"] = shares
    return series
