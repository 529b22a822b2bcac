"""Several trainer ranks on CPU (gloo): the same weights as one process, identical tables and
weights across ranks, uneven input, and the merged evaluation (stream/learn/ranks.py)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aitm.embedding_table import DynamicTable
from aitm.loss import aitm_loss
from aitm.model import AITM, AITMConfig
from aitm.train import make_optimizer
from stream.contract.samples import Sample
from stream.kafka.broker import free_port
from stream.learn.learner import OnlineLearner, Stabilisers
from stream.learn.lr_schedule import VolumeRate, VolumeScale
from stream.learn.prequential import PrequentialEvaluator
from stream.learn.ranks import RankInfo, RankSync, local_state, merged_evaluator

FIELDS = ("a", "b", "c")
ALL = (True, True, True, True)


def _sample(i: int, kind: str = "final") -> Sample:
    rng = np.random.default_rng(i)
    feats = {f: str(int(rng.integers(0, 12))) for f in FIELDS}
    labels = tuple(int(x) for x in (rng.random(4) < [0.6, 0.4, 0.3, 0.2]).cumprod())
    seq = {"first": 0, "final": 5}[kind]
    return Sample(f"i{i}", "bank_1", 1_000 + i, feats, labels, ALL, kind, 1000, seq)  # type: ignore[arg-type]


def _spawn(fn: Any, ranks: int, tmp: Path, *args: Any) -> None:
    port = free_port()
    mp.spawn(fn, args=(ranks, port, tmp, *args), nprocs=ranks, join=True)


def _join(rank: int, ranks: int, port: int) -> RankSync:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    return RankSync(RankInfo(rank, ranks))


def _leave() -> None:
    """Leave the group together: a rank that tears gloo down while the other still has a collective
    in flight aborts it (SIGABRT, "terminate called without an active exception", seen once)."""
    dist.barrier()
    dist.destroy_process_group()


def _model() -> AITM:
    torch.manual_seed(3)
    return AITM(AITMConfig(vocab_sizes=[20, 20, 20], n_tasks=4))


def _plain_batches(steps: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 20, (n, 3), generator=g), (torch.rand(n, 4, generator=g) < 0.3).float())
            for _ in range(steps)]


def _grad_worker(rank: int, ranks: int, port: int, tmp: Path) -> None:
    sync = _join(rank, ranks, port)
    model = _model()
    model.eval()  # no dropout: the comparison is exact up to float rounding
    opt = make_optimizer(model, lr=0.01)
    for x, y in _plain_batches(5, 64):
        half = slice(rank * 32, (rank + 1) * 32)  # each rank its half of the batch
        opt.zero_grad(set_to_none=True)
        aitm_loss(model(x[half]), y[half], alpha=0.0).backward()
        assert sync.reduce(model, 32) == 64
        opt.step()
    torch.save(model.state_dict(), tmp / f"grad{rank}.pt")
    _leave()


def test_two_gloo_ranks_train_to_the_weights_of_one_process_on_the_same_batches(tmp_path: Path) -> None:
    _spawn(_grad_worker, 2, tmp_path)
    model = _model()
    model.eval()
    opt = make_optimizer(model, lr=0.01)
    for x, y in _plain_batches(5, 64):
        opt.zero_grad(set_to_none=True)
        aitm_loss(model(x), y, alpha=0.0).backward()
        opt.step()
    one = model.state_dict()
    r0, r1 = (torch.load(tmp_path / f"grad{r}.pt") for r in range(2))
    assert any(not torch.equal(one[k], _model().state_dict()[k]) for k in one)  # it did train
    for k in one:
        assert torch.equal(r0[k], r1[k]), k  # bit for bit the same on both ranks
        torch.testing.assert_close(r0[k], one[k], rtol=1e-5, atol=1e-6)


def _learner_worker(rank: int, ranks: int, port: int, tmp: Path, plan: list[list[list[int]]]) -> None:
    sync = _join(rank, ranks, port)
    torch.manual_seed(0)
    ln = OnlineLearner(DynamicTable(FIELDS, rows=64, min_count=2, ttl_ms=10**9), mode="fnw", lr=0.05,
                       eval_window=500)
    ln.sync = sync
    sync.broadcast_model(ln.model)
    for round_ in plan:
        mine = round_[rank]  # this rank's sample numbers this round; may be empty (uneven input)
        ln.step([_sample(i, "first") for i in mine] + [_sample(i, "final") for i in mine])
    out = {"model": ln.model.state_dict(), "table": ln.encoder.state_dict(), "steps": ln.steps,
           "seen": ln.samples_seen, "evaluator": ln.evaluator.state_dict(), "local": local_state(ln.state_dict())}
    (tmp / f"learner{rank}.pkl").write_bytes(pickle.dumps(out))
    _leave()


def test_two_ranks_keep_identical_tables_and_weights_with_uneven_input(tmp_path: Path) -> None:
    # rank 1 has nothing in rounds 2 and 4, rank 0 nothing in round 3: nobody hangs, and the
    # ranks with data still step
    plan = [[list(range(0, 40)), list(range(100, 140))],
            [list(range(40, 80)), list(range(140, 150))],
            [list(range(80, 95)), []],
            [[], list(range(150, 190))],
            [list(range(200, 260)), []]]
    _spawn(_learner_worker, 2, tmp_path, plan)
    r0, r1 = (pickle.loads((tmp_path / f"learner{r}.pkl").read_bytes()) for r in range(2))
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    assert r0["steps"] == r1["steps"] == 5  # one optimizer step per round, on both ranks
    assert r0["table"]["admissions"] > 0
    assert _same(r0["table"], r1["table"])  # the same feature table, value for value
    # each rank evaluated its own impressions only
    assert (r0["seen"], r1["seen"]) == (2 * (40 + 40 + 15 + 60), 2 * (40 + 10 + 40))
    merged = merged_evaluator([r0["evaluator"], r1["evaluator"]], 500)
    assert merged.tasks[0].count == 40 + 40 + 15 + 60 + 40 + 10 + 40
    assert set(r0["local"]) >= {"pending_ids", "evaluator", "mixer"} and "optimizer" not in r0["local"]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_merged_evaluator_equals_one_evaluator_over_all_pairs() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((300, 4)) < 0.3).astype(np.float64)
    p = np.clip(y * 0.3 + rng.random((300, 4)) * 0.7, 0.01, 0.99)
    one = PrequentialEvaluator(4, 1000)
    one.update(y, p)
    parts = [PrequentialEvaluator(4, 500), PrequentialEvaluator(4, 500)]
    parts[0].update(y[:120], p[:120])
    parts[1].update(y[120:], p[120:])
    merged = merged_evaluator([e.state_dict() for e in parts], 500)
    for a, b in zip(one.values()["lifetime"] + one.values()["sliding"],
                    merged.values()["lifetime"] + merged.values()["sliding"], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert np.isclose(a[k], b[k]), k


def test_rank_share_splits_partitions_without_overlap() -> None:
    infos = [RankInfo(r, 3) for r in range(3)]
    owners = [[i.rank for i in infos if i.owns(p)] for p in range(8)]
    assert all(len(o) == 1 for o in owners)
    assert RankInfo.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == RankInfo(1, 2, 1)
    assert RankInfo.from_env({}) == RankInfo(0, 1, 0)


class _Producer:
    """Announcements and dead letters go nowhere (the round pairing is what is tested)."""

    def send(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass


class _LateFeed:
    """A rank's feed over a backlog of ``chunks`` on its partition, handed over from ``after_s``
    on (a feed still fetching): its high watermark says the records are there from the start."""

    def __init__(self, partition: int, chunks: list[Any], after_s: float) -> None:
        import time

        self.partitions = [partition]
        self.chunks = chunks
        self.at = time.monotonic() + after_s
        self.highwater = {partition: sum(len(c.samples) for c in chunks)}

    def get(self, timeout_s: float) -> Any:
        import time

        if time.monotonic() < self.at or not self.chunks:
            time.sleep(timeout_s)
            return None
        return self.chunks.pop(0)

    def lag(self, consumed: dict[int, int]) -> int | None:
        from stream.kafka.offsets import lag

        return lag(self.highwater, consumed)

    def close(self) -> None:
        pass


def _round_worker(rank: int, ranks: int, port: int, tmp: Path) -> None:
    import threading
    import time

    from prometheus_client import CollectorRegistry

    from stream.learn.feed import Chunk
    from stream.learn.rank_trainer import RankTrainer
    from stream.learn.sample_batch import SampleBatch
    from stream.ops.settings import Settings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    settings = Settings(data_dir=tmp / f"data{rank}", trainer_batch_size=8, trainer_linger_ms=100)
    trainer = RankTrainer(settings, CollectorRegistry(), RankInfo(rank, ranks))
    chunks = []
    for k in range(3):  # 3 whole batches of 4 samples (the global batch 8 over 2 ranks)
        ids = range(100 * rank + 4 * k, 100 * rank + 4 * k + 4)
        keys = np.array([(4 * k + j, rank, 4 * k + j) for j in range(4)], np.int64)  # the ranks' streams interleave
        chunks.append(Chunk(SampleBatch.from_samples([_sample(i, "first") for i in ids]), [], {rank: 4 * k + 4},
                            {"first": 4}, time.monotonic(), {rank: 12}, keys))
    trainer._feed = _LateFeed(rank, chunks, after_s=1.5 if rank == 1 else 0.0)  # type: ignore[assignment]
    trainer._producer = _Producer()
    trainer.run(threading.Event(), exit_when_idle_s=1.0)
    (tmp / f"rounds{rank}.pkl").write_bytes(pickle.dumps((trainer.rounds, trainer.waited_rounds,
                                                          trainer.learner.samples_seen if trainer.learner else 0)))
    trainer.publisher.close()
    _leave()


def test_a_round_waits_for_a_rank_still_reading_its_share_of_a_backlog(tmp_path: Path) -> None:
    """Rank 1's feed hands its backlog over 1.5 s after rank 0's: the rounds wait for it, so each
    of the 3 steps pairs a batch of each rank - as on every run of that backlog - instead of rank
    0 stepping alone on its first batches (4 rounds on the old code, paired by timing)."""
    _spawn(_round_worker, 2, tmp_path)
    got = [pickle.loads((tmp_path / f"rounds{r}.pkl").read_bytes()) for r in range(2)]
    assert [g[0] for g in got] == [3, 3]  # rounds: every one with both ranks' batches
    assert [g[2] for g in got] == [12, 12]  # every sample stepped on
    assert got[0][1] > 0  # rank 0 waited for rank 1


def _masked(i: int, mature: tuple[bool, bool, bool, bool]) -> Sample:
    s = _sample(i, "final")
    return Sample(s.impression_id, s.bank_id, s.event_time_ms, s.features, s.labels, mature, "final", 1000, 5)


# rank 0's rows have every label mature, rank 1's only the click: per task, the ranks bring very
# different numbers of unmasked rows (the fake-negative and positive-only rows of fnw do the same)
MASK_PLAN = [([_masked(i, ALL) for i in range(0, 30)], [_masked(i, (True, False, False, False)) for i in range(100, 130)]),
             ([_masked(i, ALL) for i in range(30, 35)], [_masked(i, (True, True, False, False)) for i in range(130, 170)]),
             ([_masked(i, (True, True, True, False)) for i in range(35, 75)], [_masked(i, ALL) for i in range(170, 175)])]


def _masked_learner() -> OnlineLearner:
    torch.manual_seed(0)
    return OnlineLearner(DynamicTable(FIELDS, rows=64, min_count=1, ttl_ms=10**9), mode="final-only", lr=0.05,
                         eval_window=500)


def _mask_worker(rank: int, ranks: int, port: int, tmp: Path) -> None:
    sync = _join(rank, ranks, port)
    ln = _masked_learner()
    ln.sync = sync
    sync.broadcast_model(ln.model)
    for round_ in MASK_PLAN:
        ln.step(list(round_[rank]))
    (tmp / f"mask{rank}.pt").write_bytes(pickle.dumps(ln.model.state_dict()))
    _leave()


def test_two_ranks_with_uneven_label_masks_train_as_one_trainer_on_the_round(tmp_path: Path) -> None:
    """Each task's loss is a mean over its unmasked (mature) rows. Over 2 ranks it must be the
    mean over both ranks' rows, as one trainer stepping on the round's rows takes it - not each
    rank's own mean, weighted by its rows (a rank with 5 unmasked rows of a task then weighed
    them as much as the other's 40)."""
    _spawn(_mask_worker, 2, tmp_path)
    ranks = [pickle.loads((tmp_path / f"mask{r}.pt").read_bytes()) for r in range(2)]
    one = _masked_learner()
    for r0, r1 in MASK_PLAN:
        one.step(list(r0) + list(r1))  # rank order: the table sees the values in the same order
    for k, v in one.model.state_dict().items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        assert torch.allclose(ranks[0][k], v, rtol=1e-4, atol=1e-6), k


def _timed(i: int, hour: int, kind: str) -> Sample:
    s = _sample(i, kind)
    return Sample(s.impression_id, s.bank_id, hour * 3_600_000, s.features, s.labels, s.mature, s.kind,
                  s.elapsed_ms, s.seq)


def _volume_worker(rank: int, ranks: int, port: int, tmp: Path, plan: list[list[list[int]]]) -> None:
    sync = _join(rank, ranks, port)
    torch.manual_seed(0)
    ln = OnlineLearner(DynamicTable(FIELDS, rows=64, min_count=2, ttl_ms=10**12), mode="fnw", lr=3e-3,
                       eval_window=500, stabilisers=Stabilisers(lr_volume=VolumeScale(ref_per_day=400)))
    ln.sync = sync
    sync.broadcast_model(ln.model)
    lrs = []
    for hour, round_ in enumerate(plan):
        mine = round_[rank]
        # every third impression gets its final alone (the joiner's lanes ran ahead): still one impression
        ln.step([_timed(i, hour, "first") for i in mine if i % 3] + [_timed(i, hour, "final") for i in mine])
        lrs.append((ln.optimizer.lr, sorted({g["lr"] for g in ln.optimizer.dense.param_groups})))
    out = {"lrs": lrs, "model": ln.model.state_dict(), "rate": ln.lr_rate.state_dict() if ln.lr_rate else None}
    (tmp / f"volume{rank}.pkl").write_bytes(pickle.dumps(out))
    _leave()


def test_two_ranks_with_uneven_volumes_step_at_the_same_rate_every_round(tmp_path: Path) -> None:
    # hourly rounds over two days; rank 0 has most of the impressions, rank 1 a few or none: each
    # rank alone would measure a different volume, but the rate is fed the round's sums - of
    # impressions, a third of which come as a final alone
    rng = np.random.default_rng(5)
    plan, nxt = [], 0
    for hour in range(50):
        a, b = int(rng.integers(2, 9)), int(rng.integers(0, 3)) if hour % 5 else 0
        plan.append([list(range(nxt, nxt + a)), list(range(nxt + a, nxt + a + b))])
        nxt += a + b
    _spawn(_volume_worker, 2, tmp_path, plan)
    r0, r1 = (pickle.loads((tmp_path / f"volume{r}.pkl").read_bytes()) for r in range(2))
    assert r0["lrs"] == r1["lrs"]  # the table's rate and every dense group's, round by round
    assert r0["rate"] == r1["rate"]
    one = VolumeRate(3e-3, VolumeScale(ref_per_day=400))  # one trainer fed both ranks' impressions
    assert [lr for lr, _ in r0["lrs"]] == [one.observe(len(a) + len(b), h * 3_600_000, h * 3_600_000)
                                           for h, (a, b) in enumerate(plan)]
    assert r0["lrs"][0][0] == 3e-3 and 3e-3 < r0["lrs"][-1][0] < 3e-3 * 4  # ~130 a day: ~1.75x
    assert all(len(groups) == 1 and groups[0] == lr for lr, groups in r0["lrs"])
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
