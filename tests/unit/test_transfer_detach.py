"""AITM's transfer without a backward path (``AITMConfig.transfer_detach``, "AITM-detach"): task t
reads z_(t-1) through the transfer layer and AIT, but its loss does not move task t-1's tower."""

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


def _model(detach: bool, seed: int = 0) -> AITM:
    torch.manual_seed(seed)
    model = AITM(AITMConfig(vocab_sizes=VOCAB, head="conditional", transfer="gated", transfer_detach=detach))
    with torch.no_grad():  # open the gates (they start at 0, which would hide the transfer's gradient)
        assert model.transfer_gate is not None
        model.transfer_gate.fill_(0.5)
    return model.eval()


def _tower_grads(model: AITM, task: int) -> list[float]:
    """The gradient norm on each task's tower from task ``task``'s own head logit alone (the step
    conditional: the end-to-end logit would reach the earlier towers through the product)."""
    model.zero_grad()
    model.head_logits(_ids(32))[:, task].sum().backward()
    out = []
    for t in range(model.config.n_tasks):
        out.append(sum(float(w.grad[t].abs().sum()) for w in model.towers.weights if w.grad is not None))
    return out


def test_the_forward_pass_is_the_same_either_way() -> None:
    a, b = _model(False), _model(True)
    b.load_state_dict(a.state_dict())
    ids = _ids(64)
    torch.testing.assert_close(b(ids), a(ids), rtol=0, atol=0)
    torch.testing.assert_close(b.forward_with_weights(ids)[1], a.forward_with_weights(ids)[1], rtol=0, atol=0)


@pytest.mark.parametrize("task", [1, 2, 3])
def test_a_later_tasks_loss_does_not_reach_the_earlier_towers(task: int) -> None:
    through, detached = _tower_grads(_model(False), task), _tower_grads(_model(True), task)
    assert through[task] > 0 and detached[task] > 0  # its own tower learns either way
    for t in range(task):  # the paper's transfer: the gradient flows back into every earlier tower ...
        assert through[t] > 0, t
        assert detached[t] == 0.0, t  # ... detached: none does
    for t in range(task + 1, 4):  # the later towers are not in this task's logit at all
        assert through[t] == 0.0 and detached[t] == 0.0


def test_the_transfer_still_learns_from_the_later_task() -> None:
    model = _model(True)
    model.head_logits(_ids(32))[:, 3].sum().backward()  # activation's conditional logit
    last = model.transfers[2]  # approval -> activation: its transfer layer and AIT are activation's to learn
    for m in (last, model.aits[2]):
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.transfer_gate is not None and model.transfer_gate.grad is not None
    assert model.transfer_gate.grad[2].abs().sum() > 0


def test_the_named_variant_and_checkpoints(tmp_path: Path) -> None:
    model = build_model("AITM-detach", VOCAB, 4, dense_init="torch")
    assert isinstance(model, AITM)
    cfg = model.config
    assert (cfg.transfer_detach, cfg.head, cfg.transfer, cfg.experts) == (True, "conditional", "gated", 0)
    old = assert_checkpoint_keeps(model, tmp_path, _ids(16), "transfer_detach")
    assert old.transfer_detach is False  # a checkpoint from before the field: the paper's backward path
