"""AITM module: shapes, the AIT weights, fused layers, dropout, and gradient flow through AIT."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aitm.layers import FastDropout, FusedEmbedding, FusedTowers, dense
from aitm.model import AIT, AITM, AITMConfig
from tests.modelhelpers import random_ids

VOCAB = (7, 3, 11, 5)


def _ids(b: int, vocab: tuple[int, ...] = VOCAB, seed: int = 0) -> torch.Tensor:
    return random_ids(vocab, b, seed)


@pytest.mark.parametrize("n_tasks", [1, 2, 4])
def test_forward_shapes_and_weights(n_tasks: int) -> None:
    model = AITM(AITMConfig(vocab_sizes=VOCAB, n_tasks=n_tasks)).eval()
    logits, w = model.forward_with_weights(_ids(9))
    assert logits.shape == (9, n_tasks)
    assert w.shape == (9, n_tasks - 1)
    assert torch.isfinite(logits).all()
    assert ((w > 0) & (w < 1)).all()
    assert torch.equal(model(_ids(9)), logits)


def test_eval_is_deterministic_and_training_uses_dropout() -> None:
    torch.manual_seed(0)
    model = AITM(AITMConfig(vocab_sizes=VOCAB))
    x = _ids(64)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_transfer_dim_must_match_k() -> None:
    with pytest.raises(ValueError, match="transfer_dim"):
        AITMConfig(vocab_sizes=VOCAB, transfer_dim=16)


def test_ait_matches_hand_computation() -> None:
    k = 4
    ait = AIT(k)
    torch.manual_seed(1)
    q, p = torch.randn(3, k), torch.randn(3, k)
    z, w = ait(q, p)
    wq, wk, wv = ait.qkv.weight.split(k, dim=0)  # (k, k) each; no bias anywhere
    assert ait.qkv.bias is None
    s_q = (q @ wq.T * (q @ wk.T)).sum(1) / math.sqrt(k)  # q_t scored by its own query-key
    s_p = (p @ wq.T * (p @ wk.T)).sum(1) / math.sqrt(k)
    w_ref = torch.softmax(torch.stack((s_q, s_p), 1), 1)  # softmax over the two inputs
    z_ref = w_ref[:, :1] * (q @ wv.T) + w_ref[:, 1:] * (p @ wv.T)
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(w.sum(1), torch.ones(3))


def test_gradients_reach_every_parameter() -> None:
    model = AITM(AITMConfig(vocab_sizes=VOCAB)).eval()  # eval: no unit dropped by chance
    model(_ids(32)).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_last_task_loss_reaches_first_tower_through_ait() -> None:
    model = AITM(AITMConfig(vocab_sizes=VOCAB)).eval()
    model(_ids(32))[:, -1].sum().backward()  # only activation's logit
    for w in model.towers.weights:  # (T, in, out): every task's tower gets a gradient
        assert w.grad is not None
        assert all(w.grad[t].abs().sum() > 0 for t in range(4))
    for m in [*model.transfers, *model.aits]:
        for name, param in m.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_fused_embedding_uses_field_offsets() -> None:
    emb = FusedEmbedding((3, 2), dim=2)
    out = emb(torch.tensor([[2, 1]]))  # (1, 4)
    table = emb.table.weight
    torch.testing.assert_close(out[0], torch.cat((table[2], table[3 + 1])))


def test_fused_embedding_copies_are_independent_tables() -> None:
    emb = FusedEmbedding((3, 2), dim=2, copies=3)
    out = emb(torch.tensor([[0, 1], [2, 0]]))  # (3, 2, 4)
    assert out.shape == (3, 2, 4)
    row = emb.table.weight[2].view(3, 2)  # field 0, id 2: one d-slice per copy
    torch.testing.assert_close(out[:, 1, :2], row)


def test_fused_towers_equal_separate_mlps() -> None:
    towers = FusedTowers(5, n=3, dims=(4, 2), dropouts=(0.0, 0.0))
    x = torch.randn(6, 5)
    out = towers(x)  # (3, 6, 2)
    per_tower = towers(x.expand(3, -1, -1))  # the per-tower input path
    for t in range(3):
        h = x
        for w, b in zip(towers.weights, towers.biases, strict=True):
            h = torch.relu(h @ w[t] + b[t])
        torch.testing.assert_close(out[t], h)
        torch.testing.assert_close(per_tower[t], h)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_fast_dropout_is_real_dropout(p: float) -> None:
    torch.manual_seed(0)
    drop = FastDropout(p)
    x = torch.ones(400_000)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.005  # ~1/sqrt(n) noise
    assert abs(y.mean().item() - 1.0) < 0.01  # inverted dropout keeps the expectation
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    assert not torch.equal(drop(x), y)  # a fresh mask every call
    drop.eval()
    assert torch.equal(drop(x), x)


def test_fast_dropout_rejects_bad_p() -> None:
    with pytest.raises(ValueError):
        FastDropout(1.0)


def test_regularized_parameters_are_embeddings_and_attention() -> None:
    model = AITM(AITMConfig(vocab_sizes=VOCAB))
    reg = model.regularized_parameters()
    assert reg[0] is model.embedding.table.weight
    assert len(reg) == 1 + 3 and all(isinstance(p, nn.Parameter) for p in reg)


def _glorot_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def _is_glorot(w: torch.Tensor, fan_in: int, fan_out: int) -> bool:
    """Uniform within the Glorot bound and filling it (torch's default is 1.6-2.4x narrower)."""
    bound, top = _glorot_bound(fan_in, fan_out), float(w.detach().abs().max())
    return 0.9 * bound < top <= bound


def test_dense_layers_start_as_keras_dense_glorot_uniform_and_zero_bias() -> None:
    torch.manual_seed(0)
    model = AITM(AITMConfig(vocab_sizes=VOCAB))
    fan_in = model.embedding.out_dim
    for w, b, width in zip(model.towers.weights, model.towers.biases, (128, 64, 32), strict=True):
        assert all(_is_glorot(w[i], fan_in, width) for i in range(w.shape[0]))
        assert b.abs().max() == 0
        fan_in = width
    for seq in model.transfers:
        lin = seq[0]
        assert isinstance(lin, nn.Linear)
        assert _is_glorot(lin.weight, 32, 32) and lin.bias.abs().max() == 0
    assert _is_glorot(model.head_w, 32, 1) and model.head_b.abs().max() == 0


def _main_init_state(vocab: tuple[int, ...], n_tasks: int, seed: int) -> dict[str, torch.Tensor]:
    """A copy of main's AITM construction before issue 17 (nn.Linear's default everywhere),
    drawn in the same order from the same seed: the reference ``dense_init="torch"`` must equal."""
    torch.manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    state["embedding.table.weight"] = FusedEmbedding(vocab, 5).table.weight.detach().clone()
    fan_in = 5 * len(vocab)
    for i, width in enumerate((128, 64, 32)):
        bound = 1.0 / math.sqrt(fan_in)  # main: weights and biases U(+-1/sqrt(fan_in))
        state[f"towers.weights.{i}"] = torch.empty(n_tasks, fan_in, width).uniform_(-bound, bound)
        state[f"towers.biases.{i}"] = torch.empty(n_tasks, 1, width).uniform_(-bound, bound)
        fan_in = width
    for i in range(n_tasks - 1):  # main: nn.Linear(k, transfer_dim) as is
        lin = nn.Linear(32, 32)
        state[f"transfers.{i}.0.weight"], state[f"transfers.{i}.0.bias"] = lin.weight.detach(), lin.bias.detach()
    for i in range(n_tasks - 1):
        state[f"aits.{i}.qkv.weight"] = AIT(32).qkv.weight.detach()
    state["head_w"] = torch.empty(n_tasks, 32).uniform_(-1 / math.sqrt(32), 1 / math.sqrt(32))
    state["head_b"] = torch.zeros(n_tasks)
    return state


@pytest.mark.parametrize("seed", [0, 7])
def test_torch_dense_init_reproduces_mains_model_exactly(seed: int) -> None:
    want = _main_init_state(VOCAB, 4, seed)
    torch.manual_seed(seed)
    got = AITM(AITMConfig(vocab_sizes=VOCAB, dense_init="torch")).state_dict()
    assert set(got) == set(want)
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    torch.manual_seed(seed)  # the default is the other one
    assert not torch.equal(AITM(AITMConfig(vocab_sizes=VOCAB)).state_dict()["head_w"], want["head_w"])


def test_torch_dense_init_has_nonzero_biases_within_the_linear_bound() -> None:
    torch.manual_seed(0)
    towers = FusedTowers(20, 3, (16, 8), (0.0, 0.0), init="torch")
    fan_in = 20
    for w, b in zip(towers.weights, towers.biases, strict=True):
        bound = 1 / math.sqrt(fan_in)
        assert 0.9 * bound < float(w.detach().abs().max()) <= bound
        assert 0.5 * bound < float(b.detach().abs().max()) <= bound
        fan_in = w.shape[-1]
    lin = dense(32, 32, "torch")
    assert float(lin.bias.detach().abs().max()) > 0 and float(lin.weight.detach().abs().max()) <= 1 / math.sqrt(32)


def test_an_unknown_dense_init_is_refused() -> None:
    with pytest.raises(ValueError, match="dense init"):
        AITMConfig(vocab_sizes=VOCAB, dense_init="he")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dense init"):
        FusedTowers(4, 1, (2,), (0.0,), init="zeros")  # type: ignore[arg-type]
