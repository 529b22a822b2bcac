"""``aitm-stream prometheus``: run the real Prometheus on the processes' configured ports.

Renders ``deploy/prometheus/prometheus.yml`` (packaged as ``stream/resources/prometheus``) with the metrics ports from the settings into
``DATA_DIR/prometheus/``, copies the rule files beside it and runs the ``prometheus`` binary
(Debian's package; ``make test``/``make demo`` install it) on loopback.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from stream import resources
from stream.ops.command import command_parser
from stream.ops.settings import Settings, load_settings

DEPLOY = resources.path("prometheus")  # deploy/prometheus, packaged
JOBS = ("broker", "simulator", "joiner", "trainer", "scorer")


def render_config(settings: Settings, scrape_interval_s: float = 5.0) -> str:
    """The scrape config for every process, with the ports and interval given."""
    lines = [
        "global:",
        f"  scrape_interval: {scrape_interval_s:g}s",
        f"  evaluation_interval: {scrape_interval_s:g}s",
        "rule_files:",
        "  - rules/recording.yml",
        "  - rules/alerts.yml",
        "scrape_configs:",
    ]
    for job in JOBS:
        port = getattr(settings, f"metrics_port_{job}")
        lines += [
            f"  - job_name: {job}",
            f'    static_configs: [{{targets: ["{settings.metrics_host}:{port}"]}}]',
        ]
    return "\n".join(lines) + "\n"


def prepare(settings: Settings, scrape_interval_s: float = 5.0) -> Path:
    """Write the config and rules under DATA_DIR/prometheus; returns the config path."""
    home = settings.data_dir / "prometheus"
    (home / "rules").mkdir(parents=True, exist_ok=True)
    for rule in (DEPLOY / "rules").glob("*.yml"):
        shutil.copy(rule, home / "rules" / rule.name)
    config = home / "prometheus.yml"
    config.write_text(render_config(settings, scrape_interval_s))
    return config


def command(settings: Settings, config: Path) -> list[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("the prometheus binary is missing: run `make system-deps` (Debian package prometheus)")
    return [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={config.parent / 'data'}",
        f"--web.listen-address=127.0.0.1:{settings.prometheus_port}",
        "--storage.tsdb.retention.time=2d",
        "--log.level=warn",
    ]


def main(argv: list[str] | None = None) -> int:
    p = command_parser("prometheus")
    p.add_argument("--scrape-interval", type=float, default=2.0, help="seconds between scrapes")
    args = p.parse_args(argv)
    settings = load_settings()
    try:
        cmd = command(settings, prepare(settings, args.scrape_interval))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    os.execv(cmd[0], cmd)  # replaces this process: signals reach Prometheus directly


if __name__ == "__main__":
    sys.exit(main())
