"""Adam that moves only the embedding rows a step's loss reached (lazy, row-wise), dense Adam elsewhere.

Dense Adam with L2 on a whole embedding table moves *every* row at every step: an untouched row's
gradient is its L2 term alone, which Adam normalises to a step of about ``lr`` towards 0 (measured
in docs/embedding_table.md: 990 of 990 untouched rows changed after one step). A streaming
learner's table then changes wholesale between two model versions, and rarely seen values decay
to 0. Here the table takes sparse gradients (``nn.Embedding(sparse=True)``) and Adam updates the
moments and the weights of the rows in the gradient only ("lazy Adam", the update of
``torch.optim.SparseAdam``, written as a few row-indexed ops: SparseAdam's generic sparse path -
three coalesces, ``sparse_mask``, sparse adds - cost ~7 ms a step on this machine at 500 x 20
look-ups, a fifth of a training step); the L2 term (``l2 * w``, as Adam's coupled
``weight_decay`` adds it) is added to those rows' gradients only. Every other parameter (towers,
attention, heads: small and dense) keeps the fused dense Adam, with L2 on
``regularized_parameters`` as before.

A row is in a step when the loss reached it: the sparse gradient is filtered to rows with a
non-zero gradient, so a row only looked up for scoring in the same forward pass (test-then-train
scores rows it does not train on) is not moved. ``touched_rows`` gives them, before ``step``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from aitm.train import regularized_parameters


class LazyAdam:
    """Row-wise Adam on ``table`` (made sparse here) plus fused ``Adam`` on the rest of ``model``.

    ``state`` maps each parameter to its optimizer state (``exp_avg``, ``exp_avg_sq``, ``step``),
    as ``torch.optim.Optimizer.state`` does."""

    def __init__(self, model: nn.Module, table: nn.Embedding, lr: float = 1e-3, l2: float = 1e-6,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        table.sparse = True
        self.table = table.weight
        self.lr, self.l2, self.betas, self.eps = lr, l2, betas, eps
        reg = [p for p in regularized_parameters(model) if p is not self.table]
        reg_ids = {id(p) for p in reg} | {id(self.table)}
        rest = [p for p in model.parameters() if id(p) not in reg_ids]
        groups = [{"params": reg, "weight_decay": l2}, {"params": rest, "weight_decay": 0.0}]
        self.dense = torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, fused=True)
        self.rows: dict[str, Any] = {}  # the table's state: step, exp_avg, exp_avg_sq (made at the first step)

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps, the table's rows and every dense group alike."""
        self.lr = lr
        for group in self.dense.param_groups:
            group["lr"] = lr

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        out: dict[torch.Tensor, dict[str, Any]] = dict(self.dense.state)
        if self.rows:
            out[self.table] = self.rows
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.table.grad = None
        self.dense.zero_grad(set_to_none)

    @torch.no_grad()
    def touched_rows(self) -> torch.Tensor:
        """(R,) the table rows the next ``step`` moves (sorted, unique): those with a non-zero
        gradient. Coalesces and filters the table's gradient in place."""
        g = self.table.grad
        if g is None:
            return torch.zeros(0, dtype=torch.int64, device=self.table.device)
        if not g.is_sparse:
            raise RuntimeError("LazyAdam needs the table's sparse gradient (nn.Embedding(sparse=True))")
        if g.is_coalesced():
            return g.indices()[0]
        g = g.coalesce()
        idx, vals = g.indices()[0], g.values()  # (R,), (R, d)
        keep = vals.ne(0).any(1)
        if not bool(keep.all()):
            idx, vals = idx[keep], vals[keep]
            g = torch.sparse_coo_tensor(idx[None], vals, g.shape, is_coalesced=True, check_invariants=False)
        self.table.grad = g
        return idx

    @torch.no_grad()
    def step(self) -> None:
        """One step: the touched rows (with their L2 term) and every dense parameter."""
        rows = self.touched_rows()
        if rows.numel():
            g = self.table.grad
            assert g is not None
            w = self.table
            grad = g.values() + self.l2 * w[rows] if self.l2 else g.values()  # (R, d)
            st = self.rows
            if not st:
                st.update(step=0, exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w))
            st["step"] += 1
            b1, b2 = self.betas
            m = st["exp_avg"][rows].lerp_(grad, 1 - b1)  # (R, d)
            v = st["exp_avg_sq"][rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            st["exp_avg"][rows], st["exp_avg_sq"][rows] = m, v
            size = self.lr * math.sqrt(1 - b2 ** st["step"]) / (1 - b1 ** st["step"])  # SparseAdam's form
            w[rows] -= size * m / (v.sqrt() + self.eps)
        self.dense.step()

    def state_dict(self) -> dict[str, Any]:
        return {"rows": dict(self.rows), "dense": self.dense.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Our own state, or that of the dense ``aitm.train.make_optimizer`` Adam a checkpoint from
        before the lazy rows holds (its first parameter is the table: its moments move here)."""
        if "rows" in state and "dense" in state:
            self.rows = self._rows_from(state["rows"])
            self.dense.load_state_dict(state["dense"])
            return
        flat = [i for g in state["param_groups"] for i in g["params"]]  # the old Adam's order
        old = state["state"]
        self.rows = self._rows_from(old[flat[0]]) if flat and flat[0] in old else {}
        dense = self.dense.state_dict()
        dense["state"] = {new: old[i] for new, i in enumerate(flat[1:]) if i in old}
        self.dense.load_state_dict(dense)

    def _rows_from(self, st: Mapping[str, Any]) -> dict[str, Any]:
        if not st:
            return {}
        w = self.table
        return {"step": int(float(st["step"])), "exp_avg": torch.as_tensor(st["exp_avg"]).to(w).clone(),
                "exp_avg_sq": torch.as_tensor(st["exp_avg_sq"]).to(w).clone()}
