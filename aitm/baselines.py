"""The paper's baselines: single-task MLP, ESMM over T steps, OMoE, MMoE, PLE, and LightGBM.

Every network maps local feature ids (B, F) to end-to-end logits (B, T), like ``AITM``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from aitm.layers import (
    DenseInit,
    FusedEmbedding,
    FusedTowers,
    check_dense_init,
    end_to_end_logits,
    glorot_uniform_,
)
from aitm.model import AITM, AITMConfig

TOWER = (128, 64, 32)  # per-task tower of MLP and ESMM, as AITM's
TOWER_DROP = (0.1, 0.3, 0.3)
EXPERT = (64, 32, 16)  # paper: expert MLP [64, 32, 16], 2 x T experts
MOE_TOWER = (16,)  # small task tower on top of the mixed experts
MOE_TOWER_DROP = (0.3,)


class TaskHeads(nn.Module):
    """One linear logit per task on per-task features (T, B, k) -> (B, T); zero bias, weights
    Glorot-uniform as Keras' Dense(1) or, with ``init="torch"``, U(+-1/sqrt(k))."""

    def __init__(self, n_tasks: int, k: int, init: DenseInit = "glorot") -> None:
        super().__init__()
        check_dense_init(init)
        if init == "glorot":
            self.w = nn.Parameter(glorot_uniform_(torch.empty(n_tasks, k, 1), k, 1))  # as Dense(1)
        else:
            bound = 1.0 / math.sqrt(k)
            self.w = nn.Parameter(torch.empty(n_tasks, k, 1).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(n_tasks, 1, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.b, h, self.w).squeeze(-1).transpose(0, 1)  # (B, T)


class SingleTaskMLP(nn.Module):
    """T independent single-task models (own embedding, tower, head): no parameter is shared.

    Trained together on the sum of per-task losses this equals T separately trained models,
    since gradients and Adam states never mix.
    """

    def __init__(self, vocab_sizes: Sequence[int], n_tasks: int, emb_dim: int = 5,
                 dense_init: DenseInit = "glorot") -> None:
        super().__init__()
        self.embedding = FusedEmbedding(vocab_sizes, emb_dim, copies=n_tasks)
        self.towers = FusedTowers(self.embedding.out_dim, n_tasks, TOWER, TOWER_DROP, dense_init)
        self.heads = TaskHeads(n_tasks, TOWER[-1], dense_init)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.heads(self.towers(self.embedding(ids)))  # (B, T)


class ESMM(nn.Module):
    """ESMM over T steps: y_t = product of the per-step conditional probabilities up to t."""

    def __init__(self, vocab_sizes: Sequence[int], n_tasks: int, emb_dim: int = 5,
                 dense_init: DenseInit = "glorot") -> None:
        super().__init__()
        self.embedding = FusedEmbedding(vocab_sizes, emb_dim)
        self.towers = FusedTowers(self.embedding.out_dim, n_tasks, TOWER, TOWER_DROP, dense_init)
        self.heads = TaskHeads(n_tasks, TOWER[-1], dense_init)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return end_to_end_logits(self.heads(self.towers(self.embedding(ids))))  # (B, T)


def _mix(gates: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Gate weights (G, B, E) over experts (E, B, k) -> mixtures (G, B, k)."""
    return torch.einsum("gbe,ebk->gbk", gates, experts)


class MoE(nn.Module):
    """OMoE (one gate shared by all tasks) or MMoE (a gate per task) over 2 x T shared experts."""

    def __init__(self, vocab_sizes: Sequence[int], n_tasks: int, multi_gate: bool, emb_dim: int = 5,
                 dense_init: DenseInit = "glorot") -> None:
        super().__init__()
        self.n_tasks = n_tasks
        self.n_experts = 2 * n_tasks
        n_gates = n_tasks if multi_gate else 1
        self.embedding = FusedEmbedding(vocab_sizes, emb_dim)
        d = self.embedding.out_dim
        self.experts = FusedTowers(d, self.n_experts, EXPERT, TOWER_DROP, dense_init)
        self.gates = nn.Linear(d, n_gates * self.n_experts)
        self.towers = FusedTowers(EXPERT[-1], n_tasks, MOE_TOWER, MOE_TOWER_DROP, dense_init)
        self.heads = TaskHeads(n_tasks, MOE_TOWER[-1], dense_init)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        v = self.embedding(ids)  # (B, d)
        experts = self.experts(v)  # (E, B, k)
        g = self.gates(v).view(v.shape[0], -1, self.n_experts)  # (B, G, E)
        g = torch.softmax(g, dim=-1).transpose(0, 1)  # (G, B, E)
        mixed = _mix(g, experts)  # (G, B, k)
        if mixed.shape[0] == 1:
            mixed = mixed.expand(self.n_tasks, -1, -1)  # (T, B, k): OMoE shares one mixture
        return self.heads(self.towers(mixed))  # (B, T)


class CGCLevel(nn.Module):
    """One PLE extraction level: a specific expert per task plus T shared experts, gated."""

    def __init__(self, in_dim: int, n_tasks: int, dims: Sequence[int], last: bool,
                 dense_init: DenseInit = "glorot") -> None:
        super().__init__()
        self.n_tasks = n_tasks
        drops = TOWER_DROP[-len(dims) :]
        self.specific = FusedTowers(in_dim, n_tasks, dims, drops, dense_init)
        self.shared = FusedTowers(in_dim, n_tasks, dims, drops, dense_init)
        self.gate_w = nn.Parameter(torch.empty(n_tasks, in_dim, 1 + n_tasks))
        self.gate_b = nn.Parameter(torch.zeros(n_tasks, 1, 1 + n_tasks))
        nn.init.uniform_(self.gate_w, -1 / math.sqrt(in_dim), 1 / math.sqrt(in_dim))
        self.shared_gate = None if last else nn.Linear(in_dim, 2 * n_tasks)
        self.out_dim = dims[-1]

    def forward(self, task_in: torch.Tensor, shared_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Task inputs (T, B, d), shared input (B, d) -> task outputs (T, B, k), shared (B, k)."""
        spec = self.specific(task_in)  # (T, B, k)
        shared = self.shared(shared_in)  # (S=T, B, k)
        gates = torch.softmax(torch.baddbmm(self.gate_b, task_in, self.gate_w), -1)  # (T, B, 1+S)
        # own expert's share plus the shared experts' mixture
        task_out = gates[..., :1] * spec + _mix(gates[..., 1:], shared)  # (T, B, k)
        if self.shared_gate is None:
            return task_out, shared_in
        sg = torch.softmax(self.shared_gate(shared_in), -1).unsqueeze(0)  # (1, B, 2T)
        shared_out = _mix(sg, torch.cat((spec, shared), 0))[0]  # (B, k)
        return task_out, shared_out


class PLE(nn.Module):
    """Progressive Layered Extraction: two CGC levels, experts [64, 32] then [16]."""

    def __init__(self, vocab_sizes: Sequence[int], n_tasks: int, emb_dim: int = 5,
                 dense_init: DenseInit = "glorot") -> None:
        super().__init__()
        self.n_tasks = n_tasks
        self.embedding = FusedEmbedding(vocab_sizes, emb_dim)
        d = self.embedding.out_dim
        self.level1 = CGCLevel(d, n_tasks, EXPERT[:2], last=False, dense_init=dense_init)
        self.level2 = CGCLevel(EXPERT[1], n_tasks, EXPERT[2:], last=True, dense_init=dense_init)
        self.towers = FusedTowers(EXPERT[-1], n_tasks, MOE_TOWER, MOE_TOWER_DROP, dense_init)
        self.heads = TaskHeads(n_tasks, MOE_TOWER[-1], dense_init)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        v = self.embedding(ids)  # (B, d)
        task_in = v.unsqueeze(0).expand(self.n_tasks, -1, -1)  # (T, B, d)
        h, s = self.level1(task_in, v)  # (T, B, 32), (B, 32)
        h, _ = self.level2(h, s)  # (T, B, 16)
        return self.heads(self.towers(h))  # (B, T)


# "AITM-cond": AITM with step-conditional heads (AITMConfig.head = "conditional"; docs/models.md)
# "AITM-gated", "AITM-cond-gated": the transfer as a gated residual from 0 (AITMConfig.transfer)
# "AITM-experts": AITM-cond-gated whose towers' first layers are 2 x T shared experts under a
# gate per task, as MMoE's (AITMConfig.experts)
# "AITM-detach": AITM-cond-gated whose transfer carries no gradient back into the earlier task's
# tower (AITMConfig.transfer_detach)
NEURAL_MODELS = ("MLP", "ESMM", "OMoE", "MMoE", "PLE", "AITM", "AITM-cond", "AITM-gated", "AITM-cond-gated",
                 "AITM-experts", "AITM-detach")
# variants the benches run only when named (--models): not in their default lists, which stay as long
VARIANT_MODELS = ("AITM-gated", "AITM-cond-gated", "AITM-experts", "AITM-detach")


def build_model(name: str, vocab_sizes: Sequence[int], n_tasks: int, dense_init: DenseInit = "glorot") -> nn.Module:
    """A network by its name in the paper's tables, with the paper's sizes; ``dense_init`` is how
    its dense layers start (``aitm.layers.DenseInit``)."""
    vocab = tuple(vocab_sizes)
    di = dense_init
    check_dense_init(di)
    builders: dict[str, Any] = {
        "MLP": lambda: SingleTaskMLP(vocab, n_tasks, dense_init=di),
        "ESMM": lambda: ESMM(vocab, n_tasks, dense_init=di),
        "OMoE": lambda: MoE(vocab, n_tasks, multi_gate=False, dense_init=di),
        "MMoE": lambda: MoE(vocab, n_tasks, multi_gate=True, dense_init=di),
        "PLE": lambda: PLE(vocab, n_tasks, dense_init=di),
        "AITM": lambda: AITM(AITMConfig(vocab_sizes=vocab, n_tasks=n_tasks, dense_init=di)),
        "AITM-cond": lambda: AITM(AITMConfig(vocab_sizes=vocab, n_tasks=n_tasks, dense_init=di, head="conditional")),
        "AITM-gated": lambda: AITM(AITMConfig(vocab_sizes=vocab, n_tasks=n_tasks, dense_init=di, transfer="gated")),
        "AITM-cond-gated": lambda: AITM(AITMConfig(vocab_sizes=vocab, n_tasks=n_tasks, dense_init=di,
                                                   head="conditional", transfer="gated")),
        "AITM-experts": lambda: AITM(AITMConfig(vocab_sizes=vocab, n_tasks=n_tasks, dense_init=di,
                                                head="conditional", transfer="gated", experts=2 * n_tasks)),
        "AITM-detach": lambda: AITM(AITMConfig(vocab_sizes=vocab, n_tasks=n_tasks, dense_init=di,
                                               head="conditional", transfer="gated", transfer_detach=True)),
    }
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose from {NEURAL_MODELS}")
    model: nn.Module = builders[name]()
    return model


@dataclass
class LightGBMBaseline:
    """One LightGBM classifier per task on categorical ids, early-stopped on validation AUC."""

    seed: int = 0
    num_threads: int = 2
    params: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.boosters: list[Any] = []

    def fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> LightGBMBaseline:
        """Train on ids (N, F) and labels (N, T), validating on (M, F), (M, T)."""
        import lightgbm as lgb  # imported here: the streaming trainer never needs it

        params: dict[str, Any] = {
            "objective": "binary",
            "metric": "auc",
            "learning_rate": 0.05,
            "num_leaves": 31,
            "min_data_in_leaf": 100,
            "feature_fraction": 0.8,
            "bagging_fraction": 0.8,
            "bagging_freq": 1,
            "lambda_l2": 1.0,
            "cat_smooth": 10.0,
            "seed": self.seed,
            "num_threads": self.num_threads,
            "verbosity": -1,
        }
        params.update(self.params or {})
        cats = list(range(x.shape[1]))
        self.boosters = []
        for t in range(y.shape[1]):
            train = lgb.Dataset(x, y[:, t], categorical_feature=cats, free_raw_data=False)
            val = lgb.Dataset(x_val, y_val[:, t], reference=train, categorical_feature=cats)
            booster = lgb.train(
                params,
                train,
                num_boost_round=1000,
                valid_sets=[val],
                callbacks=[lgb.early_stopping(30, verbose=False)],
            )
            self.boosters.append(booster)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (N, T), each task's booster at its best iteration."""
        cols = [b.predict(x, num_iteration=b.best_iteration) for b in self.boosters]
        return np.stack(cols, axis=1)
