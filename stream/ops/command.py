"""The ``aitm-stream`` command table and the argument parser every subcommand builds from it.

One place for what ``--help`` shows: a user-facing summary per command (not the module's developer
docstring), every option's default, and a ``--loglevel`` that refuses unknown levels with a usage
error instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

# name -> (module whose main(argv) runs it, one-line summary for users)
COMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("stream.kafka.broker", "run the embedded Kafka-protocol broker (Tansu) on loopback"),
    "simulate": ("simulators.cli", "stream a simulated funnel to Kafka or to files"),
    "joiner": ("stream.join.app", "join funnel events into training samples (faust + RocksDB)"),
    "trainer": ("stream.learn.trainer", "train AITM incrementally on samples, test-then-train"),
    "scorer": ("stream.serve.scorer", "score impressions and serve HTTP scoring"),
    "export": ("stream.serve.export", "write a model version as ONNX or TorchScript with its vocabulary"),
    "schemas": ("stream.contract.schemas", "write (or --check) the JSON Schema of every topic"),
    "prometheus": ("stream.ops.prometheus", "run Prometheus on the processes' metrics ports"),
    "demo": ("bench.demo", "run the whole pipeline on the embedded broker"),
    "health": ("stream.ops.health", "probe a process's HTTP endpoint (container healthchecks)"),
}
BENCHES: dict[str, tuple[str, str]] = {
    "joiner": ("bench.joiner", "joiner events/s vs a no-op faust agent and a plain loop"),
    "models": ("bench.models", "offline AITM vs baselines vs the oracle"),
    "ablation": ("bench.ablation", "our AITM vs a reference one from the original code, knob by knob"),
    "train": ("bench.train", "training samples/s and batch-1 scoring latency"),
    "feed": ("bench.feed", "the trainer feed's samples/s and bytes per sample, JSON vs msgpack"),
    "online": ("bench.online", "AITM (the product's), AITM-joint (the paper's), ESMM, MMoE, PLE and the MLP through the same online learner"),
    "stream": ("bench.stream", "the streaming learner end to end"),
    "chaos": ("bench.chaos", "kill -9 chaos run: nothing lost"),
    "rebalance": ("bench.rebalance", "two joiners, one leaving and joining again: nothing lost"),
    "serving": ("bench.serving", "every published model version against the truth"),
    "serve": ("bench.serve", "HTTP scoring latency and capacity under a keep-alive load"),
    "churn": ("bench.churn", "the embedding table under ID churn: fixed vs dynamic vs unbounded"),
    "refresh": ("bench.refresh", "model refresh by full and delta serving artifacts vs table size"),
}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
EPILOG = (
    "Settings come from environment variables (KAFKA_BOOTSTRAP_SERVERS, DATA_DIR, METRICS_PORT_*, ...;\n"
    "the README's Configuration table lists them all). Exit codes: 0 done, 2 bad arguments,\n"
    "69 Kafka unreachable, 78 bad settings."
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to every option with a real default that its help does not name."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_ = action.help or ""
        if action.help == argparse.SUPPRESS or "default" in help_.lower() or not action.option_strings:
            return action.help
        if action.default is None or action.default is False or action.default in (argparse.SUPPRESS, []):
            return action.help
        return f"{help_} (default: %(default)s)".strip()


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose options without a help text still show their default (argparse
    prints nothing at all for an option without help)."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        default = action.default
        if action.help is None and action.option_strings and default is not None and default is not False:
            action.help = "(default: %(default)s)"
        return action


def summary(name: str) -> str:
    """The summary of ``name`` (a command, or ``bench NAME``)."""
    if name.startswith("bench "):
        return BENCHES[name.removeprefix("bench ")][1]
    return COMMANDS[name][1]


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``aitm-stream NAME`` (``NAME`` a command or ``bench X``)."""
    return CommandParser(
        prog=f"aitm-stream {name}", description=summary(name), epilog=EPILOG, formatter_class=HelpFormatter
    )


def add_loglevel(parser: argparse.ArgumentParser, default: str = "info") -> None:
    """``--loglevel``: one of LOG_LEVELS, any case; its default is the environment's ``LOG_LEVEL``
    when that is one of them (so a Procfile's processes can be made verbose without editing it)."""
    env = os.environ.get("LOG_LEVEL", "").lower()
    parser.add_argument(
        "--loglevel",
        type=str.lower,
        choices=LOG_LEVELS,
        default=env if env in LOG_LEVELS else default,
        help="log level (default: $LOG_LEVEL, else %(default)s)",
    )
