"""``aitm-stream trainer`` as one of N ranks under ``torchrun`` (data-parallel, gloo or NCCL).

    torchrun --nproc-per-node 2 -m stream.cli trainer       # one machine, two ranks
    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m stream.cli trainer                                # two machines (shared MODEL_STORE)

Each rank reads the ``samples`` partitions ``p % ranks == rank`` (``RankInfo.share``) with its own
feed process, batches them as one trainer does, and the ranks then step in *rounds*: one small
all-reduce of flags per round (who has a batch, stop, checkpoint due, still busy), then - when any
rank has a batch - one test-then-train step on every rank, a rank without data taking part with
an empty batch (``stream.learn.ranks``: the feature table and the gradients stay identical on
every rank). Rank 0 alone holds the model store's writer lease, judges candidates (its own
holdout), writes checkpoints - with every rank's offsets and every rank's own learner state
(pending first-sample predictions, mixing buffer, evaluator) - and announces versions. A resume
(every rank reads the newest version) gives each rank its own part back; with a different number
of ranks the offsets still hold (kept per partition) and ranks >= 1 start their own part afresh.
A rank that dies makes torchrun's elastic agent stop the group and start it again
(``--max-restarts``): every rank resumes from the last checkpoint, and the samples after it are
read again, so nothing is lost (at-least-once, as for one trainer).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry, start_http_server

from stream.learn.batcher import Batch
from stream.learn.feed import SampleFeed
from stream.learn.learner import OnlineLearner, fields_of
from stream.learn.ranks import LOCAL_STATE, RankInfo, RankSync, init_group, local_state, merged_evaluator
from stream.learn.round_cut import RoundPool, plan_round
from stream.learn.sample_batch import SampleBatch
from stream.learn.trainer import QUALITY_REFRESH_S, Trainer, _warm_up_torch
from stream.ops.clock import Clock
from stream.ops.jsonsafe import finite
from stream.ops.lease import WriterLease
from stream.ops.metrics import process_registry
from stream.ops.settings import Settings, kafka_client_config

log = logging.getLogger(__name__)
# a round waits for a rank whose partitions have records it has not received yet and that could
# bring samples before the round's cut (stream.learn.round_cut); not longer than this
RANK_WAIT_S = 5.0


class RankTrainer(Trainer):
    """One rank: the trainer's state and loop, stepping in rounds with the other ranks."""

    def __init__(self, settings: Settings, registry: CollectorRegistry, info: RankInfo, clock: Clock | None = None,
                 mode: str | None = None) -> None:
        super().__init__(settings, registry, clock, mode)
        if not settings.trainer_one_pass:
            raise ValueError("several trainer ranks need TRAINER_ONE_PASS=true (one forward pass a step)")
        self.info = info
        self.sync = RankSync(info, self.device)
        self.rounds = 0
        # the global batch stays TRAINER_BATCH_SIZE: a round is the next TRAINER_BATCH_SIZE samples
        # of all partitions' merged order, each rank training its part (stream.learn.round_cut), so
        # N ranks make one trainer's steps on one trainer's batches (with each rank batching the
        # full size, 2 ranks made half the steps on twice the rows and lost 0.04 AUC on a quick
        # bench stream's backlog). The feed's chunks are a rank's share of a round.
        self.rank_batch = max(1, -(-settings.trainer_batch_size // info.ranks))
        self._ranks_state: dict[str, Any] = {}  # rank 0, at a checkpoint: the other ranks' own state
        self.received: dict[int, int] = {}  # partition -> offset after the last record the feed handed over
        self.waited_rounds = 0  # rounds that waited for a rank behind
        self.pool: RoundPool | None = None  # made by run()
        self._lingered_s = 0.0

    @property
    def leader(self) -> bool:
        return self.info.rank == 0

    # --- resume ---------------------------------------------------------------------------------

    def _resume_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        state = dict(extra["learner"])
        if self.leader:
            return state
        mine = (extra.get("ranks") or {}).get(str(self.info.rank))
        if extra.get("ranks_n") != self.info.ranks or mine is None:
            # another number of ranks wrote it: this rank's own part starts afresh (the shared part
            # and the per-partition offsets still hold)
            assert self.learner is not None
            mine = local_state(self.learner.state_dict())
            log.warning("rank %d: checkpoint from %s ranks, own learner state starts afresh", self.info.rank,
                        extra.get("ranks_n", 1))
        state.update(mine)
        return state

    def _extra_state(self) -> dict[str, Any]:
        return {"ranks": self._ranks_state, "ranks_n": self.info.ranks}

    def _attach(self, learner: OnlineLearner) -> None:
        learner.sync = self.sync
        self.sync.broadcast_model(learner.model)  # as DDP does: every rank starts from rank 0's weights

    # --- Kafka ----------------------------------------------------------------------------------

    def connect(self) -> None:
        from kafka import KafkaProducer

        self._producer = KafkaProducer(client_id=f"aitm-trainer-{self.info.rank}", acks="all", linger_ms=5,
                                       enable_idempotence=False, **self.s.kafka_python_config())
        feed = SampleFeed(partial(kafka_client_config, self.s, "aiokafka"), self.s.topic_samples, self.offsets,
                          chunk_size=self.rank_batch, share=self.info.share)
        feed.start_and_wait()
        self._feed = feed
        log.info("rank %d of %d reads partitions %s", self.info.rank, self.info.ranks, feed.partitions)

    # --- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event, exit_when_idle_s: float | None = None) -> None:
        """Rounds until every rank is idle (``exit_when_idle_s``) or any rank is stopped.

        Each round every rank shows the keys of its next ``TRAINER_BATCH_SIZE`` held samples (one
        all-gather, with its flags); every rank then computes the same cut
        (``stream.learn.round_cut.plan_round``): the next batch of the order of all partitions, the
        batch one trainer would train, each rank training its own part of it."""
        feed = self._feed
        if feed is None:
            raise RuntimeError("connect() first")
        if self.learner is not None:
            self._attach(self.learner)
        pool = self.pool = RoundPool()
        size = self.s.trainer_batch_size
        last_ckpt = last_gauges = idle_since = last_chunk = time.monotonic()
        last_quality = 0.0
        stopping = False
        waiting_since: float | None = None  # rounds wait for a rank behind since then
        trained_at_last_gauge = self.learner.trained_samples if self.learner else 0
        while True:
            # what the feed has, up to two global batches held (then the feed's queue holds back)
            timeout = 0.0 if pool.n >= size and waiting_since is None else 0.05
            while not (stopping or stop.is_set()) and pool.n < 2 * size:
                chunk = feed.get(timeout_s=timeout)
                if chunk is None:
                    break
                timeout = 0.0
                self.received.update(chunk.offsets)
                self._intake(chunk)
                last_chunk = time.monotonic()
                pool.add(chunk, self.clock.now_ms(), last_chunk)
                idle_since = last_chunk
            now, now_ms = time.monotonic(), self.clock.now_ms()
            if not pool.n:
                self.offsets.update(pool.received)  # every record received is trained or dead-lettered
            else:
                idle_since = now
            ckpt_due = self.leader and ((now - last_ckpt) * 1000 >= self.s.trainer_checkpoint_interval_ms
                                        or self.batches_since >= self.s.trainer_checkpoint_batches)
            idle = exit_when_idle_s is not None and not pool.n and now - idle_since >= exit_when_idle_s
            stale = waiting_since is not None and now - waiting_since >= RANK_WAIT_S
            lingered = pool.n > 0 and pool.waited_s(now) * 1000 >= self.s.trainer_linger_ms
            every = self.sync.gather((pool.head(size), self._behind(), lingered, stop.is_set(), ckpt_due, not idle,
                                      self.consumed > 0, stale))
            heads = [e[0] for e in every]
            behind = [bool(e[1]) for e in every]
            stopping = stopping or any(e[3] for e in every)
            held = sum(len(h) for h in heads)
            plan = plan_round(heads, behind, size, any(e[2] for e in every),
                              flush=stopping or any(e[7] for e in every))
            if plan is not None:
                if held < size and not stopping:
                    self._lingered_s += max(0.0, now - last_chunk)
                k = plan[self.info.rank]
                self._round(pool.take(k, now_ms) if k else None)
                waiting_since = None
            elif held and any(behind):  # a rank is still receiving its share: the cut may need it
                self.waited_rounds += 1
                waiting_since = now if waiting_since is None else waiting_since
            if any(e[4] for e in every):
                self._checkpoint_round()
                last_ckpt = time.monotonic()
            if now - last_gauges >= 1.0:
                if self.learner is not None:
                    done = self.learner.trained_samples
                    self.metrics.throughput.set((done - trained_at_last_gauge) / (now - last_gauges))
                    trained_at_last_gauge = done
                    self.table_gauges.refresh(self.learner.encoder)
                    if now - last_quality >= QUALITY_REFRESH_S:
                        self.update_quality_gauges()
                        last_quality = now
                last_gauges = now
                self.update_lag_gauge()
            if stopping and plan is None and not held:
                break  # every rank's held samples trained
            if any(e[6] for e in every) and not any(e[5] for e in every):
                break  # every rank idle, armed by the first record anywhere
        self._checkpoint_round(final=True)
        self.publisher.wait_all()
        self.update_quality_gauges()
        self.update_lag_gauge()

    @property
    def lingered_s(self) -> float:
        """Seconds partial rounds waited (TRAINER_LINGER_MS) with nothing new to read."""
        return self._lingered_s

    def _behind(self) -> bool:
        """Whether this rank's partitions hold records its feed has not handed over yet (a backlog
        being read): a round then waits for its batch, so that every run of the same backlog
        pairs the ranks' batches alike (a rank owning no partition is never behind)."""
        feed = self._feed
        if feed is None or not feed.partitions:
            return False
        lag = feed.lag(self.received)
        return lag is None or lag > 0

    def _round(self, batch: Batch | None) -> None:
        """One step on every rank: this rank's batch, or an empty one."""
        self.rounds += 1
        if self.learner is None:  # cold start on every rank at once, with every rank's fields
            mine = fields_of(SampleBatch.concat(batch.parts)) if batch is not None and batch.parts else ()
            fields = tuple(sorted({f for fs in self.sync.gather(mine) for f in fs}))
            if not fields:  # only dead letters so far, on every rank
                if batch is not None:
                    self.offsets.update(batch.offsets)
                return
            self.learner = self._new_learner(fields)
            self._attach(self.learner)
        if batch is not None and batch.parts:
            self._train(batch)
            return
        self.learner.step(SampleBatch.empty())  # no samples here: this rank's part of the collectives
        if batch is not None:
            self.offsets.update(batch.offsets)

    def _checkpoint_round(self, final: bool = False) -> None:
        """Every rank sends rank 0 its offsets, its new-sample times and its own learner state;
        rank 0 writes and announces the version (when the gate lets it), with a training checkpoint
        when one is due (``final``: at the stop, always)."""
        learner = self.learner
        mine = {"offsets": dict(self.offsets), "new_min_ms": self.new_min_ms, "new_max_ms": self.new_max_ms,
                "batches": self.batches_since,
                "local": local_state(learner.state_dict()) if learner is not None and not self.leader else None}
        got: list[Any] = [None] * self.info.ranks if self.leader else []
        dist.gather_object(mine, got if self.leader else None, dst=0)
        if not self.leader:
            self.new_min_ms, self.batches_since = None, 0  # rank 0 carries them into the version
            return
        mins = [g["new_min_ms"] for g in got if g["new_min_ms"] is not None]
        if learner is None or not (mins or final):
            return
        for r, g in enumerate(got):
            self.offsets.update({p: o for p, o in g["offsets"].items() if RankInfo(r, self.info.ranks).owns(p)})
        self._ranks_state = {str(r): g["local"] for r, g in enumerate(got) if r and g["local"] is not None}
        if mins:
            self.new_min_ms = min(mins)
            self.new_max_ms = max(g["new_max_ms"] for g in got)
            self.checkpoint_async(training=final)
        if final:
            self.checkpoint_rest()
        self._ranks_state = {}

    def rank_summary(self, wall_s: float) -> dict[str, Any] | None:
        """Rank 0: the run summary over every rank (counts summed, quality from every rank's
        finals); other ranks: None. A collective: every rank calls it."""
        own = self.summary(wall_s)
        own["rounds"] = self.rounds
        own["waited_rounds"] = self.waited_rounds
        own["evaluator"] = self.learner.evaluator.state_dict() if self.learner else None
        got: list[Any] = [None] * self.info.ranks if self.leader else []
        dist.gather_object(own, got if self.leader else None, dst=0)
        if not self.leader:
            return None
        out = dict(got[0])
        for key in ("records_consumed", "dead_letters", "samples_processed", "trained_rows"):
            out[key] = sum(g[key] for g in got)
        for key in ("active_seconds", "wall_seconds", "busy_seconds", "lingered_seconds"):
            out[key] = max(g[key] for g in got)
        states = [g["evaluator"] for g in got if g["evaluator"] is not None]
        if states:
            out["quality"] = merged_evaluator(states, self.s.trainer_eval_window).values()
        out["trainer_workers"] = self.info.ranks
        out["ranks"] = [{k: g[k] for k in ("records_consumed", "samples_processed", "trained_rows", "busy_seconds",
                                           "active_seconds", "cpu_seconds", "rounds", "waited_rounds")} for g in got]
        out.pop("evaluator", None)
        return out


def main_rank(settings: Settings, info: RankInfo, mode: str | None, exit_when_idle_s: float | None,
              summary_json: Path | None, no_metrics: bool) -> int:
    """``aitm-stream trainer`` when torchrun started several ranks (trainer.main dispatches here)."""
    logging.getLogger().handlers[0].setFormatter(
        logging.Formatter(f"%(asctime)s trainer[{info.rank}] %(levelname)s %(message)s"))
    torch.set_num_threads(settings.trainer_threads)
    _warm_up_torch()
    from stream.kafka.broker import ensure_topics

    if info.rank == 0:
        ensure_topics(settings.kafka_python_config(), settings.topic_specs(), settings.topic_replication_factor,
                      settings.kafka_connect_timeout_s)
    registry = process_registry()
    if not no_metrics:  # one port a rank: METRICS_PORT_TRAINER + local rank
        start_http_server(settings.metrics_port_trainer + info.local_rank, addr=settings.metrics_host,
                          registry=registry)
    trainer = RankTrainer(settings, registry, info, mode=mode)
    init_group(info, trainer.device)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    lease = WriterLease(trainer.store.root) if info.rank == 0 else None
    trainer.metrics.writer_lease.set(0)
    if lease is not None and not lease.wait(stop):
        dist.destroy_process_group()
        return 0
    dist.barrier()  # rank 0 holds the writer lease: every rank may read the store now
    trainer.metrics.writer_lease.set(1 if lease is not None else 0)
    trainer.restore()
    trainer.connect()
    t0 = time.monotonic()
    log.info("rank %d of %d: mode %s, device %s, model store %s", info.rank, info.ranks, trainer.mode,
             trainer.device, trainer.store.root)
    try:
        trainer.run(stop, exit_when_idle_s)
    finally:
        trainer.close()
        if lease is not None:
            lease.release()
    summary = trainer.rank_summary(time.monotonic() - t0)  # after close: the feed's CPU is reaped
    if summary_json is not None and summary is not None:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(finite(summary), indent=1) + "\n")
    dist.destroy_process_group()
    return 0


__all__ = ["LOCAL_STATE", "RankTrainer", "main_rank"]
