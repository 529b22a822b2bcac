"""The demo's timeline of scraped metrics, its progress line, summary table and HTML report."""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from simulators.funnel import DAY_MS, EPOCH_MS

TASKS = ("click", "application", "approval", "activation")
Snapshot = dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]


def pick(snap: Snapshot, proc: str, name: str, **labels: str) -> float:
    """The sum of ``name`` samples of ``proc`` whose labels include ``labels`` (NaN if none)."""
    total, found = 0.0, False
    for (n, lbls), v in snap.get(proc, {}).items():
        if n == name and all(dict(lbls).get(k) == val for k, val in labels.items()):
            total, found = total + v, True
    return total if found else math.nan


def fmt(value: float, spec: str) -> str:
    """``format(value, spec)``, but "n/a" (right-aligned to the spec's width) for NaN: a task the
    data has no labels for (an Ali-CCP replay has no approval or activation) is not a number."""
    if not math.isnan(value):
        return format(value, spec)
    width = spec.split(".")[0].lstrip("<>^=+- ")
    return format("n/a", f">{width}") if width.isdigit() else "n/a"


def by_label(snap: Snapshot, proc: str, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, lbls), v in snap.get(proc, {}).items():
        if n == name and label in dict(lbls):
            key = dict(lbls)[label]
            out[key] = out.get(key, 0.0) + v
    return out


@dataclass
class Timeline:
    """Scrapes over wall time."""

    times: list[float] = field(default_factory=list)
    snaps: list[Snapshot] = field(default_factory=list)

    def add(self, t: float, snap: Snapshot) -> None:
        self.times.append(t)
        self.snaps.append(snap)

    def last(self, proc: str, name: str, **labels: str) -> float:
        for snap in reversed(self.snaps):
            v = pick(snap, proc, name, **labels)
            if not math.isnan(v):
                return v
        return math.nan

    def latest(self, proc: str) -> Snapshot:
        """The last snapshot in which ``proc`` answered (it may have exited since)."""
        for snap in reversed(self.snaps):
            if snap.get(proc):
                return snap
        return {}

    def sim_day(self, snap: Snapshot) -> float:
        v = pick(snap, "simulator", "aitm_simulator_time_seconds")
        return (v * 1000 - EPOCH_MS) / DAY_MS if not math.isnan(v) else math.nan

    def rate(self, proc: str, name: str, i: int) -> float:
        if i == 0:
            return math.nan
        a, b = pick(self.snaps[i - 1], proc, name), pick(self.snaps[i], proc, name)
        return (b - a) / max(self.times[i] - self.times[i - 1], 1e-9)

    def progress_line(self, days: int) -> str:
        i = len(self.snaps) - 1
        snap = self.snaps[i]
        day = self.sim_day(snap)
        ev = self.rate("joiner", "aitm_joiner_events_total", i)
        aucs = " ".join(
            f"{t[:4]} {fmt(pick(snap, 'trainer', 'aitm_trainer_auc_ratio', task=t, window='sliding'), '.3f')}"
            for t in TASKS
        )
        version = pick(snap, "scorer", "aitm_scorer_model_version")
        return (
            f"sim day {day:5.1f}/{days} | {0 if math.isnan(ev) else ev:6,.0f} ev/s | AUC {aucs} | "
            f"model v{0 if math.isnan(version) else int(version)}   "
        )

    def summary(self, wall_s: float) -> str:
        if not self.snaps:
            return "no metrics were scraped"
        snap = self.latest("trainer")
        rows = [
            f"{'task':<12}{'AUC window':>11}{'AUC life':>10}{'since freeze: live':>20}{'frozen':>8}{'log loss':>10}{'calib':>8}"
        ]
        for t in TASKS:
            vals = [
                pick(snap, "trainer", name, task=t, window=window)
                for name, window in (
                    ("aitm_trainer_auc_ratio", "sliding"),
                    ("aitm_trainer_auc_ratio", "lifetime"),
                    ("aitm_trainer_since_freeze_auc_ratio", "lifetime"),
                    ("aitm_trainer_frozen_auc_ratio", "lifetime"),
                    ("aitm_trainer_log_loss", "sliding"),
                    ("aitm_trainer_calibration_ratio", "sliding"),
                )
            ]
            rows.append(
                f"{t:<12}{fmt(vals[0], '>11.4f')}{fmt(vals[1], '>10.4f')}{fmt(vals[2], '>20.4f')}"
                f"{fmt(vals[3], '>8.4f')}{fmt(vals[4], '>10.4f')}{fmt(vals[5], '>8.3f')}"
            )
        sent = by_label(self.latest("simulator"), "simulator", "aitm_simulator_records_total", "topic")
        dead = by_label(self.latest("joiner"), "joiner", "aitm_joiner_dead_letters_total", "reason")
        samples = by_label(self.latest("joiner"), "joiner", "aitm_joiner_samples_total", "kind")
        total = sum(sent.values())
        rows += [
            "",
            f"wall time            {wall_s:,.0f} s  ({total / max(wall_s, 1e-9):,.0f} records/s on average)",
            "records sent         " + ", ".join(f"{k}={int(v):,}" for k, v in sorted(sent.items())),
            "dead letters         "
            + (", ".join(f"{k}={int(v):,}" for k, v in sorted(dead.items())) or "none"),
            "samples emitted      " + ", ".join(f"{k}={int(v):,}" for k, v in sorted(samples.items())),
            f"samples trained      {int(self.last('trainer', 'aitm_trainer_trained_samples_total') or 0):,}",
            f"scores published     {int(self.last('scorer', 'aitm_scorer_scores_total') or 0):,}",
            f"model version        {int(self.last('scorer', 'aitm_scorer_model_version') or 0)}",
        ]
        return "\n".join(rows)


def _png(fig: object) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")  # type: ignore[attr-defined]
    return base64.b64encode(buf.getvalue()).decode()


def plots(tl: Timeline) -> list[tuple[str, str]]:
    """(title, base64 PNG) for each plot of the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [tl.sim_day(s) for s in tl.snaps]
    out: list[tuple[str, str]] = []
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), sharey=True)
    for ax, t in zip(axes, TASKS, strict=True):
        inc = [
            pick(s, "trainer", "aitm_trainer_since_freeze_auc_ratio", task=t, window="sliding")
            for s in tl.snaps
        ]
        frz = [
            pick(s, "trainer", "aitm_trainer_frozen_auc_ratio", task=t, window="sliding") for s in tl.snaps
        ]
        ax.plot(days, inc, label="incremental")
        ax.plot(days, frz, "--", label="frozen")
        ax.set_title(t)
        ax.set_xlabel("simulated day")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AUC (sliding window, final labels)")
    axes[0].legend()
    out.append(
        (
            "Conversion AUC per step over stream time: incremental vs frozen (sliding window of final labels of"
            " impressions after the freeze, the same impressions for both)",
            _png(fig),
        )
    )
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for t in TASKS:
        ax.plot(
            days,
            [
                pick(s, "trainer", "aitm_trainer_calibration_ratio", task=t, window="sliding")
                for s in tl.snaps
            ],
            label=t,
        )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")  # the untrained first hours over-predict a hundredfold
    ax.set_xlabel("simulated day")
    ax.set_ylabel("mean predicted / observed (log scale)")
    ax.legend()
    ax.grid(alpha=0.3)
    out.append(("Calibration", _png(fig)))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    idx = range(len(tl.snaps))
    ax.plot(
        tl.times, [tl.rate("joiner", "aitm_joiner_events_total", i) for i in idx], label="events joined/s"
    )
    ax.plot(
        tl.times,
        [tl.rate("trainer", "aitm_trainer_trained_samples_total", i) for i in idx],
        label="samples trained/s",
    )
    ax.plot(tl.times, [tl.rate("scorer", "aitm_scorer_scores_total", i) for i in idx], label="scores/s")
    ax.set_xlabel("wall seconds")
    ax.legend()
    ax.grid(alpha=0.3)
    out.append(("Throughput", _png(fig)))
    plt.close(fig)
    if tl.snaps:
        buckets = sorted(
            ((float(dict(lbls)["le"]), v) for (n, lbls), v in tl.snaps[-1].get("joiner", {}).items()
             if n == "aitm_joiner_label_delay_seconds_bucket"),
        )  # fmt: skip
        if buckets:
            fig, ax = plt.subplots(figsize=(8, 3.6))
            edges = [b for b, _ in buckets]
            counts = [buckets[0][1]] + [b[1] - a[1] for a, b in itertools.pairwise(buckets)]
            labels = [_human(e) for e in edges]
            ax.bar(range(len(counts)), counts)
            ax.set_xticks(range(len(counts)), labels, rotation=45)
            ax.set_xlabel("label delay (impression to final), upper bucket bound")
            ax.set_ylabel("impressions")
            out.append(("Label delay", _png(fig)))
            plt.close(fig)
    return out


def _human(seconds: float) -> str:
    if math.isinf(seconds):
        return "more"
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def write_report(tl: Timeline, path: Path, wall_s: float) -> None:
    """A self-contained HTML page: the summary table and the plots as inline PNGs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figures = "\n".join(
        f'<h2>{html.escape(title)}</h2>\n<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">'
        for title, png in plots(tl)
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>AITM streaming demo report</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
pre{{background:#f6f6f6;padding:1em}} img{{max-width:100%}}</style></head>
<body><h1>AITM streaming demo report</h1>
<p>Joiner, trainer and scorer on the embedded broker; metrics scraped every 2 s from each process.</p>
<h2>Summary</h2><pre>{html.escape(tl.summary(wall_s))}</pre>
{figures}
</body></html>
"""
    path.write_text(page)
