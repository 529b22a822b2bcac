"""AITM's transfer as a gated residual (``transfer="gated"``): shapes, the start exactly ESMM's product
(conditional head) with the gate at 0, the gate learning from the first step, and checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aitm.baselines import ESMM, build_model
from aitm.model import AITM, AITMConfig
from tests.modelhelpers import assert_checkpoint_keeps, random_ids

VOCAB = (7, 3, 11, 5)


def _ids(b: int, seed: int = 0) -> torch.Tensor:
    return random_ids(VOCAB, b, seed)  # (B, F)


def _gated(seed: int = 0, head: str = "conditional") -> AITM:
    torch.manual_seed(seed)
    return AITM(AITMConfig(vocab_sizes=VOCAB, head=head, transfer="gated"))  # type: ignore[arg-type]


def _esmm_with_the_same_body(model: AITM) -> ESMM:
    """An ESMM whose embedding, towers and heads are ``model``'s (AITM has one more: the transfer)."""
    esmm = ESMM(VOCAB, model.config.n_tasks, model.config.emb_dim)
    with torch.no_grad():
        esmm.embedding.table.weight.copy_(model.embedding.table.weight)
        for mine, theirs in zip(esmm.towers.parameters(), model.towers.parameters(), strict=True):
            mine.copy_(theirs)
        esmm.heads.w.copy_(model.head_w.unsqueeze(-1))  # (T, k, 1)
        esmm.heads.b.copy_(model.head_b.view(-1, 1, 1))  # (T, 1, 1)
    return esmm.eval()


def test_shapes_and_the_gate_starting_at_zero() -> None:
    model = _gated().eval()
    t, k = model.config.n_tasks, model.config.tower_dims[-1]
    assert model.transfer_gate is not None
    assert model.transfer_gate.shape == (t - 1, k)
    assert not model.transfer_gate.any()
    logits, w_prev = model.forward_with_weights(_ids(16))
    assert logits.shape == (16, t) and w_prev.shape == (16, t - 1)
    assert AITM(AITMConfig(vocab_sizes=VOCAB)).transfer_gate is None  # the paper's: no gate


@pytest.mark.parametrize("seed", range(3))
def test_the_gated_conditional_aitm_starts_as_esmm_up_to_rounding(seed: int) -> None:
    model = _gated(seed)
    with torch.no_grad():  # heads away from 0 so the check sees every step's tower
        model.head_b.copy_(torch.tensor([-1.0, -2.0, -0.5, -0.3]))
    model.eval()
    esmm = _esmm_with_the_same_body(model)
    ids = _ids(256, seed)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), esmm(ids), rtol=1e-6, atol=1e-5)  # float rounding
        assert model.transfer_gate is not None  # not vacuous: an open gate makes it another model
        model.transfer_gate.fill_(0.5)
        assert (model(ids) - esmm(ids))[:, 1:].abs().max() > 1e-3


def test_the_gate_learns_from_the_first_step_and_the_transfer_after_it() -> None:
    model = _gated(1).train()
    ids = _ids(64, 1)
    labels = (torch.rand(64, 4) < 0.3).float().cummin(dim=1).values
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids), labels)
    loss.backward()
    assert model.transfer_gate is not None and model.transfer_gate.grad is not None
    assert model.transfer_gate.grad.abs().sum() > 0  # the gate moves at once
    for ait in model.aits:  # the transfer's own weights wait for the gate to open: 0 * anything
        assert ait.qkv.weight.grad is None or not ait.qkv.weight.grad.any()


def test_build_model_names_it_and_checkpoints_keep_it(tmp_path: Path) -> None:
    model = build_model("AITM-cond-gated", VOCAB, 4)
    assert isinstance(model, AITM)
    assert (model.config.head, model.config.transfer) == ("conditional", "gated")
    # a checkpoint written before the field: the paper's transfer
    assert assert_checkpoint_keeps(model, tmp_path, _ids(8), "transfer").transfer == "ait"


def test_an_unknown_transfer_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown AITM transfer"):
        AITMConfig(vocab_sizes=VOCAB, transfer="residual")  # type: ignore[arg-type]


def test_the_benches_run_the_gated_variants_only_when_named() -> None:
    from bench.models import _parse
    from bench.online import MODELS, build_parser

    assert "AITM-cond-gated" in MODELS  # accepted by name
    for default in (build_parser().parse_args([]).models, _parse([]).models):
        names = default.split(",")
        assert "AITM" in names and "AITM-gated" not in names and "AITM-cond-gated" not in names
    # bench online: "AITM" is the product's, "AITM-joint" the paper's; AITM-cond by name only
    online = build_parser().parse_args([]).models.split(",")
    assert online == ["AITM", "AITM-joint", "ESMM", "MMoE", "PLE", "MLP"]
    assert "AITM-cond" in _parse([]).models.split(",")  # bench models: unchanged


def test_the_product_serves_the_gated_transfer_and_the_model_keeps_the_papers(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream.ops.settings import Settings

    monkeypatch.delenv("TRAINER_AITM_TRANSFER", raising=False)
    assert Settings().trainer_aitm_transfer == "gated"  # the product's default (issue 17)
    assert AITMConfig(vocab_sizes=VOCAB).transfer == "ait"  # the model's: the paper's, old checkpoints'
