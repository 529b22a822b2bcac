"""What a cold stream can know about its delayed rates: a kept run's samples through the trainer's
delay model, with a model-free, delay-corrected empirical rate beside it (docs/serving.md, third
round). ``aitm-stream bench serving --delay-diagnostic DIR``.

Every half simulated day of arrivals, per task: the rate estimate
``sum_h k_h pos_h / sum_h k_h n_h G(now - h)`` over impression hours h (``n_h`` impressions,
``pos_h`` positives arrived so far, ``k_h`` two-day recency weights, G the delay model's fit so
far), divided by the true mean rate of the fresh set the versions are judged on; and the fit's
median delay. If this estimator, which needs no model, is far off, no served correction built on
the same fit can be right.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from stream.contract.samples import parse_sample
from stream.learn.delay_model import DelayModel
from stream.learn.publication_gate import settled_after_ms
from stream.ops.settings import Settings

DAY_MS = 86_400_000
HOUR_MS = 3_600_000


def delay_diagnostic(work: Path, true_rates: np.ndarray, recency_days: float = 2.0) -> list[dict[str, Any]]:
    """Rows of (stream day, positives seen, estimate / truth per task, fitted median delay in days)."""
    rows = [json.loads(line) for line in (work / "samples.ndjson").open()]
    rows.sort(key=lambda r: (r["timestamp"], r["partition"], r["offset"]))
    windows = settled_after_ms(Settings())
    model = DelayModel(windows, 3.0)
    impressions: dict[int, int] = {}
    positives: list[dict[int, int]] = [{} for _ in windows]
    seen_imp: set[str] = set()
    seen_pos: set[tuple[str, int]] = set()
    start: int | None = None
    next_at = 0
    out: list[dict[str, Any]] = []
    for r in rows:
        s = parse_sample(r["value"])
        if start is None:
            start = s.event_time_ms
            model.start(start)
            next_at = start + DAY_MS // 2
        arrival = max(s.watermark_ms, s.event_time_ms + s.elapsed_ms)
        hour = (s.event_time_ms - start) // HOUR_MS
        if s.kind != "correction" and s.impression_id not in seen_imp:  # an impression's first word
            seen_imp.add(s.impression_id)
            impressions[hour] = impressions.get(hour, 0) + 1
        if s.kind != "final":
            for t in range(len(windows)):
                if s.labels[t] == 1 and (s.impression_id, t) not in seen_pos:
                    seen_pos.add((s.impression_id, t))
                    positives[t][hour] = positives[t].get(hour, 0) + 1
                    model.observe(t, np.array([s.event_time_ms]), np.array([arrival]))
        model.advance(arrival)
        if arrival < next_at:
            continue
        next_at += DAY_MS // 2
        now = model.now_ms
        hours = np.array(sorted(impressions))
        n = np.array([impressions[h] for h in hours], np.float64)
        mid = start + hours * HOUR_MS + HOUR_MS // 2
        k = 0.5 ** ((now - mid) / (recency_days * DAY_MS))
        ratio: list[float | None] = []
        median: list[float | None] = []
        for t in range(len(windows)):
            fit = model.fits[t]
            if fit is None:
                ratio.append(None)
                median.append(None)
                continue
            g = np.where(now - mid < windows[t], model.cdf(t, np.maximum(now - mid, 1)), 1.0)
            pos = np.array([positives[t].get(h, 0) for h in hours], np.float64)
            ratio.append(round(float((k * pos).sum() / (k * n * g).sum() / true_rates[t]), 3))
            median.append(round(float(np.exp(fit[0])) / DAY_MS, 2))
        out.append({"stream_day": round((now - start) / DAY_MS, 2), "positives": [len(p) and sum(p.values())
                    for p in positives], "estimate_over_truth": ratio, "median_delay_days": median})
    return out
