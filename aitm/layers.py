"""Blocks shared by AITM and the baselines: fused embedding, fused towers, fast dropout."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

_INT16_SPAN = 65536
EMBEDDING_INIT_STD = 0.1  # a new embedding row is drawn from N(0, this^2)


class FastDropout(nn.Module):
    """Inverted dropout whose Bernoulli mask comes from 16-bit random integers.

    ``torch.rand`` draws 4 bytes per element and ``F.dropout``'s Bernoulli kernel is slower still;
    here one int64 draw gives four int16 uniforms, compared with a threshold. The keep
    probability is exact up to 1/65536, the mask is fresh every call and inference is identity.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = p
        # drop when the int16 uniform (range -32768..32767) is below this threshold
        self.threshold = -32768 + round(p * _INT16_SPAN)
        self.scale = 1.0 / (1.0 - p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
        words.random_(-(2**63), None)  # full 64-bit range: every int16 lane is uniform
        keep = words.view(torch.int16)[:n].view(x.shape) >= self.threshold  # (*x.shape) bool
        return x * (keep.to(x.dtype) * self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# how the dense layers start: "glorot" as Keras' Dense (the original AITM code; +0.005-0.007 AUC
# offline and online, docs/models.md) or "torch", nn.Linear's default (main before issue 17; the
# streaming trainer keeps it until the served-score smoothing is re-tuned, TRAINER_DENSE_INIT)
DenseInit = Literal["glorot", "torch"]
DENSE_INITS: tuple[DenseInit, ...] = ("glorot", "torch")


def check_dense_init(init: str) -> None:
    """Raise ``ValueError`` unless ``init`` is one of ``DENSE_INITS``."""
    if init not in DENSE_INITS:
        raise ValueError(f"unknown dense init {init!r}; choose from {DENSE_INITS}")


def glorot_uniform_(w: torch.Tensor, fan_in: int, fan_out: int) -> torch.Tensor:
    """Glorot-uniform init in place, U(+-sqrt(6 / (fan_in + fan_out))): Keras' default, which the
    original AITM code relies on. torch's ``nn.Linear`` default, U(+-1/sqrt(fan_in)), is 1.6-2.4x
    narrower on AITM's layers and cost 0.004-0.006 AUC on every converting step (docs/models.md)."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return w.uniform_(-bound, bound)


def dense(fan_in: int, fan_out: int, init: DenseInit = "glorot") -> nn.Linear:
    """``nn.Linear`` with Glorot-uniform weights and zero bias (Keras' ``Dense`` default), or with
    ``nn.Linear``'s own default (weights and bias U(+-1/sqrt(fan_in))) when ``init="torch"``."""
    check_dense_init(init)
    layer = nn.Linear(fan_in, fan_out)
    if init == "glorot":
        glorot_uniform_(layer.weight, fan_in, fan_out)
        nn.init.zeros_(layer.bias)
    return layer


def end_to_end_logits(cond_logits: torch.Tensor) -> torch.Tensor:
    """Conditional step logits (B, T) -> logits of the products p_t = prod_{s<=t} sigmoid(c_s), (B, T).

    ESMM's output, and AITM's with ``head="conditional"``. In log space: log p_t is a cumulative
    sum of log-sigmoids (never underflows), log(1 - p_t) = log(-expm1(log p_t)) (log1mexp, exact
    near 0), log p_t capped at -1e-6 so a saturated chain stays finite (logit <= 13.8).
    """
    log_p = torch.cumsum(F.logsigmoid(cond_logits), dim=1).clamp(max=-1e-6)  # (B, T) log p
    return log_p - torch.log(-torch.expm1(log_p))  # logit = log p - log(1 - p)


class FusedEmbedding(nn.Module):
    """All categorical fields in one table: field ``i``'s local id ``j`` is row offset[i] + j."""

    def __init__(self, vocab_sizes: Sequence[int], dim: int, copies: int = 1) -> None:
        super().__init__()
        if not vocab_sizes or min(vocab_sizes) < 1:
            raise ValueError(f"every field needs a vocabulary of at least 1, got {vocab_sizes}")
        self.n_fields = len(vocab_sizes)
        self.dim = dim
        self.copies = copies  # >1 gives each task its own embedding (single-task baselines)
        offsets = torch.tensor([0, *list(vocab_sizes)[:-1]], dtype=torch.int64).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)  # (F,)
        self.table = nn.Embedding(int(sum(vocab_sizes)), dim * copies)
        nn.init.normal_(self.table.weight, std=EMBEDDING_INIT_STD)

    @property
    def out_dim(self) -> int:
        """Width of one copy of the concatenated field embeddings."""
        return self.n_fields * self.dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Local ids (B, F) -> (B, F*d), or (copies, B, F*d) when copies > 1."""
        offsets: torch.Tensor = self.offsets  # type: ignore[assignment]
        emb = self.table(ids + offsets)  # (B, F, d*copies)
        if self.copies == 1:
            return emb.flatten(1)  # (B, F*d)
        b = ids.shape[0]
        emb = emb.view(b, self.n_fields, self.copies, self.dim)  # (B, F, C, d)
        return emb.permute(2, 0, 1, 3).reshape(self.copies, b, self.out_dim)  # (C, B, F*d)


class FusedTowers(nn.Module):
    """``n`` independent MLP towers (Linear, ReLU, dropout per layer) run as batched matmuls.

    Input is either shared (B, in) or one per tower (n, B, in); output is (n, B, dims[-1]).
    Weights start Glorot-uniform and biases at zero, as Keras' ``Dense`` (``glorot_uniform_``), or
    with ``init="torch"`` both U(+-1/sqrt(fan_in)) as ``nn.Linear``'s default.
    """

    def __init__(
        self, in_dim: int, n: int, dims: Sequence[int], dropouts: Sequence[float], init: DenseInit = "glorot"
    ) -> None:
        super().__init__()
        if len(dims) != len(dropouts):
            raise ValueError(f"one dropout per layer: dims={dims}, dropouts={dropouts}")
        check_dense_init(init)
        self.n = n
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.drops = nn.ModuleList(FastDropout(p) for p in dropouts)
        fan_in = in_dim
        for width in dims:
            if init == "glorot":
                self.weights.append(nn.Parameter(glorot_uniform_(torch.empty(n, fan_in, width), fan_in, width)))
                self.biases.append(nn.Parameter(torch.zeros(n, 1, width)))
            else:
                bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init
                self.weights.append(nn.Parameter(torch.empty(n, fan_in, width).uniform_(-bound, bound)))
                self.biases.append(nn.Parameter(torch.empty(n, 1, width).uniform_(-bound, bound)))
            fan_in = width
        self.out_dim = fan_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (w, b, drop) in enumerate(zip(self.weights, self.biases, self.drops, strict=True)):
            if i == 0 and h.dim() == 2:
                # shared input: one wide matmul instead of n copies of the input
                n, fan_in, width = w.shape
                wide = w.permute(1, 0, 2).reshape(fan_in, n * width)  # (in, n*w)
                h = (h @ wide).view(-1, n, width).transpose(0, 1) + b  # (n, B, w)
            else:
                h = torch.baddbmm(b, h, w)  # (n, B, w)
            h = drop(torch.relu(h))
        return h
