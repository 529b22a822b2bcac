"""``aitm-stream``: one console script, a subcommand per process or benchmark.

Each subcommand lives in its own module as ``main(argv) -> int``; this file only dispatches,
importing the module lazily so that ``aitm-stream broker`` does not pay for torch.
"""

from __future__ import annotations

import importlib
import sys

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
}
BENCHES: dict[str, tuple[str, str]] = {
    "joiner": ("bench.joiner", "joiner events/s vs a no-op faust agent and a plain loop"),
    "models": ("bench.models", "offline AITM vs baselines vs the oracle"),
    "train": ("bench.train", "training samples/s and batch-1 scoring latency"),
    "stream": ("bench.stream", "the streaming learner end to end"),
    "chaos": ("bench.chaos", "kill -9 chaos run: nothing lost"),
    "serving": ("bench.serving", "every published model version against the truth"),
    "serve": ("bench.serve", "HTTP scoring latency and capacity under a keep-alive load"),
}


def _usage() -> str:
    lines = ["usage: aitm-stream COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["  bench NAME  benchmarks writing JSON:"]
    lines += [f"    {name:<8} {help_}" for name, (_, help_) in BENCHES.items()]
    return "\n".join(lines)


def _run(module_name: str, argv: list[str]) -> int:
    module = importlib.import_module(module_name)
    return int(module.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd == "bench":
        if not rest or rest[0] not in BENCHES:
            print(_usage(), file=sys.stderr)
            return 2
        return _run(BENCHES[rest[0]][0], rest[1:])
    if cmd not in COMMANDS:
        print(f"unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return _run(COMMANDS[cmd][0], rest)


if __name__ == "__main__":
    sys.exit(main())
