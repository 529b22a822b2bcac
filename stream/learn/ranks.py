"""Several trainer ranks under ``torchrun``: the process group and the collectives of one step.

Each rank reads its own share of the ``samples`` partitions (``p % ranks == rank``), so one
impression's samples (keyed by impression id) always reach the same rank and its first-sample
prediction, deduplication and mixing buffer stay rank-local. What must be identical on every
rank is kept so by the same collectives, in the same order, on every rank, every round:

1. ``encode``: the feature table. Every rank all-gathers the round's feature columns and event
   times and encodes all of them, in rank order, into its own ``DynamicTable`` (counting,
   admitting, touching and expiring alike), then keeps its own rows. Same input sequence, same
   table, same rows assigned - and the learner draws fresh rows from a generator seeded by the
   table's assignment count, so those are identical too.
2. ``reduce``: the gradients. Each rank scales its gradient by its trained rows, one flat
   all-reduce sums them with the row count, and every rank steps Adam on the row-weighted mean
   (a rank with no rows this round contributes zeros). Same gradient, same optimizer state: the
   same weights. This is what DDP's bucketed all-reduce does; DDP's module wrapper itself is not
   used because the learner's one forward pass both scores and trains a variable subset of rows
   and the mixing buffer decides per rank whether a step happens - the wrapper's hooks assume
   one forward and one backward per rank per step (docs/streaming.md, "Several trainer ranks").

A rank without data still takes part (``idle``), so uneven streams never hang the group.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from stream.learn.prequential import PrequentialEvaluator, TaskWindow

if TYPE_CHECKING:
    from aitm.embedding_table import Encoder
    from stream.learn.learner import OnlineLearner

# learner state that is each rank's own (its impressions); the rest (optimizer, trained weights,
# weight average, step count) is identical on every rank and checkpointed once, from rank 0
LOCAL_STATE = ("evaluator", "pending_ids", "pending_probs", "trained_samples", "samples_seen", "mixer",
               "stream_start_ms", "delay", "frozen")


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the group, from torchrun's environment (one rank when absent)."""

    rank: int = 0
    ranks: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RankInfo:
        e = os.environ if env is None else env
        return cls(int(e.get("RANK", "0")), int(e.get("WORLD_SIZE", "1")), int(e.get("LOCAL_RANK", "0")))

    @property
    def share(self) -> tuple[int, int]:
        return self.rank, self.ranks

    def owns(self, partition: int) -> bool:
        return partition % self.ranks == self.rank


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_group(info: RankInfo, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the group torchrun set up (``env://``: MASTER_ADDR/PORT, RANK, WORLD_SIZE). The long
    timeout covers rank 0 waiting as a standby for the model store's writer lease."""
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else info.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    # the group's keys under a prefix per torchrun attempt: after a restart the store may still
    # hold the dead attempt's addresses, and a fast rank would dial those (measured: "Connection
    # refused" at init on the second attempt)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                          info.ranks, is_master=not agent and info.rank == 0, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend_for(device), store=dist.PrefixStore(f"aitm-trainer/{attempt}", store),
                            rank=info.rank, world_size=info.ranks, timeout=timeout)


class RankSync:
    """The per-round collectives (module docstring). ``device`` holds the reduction buffers."""

    def __init__(self, info: RankInfo, device: torch.device | str = "cpu", group: Any = None) -> None:
        self.info = info
        self.device = torch.device(device)
        self.group = group

    # --- 1. the feature table -------------------------------------------------------------------

    def encode(self, encoder: Encoder, columns: Mapping[str, Sequence[str]], n: int, update: bool = False,
               event_time_ms: Sequence[int] | np.ndarray | None = None,
               order: np.ndarray | None = None) -> np.ndarray:
        """``encoder.encode_columns`` over every rank's rows; this rank's (N, F). The rows go
        through the table in the order of their keys ``order`` (N, 3) - (stream time, partition,
        offset), the order one trainer meets them in (``stream.learn.round_cut``) - when every rank
        with rows gives them, else in rank order."""
        times = np.zeros(0, np.int64) if event_time_ms is None else np.asarray(event_time_ms, np.int64)
        mine = ({k: list(v) for k, v in columns.items()}, n, times, order if order is not None and len(order) == n else None)
        parts: list[Any] = [None] * self.info.ranks
        dist.all_gather_object(parts, mine, group=self.group)
        names = sorted({name for cols, _, _, _ in parts for name in cols})
        merged = {name: [v for cols, k, _, _ in parts for v in (cols.get(name) or [""] * k)] for name in names}
        total = sum(k for _, k, _, _ in parts)
        all_times = np.concatenate([t for _, _, t, _ in parts]) if event_time_ms is not None else None
        perm: np.ndarray | None = None
        if total and all(o is not None for _, k, _, o in parts if k):
            keys = np.concatenate([o for _, k, _, o in parts if k])  # (sum N, 3)
            perm = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))
            merged = {name: [col[i] for i in perm.tolist()] for name, col in merged.items()}
            all_times = all_times[perm] if all_times is not None else None
        ids = encoder.encode_columns(merged, total, update=update, event_time_ms=all_times)  # (sum N, F)
        if perm is not None:
            back = np.empty_like(ids)
            back[perm] = ids
            ids = back
        start = sum(k for _, k, _, _ in parts[: self.info.rank])
        return ids[start : start + n]

    # --- 2. the gradients -----------------------------------------------------------------------

    def reduce(self, model: nn.Module, rows: int) -> int:
        """Replace every parameter's gradient by the row-weighted mean over ranks; the rows summed
        over ranks (0: nobody trained this round, gradients untouched)."""
        params = [p for p in model.parameters() if p.requires_grad]
        flat = torch.cat([_dense_grad(p).reshape(-1) * float(rows) for p in params]
                         + [torch.tensor([float(rows)], device=params[0].device)])
        if flat.device != self.device:
            flat = flat.to(self.device, non_blocking=True)
        dist.all_reduce(flat, group=self.group)
        total = int(flat[-1].item())  # the one host sync of the step: whether to step at all
        if total == 0:
            return 0
        flat = flat[:-1] / total
        # an embedding trained row-wise (``aitm.lazy_adam``) takes its gradient sparse: the rows any
        # rank's loss reached (every rank then moves the same rows)
        sparse = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse}
        at = 0
        for p in params:
            k = p.numel()
            g = flat[at : at + k].view_as(p).to(p.device, non_blocking=True)
            p.grad = g.to_sparse(1) if id(p) in sparse else g
            at += k
        return total

    def counts(self, values: Sequence[float]) -> list[float]:
        """A few numbers summed over ranks (the step's rows and each task's unmasked rows: the
        per-task means of the loss are over the whole round's rows, as one trainer's are)."""
        t = torch.tensor(list(values), dtype=torch.float64)
        if self.device.type == "cuda":
            t = t.to(self.device)
        dist.all_reduce(t, group=self.group)
        return [float(x) for x in t.cpu().tolist()]

    def volume(self, impressions: int, times_ms: tuple[int, int] | None) -> tuple[int, tuple[int, int] | None]:
        """The round's new impressions summed over ranks (each rank sees only its partitions'
        impressions, every sample of each: the sum is the stream's) and its (earliest, latest)
        event time over ranks (None: no rank had samples): what the learning rate that follows
        the volume is fed, so every rank computes the same rate (``stream.learn.lr_schedule``)."""
        every = self.gather((impressions, times_ms))
        spans = [t for _, t in every if t is not None]
        total = sum(n for n, _ in every)
        return total, (min(a for a, _ in spans), max(b for _, b in spans)) if spans else None

    def idle(self, learner: OnlineLearner) -> None:
        """A round in which this rank has no samples: the same collectives as a step, contributing
        nothing (the table still learns the others' values, the weights still move)."""
        learner._encode({}, 0, True, np.zeros(0, np.int64))
        learner._reset_rows(learner.encoder.take_assigned())
        self.no_rows(learner)

    def no_rows(self, learner: OnlineLearner) -> None:
        """This rank trains no rows this round (empty, or its mixing buffer held them): zero
        gradients into the reduction, and the step the others' rows make."""
        learner.optimizer.zero_grad(set_to_none=True)
        scaler = learner.io.scaler  # fp16: every rank steps through its scaler, so scales stay equal
        if scaler is not None:
            scaler.scale(torch.zeros((), device=learner.device))  # starts its scale on a first idle round
        self.counts([0.0] * (1 + learner.model.config.n_tasks))  # the others' loss normalisation
        total = self.reduce(learner.model, 0)
        if total:
            touched = learner.prepare_step()
            if scaler is not None:
                scaler.step(learner.optimizer)
                scaler.update()
            else:
                learner.optimizer.step()
            learner.after_step(total, touched)

    # --- start-up -------------------------------------------------------------------------------

    def broadcast_model(self, model: nn.Module) -> None:
        """Rank 0's weights to every rank (as DDP does at construction)."""
        for t in model.state_dict().values():
            dist.broadcast(t, 0, group=self.group)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.info.ranks
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def flags(self, values: Sequence[float]) -> list[float]:
        """Element-wise maximum of a few numbers over ranks (one small all-reduce)."""
        t = torch.tensor(list(values), dtype=torch.float64)
        if self.device.type == "cuda":
            t = t.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [float(x) for x in t.cpu().tolist()]


def _dense_grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    if g is None:
        return torch.zeros_like(p)
    return g.to_dense() if g.is_sparse else g


def local_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The rank-local part of ``OnlineLearner.state_dict()`` (``LOCAL_STATE``)."""
    return {k: state[k] for k in LOCAL_STATE if k in state}


def merged_evaluator(states: Sequence[list[dict[str, object]]], window: int) -> PrequentialEvaluator:
    """One evaluator over every rank's finals: lifetime sums and bins added, windows joined (so the
    window holds up to ``window`` pairs of each rank)."""
    n_tasks = len(states[0])
    out = PrequentialEvaluator(n_tasks, window * len(states))
    for t in range(n_tasks):
        task = out.tasks[t]
        parts = []
        for s in states:
            one = TaskWindow(window)
            one.load_state_dict(s[t])
            parts.append(one)
        labels = np.concatenate([p.window_pairs()[0] for p in parts])
        probs = np.concatenate([p.window_pairs()[1] for p in parts])
        task.load_state_dict({
            "labels": torch.from_numpy(labels), "probs": torch.from_numpy(probs), "next": labels.size,
            "size": labels.size, "count": sum(p.count for p in parts),
            "sums": [sum(p._positives for p in parts), sum(p._pred_sum for p in parts),
                     sum(p._loss_sum for p in parts)],
            "pos_bins": np.sum([p._pos_bins for p in parts], axis=0).tolist(),
            "neg_bins": np.sum([p._neg_bins for p in parts], axis=0).tolist(),
        })
    return out
