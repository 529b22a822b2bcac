"""The Grafana dashboard as code: ``deploy/grafana/dashboards/aitm-funnel.json`` is generated from
the panel table below with grafana-foundation-sdk (Grafana's own typed builders), not kept by hand.

    python deploy/grafana/dashboard.py            # rewrite the JSON (make dashboards)
    python deploy/grafana/dashboard.py --check    # exit 1 if the JSON is not what this generates

Every panel is a time series of Prometheus queries; panels fill two columns in table order. The
panels pick their datasource through the dashboard variable ``datasource`` (any Prometheus
datasource, whatever its uid). Each query is run against the real Prometheus by
tests/e2e/test_dashboards.py.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dashboard_builder
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos

OUT = Path(__file__).resolve().parent / "dashboards" / "aitm-funnel.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    min: float | None = None
    max: float | None = None


PANELS = [
    Panel(
        "Conversion AUC per step (sliding window, final labels)",
        "percentunit",
        [
            ("aitm:trainer_auc:sliding", "{{task}}"),
        ],
        min=0.5,
        max=1,
    ),
    Panel(
        "Conversion AUC per step (lifetime)",
        "percentunit",
        [
            ("aitm:trainer_auc:lifetime", "{{task}}"),
        ],
        min=0.5,
        max=1,
    ),
    Panel(
        "Log loss (sliding window)",
        "none",
        [
            ('aitm_trainer_log_loss{window="sliding"}', "{{task}}"),
        ],
    ),
    Panel(
        "Calibration: mean predicted / observed",
        "none",
        [
            ('aitm_trainer_calibration_ratio{window="sliding"}', "{{task}}"),
        ],
    ),
    Panel(
        "Positive rate per step (final labels)",
        "percentunit",
        [
            ('aitm_trainer_positive_rate_ratio{window="sliding"}', "{{task}}"),
        ],
    ),
    Panel(
        "Events/s per topic",
        "ops",
        [
            ("aitm:joiner_events:rate1m", "joined {{type}}"),
            ("aitm:simulator_records:rate1m", "sent {{topic}}"),
        ],
    ),
    Panel(
        "Dead letters by reason",
        "ops",
        [
            ("sum by (reason) (rate(aitm_joiner_dead_letters_total[1m]))", "{{reason}}"),
        ],
    ),
    Panel(
        "Open funnels",
        "short",
        [
            ("aitm_joiner_open_funnels", "open funnels"),
        ],
    ),
    Panel(
        "Label delay (impression to final)",
        "s",
        [
            (
                "histogram_quantile(0.5, sum by (le) (rate(aitm_joiner_label_delay_seconds_bucket[5m])))",
                "p50",
            ),
            (
                "histogram_quantile(0.9, sum by (le) (rate(aitm_joiner_label_delay_seconds_bucket[5m])))",
                "p90",
            ),
        ],
    ),
    Panel(
        "Samples emitted by kind",
        "ops",
        [
            ("aitm:joiner_samples:rate1m", "{{kind}}"),
        ],
    ),
    Panel(
        "Model version",
        "short",
        [
            ("max(aitm_trainer_model_version)", "trainer"),
            ("max(aitm_scorer_model_version)", "scorer"),
        ],
    ),
    Panel(
        "Model staleness",
        "s",
        [
            ("aitm:scorer_model_age_seconds", "seconds since the model in use was published"),
        ],
    ),
    Panel(
        "Training samples/s",
        "ops",
        [
            ("sum(aitm_trainer_train_samples_per_second)", "samples/s"),
        ],
    ),
    Panel(
        "Scoring latency",
        "s",
        [
            ("aitm:scorer_latency_seconds:p50", "p50 {{path}}"),
            ("aitm:scorer_latency_seconds:p99", "p99 {{path}}"),
            ("aitm:scorer_latency_seconds:p999", "p999 {{path}}"),
        ],
    ),
    Panel(
        "Scores published/s",
        "ops",
        [
            ("aitm:scorer_scores:rate1m", "scores/s"),
        ],
    ),
    Panel(
        "Join watermark lag",
        "s",
        [
            ("max(aitm_joiner_watermark_lag_seconds)", "lag"),
        ],
    ),
    Panel(
        "Consumer lag",
        "short",
        [
            ("max(aitm_trainer_consumer_lag_records)", "trainer"),
            ("max(aitm_scorer_consumer_lag_records)", "scorer"),
        ],
    ),
    Panel(
        "Calibration: the served version (held-back finals) vs first-sample predictions",
        "none",
        [
            ("max by (task) (aitm_trainer_served_calibration_ratio)", "served {{task}}"),
            ('max by (task) (aitm_trainer_calibration_ratio{window="sliding"})', "first sample {{task}}"),
        ],
    ),
    Panel(
        "Log loss: the served version (held-back finals) vs first-sample predictions",
        "none",
        [
            ("max by (task) (aitm_trainer_served_log_loss)", "served {{task}}"),
            ('max by (task) (aitm_trainer_log_loss{window="sliding"})', "first sample {{task}}"),
        ],
    ),
    Panel(
        "Publication gate: refused versions (30 min), settled held-back impressions, late positives waiting",
        "short",
        [
            ("sum by (reason) (increase(aitm_trainer_refused_versions_total[30m]))", "refused: {{reason}}"),
            ("sum by (task) (aitm_trainer_holdout_impressions)", "held back, settled: {{task}}"),
            ("sum by (task) (aitm_trainer_held_positives)", "waiting: {{task}}"),
        ],
    ),
    Panel(
        "Served-score corrections: output-bias shift of the served average, cold-start delay factor",
        "none",
        [
            ("max by (task) (aitm_trainer_served_bias_shift)", "bias shift (logit) {{task}}"),
            ("max by (task) (aitm_trainer_delay_factor)", "delay factor {{task}}"),
        ],
    ),
    Panel(
        "Process CPU per job (cores)",
        "none",
        [
            ("sum by (job) (rate(process_cpu_seconds_total[1m]))", "{{job}}"),
        ],
    ),
    Panel(
        "Process resident memory and Python GC collections per job",
        "bytes",
        [
            ("sum by (job) (process_resident_memory_bytes)", "RSS {{job}}"),
            ("sum by (job) (rate(python_gc_collections_total[1m]))", "GC collections/s {{job}}"),
        ],
    ),
]


def build() -> dict[str, Any]:
    dash = (
        dashboard_builder.Dashboard("AITM streaming funnel learner")
        .uid("aitm-funnel")
        .tags(["aitm"])
        .timezone("browser")
        .refresh("5s")
        .time("now-30m", "now")
        .with_variable(
            dashboard_builder.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
        )
    )
    for i, p in enumerate(PANELS):
        panel = (
            timeseries.Panel()
            .id(i + 1)
            .title(p.title)
            .datasource(DATASOURCE)
            .grid_pos(GridPos(h=8, w=12, x=12 * (i % 2), y=8 * (i // 2)))
            .unit(p.unit)
            .legend(
                common_builder.VizLegendOptions()
                .display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM)
                .show_legend(True)
            )
            .tooltip(common_builder.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI))
        )
        if p.min is not None:
            panel = panel.min(p.min)
        if p.max is not None:
            panel = panel.max(p.max)
        for j, (expr, legend) in enumerate(p.targets):
            panel = panel.with_target(
                prometheus.Dataquery()
                .ref_id(chr(ord("A") + j))
                .datasource(DATASOURCE)
                .expr(expr)
                .legend_format(legend)
            )
        dash = dash.with_panel(panel)
    out: dict[str, Any] = json.loads(json.dumps(dash.build(), cls=JSONEncoder))
    return out


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUT.read_text() != text:
            print(
                f"{OUT} is not what deploy/grafana/dashboard.py generates: run `make dashboards`",
                file=sys.stderr,
            )
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
