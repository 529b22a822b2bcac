"""``aitm-stream``: one console script, a subcommand per process or benchmark.

Each subcommand lives in its own module as ``main(argv) -> int``; this file only dispatches,
importing the module lazily so that ``aitm-stream broker`` does not pay for torch, and turns the
errors a user can fix (bad settings, an unreachable broker) into one line and an exit code.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from stream.ops.command import BENCHES, COMMANDS, EPILOG

EX_USAGE = 2  # bad arguments (argparse's own code)
EX_UNAVAILABLE = 69  # sysexits.h: Kafka unreachable
EX_CONFIG = 78  # sysexits.h: bad settings


def package_version() -> str:
    try:
        return version("aitm-stream")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree never installed
        return "unknown"


def _usage() -> str:
    lines = ["usage: aitm-stream [--version] COMMAND [ARGS...]   (aitm-stream COMMAND --help for its options)",
             "", "commands:"]  # fmt: skip
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["  bench NAME  benchmarks writing JSON:"]
    lines += [f"    {name:<8} {help_}" for name, (_, help_) in BENCHES.items()]
    return "\n".join([*lines, "", EPILOG])


def one_line_error(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, message) for the errors a user fixes outside the code; None for bugs."""
    from pydantic import ValidationError

    from stream.kafka.broker import BrokerUnreachable
    from stream.ops.settings import SettingsError

    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'_'.join(str(p) for p in e['loc']).upper() or 'settings'}={e.get('input')!r}: {e['msg']}"
            for e in exc.errors()
        )
        return EX_CONFIG, f"bad settings: {problems}"
    if isinstance(exc, SettingsError):
        return EX_CONFIG, f"bad settings: {exc}"
    if isinstance(exc, BrokerUnreachable):
        return EX_UNAVAILABLE, str(exc)
    if type(exc).__name__ in ("NoBrokersAvailable", "KafkaConnectionError", "KafkaTimeoutError"):
        return EX_UNAVAILABLE, f"Kafka is unreachable ({type(exc).__name__}): check KAFKA_BOOTSTRAP_SERVERS"
    return None


def _run(module_name: str, argv: list[str], prog: str) -> int:
    module = importlib.import_module(module_name)
    try:
        return int(module.main(argv) or 0)
    except Exception as exc:
        known = one_line_error(exc)
        if known is None:
            raise
        code, message = known
        print(f"aitm-stream {prog}: error: {message}", file=sys.stderr)
        return code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--version":
        print(f"aitm-stream {package_version()}")
        return 0
    if not args or args[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else EX_USAGE
    cmd, rest = args[0], args[1:]
    if cmd == "bench":
        if not rest or rest[0] not in BENCHES:
            got = f"unknown bench {rest[0]!r}" if rest else "bench needs a NAME"
            print(f"aitm-stream: error: {got}\n\n{_usage()}", file=sys.stderr)
            return EX_USAGE
        return _run(BENCHES[rest[0]][0], rest[1:], f"bench {rest[0]}")
    if cmd not in COMMANDS:
        print(f"aitm-stream: error: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return EX_USAGE
    return _run(COMMANDS[cmd][0], rest, cmd)


if __name__ == "__main__":
    sys.exit(main())
