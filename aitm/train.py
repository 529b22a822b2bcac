"""Model-agnostic training: optimizer, one step, prediction, ``fit`` with early stopping.

Works for any ``nn.Module`` mapping ids (B, F) to end-to-end logits (B, T).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from aitm.evaluate import auc
from aitm.loss import ALPHA, aitm_loss


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults are the paper's (Adam, lr 1e-3, batch 2000, L2 1e-6)."""

    lr: float = 1e-3
    batch_size: int = 2000
    l2: float = 1e-6  # on embeddings and attention maps, as in the original code
    alpha: float = ALPHA  # calibrator weight; 0 for the baselines
    max_epochs: int = 10
    patience: int = 2  # validation checks without a better sum of AUCs before stopping
    evals_per_epoch: int = 1
    seed: int = 0
    eval_batch_size: int = 50_000


@dataclass(frozen=True)
class Split:
    """Feature ids (N, F) int64 and labels (N, T) float32, as tensors on one device."""

    ids: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_numpy(cls, ids: np.ndarray, labels: np.ndarray, device: str | torch.device = "cpu") -> Split:
        return cls(
            torch.as_tensor(ids, dtype=torch.int64, device=device),
            torch.as_tensor(labels, dtype=torch.float32, device=device),
        )

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class FitResult:
    """What ``fit`` did: the best validation AUCs, when they happened, and the throughput."""

    best_val_auc: list[float]
    best_check: int
    checks: int
    steps: int
    train_seconds: float
    history: list[list[float]] = field(default_factory=list)  # validation AUCs per check


def pick_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def regularized_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The model's own choice if it has one, else every embedding table."""
    own: Callable[[], list[torch.Tensor]] | None = getattr(model, "regularized_parameters", None)
    if own is not None:
        return own()
    return [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]


def make_optimizer(model: nn.Module, lr: float = 1e-3, l2: float = 1e-6) -> torch.optim.Optimizer:
    """Adam with L2 only on ``regularized_parameters``; fused kernel (one op for all params)."""
    reg = regularized_parameters(model)
    reg_ids = {id(p) for p in reg}
    rest = [p for p in model.parameters() if id(p) not in reg_ids]
    groups = [{"params": reg, "weight_decay": l2}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.Adam(groups, lr=lr, fused=True)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ids: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    alpha: float = ALPHA,
) -> torch.Tensor:
    """One optimisation step on a batch (B, F), (B, T); returns the detached loss (no sync)."""
    if not model.training:
        model.train()
    logits = model(ids)  # (B, T)
    loss = aitm_loss(logits, labels, mask, weight, alpha)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.inference_mode()
def predict_proba(model: nn.Module, ids: torch.Tensor, batch_size: int = 50_000) -> np.ndarray:
    """End-to-end probabilities (N, T) in eval mode."""
    model.eval()
    out = [
        torch.sigmoid(model(ids[i : i + batch_size])).float().cpu() for i in range(0, len(ids), batch_size)
    ]
    return torch.cat(out).numpy()


def task_aucs(labels: np.ndarray, probs: np.ndarray) -> list[float]:
    """AUC of every task column of (N, T) labels and predictions."""
    return [auc(labels[:, t], probs[:, t]) for t in range(labels.shape[1])]


def evaluate(model: nn.Module, split: Split, batch_size: int = 50_000) -> list[float]:
    """Per-task AUC of ``model`` on ``split``."""
    probs = predict_proba(model, split.ids, batch_size)
    return task_aucs(split.labels.cpu().numpy(), probs)


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    config: TrainConfig,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Train with shuffled mini-batches; keep the state with the best validation sum of AUCs."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    optimizer = make_optimizer(model, config.lr, config.l2)
    n = len(train)
    steps_per_epoch = max(1, n // config.batch_size)  # drop the ragged last batch
    check_every = max(1, steps_per_epoch // max(1, config.evals_per_epoch))
    best_sum, best_state, best_aucs, best_check = -np.inf, None, [float("nan")], 0
    history: list[list[float]] = []
    steps, check, train_seconds = 0, 0, 0.0
    stop = False
    for _epoch in range(config.max_epochs):
        perm = torch.randperm(n, generator=gen).to(train.ids.device)  # (N,)
        start = time.perf_counter()
        for s in range(steps_per_epoch):
            idx = perm[s * config.batch_size : (s + 1) * config.batch_size]  # (B,)
            train_step(model, optimizer, train.ids[idx], train.labels[idx], alpha=config.alpha)
            steps += 1
            if steps % check_every and s != steps_per_epoch - 1:
                continue
            train_seconds += time.perf_counter() - start
            aucs = evaluate(model, val, config.eval_batch_size)
            history.append(aucs)
            check += 1
            total = float(np.nansum(aucs))
            if log is not None:
                rounded = [round(a, 4) for a in aucs]
                log(f"check {check} step {steps}: val AUC {rounded} sum {total:.4f}")
            if total > best_sum:
                best_sum, best_aucs, best_check = total, aucs, check
                best_state = copy.deepcopy(model.state_dict())
            elif check - best_check >= config.patience:
                stop = True
                break
            start = time.perf_counter()
        if stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(best_aucs, best_check, check, steps, train_seconds, history)
