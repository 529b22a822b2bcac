"""AITM (Xi et al., KDD'21): multi-step conversions with Adaptive Information Transfer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn

from aitm.layers import (
    DenseInit,
    FastDropout,
    FusedEmbedding,
    FusedTowers,
    check_dense_init,
    dense,
    end_to_end_logits,
    glorot_uniform_,
)

# what a task's head predicts (docs/models.md, "The output parametrisation"): "joint" - the
# paper's - each end-to-end probability by its own sigmoid, the funnel order only encouraged by
# the calibrator; "conditional" - each head a step conditional, p_t = p_(t-1) * sigmoid(c_t) as
# ESMM's, the order held by construction
AITMHead = Literal["joint", "conditional"]
AITM_HEADS: tuple[AITMHead, ...] = ("joint", "conditional")
# how task t's representation takes in the information transferred from task t-1 (docs/models.md,
# "The transfer as a gated residual"): "ait" - the paper's - z_t = AIT(q_t, p_(t-1)); "gated" -
# z_t = q_t + g_t * AIT(q_t, p_(t-1)), g_t a per-unit gate starting at 0, so the model starts as
# per-task towers under the heads (with the conditional head exactly ESMM's product) and the
# transfer enters only as far as the loss asks for it
AITMTransfer = Literal["ait", "gated"]
AITM_TRANSFERS: tuple[AITMTransfer, ...] = ("ait", "gated")


@dataclass(frozen=True)
class AITMConfig:
    """Sizes of an AITM model; defaults are the paper's (Table 4 and the original code)."""

    vocab_sizes: tuple[int, ...]  # per field, including the out-of-vocabulary id 0
    n_tasks: int = 4  # click, application, approval, activation
    emb_dim: int = 5  # d: small because most fields have few values
    tower_dims: tuple[int, ...] = (128, 64, 32)  # f_t; the last width is k of the AIT module
    dropouts: tuple[float, ...] = (0.1, 0.3, 0.3)  # one per tower layer
    transfer_dim: int = 32  # g_{t-1}: one ReLU layer; must equal k so p and q can be mixed
    # how towers, transfers and heads start (aitm/layers.py DenseInit): "glorot" as Keras' Dense
    # (the original code; +0.005-0.007 AUC) or "torch", nn.Linear's default, which the streaming
    # trainer keeps (TRAINER_DENSE_INIT): its served-score smoothing was tuned on it. Checkpoints
    # written before this field load with the default (the init no longer matters once loaded)
    dense_init: DenseInit = "glorot"
    # "joint" (the paper's: head t's logit is p_t's) or "conditional" (head t's logit is the step
    # conditional's, p_t = p_(t-1) * sigmoid(c_t)): AITM_HEADS. Checkpoints written before this
    # field load as "joint", the head they were trained with
    head: AITMHead = "joint"
    # "ait" (the paper's: z_t = AIT(q_t, p_(t-1))) or "gated" (z_t = q_t + g_t * AIT(q_t, p_(t-1)),
    # g_t starting at 0): AITM_TRANSFERS. Checkpoints written before this field load as "ait"
    transfer: AITMTransfer = "ait"
    # 0 (the paper's shared embeddings under the towers) or E shared experts of the towers' first
    # layers (tower_dims[:-1]) mixed per task by MMoE's gates, the towers keeping their last layer
    # (docs/models.md, "Shared experts under AITM's towers"). Checkpoints written before this field
    # load with 0, the shape they were trained with
    experts: int = 0
    # False (the paper's) or True: the information task t takes from task t-1 carries no gradient
    # back into task t-1's tower (z_(t-1) detached before the transfer layer), so a later task
    # learns to read the earlier one's representation, not to reshape it (docs/models.md, "The
    # transfer without a backward path"). The forward pass is the same either way. Checkpoints
    # written before this field load with False, the shape they were trained with
    transfer_detach: bool = False

    def __post_init__(self) -> None:
        check_dense_init(self.dense_init)
        if self.head not in AITM_HEADS:
            raise ValueError(f"unknown AITM head {self.head!r}; choose from {AITM_HEADS}")
        if self.transfer not in AITM_TRANSFERS:
            raise ValueError(f"unknown AITM transfer {self.transfer!r}; choose from {AITM_TRANSFERS}")
        if self.experts < 0 or (self.experts and len(self.tower_dims) < 2):
            raise ValueError(f"experts must be 0, or > 0 with at least two tower layers; got {self.experts}")
        if self.n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {self.n_tasks}")
        if self.transfer_dim != self.tower_dims[-1]:
            raise ValueError(
                f"transfer_dim ({self.transfer_dim}) must equal the last tower width "
                f"({self.tower_dims[-1]}): AIT mixes p_(t-1) and q_t in one space"
            )


class AIT(nn.Module):
    """Adaptive Information Transfer: attention over (q_t, p_{t-1}), bias-free q/k/v maps."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(k, 3 * k, bias=False)  # h2 (query), h3 (key), h1 (value) fused
        self.k = k

    def forward(self, q_t: torch.Tensor, p_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, k), (B, k) -> z_t (B, k) and the weights (B, 2) on (q_t, p_{t-1})."""
        w, value = self.weights_and_values(q_t, p_prev)
        z = (w.unsqueeze(-1) * value).sum(1)  # (B, k)
        return z, w

    def weights_and_values(self, q_t: torch.Tensor, p_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The softmax weights (B, 2) and the values h1(u) (B, 2, k) of u in (q_t, p_{t-1})."""
        u = torch.stack((q_t, p_prev), dim=1)  # (B, 2, k)
        query, key, value = self.qkv(u).split(self.k, dim=-1)  # 3 x (B, 2, k)
        scores = (query * key).sum(-1) / math.sqrt(self.k)  # (B, 2): each input's own q.k
        return torch.softmax(scores, dim=1), value  # (B, 2), (B, 2, k)


class AITM(nn.Module):
    """Shared embedding, a tower per task, AIT from task t-1 to t, a logit head per task.

    ``forward`` returns end-to-end logits (B, T); ``forward_with_weights`` also returns the
    AIT weight on p_{t-1} for tasks 2..T, shape (B, T-1). ``head_logits`` are the heads' own
    logits: the end-to-end ones (``head="joint"``) or the step conditionals c_t
    (``head="conditional"``), whose end-to-end logits are those of prod_{s<=t} sigmoid(c_s).
    """

    def __init__(self, config: AITMConfig) -> None:
        super().__init__()
        self.config = config
        t, k = config.n_tasks, config.tower_dims[-1]
        self.embedding = FusedEmbedding(config.vocab_sizes, config.emb_dim)
        init = config.dense_init
        d = self.embedding.out_dim
        if config.experts:  # MMoE's experts (the towers' first layers) and a gate per task
            self.experts: FusedTowers | None = FusedTowers(
                d, config.experts, config.tower_dims[:-1], config.dropouts[:-1], init)
            self.expert_gates: nn.Linear | None = nn.Linear(d, t * config.experts)
            self.towers = FusedTowers(config.tower_dims[-2], t, config.tower_dims[-1:], config.dropouts[-1:], init)
        else:
            self.experts = self.expert_gates = None
            self.towers = FusedTowers(d, t, config.tower_dims, config.dropouts, init)
        self.transfers = nn.ModuleList(
            nn.Sequential(dense(k, config.transfer_dim, init), nn.ReLU(), FastDropout(config.dropouts[-1]))
            for _ in range(t - 1)
        )
        self.aits = nn.ModuleList(AIT(k) for _ in range(t - 1))
        # transfer="gated": one gate per unit of z_t, t = 2..T, at 0 (the start is the towers alone)
        self.transfer_gate = nn.Parameter(torch.zeros(t - 1, k)) if config.transfer == "gated" else None
        if init == "glorot":
            self.head_w = nn.Parameter(glorot_uniform_(torch.empty(t, k), k, 1))  # T Dense(1) heads
        else:
            self.head_w = nn.Parameter(torch.empty(t, k).uniform_(-1 / math.sqrt(k), 1 / math.sqrt(k)))
        self.head_b = nn.Parameter(torch.zeros(t))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Local feature ids (B, F) int64 -> logits (B, T)."""
        return self.forward_with_weights(ids)[0]

    def forward_with_weights(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T) and the AIT weight on p_{t-1} for t = 2..T, (B, T-1)."""
        logits, w_prev = self.head_logits_with_weights(ids)  # (B, T), (B, T-1)
        if self.config.head == "conditional":
            logits = end_to_end_logits(logits)  # (B, T): p_t = prod_{s<=t} sigmoid(c_s)
        return logits, w_prev

    def head_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The heads' own logits (B, T): end-to-end (joint) or the step conditionals c_t."""
        return self.head_logits_with_weights(ids)[0]

    def transfer_step(
        self, i: int, q_t: torch.Tensor, z_prev: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transition ``i`` (task t-1 -> t, t = i + 2): z_t (B, k) from the tower's q_t (B, k) and
        z_(t-1) (B, k), with the AIT weights (B, 2) on (q_t, p_(t-1)) and the values h1(u) (B, 2, k)
        they weigh (``bench models`` reads both: how much of z_t each input makes up)."""
        prev = z_prev.detach() if self.config.transfer_detach else z_prev
        p_prev = self.transfers[i](prev)  # (B, k)
        w, value = cast(AIT, self.aits[i]).weights_and_values(q_t, p_prev)  # (B, 2), (B, 2, k)
        z = (w.unsqueeze(-1) * value).sum(1)  # (B, k): AIT's output
        if self.transfer_gate is not None:
            z = q_t + self.transfer_gate[i] * z  # (B, k): the tower plus the gated transfer
        return z, w, value

    def head_logits_with_weights(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The heads' own logits (B, T) and the AIT weight on p_{t-1} for t = 2..T, (B, T-1)."""
        v = self.embedding(ids)  # (B, F*d)
        q = self.towers(self.tower_inputs(v))  # (T, B, k)
        zs = [q[0]]  # z_1 = q_1
        weights = []
        for i in range(len(self.aits)):
            z, w, _ = self.transfer_step(i, q[i + 1], zs[-1])  # (B, k), (B, 2)
            zs.append(z)
            weights.append(w[:, 1])  # (B,)
        z_all = torch.stack(zs, dim=1)  # (B, T, k)
        logits = (z_all * self.head_w).sum(-1) + self.head_b  # (B, T): the heads' logits
        no_weights = logits.new_zeros(logits.shape[0], 0)  # (B, 0) when T = 1
        w_prev = torch.stack(weights, dim=1) if weights else no_weights  # (B, T-1)
        return logits, w_prev

    def tower_inputs(self, v: torch.Tensor) -> torch.Tensor:
        """The embeddings (B, F*d) as the towers read them: shared (B, F*d), or with experts each
        task's gated mixture of the experts' outputs (T, B, h)."""
        if self.experts is None or self.expert_gates is None:
            return v
        out = self.experts(v)  # (E, B, h)
        gates = self.expert_gates(v).view(v.shape[0], self.config.n_tasks, self.config.experts)  # (B, T, E)
        gates = torch.softmax(gates, dim=-1).transpose(0, 1)  # (T, B, E)
        return torch.einsum("tbe,ebh->tbh", gates, out)  # (T, B, h)

    def regularized_parameters(self) -> list[torch.Tensor]:
        """Parameters under L2 in the original code: the embeddings and the attention maps."""
        return [
            self.embedding.table.weight,
            *(m.qkv.weight for m in self.aits if isinstance(m, AIT)),
        ]
