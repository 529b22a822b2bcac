"""``make mutation``: the mutation score of each core module against its fast unit tests.

mutmut (configured in ``pyproject.toml``, ``[tool.mutmut]``) copies the sources to ``mutants/``,
records which of the fast unit tests reach which function, then for every mutant (one small
change: ``<`` -> ``<=``, ``True`` -> ``False``, ``+ 1`` -> ``+ 2`` ...) runs only the tests that
reach the mutated function. A mutant that no test notices *survived*. This script runs mutmut on
one module at a time (a shared 2-core machine: never several at once) and writes
``reports/mutation.json``::

    {module: {"killed": n, "survived": n, "score": 0..1, "equivalent": n, "survivors": [...]}}

``score`` = killed / (killed + survived), with the *equivalent* mutants (no behaviour can tell
them apart from the original; listed with reasons in ``docs/testing.md`` and in
``EQUIVALENT`` below) left out of both. A timeout counts as killed (the mutant hangs), a mutant
that no selected test reaches ("no tests") as survived. It is a measurement, like the benches,
and not part of ``make test``.

    python -m tests.mutation [--module stream/funnel.py ...] [--jobs 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent

# module -> the mutant names (mutmut's glob patterns) that make up its score. The scorer's
# scoring is the part of ``stream/scorer.py`` that turns features into published scores (the
# Kafka loop and the model-version watcher are covered by the integration tests, not here).
# mutmut 3 does not mutate decorated functions and methods of decorated classes
# (``ScoringModel.predict``, ``BankPolicy.score``): docs/testing.md says how those are covered.
MODULES: Final[dict[str, tuple[str, ...]]] = {
    "stream/funnel.py": ("stream.funnel.*",),
    "stream/join.py": ("stream.join.*",),
    "stream/watermark.py": ("stream.watermark.*",),
    "stream/delayed_feedback.py": ("stream.delayed_feedback.*",),
    "aitm/loss.py": ("aitm.loss.*",),
    "stream/scorer.py": (
        "stream.scorer.x_score_fields__mutmut_*",
        "stream.scorer.x_parse_request__mutmut_*",
        "stream.scorer.xǁScorerǁscore_batch__mutmut_*",
        "stream.scorer.xǁScorerǁhttp_score__mutmut_*",
        "stream.projection.*",
    ),
}

# Equivalent mutants: no input can tell them from the original (reasons in docs/testing.md).
EQUIVALENT: Final[dict[str, str]] = {}

# one thread per test process: torch's thread pool does not survive mutmut's fork (the children
# hang until mutmut's timeout, and a hang would be counted as a kill)
ENV: Final = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

KILLED: Final = {"killed", "timeout", "segfault", "caught by type check"}
SURVIVED: Final = {"survived", "no tests", "suspicious"}


def _status(exit_code: int | None) -> str:
    from mutmut.__main__ import status_by_exit_code

    return str(status_by_exit_code[exit_code])


def _results(patterns: tuple[str, ...]) -> dict[str, str]:
    """Status of every mutant matching ``patterns``, read from mutmut's ``mutants/*.meta``."""
    import fnmatch

    out: dict[str, str] = {}
    for meta in (ROOT / "mutants").rglob("*.meta"):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        for name, code in codes.items():
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                out[name] = _status(code)
    return out


def score(statuses: dict[str, str]) -> dict[str, object]:
    equivalent = sorted(n for n in statuses if n in EQUIVALENT)
    killed = sum(1 for n, s in statuses.items() if s in KILLED and n not in EQUIVALENT)
    timeouts = sum(1 for n, s in statuses.items() if s == "timeout" and n not in EQUIVALENT)
    survivors = sorted(n for n, s in statuses.items() if s in SURVIVED and n not in EQUIVALENT)
    unchecked = sorted(n for n, s in statuses.items() if s not in KILLED | SURVIVED)
    total = killed + len(survivors)
    return {
        "killed": killed,
        "survived": len(survivors),
        "score": round(killed / total, 4) if total else 0.0,
        "equivalent": len(equivalent),
        "timeouts": timeouts,  # counted as killed (the mutant hung); a real kill should not need it
        "unchecked": len(unchecked),
        "survivors": survivors,
    }


def run_module(module: str, jobs: int, keep: bool, log: Path) -> dict[str, object]:
    if not keep:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    patterns = MODULES[module]
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *patterns]
    t0 = time.monotonic()
    with log.open("a") as fh:
        fh.write(f"\n=== {module}: {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=False, env=ENV).returncode
    if rc != 0:
        raise SystemExit(f"mutmut failed on {module} (exit {rc}); see {log}")
    result = score(_results(patterns))
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", action="append", choices=sorted(MODULES), help="only these (repeatable)")
    ap.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    ap.add_argument("--keep", action="store_true", help="reuse mutants/ (mutmut's cache) instead of a clean run")
    ap.add_argument("--json", type=Path, default=ROOT / "reports" / "mutation.json")
    args = ap.parse_args(argv)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    log = args.json.with_suffix(".log")
    log.write_text("")
    report: dict[str, object] = json.loads(args.json.read_text()) if args.module and args.json.exists() else {}
    for module in args.module or list(MODULES):
        result = run_module(module, args.jobs, args.keep, log)
        report[module] = result
        print(f"{module}: killed {result['killed']}, survived {result['survived']}, score {result['score']:.3f} "
              f"({result['equivalent']} equivalent, {result['timeouts']} timeouts, {result['seconds']} s)", flush=True)
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
