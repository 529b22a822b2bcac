"""Baselines: shapes, ESMM's product structure, independence of single-task models, LightGBM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aitm.baselines import (
    NEURAL_MODELS,
    LightGBMBaseline,
    SingleTaskMLP,
    TaskHeads,
    build_model,
    end_to_end_logits,
)
from aitm.evaluate import auc
from aitm.layers import FusedTowers
from tests.modelhelpers import random_ids

VOCAB = (7, 3, 11, 5)


def _ids(b: int) -> torch.Tensor:
    return random_ids(VOCAB, b)


@pytest.mark.parametrize("name", NEURAL_MODELS)
@pytest.mark.parametrize("n_tasks", [2, 4])
def test_every_model_maps_ids_to_task_logits(name: str, n_tasks: int) -> None:
    model = build_model(name, VOCAB, n_tasks).eval()
    out = model(_ids(13))
    assert out.shape == (13, n_tasks)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NEURAL_MODELS)
def test_gradients_reach_every_parameter(name: str) -> None:
    model = build_model(name, VOCAB, 4).eval()
    gate = getattr(model, "transfer_gate", None)
    if gate is not None:  # a gated transfer starts closed: its weights learn once the gate opens
        with torch.no_grad():
            gate.fill_(0.1)
    model(_ids(64)).sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}.{pname}"


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build_model("DeepFM", VOCAB, 4)


def test_esmm_logits_are_products_of_conditionals() -> None:
    cond = torch.randn(50, 4, dtype=torch.float64) * 3
    p = torch.sigmoid(end_to_end_logits(cond))
    torch.testing.assert_close(p, torch.cumprod(torch.sigmoid(cond), dim=1))


def test_esmm_predictions_are_monotone() -> None:
    model = build_model("ESMM", VOCAB, 4).eval()
    p = torch.sigmoid(model(_ids(200)))
    assert (p[:, 1:] <= p[:, :-1] + 1e-6).all()


def test_single_task_models_share_nothing() -> None:
    model = SingleTaskMLP(VOCAB, n_tasks=3).eval()
    model(_ids(64))[:, 0].sum().backward()  # the first task's loss only
    emb = model.embedding.table.weight.grad
    assert emb is not None
    d = model.embedding.dim
    assert emb[:, :d].abs().sum() > 0 and emb[:, d:].abs().sum() == 0
    for w in model.towers.weights:
        assert w.grad is not None
        assert w.grad[0].abs().sum() > 0 and w.grad[1:].abs().sum() == 0


def test_lightgbm_learns_a_categorical_signal() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, size=(6000, 3))
    p1 = 0.05 + 0.5 * (x[:, 0] < 5)
    y1 = rng.random(6000) < p1
    y2 = y1 & (rng.random(6000) < 0.5 + 0.4 * (x[:, 1] < 10))
    y = np.stack([y1, y2], axis=1).astype(np.int8)
    model = LightGBMBaseline(seed=0).fit(x[:4000], y[:4000], x[4000:5000], y[4000:5000])
    p = model.predict_proba(x[5000:])
    assert p.shape == (1000, 2)
    assert auc(y[5000:, 0], p[:, 0]) > 0.75
    assert auc(y[5000:, 1], p[:, 1]) > 0.7


@pytest.mark.parametrize("name", ["MLP", "ESMM", "OMoE", "MMoE", "PLE", "AITM"])
def test_dense_init_reaches_every_tower_and_head(name: str) -> None:
    """"torch": towers' weights and biases U(+-1/sqrt(fan_in)) and heads U(+-1/sqrt(k)) with zero
    bias, as before issue 17; "glorot" (the default): zero tower and head biases."""
    torch.manual_seed(0)
    old = build_model(name, (5, 7, 3), 4, dense_init="torch")
    torch.manual_seed(0)
    new = build_model(name, (5, 7, 3), 4)
    towers = [m for m in old.modules() if isinstance(m, FusedTowers)]
    assert towers
    for t in towers:
        for w, b in zip(t.weights, t.biases, strict=True):
            bound = 1 / math.sqrt(w.shape[1])
            assert 0 < float(b.detach().abs().max()) <= bound and float(w.detach().abs().max()) <= bound
    for t in (m for m in new.modules() if isinstance(m, FusedTowers)):
        assert all(float(b.detach().abs().max()) == 0 for b in t.biases)
    heads = [m for m in old.modules() if isinstance(m, TaskHeads)]
    for h in heads:  # AITM has its own heads: covered in test_model.py
        k = h.w.shape[1]
        top = float(h.w.detach().abs().max())
        assert 0.5 / math.sqrt(k) < top <= 1 / math.sqrt(k) and float(h.b.detach().abs().max()) == 0
