"""Two trainer ranks under torchrun (gloo, CPU) on the embedded broker.

The ranks split the samples partitions, rank 0 alone announces versions (each version number
once on ``model-versions``) with every rank's offsets and own learner state; evaluation merges
the finals of both ranks. Then ``kill -9`` of rank 1 mid-run: torchrun's agent restarts the group,
every rank resumes from the last checkpoint, and the final version's lineage has consumed every
record and trained on each sample exactly once (the rule of test_trainer_restart.py, summed over
the ranks).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.topic_reader import read_topic
from stream.contract.versions import parse_version
from stream.learn.learner import held_back
from stream.ops.model_store import ModelStore
from stream.ops.settings import Settings
from tests.integration.test_trainer_restart import N_MALFORMED, env_for, make_samples, produce_with_malformed

N_IMPRESSIONS = 4000


def torchrun(env: dict[str, str], log: Path, restarts: int, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "--monitor-interval", "0.5",
           "-m", "stream.cli", "trainer", "--no-metrics", *extra]
    return subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def rank_pids(agent: int, rank: int) -> list[int]:
    """Worker processes of the torchrun ``agent`` with RANK=``rank``."""
    out = []
    for pid in subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            out.append(int(pid))
    return out


@pytest.mark.parametrize("kill_rank_1", [False, True], ids=["clean", "kill-9"])
def test_two_ranks_publish_once_merge_evaluation_and_survive_kill_9(
    make_settings: Callable[..., Settings], tmp_path: Path, kill_rank_1: bool
) -> None:
    settings = make_settings(samples_partitions=4)
    samples = make_samples(N_IMPRESSIONS)
    produce_with_malformed(settings, samples)
    trained = [s for s in samples if not held_back([s.impression_id], settings.trainer_holdout_share)[0]]
    expected_rows = sum(1 + s.labels[0] for s in trained if s.kind == "first") + sum(
        1 for s in trained if s.kind == "correction")

    env = {**env_for(settings), "TRAINER_BATCH_SIZE": "100"}
    log = tmp_path / "trainer.log"
    summary_path = tmp_path / "summary.json"
    store = ModelStore(settings.model_store_path())
    agent = torchrun(env, log, 1 if kill_rank_1 else 0, "--exit-when-idle", "4", "--summary-json", str(summary_path))
    try:
        if kill_rank_1:
            deadline = time.monotonic() + 120
            while len(store.versions()) < 2 and time.monotonic() < deadline and agent.poll() is None:
                time.sleep(0.05)
            victims = rank_pids(agent.pid, 1)
            assert len(store.versions()) >= 2 and victims, log.read_text()[-3000:]
            os.kill(victims[0], signal.SIGKILL)
        assert agent.wait(timeout=150) == 0, log.read_text()[-4000:]
    finally:
        if agent.poll() is None:
            agent.kill()
    text = log.read_text()
    summary = json.loads(summary_path.read_text())
    assert summary["trainer_workers"] == 2 and len(summary["ranks"]) == 2
    assert all(r["samples_processed"] > 0 for r in summary["ranks"])  # both ranks read a share
    if kill_rank_1:
        assert "resumed from model version" in text  # the restarted group resumed from the store
    else:
        assert summary["samples_processed"] == len(samples)  # split between the ranks, none twice
        assert summary["dead_letters"] == N_MALFORMED
        n_finals = sum(s.kind == "final" for s in samples)
        assert summary["quality"]["lifetime"][0]["count"] == n_finals  # both ranks' finals, merged

    # versions: announced by one rank only - every number once, in order
    announced = [parse_version(r.value).version for r in read_topic(settings, settings.topic_model_versions, 2.0)]
    assert announced and len(announced) == len(set(announced)), announced
    v, ckpt = store.load_latest()  # type: ignore[misc]
    assert announced[-1] == v
    extra: dict[str, Any] = ckpt["extra"]
    assert extra["ranks_n"] == 2 and set(extra["ranks"]) == {"1"}
    assert sum(extra["offsets"].values()) == len(samples) + N_MALFORMED  # every record consumed ...
    rows = 0
    for state in (extra["learner"], extra["ranks"]["1"]):
        mixer = state["mixer"]
        waiting = sum(len(b["ids"]) for b in mixer["ready"]) + sum(len(b["ids"]) for q in mixer["held"] for b in q)
        rows += state["trained_samples"] + waiting
    assert rows == expected_rows  # ... and trained on exactly once, over both ranks
