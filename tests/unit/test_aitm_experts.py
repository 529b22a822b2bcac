"""AITM with shared experts under its towers (``AITMConfig.experts``, "AITM-experts"): the towers'
first layers become MMoE's experts, each task's tower reading its own gated mixture of them, with
the transfer and the heads as the product's AITM (conditional head, gated transfer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aitm.baselines import build_model
from aitm.model import AITM, AITMConfig
from tests.modelhelpers import assert_checkpoint_keeps, random_ids

VOCAB = (7, 3, 11, 5)


def _ids(b: int, seed: int = 0) -> torch.Tensor:
    return random_ids(VOCAB, b, seed)  # (B, F)


def _model(experts: int = 8, seed: int = 0) -> AITM:
    torch.manual_seed(seed)
    return AITM(AITMConfig(vocab_sizes=VOCAB, head="conditional", transfer="gated", experts=experts))


def test_shapes_and_the_towers_on_top_of_the_experts() -> None:
    model = _model().eval()
    t, dims = model.config.n_tasks, model.config.tower_dims
    assert model.experts is not None and model.expert_gates is not None
    assert [w.shape[-1] for w in model.experts.weights] == list(dims[:-1])  # the towers' first layers
    assert [w.shape[-1] for w in model.towers.weights] == [dims[-1]]  # the towers keep their last
    assert model.expert_gates.out_features == t * 8
    logits, w_prev = model.forward_with_weights(_ids(16))
    assert logits.shape == (16, t) and w_prev.shape == (16, t - 1)
    assert torch.all(logits.diff(dim=1) <= 1e-6)  # the conditional head: the funnel's order held


def test_an_empty_batch_scores_to_an_empty_result() -> None:
    model = _model().eval()  # the online learner can step on a batch with no rows to score
    logits, w_prev = model.forward_with_weights(_ids(0))
    assert logits.shape == (0, 4) and w_prev.shape == (0, 3)


def test_without_experts_the_model_is_the_papers_shape() -> None:
    model = _model(experts=0)
    assert model.experts is None and model.expert_gates is None
    assert not any("expert" in k for k in model.state_dict())  # old checkpoints load as they were
    assert model.towers.weights[0].shape[1] == model.embedding.out_dim


def test_each_task_reads_its_own_gated_mixture_of_the_experts() -> None:
    model = _model(experts=4).eval()
    assert model.experts is not None and model.expert_gates is not None
    v = model.embedding(_ids(32))
    with torch.no_grad():  # task t's gate all on expert (t + 1) % 4: its input is that expert's output
        model.expert_gates.weight.zero_()
        bias = torch.full((4, 4), -30.0)
        for t in range(4):
            bias[t, (t + 1) % 4] = 30.0
        model.expert_gates.bias.copy_(bias.flatten())
        inputs, outs = model.tower_inputs(v), model.experts(v)
        for t in range(4):
            torch.testing.assert_close(inputs[t], outs[(t + 1) % 4])
        model.expert_gates.bias.zero_()  # even gates: every task reads the experts' mean
        torch.testing.assert_close(model.tower_inputs(v)[2], outs.mean(0))


def test_the_experts_and_gates_learn_from_a_late_step_alone() -> None:
    model = _model(seed=1).train()
    ids = _ids(64, 1)
    labels = (torch.rand(64) < 0.3).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids)[:, 3], labels)
    loss.backward()
    assert model.experts is not None and model.expert_gates is not None
    for w in model.experts.weights:
        assert w.grad is not None and w.grad.abs().sum() > 0
    gate_grad = model.expert_gates.weight.grad
    assert gate_grad is not None and gate_grad.view(4, 8, -1)[3].abs().sum() > 0  # activation's own gate


def test_build_model_names_it_and_checkpoints_keep_it(tmp_path: Path) -> None:
    model = build_model("AITM-experts", VOCAB, 4)
    assert isinstance(model, AITM)
    cfg = model.config
    assert (cfg.head, cfg.transfer, cfg.experts) == ("conditional", "gated", 8)
    # a checkpoint written before the field: the towers on the embeddings
    assert assert_checkpoint_keeps(model, tmp_path, _ids(8), "experts").experts == 0


def test_a_bad_expert_count_is_refused() -> None:
    with pytest.raises(ValueError, match="experts"):
        AITMConfig(vocab_sizes=VOCAB, experts=-1)
    with pytest.raises(ValueError, match="experts"):
        AITMConfig(vocab_sizes=VOCAB, experts=4, tower_dims=(32,), dropouts=(0.1,))


def test_the_benches_run_it_only_when_named() -> None:
    from bench.models import _parse
    from bench.online import MODELS, build_parser

    assert "AITM-experts" in MODELS
    for default in (build_parser().parse_args([]).models, _parse([]).models):
        assert "AITM-experts" not in default.split(",")
