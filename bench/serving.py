"""``aitm-stream bench serving``: what users receive - every published model version against the truth.

For each delivery profile (``realtime``; ``batch_feeds``: the simulator's ``batch-feeds``, each bank
exporting approvals hourly and activations in one file a day at 02:00) the simulator streams ``--days`` days of impressions and then every late
conversion still to come (the tail: only late conversions arrive, no impression), through the
real ``joiner``, ``trainer`` and ``scorer`` processes (the Procfile's commands, under
``bench.supervisor``) on the embedded broker. The model store keeps every version. Afterwards a
fixed set of fresh simulated impressions of the last day (never streamed) is scored with every
published version through the scorer's own ``ScoringModel`` - the code behind the ``scores``
topic and ``POST /score`` - and compared with the simulator's true probabilities:

- ``calibration`` {task: {p05, p50, p95}}: mean predicted / true mean, over the versions whose
  stream time (the samples' watermark at the version's offsets) is past the first 2 days;
- ``non_monotone_share`` {p50, max}: share of rows with a later step above an earlier one, over
  every published version; ``raw_non_monotone_share`` the same before the serving projection;
- ``swing`` {task}: max ratio of mean predicted rate between consecutive versions (both past day 2);
- ``auc_vs_truth`` {task}: median over versions past day 2 of the AUC of served predictions
  against labels drawn from the true probabilities (``oracle_auc``: the truth's own AUC);
- ``scores_topic``: the rows actually published on ``scores`` by the scorer process, checked for
  the funnel order; ``served_auc`` {task}: what users received - each impression's published score
  (by the version the scorer held then) against its final label, impressions past ``--skip-days``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aitm.evaluate import auc
from bench.report import write_json
from bench.supervisor import Supervisor, read_procfile, wait_http
from bench.topic_reader import read_topic
from simulators.faults import SimulatedStream, TruthRow
from simulators.funnel import DAY_MS, EPOCH_MS, FunnelSimulator, SimConfig
from simulators.kafka_sink import produce
from stream.contract.events import TASKS
from stream.contract.samples import InvalidSample, encode_sample, parse_sample
from stream.contract.versions import parse_version
from stream.kafka.broker import EmbeddedBroker, ensure_topics, free_port
from stream.ops.command import command_parser
from stream.ops.jsonsafe import finite
from stream.ops.model_store import ModelStore
from stream.ops.settings import Settings
from stream.serve.scoring import ScoringModel

PROFILES = ("realtime", "batch_feeds")
N_TASKS = len(TASKS)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser("bench serving")
    p.add_argument("--json", type=Path, default=Path("reports/bench_serving.json"))
    p.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated: realtime,batch_feeds")
    p.add_argument("--days", type=int, default=14, help="simulated days of impressions (>= 14)")
    p.add_argument("--impressions-per-day", type=int, default=4000)
    p.add_argument("--drift", type=float, default=0.03, help="radians/day of concept drift")
    p.add_argument("--fresh", type=int, default=20_000, help="fresh impressions per simulated day")
    p.add_argument("--skip-days", type=float, default=2.0, help="versions before this stream day are not judged")
    p.add_argument("--speedup", type=float, default=12000.0, help="simulated seconds per wall second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--activation-median-days", type=float, default=2.0,
                   help="the simulator's median activation delay after approval (its window stays 14 days): "
                        "checks that the delay correction holds for shorter or longer delays")
    p.add_argument("--keep", type=Path, default=None, help="keep logs, samples and the model store here")
    p.add_argument("--rescore", type=Path, default=None, metavar="DIR",
                   help="no run: recompute the figures of a run kept with --keep DIR")
    p.add_argument("--replay", type=Path, default=None, metavar="DIR",
                   help="no run: replay the samples of a run kept with --keep DIR through the trainer core "
                        "with the settings in the environment (ablations; bench/sample_replay.py)")
    p.add_argument("--delay-diagnostic", type=Path, default=None, metavar="DIR",
                   help="no run: a kept run's samples through the delay model, with a model-free delay-corrected "
                        "rate per task against the truth (bench/delay_estimate.py)")
    return p.parse_args(argv)


def simulator(args: argparse.Namespace) -> FunnelSimulator:
    """The simulated world of a run (the same for its replays and rescores)."""
    return FunnelSimulator(SimConfig(seed=args.seed, impressions_per_day=args.impressions_per_day, drift=args.drift,
                                     activation_median_days=getattr(args, "activation_median_days", 2.0)))


# --- figures -----------------------------------------------------------------------------------


class FreshSets:
    """Fresh simulated impressions, never streamed: a fixed set of ``n`` per simulated day (another
    draw of that day: a day batch is seeded by seed, day and size), with their true probabilities
    and labels drawn from them. The last day's set is the one every version is compared on."""

    def __init__(self, sim: FunnelSimulator, days: int, n: int) -> None:
        self.sim, self.days, self.n = sim, days, n
        self._cache: dict[int, tuple[list[dict[str, str]], np.ndarray, np.ndarray]] = {}

    def day(self, d: int) -> tuple[list[dict[str, str]], np.ndarray, np.ndarray]:
        """(feature dicts, labels (N, T), true probabilities (N, T)) of day ``d`` (clamped to the run)."""
        d = min(max(d, 0), self.days - 1)
        if d not in self._cache:
            if len(self._cache) >= 3:  # versions come in stream order: keep a few days
                self._cache.pop(min(k for k in self._cache if k != self.days - 1))
            batch = self.sim.day_batch(d, self.n)
            self._cache[d] = (self.sim.feature_dicts(batch), batch.labels.astype(np.int64), batch.p_true)
        return self._cache[d]

    def last(self) -> tuple[list[dict[str, str]], np.ndarray, np.ndarray]:
        return self.day(self.days - 1)

    def truth_mean(self) -> np.ndarray:
        """(T,) the true mean rates of the last day's set: what calibration divides by."""
        out: np.ndarray = self.last()[2].mean(axis=0)
        return out


@dataclass(frozen=True)
class VersionScore:
    """One published version scored on the fresh impressions: the last day's set (the same rows
    for every version) gives the reported figures; ``calibration_own_day`` is a diagnostic on the
    set of the day the version serves (its stream time), where the weekday and the drift move the
    truth from day to day."""

    version: int
    stream_ms: int | None  # the samples' watermark at the version's offsets (event time reached)
    mean: list[float]  # (T,) mean served probability on the last day's set
    calibration: list[float]  # (T,) mean served / mean true probability, last day's set
    non_monotone: float  # share of served rows with a later step above an earlier one
    raw_non_monotone: float  # the same for the model's raw output (before any serving projection)
    auc: list[float]  # (T,) on the last day's set, against labels drawn from the truth
    calibration_own_day: list[float]  # (T,) on the set of the day the version serves


def non_monotone_share(probs: np.ndarray) -> float:
    """Share of rows (N, T) where some step is predicted above the step before it.

    >>> non_monotone_share(np.array([[0.3, 0.1, 0.1, 0.05], [0.3, 0.1, 0.2, 0.05]]))
    0.5
    """
    if len(probs) == 0:
        return 0.0
    return float((np.diff(probs, axis=1) > 0).any(axis=1).mean())


def _pct(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    v = [x for x in values if np.isfinite(x)]
    return round(float(np.percentile(v, q)), 4) if v else None


def figures(scores: Sequence[VersionScore], since_ms: int) -> dict[str, Any]:
    """The report of one profile from its versions, in publication order."""
    judged = [s for s in scores if s.stream_ms is not None and s.stream_ms >= since_ms]
    ratios = np.array([s.calibration for s in judged]).reshape(-1, N_TASKS)
    swing: dict[str, float | None] = {}
    for t, task in enumerate(TASKS):
        pairs = [max(a.mean[t] / b.mean[t], b.mean[t] / a.mean[t]) for a, b in itertools.pairwise(judged)
                 if a.mean[t] > 0 and b.mean[t] > 0]
        swing[task] = round(max(pairs), 4) if pairs else None
    return {
        "versions": len(scores),
        "versions_judged": len(judged),
        "calibration": {task: {"p05": _pct(ratios[:, t], 5), "p50": _pct(ratios[:, t], 50),
                               "p95": _pct(ratios[:, t], 95)} for t, task in enumerate(TASKS)},
        "non_monotone_share": {"p50": _pct([s.non_monotone for s in scores], 50),
                               "max": _pct([s.non_monotone for s in scores], 100)},
        "raw_non_monotone_share": {"p50": _pct([s.raw_non_monotone for s in scores], 50),
                                   "max": _pct([s.raw_non_monotone for s in scores], 100)},
        "swing": swing,
        "auc_vs_truth": {task: _pct([s.auc[t] for s in judged], 50) for t, task in enumerate(TASKS)},
        "last_version_calibration": {task: round(scores[-1].calibration[t], 4) for t, task in enumerate(TASKS)}
        if scores else None,
        "calibration_own_day": {task: {"p05": _pct([s.calibration_own_day[t] for s in judged], 5),
                                       "p50": _pct([s.calibration_own_day[t] for s in judged], 50),
                                       "p95": _pct([s.calibration_own_day[t] for s in judged], 95)}
                                for t, task in enumerate(TASKS)},
    }


# --- one profile -------------------------------------------------------------------------------


def _as_json(value: bytes) -> str:
    """A samples record as its JSON form (a binary one re-encoded; an invalid one as it came)."""
    try:
        return encode_sample(parse_sample(value)).decode()
    except InvalidSample:
        return value.decode(errors="replace")


def _stream_times(settings: Settings, dump: Path | None = None) -> dict[int, list[int]]:
    """partition -> watermark_ms of each sample by offset (the event time the stream had reached);
    ``dump``: also write the samples there (NDJSON: partition, offset, timestamp, value) for replays."""
    out: dict[int, list[int]] = {}
    recs = sorted(read_topic(settings, settings.topic_samples), key=lambda r: (r.partition, r.offset))
    if dump is not None:
        with dump.open("w") as fh:
            for r in recs:
                fh.write(json.dumps({"partition": r.partition, "offset": r.offset, "timestamp": r.timestamp,
                                     "value": _as_json(r.value)}) + "\n")
    for rec in recs:
        try:
            wm = parse_sample(rec.value).watermark_ms
        except InvalidSample:
            wm = 0
        rows = out.setdefault(rec.partition, [])
        rows.extend([0] * (rec.offset - len(rows)))  # (gaps never happen; keep offsets aligned)
        rows.append(wm)
    return out


def _version_stream_ms(offsets: dict[str, int], times: dict[int, list[int]]) -> int | None:
    seen = [times[int(p)][min(int(o), len(times[int(p)])) - 1] for p, o in offsets.items()
            if int(o) > 0 and int(p) in times and times[int(p)]]
    return max(seen) if seen else None


def score_version(m: ScoringModel, fresh: FreshSets, stream_ms: int | None) -> VersionScore:
    """Score a version as the scorer serves it (``ScoringModel.predict``: the code behind the
    scores topic and POST /score), and its raw model output, on the fresh sets."""
    rows, labels, p_true = fresh.last()
    served = m.predict(rows)  # (N, T)
    day = int((stream_ms - EPOCH_MS) // DAY_MS) if stream_ms is not None else fresh.days - 1
    day_rows, _, day_true = fresh.day(day)
    day_served = served if day_rows is rows else m.predict(day_rows)
    return VersionScore(
        version=m.version,
        stream_ms=stream_ms,
        mean=[float(x) for x in served.mean(axis=0)],
        calibration=[float(x) for x in served.mean(axis=0) / p_true.mean(axis=0)],
        non_monotone=non_monotone_share(served),
        raw_non_monotone=non_monotone_share(_raw(m, rows)),
        auc=[auc(labels[:, t], served[:, t]) for t in range(N_TASKS)],
        calibration_own_day=[float(x) for x in day_served.mean(axis=0) / day_true.mean(axis=0)],
    )


def _raw(m: ScoringModel, rows: list[dict[str, str]]) -> np.ndarray:
    with torch.inference_mode():
        out: np.ndarray = torch.sigmoid(m.model(torch.from_numpy(m.encoder.encode_dicts(rows)))).numpy()
    return out


def run_profile(profile: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Stream one delivery profile through the pipeline and score every version it published."""
    t0 = time.monotonic()
    sim = simulator(args)
    fresh = FreshSets(sim, args.days, args.fresh)
    broker = EmbeddedBroker(log_path=work / "tansu.log").start()
    settings = Settings(kafka_bootstrap_servers=broker.bootstrap, data_dir=work / "data", model_store_keep=1_000_000,
                        model_store_keep_checkpoints=1_000_000)
    # the days' events, then every late one (the tail), as the simulator's delivery profile delivers them
    records = SimulatedStream(sim, args.days, delivery=profile.replace("_", "-"),
                              partitions=settings.event_partitions)
    ensure_topics(settings.kafka_python_config(), settings.topic_specs())
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "DATA_DIR": str(settings.data_dir),
        "MODEL_STORE_KEEP": str(settings.model_store_keep),  # every version stays to be scored
        "MODEL_STORE_KEEP_CHECKPOINTS": str(settings.model_store_keep_checkpoints),
        # ... from its training checkpoint (its offsets date it): one with every version
        "TRAINER_TRAINING_CHECKPOINT_INTERVAL_MS": "0",
        "SCORER_HTTP_PORT": str(free_port()),
        "METRICS_PORT_JOINER": str(free_port()),
        "METRICS_PORT_TRAINER": str(free_port()),
        "METRICS_PORT_SCORER": str(free_port()),
        "JOINER_RECOVERY_CONSISTENCY_CHECK": "false",  # the embedded broker (BROKER.md)
        "JOINER_SWEEP_INTERVAL_MS": "50",  # 10 simulated minutes per sweep at 12000x, as bench stream
    }
    procfile = read_procfile()
    report: dict[str, Any] = {}
    try:
        with Supervisor(env, work / "logs") as sup:
            sup.start("joiner", procfile["joiner"])
            sup.start("trainer", [*procfile["trainer"], "--exit-when-idle", "20"])
            sup.start("scorer", procfile["scorer"])
            for name in ("joiner", "trainer", "scorer"):
                port = env[f"METRICS_PORT_{name.upper()}"]
                wait_http(f"http://127.0.0.1:{port}/metrics", 90, lambda n=name: sup.alive(n))  # type: ignore[misc]
            main_end = EPOCH_MS + args.days * DAY_MS
            recs = list(records)
            counts = produce([r for r in recs if r.deliver_ms < main_end], settings, speedup=args.speedup)
            # the tail (late conversions only) faster, as bench stream does
            for topic, n in produce([r for r in recs if r.deliver_ms >= main_end], settings,
                                    speedup=args.speedup * 8).items():
                counts[topic] = counts.get(topic, 0) + n
            report["events_produced"] = sum(counts.values())
            report["produce_s"] = round(time.monotonic() - t0, 1)
            print(f"[{profile}] produced {report['events_produced']} events in {report['produce_s']}s", flush=True)
            deadline = time.monotonic() + 900
            while sup.alive("trainer") and time.monotonic() < deadline:  # it exits 20 s after the last sample
                if not sup.alive("joiner"):
                    raise RuntimeError(f"the joiner exited:\n{sup.tail('joiner')}")
                time.sleep(1)
            if sup.alive("trainer") or sup.children["trainer"].proc.returncode != 0:
                raise RuntimeError(f"the trainer did not finish cleanly:\n{sup.tail('trainer')}")
            time.sleep(3)  # the scorer swaps the last version in
            codes = sup.stop_all(order=["scorer", "joiner"])
            report["exit_codes"] = codes
        report["scores_topic"] = _check_scores(settings, records.truth, EPOCH_MS + round(args.skip_days * DAY_MS))
        times = _stream_times(settings, work / "samples.ndjson" if args.keep else None)
        announced = sorted((parse_version(r.value) for r in read_topic(settings, settings.topic_model_versions)),
                           key=lambda v: v.version)
        store = ModelStore(settings.model_store_path(), settings.model_store_keep)
        # the announcement names the serving artifact; its training checkpoint has the offsets
        scores = [_score_file(store, store.path_of(a.version), a.version, None, fresh, times) for a in announced]
    finally:
        broker.stop()
    report.update(report_of(scores, fresh, args))
    report["wall_s"] = round(time.monotonic() - t0, 1)
    return report


def _score_file(store: ModelStore, path: Path, version: int, sha256: str | None, fresh: FreshSets,
                times: dict[int, list[int]]) -> VersionScore:
    ckpt = store.load(path=path, sha256=sha256)
    m = ScoringModel.from_checkpoint(version, ckpt)
    return score_version(m, fresh, _version_stream_ms(ckpt["extra"].get("offsets", {}), times))


def rescore(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The figures again from a kept run (``--keep``): its model store and its samples dump. The
    announcements are gone with the broker: every version file in the store is taken as published
    (the trainer writes a file only for a version it publishes)."""
    sim = simulator(args)
    fresh = FreshSets(sim, args.days, args.fresh)
    times: dict[int, list[int]] = {}
    with (work / "samples.ndjson").open() as fh:
        for line in fh:
            r = json.loads(line)
            rows = times.setdefault(int(r["partition"]), [])
            rows.extend([0] * (int(r["offset"]) - len(rows)))
            rows.append(int(json.loads(r["value"]).get("watermark_ms", 0)))
    store = ModelStore(work / "data" / "models", keep=1_000_000)
    scores = [_score_file(store, store.path_of(v), v, None, fresh, times) for v in store.versions()]
    return report_of(scores, fresh, args)


def report_of(scores: list[VersionScore], fresh: FreshSets, args: argparse.Namespace) -> dict[str, Any]:
    """The figures of one profile (see the module doc), its truth and a table per version."""
    report: dict[str, Any] = {}
    since = EPOCH_MS + round(args.skip_days * DAY_MS)
    report.update(figures(scores, since))
    _, y_last, p_last = fresh.last()
    report["true_mean_last_day"] = {task: round(float(x), 5) for task, x in zip(TASKS, p_last.mean(0), strict=True)}
    report["oracle_auc_last_day"] = {task: round(auc(y_last[:, t], p_last[:, t]), 4) for t, task in enumerate(TASKS)}
    report["per_version"] = [
        {"version": s.version, "stream_day": round((s.stream_ms - EPOCH_MS) / DAY_MS, 2) if s.stream_ms else None,
         "mean": [round(x, 5) for x in s.mean], "calibration": [round(x, 3) for x in s.calibration],
         "auc": [round(x, 4) for x in s.auc], "calibration_own_day": [round(x, 3) for x in s.calibration_own_day],
         "non_monotone": round(s.non_monotone, 4),
         "raw_non_monotone": round(s.raw_non_monotone, 4)}
        for s in scores
    ]
    return report


def _check_scores(settings: Settings, truth: Sequence[TruthRow] = (), since_ms: int = 0) -> dict[str, Any]:
    """Rows the scorer process published on ``scores``: how many, how many break the funnel order,
    and ``served_auc`` {task}: what users received - each impression's published score (the version
    the scorer held when the impression came) against its final label (the simulator's answer key),
    over the impressions of ``truth`` since ``since_ms`` with a final (the last score of a repeat)."""
    recs = read_topic(settings, settings.topic_scores)
    values = [json.loads(r.value) for r in recs]
    probs = np.array([[v["probabilities"][t] for t in TASKS] for v in values]).reshape(-1, N_TASKS)
    out: dict[str, Any] = {"rows": len(recs), "non_monotone_share": round(non_monotone_share(probs), 6)}
    if truth:
        scored = {v["impression_id"]: i for i, v in enumerate(values)}
        rows = [(scored[r.impression_id], r.final_labels) for r in truth
                if r.final_labels is not None and not r.tail and r.event_time_ms >= since_ms
                and r.impression_id in scored]
        y = np.array([f for _, f in rows], np.float64).reshape(-1, N_TASKS)
        p = probs[[i for i, _ in rows]].reshape(-1, N_TASKS)
        aucs = [auc(y[:, t], p[:, t]) for t in range(N_TASKS)]  # nan with one class (or none)
        out["served_auc"] = {task: None if np.isnan(a) else round(a, 4) for task, a in zip(TASKS, aucs, strict=True)}
        out["served_auc_impressions"] = len(rows)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    unknown = set(profiles) - set(PROFILES)
    if unknown:
        print(f"unknown profile(s) {sorted(unknown)}; choose from {PROFILES}", file=sys.stderr)
        return 2
    if args.days < 14:
        print("note: the issue asks for at least 14 simulated days", file=sys.stderr)
    if args.fresh == args.impressions_per_day:
        args.fresh += 1  # a day batch is drawn per (seed, day, n): another n is another draw
    t0 = time.monotonic()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        return _main(args, profiles, root, t0)
    finally:
        if args.keep is None:  # the two runs' logs, stores and samples: ~2.3 GB
            shutil.rmtree(root, ignore_errors=True)


def _main(args: argparse.Namespace, profiles: list[str], root: Path, t0: float) -> int:
    report: dict[str, Any] = {
        "days": args.days, "impressions_per_day": args.impressions_per_day, "drift": args.drift,
        "fresh_impressions": args.fresh, "skip_days": args.skip_days, "speedup": args.speedup, "seed": args.seed,
        "activation_median_days": args.activation_median_days,
        "settings": {k: v for k, v in Settings().model_dump().items() if k.startswith("trainer_") and k not in
                     ("trainer_warm_start",)},
    }
    for profile in profiles:
        if args.rescore is not None:
            report[profile] = rescore(args.rescore / profile, args)
            continue
        if args.delay_diagnostic is not None:
            from bench.delay_estimate import delay_diagnostic

            sim = simulator(args)
            truth = FreshSets(sim, args.days, args.fresh).truth_mean()
            report[profile] = {"delay_diagnostic": delay_diagnostic(args.delay_diagnostic / profile, truth)}
            continue
        if args.replay is not None:
            from bench.sample_replay import replay

            report[profile] = replay(args.replay / profile, args)
            continue
        work = root / profile
        work.mkdir(parents=True, exist_ok=True)
        report[profile] = run_profile(profile, args, work)
        print(json.dumps({profile: {k: v for k, v in report[profile].items() if k != "per_version"}}, indent=1),
              flush=True)
    report.update(wall_s=round(time.monotonic() - t0, 1), machine=platform.machine(), cpus=os.cpu_count(),
                  torch=torch.__version__)
    write_json(args.json, finite(report), default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
