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

    python -m tests.mutation [--module stream/join/funnel.py ...] [--jobs 2] [--keep]
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
# scoring is the part of ``stream/serve/`` that turns features into published scores (the
# Kafka loop and the model-version watcher are covered by the integration tests, not here).
# mutmut 3 does not mutate decorated functions and methods of decorated classes
# (``ScoringModel.predict``, ``BankPolicy.score``): docs/testing.md says how those are covered.
MODULES: Final[dict[str, tuple[str, ...]]] = {
    "stream/join/funnel.py": ("stream.join.funnel.*",),
    "stream/join/driver.py": ("stream.join.driver.*",),
    "stream/join/watermark.py": ("stream.join.watermark.*",),
    "stream/learn/delayed_feedback.py": ("stream.learn.delayed_feedback.*",),
    "aitm/loss.py": ("aitm.loss.*",),
    "stream/serve (scoring)": (
        "stream.serve.scoring.x_score_fields__mutmut_*",
        "stream.serve.http.x_parse_request__mutmut_*",
        "stream.serve.scorer.xǁScorerǁscore_batch__mutmut_*",
        "stream.serve.scorer.xǁScorerǁhttp_score__mutmut_*",
        "aitm.projection.*",
    ),
}

# Equivalent mutants: no input can tell them from the original (also in docs/testing.md).
_EQUIVALENT_GROUPS: Final[list[tuple[tuple[str, ...], str]]] = [
    (
        (
            'stream.join.funnel.x__apply_in_order__mutmut_10',
        ),
        '`r == 5` for `r == 4`: an activated funnel (r = 4) holds no event of a step 5, so `nxt` is empty either way',
    ),
    (
        (
            'stream.join.funnel.x__reject__mutmut_2',
            'stream.join.funnel.x__reject__mutmut_3',
            'stream.join.funnel.x__reject__mutmut_4',
            'stream.join.funnel.x__reject__mutmut_5',
            'stream.join.funnel.x__reject__mutmut_6',
            'stream.join.funnel.x__reject__mutmut_7',
            'stream.join.funnel.x__reject__mutmut_8',
            'stream.join.funnel.x__reject__mutmut_9',
        ),
        'the stub branch of `_reject` is dead code: no caller passes a stub (stubs are judged by `_reject_stub_event`)',
    ),
    (
        (
            'stream.join.funnel.x__sample__mutmut_7',
            'stream.join.funnel.x__sample__mutmut_8',
        ),
        'a final sample computed through `mature()` is all True anyway: at the final every task is positive or its window closed on its lane',
    ),
    (
        (
            'stream.join.funnel.x__settle__mutmut_94',
            'stream.join.funnel.x__settle__mutmut_95',
        ),
        '`swept` / `cfg` passed as None to `_sample` for a final: they are read only for a sample that is not final',
    ),
    (
        (
            'stream.join.funnel.x__settle__mutmut_56',
            'stream.join.funnel.x__settle__mutmut_63',
            'stream.join.funnel.x__settle__mutmut_75',
            'stream.join.funnel.x__settle__mutmut_82',
            'stream.join.funnel.x_advance__mutmut_264',
            'stream.join.funnel.x_advance__mutmut_271',
            'stream.join.funnel.x_sweep__mutmut_63',
            'stream.join.funnel.x_sweep__mutmut_70',
        ),
        'the `arrived_late` flag of `_reject` is read only for an event of the next step (r + 1); held events and events given up here are always further ahead (an event of step r + 1 is applied or rejected at once)',
    ),
    (
        (
            'stream.join.funnel.x_advance__mutmut_300',
        ),
        'the event id of an event applied at once is never read (only held events keep theirs)',
    ),
    (
        (
            'stream.join.funnel.x_advance__mutmut_307',
        ),
        'the arrival lane of an event applied at once: it is below the final time (else `is_final` rejected it before), so NO_WATERMARK decides the same',
    ),
    (
        (
            'stream.join.funnel.x_advance__mutmut_350',
            'stream.join.funnel.x_sweep__mutmut_121',
            'stream.join.funnel.x_sweep__mutmut_127',
        ),
        '`created` of `_settle` is read only when the funnel is not final; None is False; in `sweep` `_settle` runs only once final',
    ),
    (
        (
            'stream.join.funnel.x_decode_state__mutmut_3',
        ),
        '`""` instead of None after a failed unmarshal: both fail `isinstance(v, tuple)` and raise the same error',
    ),
    (
        (
            'stream.join.funnel.x_features_json__mutmut_2',
        ),
        '`type(None) is dict`: every map then goes through `dict(...)`, a copy with the same JSON',
    ),
    (
        (
            'stream.join.funnel.x_mature__mutmut_2',
        ),
        'None for False as the initial `settled_negative`: both falsy, and it is only tested for truth',
    ),
    (
        (
            'stream.join.funnel.x_next_dues__mutmut_31',
        ),
        '`d <= due` for `d < due`: when equal, `due = d` keeps the same value',
    ),
    (
        (
            'stream.join.driver.xǁFunnelJoinǁ_apply__mutmut_19',
        ),
        '`or` for `and` in the reschedule branch: in `on_record` an unchanged state is rescheduled to the dues it has (computed against the lanes swept so far; a key not popped has no due up to them)',
    ),
    (
        (
            'stream.join.driver.xǁFunnelJoinǁ_apply__mutmut_50',
            'stream.join.driver.xǁFunnelJoinǁ_apply__mutmut_51',
            'stream.join.driver.xǁFunnelJoinǁ_apply__mutmut_52',
        ),
        'the message of an assertion no input reaches (a sample always has its funnel)',
    ),
    (
        (
            'stream.join.driver.xǁFunnelJoinǁ_apply__mutmut_55',
        ),
        '`b"{}"` fallback for a funnel without features: only a stub has none, and a stub sends no sample',
    ),
    (
        (
            'stream.join.driver.xǁFunnelJoinǁ_apply__mutmut_86',
        ),
        '`self.metrics or ...`: both operands are set together (metrics given) or unset together',
    ),
    (
        (
            'stream.join.driver.xǁFunnelJoinǁ_dead__mutmut_27',
            'stream.join.driver.xǁFunnelJoinǁ_dead__mutmut_28',
        ),
        'the per-reason cache of metric children: a miss looks the child up again (same counter)',
    ),
    (
        (
            'stream.join.driver.xǁFunnelJoinǁon_record__mutmut_7',
        ),
        '`b"XXXX"` for `b""` as the body of a record without value: both fail to parse with the same reason and message, and the dead letter carries no value either way',
    ),
    (
        (
            'stream.join.driver.xǁFunnelJoinǁon_record__mutmut_61',
        ),
        '`>=` for `>` before replacing a lane with an equal value',
    ),
    (
        (
            'stream.join.driver.xǁFunnelJoinǁon_record__mutmut_101',
            'stream.join.driver.xǁFunnelJoinǁon_record__mutmut_111',
        ),
        '`existed` is read only to delete a state; `advance` never deletes one (only `sweep` purges)',
    ),
    (
        (
            'stream.join.driver.xǁFunnelJoinǁsweep__mutmut_11',
        ),
        'the value of a dict used as an ordered set',
    ),
    (
        (
            'stream.join.driver.xǁ_Partitionǁ__init____mutmut_17',
        ),
        '`float("-INF")` is `float("-inf")`',
    ),
    (
        (
            'stream.join.watermark.xǁPartitionWatermarkǁ_raise__mutmut_15',
            'stream.join.watermark.xǁPartitionWatermarkǁ_raise__mutmut_23',
            'stream.join.watermark.xǁPartitionWatermarkǁ_raise__mutmut_27',
        ),
        '`>=` for `>` in a max or before assigning an equal value',
    ),
    (
        (
            'stream.join.watermark.xǁPartitionWatermarkǁlag_ms__mutmut_10',
            'stream.join.watermark.xǁPartitionWatermarkǁlag_ms__mutmut_13',
            'stream.join.watermark.xǁPartitionWatermarkǁlag_ms__mutmut_14',
        ),
        '`strict=` of a zip of two five-tuples',
    ),
    (
        (
            'stream.learn.delayed_feedback.x__rows__mutmut_11',
        ),
        'numpy reads the sort kind case-insensitively (`"STABLE"` is `"stable"`)',
    ),
    (
        (
            'stream.learn.delayed_feedback.x__rows__mutmut_28',
            'stream.learn.delayed_feedback.x__rows__mutmut_37',
            'stream.learn.delayed_feedback.x__rows__mutmut_46',
        ),
        '`reshape(-2, 4)`: numpy takes any negative size as the one to infer',
    ),
    (
        (
            'stream.learn.delayed_feedback.x_train_rows__mutmut_10',
            'stream.learn.delayed_feedback.x_train_rows__mutmut_12',
            'stream.learn.delayed_feedback.x_train_rows__mutmut_15',
            'stream.learn.delayed_feedback.x_train_rows__mutmut_17',
            'stream.learn.delayed_feedback.x_train_rows__mutmut_37',
            'stream.learn.delayed_feedback.x_train_rows__mutmut_54',
            'stream.learn.delayed_feedback.x_train_rows__mutmut_56',
            'stream.learn.delayed_feedback.x_train_rows__mutmut_91',
            'stream.learn.delayed_feedback.x_train_rows__mutmut_93',
        ),
        'a dtype left as float64 (None) in an intermediate array: every part is cast to float32 in `_rows`, the values (0, 1, weights from float64 p) are the same',
    ),
]
_EQUIVALENT_GROUPS.append((
    tuple(f"stream.join.driver.xǁFunnelJoinǁsweep_due__mutmut_{i}" for i in (17, 20, 21)),
    "`strict=` of a zip of two five-tuples",
))
_EQUIVALENT_GROUPS.append((
    ("aitm.loss.x_bce_per_task__mutmut_22",),
    "`mask.to(None)` (the mask's own dtype): a mask is 0/1, and torch's type promotion gives the same "
    "numbers for a bool, integer or float mask",
))
_EQUIVALENT_GROUPS.append((
    ("aitm.projection.x_funnel_order__mutmut_7",),
    "`axis=+1` for `axis=-1`: the same axis of the (N, T) arrays the scorer passes",
))
_EQUIVALENT_GROUPS.append((
    (
        "stream.serve.scoring.x_score_fields__mutmut_18", "stream.serve.scoring.x_score_fields__mutmut_21",
        "stream.serve.scoring.x_score_fields__mutmut_22", "stream.serve.scorer.xǁScorerǁscore_batch__mutmut_19",
        "stream.serve.scorer.xǁScorerǁscore_batch__mutmut_22", "stream.serve.scorer.xǁScorerǁscore_batch__mutmut_23",
    ),
    "`strict=` of a zip of sequences of one length (four tasks and a row of four; the events and their rows)",
))
_EQUIVALENT_GROUPS.append((
    ("stream.serve.scorer.xǁScorerǁscore_batch__mutmut_8",),
    "`b\"XXXX\"` for `b\"\"` as the body of a record without value: the same parse error and message",
))
EQUIVALENT: Final[dict[str, str]] = {n: why for names, why in _EQUIVALENT_GROUPS for n in names}

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
        # listed as equivalent but killed now: the function changed, the list needs updating
        "stale_equivalents": sorted(n for n in equivalent if statuses[n] in KILLED),
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
