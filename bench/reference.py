"""A straightforward reference AITM for the ablation bench (not the product model).

Written from the paper and the original TensorFlow code (github xidongbo/AITM, ``AITM.py`` and
``AITM_standard.py``) in plain PyTorch layers: an embedding table per field initialised
N(0, 0.01); per-task towers of Dense + ReLU + dropout with Keras' defaults (Glorot-uniform
weights, zero biases); the transfer layer g (Dense + ReLU + dropout); one bias-free query/key/
value triple initialised N(0, 0.01) and shared by every transition (``AITM_standard.py``); a
Dense(1) head per task. Each place where the product model differs is a knob of
``ReferenceConfig``, so the bench can move one difference at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ReferenceConfig:
    """The original code's choices; the product's value of each knob is in its comment."""

    emb_std: float = 0.01  # product: 0.1
    dense_init: str = "glorot"  # "glorot" (Keras: Glorot-uniform, zero bias) | "torch" (product)
    attn_init: str = "normal"  # "normal" (N(0, 0.01)) | "torch" (product: nn.Linear default)
    shared_attention: bool = True  # product: one AIT per transition
    transfer_dropout: bool = True  # dropout after g, as the original code (product: same)
    batch_norm: bool = False  # AITM_standard.py's default; AITM.py and the paper have none


def _dense(fan_in: int, width: int, init: str) -> nn.Linear:
    layer = nn.Linear(fan_in, width)
    if init == "glorot":
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    elif init != "torch":
        raise ValueError(f"dense_init must be 'glorot' or 'torch', got {init!r}")
    return layer


class _Attention(nn.Module):
    """The original ``attention``: bias-free Q, K, V maps; softmax over (tower, transfer)."""

    def __init__(self, k: int, init: str) -> None:
        super().__init__()
        self.q, self.k_, self.v = (nn.Linear(k, k, bias=False) for _ in range(3))
        if init == "normal":
            for m in (self.q, self.k_, self.v):
                nn.init.normal_(m.weight, std=0.01)
        elif init != "torch":
            raise ValueError(f"attn_init must be 'normal' or 'torch', got {init!r}")
        self.scale = 1.0 / math.sqrt(k)

    def forward(self, tower: torch.Tensor, transfer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.stack((tower, transfer), dim=1)  # (B, 2, k)
        a = (self.q(u) * self.k_(u)).sum(-1) * self.scale  # (B, 2)
        w = torch.softmax(a, dim=1)  # (B, 2)
        return (w.unsqueeze(-1) * self.v(u)).sum(1), w[:, 1]  # (B, k), (B,)


class ReferenceAITM(nn.Module):
    """AITM as the original code builds it; ``forward`` returns end-to-end logits (B, T)."""

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        n_tasks: int,
        config: ReferenceConfig | None = None,
        emb_dim: int = 5,
        tower_dims: Sequence[int] = (128, 64, 32),
        dropouts: Sequence[float] = (0.1, 0.3, 0.3),
    ) -> None:
        super().__init__()
        cfg = self.config = config or ReferenceConfig()
        self.embeddings = nn.ModuleList(nn.Embedding(v, emb_dim) for v in vocab_sizes)
        for e in self.embeddings:
            assert isinstance(e, nn.Embedding)
            nn.init.normal_(e.weight, std=cfg.emb_std)
        k = tower_dims[-1]

        def block(fan_in: int, width: int, p: float) -> list[nn.Module]:
            layers: list[nn.Module] = [_dense(fan_in, width, cfg.dense_init)]
            if cfg.batch_norm:
                layers.append(nn.BatchNorm1d(width, momentum=0.1))
            return [*layers, nn.ReLU(), nn.Dropout(p)]

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            fan_in = len(vocab_sizes) * emb_dim
            for width, p in zip(tower_dims, dropouts, strict=True):
                layers += block(fan_in, width, p)
                fan_in = width
            return nn.Sequential(*layers)

        self.towers = nn.ModuleList(tower() for _ in range(n_tasks))
        p_last = dropouts[-1] if cfg.transfer_dropout else 0.0
        self.transfers = nn.ModuleList(nn.Sequential(*block(k, k, p_last)) for _ in range(n_tasks - 1))
        n_attn = 1 if cfg.shared_attention else max(1, n_tasks - 1)
        self.attentions = nn.ModuleList(_Attention(k, cfg.attn_init) for _ in range(n_attn))
        self.heads = nn.ModuleList(_dense(k, 1, cfg.dense_init) for _ in range(n_tasks))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward_with_weights(ids)[0]

    def forward_with_weights(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T) and the weight on the transferred p_{t-1} for t = 2..T, (B, T-1)."""
        v = torch.cat([e(ids[:, f]) for f, e in enumerate(self.embeddings)], dim=1)  # (B, F*d)
        z = self.towers[0](v)  # (B, k)
        logits, weights = [self.heads[0](z)], []
        for t in range(1, len(self.towers)):
            attn = self.attentions[0 if len(self.attentions) == 1 else t - 1]
            z, w = attn(self.towers[t](v), self.transfers[t - 1](z))  # (B, k), (B,)
            logits.append(self.heads[t](z))
            weights.append(w)
        no_weights = v.new_zeros(v.shape[0], 0)
        return torch.cat(logits, dim=1), torch.stack(weights, dim=1) if weights else no_weights

    def regularized_parameters(self) -> list[torch.Tensor]:
        """L2 targets of the original code: the embedding tables and the attention maps."""
        out: list[torch.Tensor] = []
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                out.append(m.weight)
            elif isinstance(m, _Attention):
                out += [m.q.weight, m.k_.weight, m.v.weight]
        return out
