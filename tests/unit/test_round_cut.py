"""Several ranks cut their rounds on the order of all partitions (stream/learn/round_cut.py): a
round is the next batch one trainer would train, whatever share of it each rank holds, and 2 gloo
ranks over a backlog spread over partitions train to one trainer's weights."""

from __future__ import annotations

import os
import pickle
import random
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from stream.contract.samples import Sample, encode_binary
from stream.learn.feed import Chunk, _chunk
from stream.learn.partition_merge import PartitionMerge
from stream.learn.round_cut import RoundPool, plan_round
from stream.learn.sample_batch import SampleBatch
from tests.unit.test_partition_merge import Rec
from tests.unit.test_ranks import _LateFeed, _Producer, _spawn

PARTITIONS = 4
BATCH = 40


def _k(*rows: tuple[int, int, int]) -> np.ndarray:
    return np.array(rows, np.int64).reshape(-1, 3)


def test_a_round_is_the_next_batch_of_all_partitions_merged() -> None:
    a = _k((10, 0, 0), (20, 0, 1), (30, 2, 0), (40, 0, 2))  # rank 0: partitions 0 and 2
    b = _k((15, 1, 0), (20, 1, 1), (50, 3, 0))  # rank 1: partitions 1 and 3
    # times 10 15 20(p0) 20(p1) 30: ties by partition
    assert plan_round([a, b], [False, False], size=5, lingered=False) == [3, 2]
    assert plan_round([a, b], [True, True], size=5, lingered=False) == [3, 2]  # each shows more than its part
    assert plan_round([b, a], [False, False], size=5, lingered=False) == [2, 3]


def test_a_round_waits_for_a_rank_behind_whose_every_sample_is_in_the_cut() -> None:
    a = _k((10, 0, 0), (20, 0, 1))  # all rank 0 has received, and its partitions hold more
    b = _k(*[(12 + 3 * i, 1, i) for i in range(8)])  # times 12, 15, 18, 21, ..
    assert plan_round([a, b], [True, False], size=6, lingered=False) is None
    # caught up (nothing more on the broker for it): the cut is sure
    assert plan_round([a, b], [False, False], size=6, lingered=False) == [2, 4]
    # a rank behind whose later samples are past the cut holds nothing back
    assert plan_round([a, b], [True, False], size=2, lingered=False) == [1, 1]
    # a stop (or a rank behind too long) trains what is held
    assert plan_round([a, b], [True, False], size=6, lingered=False, flush=True) == [2, 4]


def test_a_caught_up_stream_steps_after_the_linger_and_never_on_nothing() -> None:
    a, b = _k((10, 0, 0)), _k()
    assert plan_round([a, b], [False, False], size=5, lingered=False) is None  # partial, not lingered
    assert plan_round([a, b], [False, False], size=5, lingered=True) == [1, 0]  # no wait for rank 1
    assert plan_round([a, b], [False, True], size=5, lingered=True) is None  # rank 1's backlog first
    assert plan_round([_k(), _k()], [False, False], size=5, lingered=True, flush=True) is None


def _samples(n: int) -> SampleBatch:
    return SampleBatch.from_samples([Sample(f"i{i}", "b", i, {"a": "x"}, (0, 0, 0, 0), (False,) * 4, "first",  # type: ignore[arg-type]
                                            0, 0, i) for i in range(n)])


def test_pool_resume_offsets_never_pass_a_sample_not_trained() -> None:
    pool = RoundPool()
    keys = _k((1, 0, 5), (2, 2, 7), (3, 0, 6), (4, 2, 9))  # offset 8 of partition 2 was refused
    pool.add(Chunk(_samples(4), [], {0: 7, 2: 10}, keys=keys), now_ms=100, mono=1.0)
    first = pool.take(2, now_ms=200)
    assert first.keys is not None and first.keys.tolist() == keys[:2].tolist()
    assert first.parts[0].impression_ids == ["i0", "i1"] and first.first_at_ms == 100
    assert first.offsets == {0: 6, 2: 9}  # the first sample still held of each partition
    assert pool.head(5).tolist() == keys[2:].tolist()
    rest = pool.take(2, now_ms=300)
    assert rest.offsets == {0: 7, 2: 10} and pool.n == 0  # past every record received


# --- 2 gloo ranks against one trainer, both through the feed's merge ------------------------------


def _backlog() -> dict[int, list[Rec]]:
    """Impressions over 4 partitions (by a hash of the id, as the joiner keys them), each with a
    first sample and, later, its final; a partition's records in the order the joiner wrote them."""
    rng = random.Random(7)
    rows: dict[int, list[tuple[int, Sample]]] = {p: [] for p in range(PARTITIONS)}
    for i in range(420):
        t = 1_000 * i + rng.randrange(500)
        iid = f"imp-{i}"
        p = zlib.crc32(iid.encode()) % PARTITIONS
        feats = {"a": str(rng.randrange(30)), "b": str(rng.randrange(8)), "c": str(i % 5)}
        labels = tuple(int(x) for x in (np.array([rng.random() for _ in range(4)]) < [0.5, 0.35, 0.3, 0.25]).cumprod())
        rows[p].append((t, Sample(iid, "bank_1", t, feats, (0, 0, 0, 0), (False,) * 4, "first", 0, 0, t)))  # type: ignore[arg-type]
        done = t + rng.randrange(5_000, 60_000)
        rows[p].append((done, Sample(iid, "bank_1", t, feats, labels, (True,) * 4, "final", done - t, 5, done)))  # type: ignore[arg-type]
    out: dict[int, list[Rec]] = {}
    for p, got in rows.items():
        got.sort(key=lambda r: r[0])
        out[p] = [Rec("samples", p, o, None, encode_binary(s)) for o, (_, s) in enumerate(got)]
    return out


class _MergeFeed(_LateFeed):
    """A feed over a backlog of ``partitions``: fetches of random size from a random partition (as
    aiokafka's come), through the feed's own ``PartitionMerge`` and chunking."""

    def __init__(self, backlog: dict[int, list[Rec]], partitions: list[int], chunk_size: int, seed: int) -> None:
        from stream.learn.feed import MERGE_LANE_CHUNKS

        rng = random.Random(seed)
        self.partitions = partitions
        self.at = 0.0  # handed over from the start
        self.highwater = {p: len(backlog[p]) for p in partitions}
        merge = PartitionMerge(partitions, MERGE_LANE_CHUNKS * chunk_size)
        at = dict.fromkeys(partitions, 0)
        self.chunks: list[Chunk] = []
        while True:
            waiting = [p for p in partitions if at[p] < len(backlog[p])]
            fetchable = [p for p in waiting if merge.room(p) > 0]
            if fetchable:
                p = rng.choice(fetchable)
                k = min(merge.room(p), rng.randrange(1, 3 * chunk_size))
                merge.add(p, backlog[p][at[p]: at[p] + k])
                at[p] += min(k, len(backlog[p]) - at[p])
            got = merge.take(chunk_size, waiting)
            while got is not None:
                self.chunks.append(_chunk(got, time.monotonic(), self.highwater))
                got = merge.take(chunk_size, [p for p in partitions if at[p] < len(backlog[p])])
            if not waiting and not merge.buffered():
                break



def _settings(tmp: Path) -> Any:
    from stream.ops.settings import Settings

    # min step 1 and late positives at once: those pace each rank's own rows (its mixing buffer)
    return Settings(data_dir=tmp, trainer_batch_size=BATCH, trainer_linger_ms=100, trainer_min_step_rows=1,
                    trainer_positive_slack=0, trainer_embedding_rows=256, trainer_feature_min_count=2,
                    trainer_checkpoint_interval_ms=60_000)


def _rank_worker(rank: int, ranks: int, port: int, tmp: Path) -> None:
    from prometheus_client import CollectorRegistry

    from stream.learn.rank_trainer import RankTrainer
    from stream.learn.ranks import RankInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    info = RankInfo(rank, ranks)
    trainer = RankTrainer(_settings(tmp / f"data{rank}"), CollectorRegistry(), info)
    mine = [p for p in range(PARTITIONS) if info.owns(p)]
    trainer._feed = _MergeFeed(_backlog(), mine, trainer.rank_batch, seed=rank)  # type: ignore[assignment]
    trainer._producer = _Producer()
    trainer.run(threading.Event(), exit_when_idle_s=1.0)
    assert trainer.learner is not None
    (tmp / f"rank{rank}.pkl").write_bytes(pickle.dumps((trainer.learner.model.state_dict(), trainer.rounds,
                                                        trainer.learner.samples_seen, dict(trainer.offsets))))
    trainer.publisher.close()
    dist.destroy_process_group()


def test_two_ranks_over_a_backlog_train_to_the_weights_of_one_trainer(tmp_path: Path) -> None:
    """The backlog goes through each feed's merge (fetches of random size and order); one trainer
    reads all 4 partitions, each of 2 ranks its 2. Cut on the merged order of all partitions, with
    the table meeting the rows in that order, every round is one trainer's batch: the ranks end
    with one trainer's weights (to float rounding), and with each other's exactly. (Each rank
    taking half a batch of its own share instead: the rounds' batches differ from one trainer's.)"""
    from prometheus_client import CollectorRegistry

    from stream.learn.trainer import Trainer

    _spawn(_rank_worker, 2, tmp_path)
    got = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    one = Trainer(_settings(tmp_path / "one"), CollectorRegistry())
    backlog = _backlog()
    one._feed = _MergeFeed(backlog, list(range(PARTITIONS)), BATCH, seed=11)  # type: ignore[assignment]
    one._producer = _Producer()
    torch.set_num_threads(1)
    one.run(threading.Event(), exit_when_idle_s=1.0)
    assert one.learner is not None
    total = sum(len(r) for r in backlog.values())
    assert got[0][2] + got[1][2] == one.learner.samples_seen == total
    assert got[0][1] == got[1][1] == -(-total // BATCH)  # rounds: one trainer's batches
    assert {**got[0][3], **got[1][3]} == dict(one.offsets) == {p: len(r) for p, r in backlog.items()}
    for k, v in one.learner.model.state_dict().items():
        assert torch.equal(got[0][0][k], got[1][0][k]), k
        assert torch.allclose(got[0][0][k], v, rtol=1e-4, atol=1e-5), (k, float((got[0][0][k] - v).abs().max()))
    one.publisher.close()
