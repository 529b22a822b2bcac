"""Baselines: shapes, ESMM's product structure, independence of single-task models, LightGBM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aitm.baselines import (
    NEURAL_MODELS,
    LightGBMBaseline,
    SingleTaskMLP,
    build_model,
    end_to_end_logits,
)
from aitm.evaluate import auc

VOCAB = (7, 3, 11, 5)


def _ids(b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.stack([torch.randint(0, v, (b,), generator=g) for v in VOCAB], dim=1)


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
