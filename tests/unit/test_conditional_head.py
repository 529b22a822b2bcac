"""AITM's step-conditional heads (``head="conditional"``): the funnel order by construction, finite
loss and gradients at extreme logits, prior-rate start, re-centring, and old checkpoints as joint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aitm.baselines import build_model
from aitm.checkpoint import config_from_dict, load_checkpoint, make_checkpoint, save_checkpoint
from aitm.loss import aitm_loss, calibrator
from aitm.model import AITM, AITMConfig
from stream.learn.stabilisers import init_output_bias
from stream.learn.weight_average import output_bias_shift
from stream.ops.settings import Settings
from tests.modelhelpers import random_ids

VOCAB = (7, 3, 11, 5)


def _ids(b: int, seed: int = 0) -> torch.Tensor:
    return random_ids(VOCAB, b, seed)  # (B, F)


def _scrambled(seed: int, scale: float, head: str = "conditional") -> AITM:
    """An AITM with every parameter redrawn - arbitrary weights -, its heads' at ``scale`` (the
    body's at 1: far larger overflows the towers themselves, whatever the head)."""
    torch.manual_seed(seed)
    model = AITM(AITMConfig(vocab_sizes=VOCAB, head=head))  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (scale if name.startswith("head_") else 1.0))
    return model.eval()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0, 1e4])
def test_the_conditional_heads_outputs_never_rise_along_the_funnel(seed: int, scale: float) -> None:
    model = _scrambled(seed, scale)
    with torch.no_grad():
        logits = model(_ids(512, seed))  # (B, T)
    probs = torch.sigmoid(logits)
    assert torch.isfinite(logits).all()
    assert (probs[:, 1:] <= probs[:, :-1]).all()  # exactly, for every row
    assert float(calibrator(probs)) == 0.0  # the calibrator has nothing to push


def test_the_joint_head_with_the_same_weights_does_break_the_order() -> None:
    """The check above is not vacuous: the same arbitrary weights read as joint heads do not keep it."""
    model = _scrambled(0, 1.0, head="joint")
    with torch.no_grad():
        probs = torch.sigmoid(model(_ids(512)))
    assert (probs[:, 1:] > probs[:, :-1]).any()


def test_each_step_is_the_one_before_times_its_conditional() -> None:
    model = _scrambled(1, 0.5)
    ids = _ids(256, 1)
    with torch.no_grad():
        p = torch.sigmoid(model(ids).double())  # (B, T)
        c = torch.sigmoid(model.head_logits(ids).double())  # (B, T) the step conditionals
    torch.testing.assert_close(p[:, 0], c[:, 0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p[:, 1:], p[:, :-1] * c[:, 1:], rtol=1e-4, atol=1e-7)
    joint = AITM(AITMConfig(vocab_sizes=VOCAB)).eval()  # the paper's head: the heads' logits are the output
    torch.testing.assert_close(joint(ids), joint.head_logits(ids))


@pytest.mark.parametrize("bias", [-1e4, -80.0, 40.0, 1e4])
def test_loss_and_gradients_are_finite_at_extreme_logits(bias: float) -> None:
    model = AITM(AITMConfig(vocab_sizes=VOCAB, head="conditional")).train()
    with torch.no_grad():
        model.head_b.fill_(bias)
        model.head_w.mul_(50.0)
    ids = _ids(64)
    labels = torch.zeros(64, 4)
    labels[:32, 0], labels[:16, 1], labels[:8, 2], labels[:4, 3] = 1, 1, 1, 1  # funnel-ordered
    loss = aitm_loss(model(ids), labels, alpha=0.6)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_it_starts_at_the_prior_rates_end_to_end() -> None:
    rates = (0.2, 0.02, 0.01, 0.005)
    model = build_model("AITM-cond", VOCAB, 4).eval()
    assert isinstance(model, AITM) and model.config.head == "conditional"
    init_output_bias(model, rates)
    np.testing.assert_allclose(model.head_b.detach().numpy(), np.log([0.25, 0.1 / 0.9, 1.0, 1.0]), rtol=1e-5)
    with torch.no_grad():
        model.head_w.zero_()  # the heads read nothing: their biases alone
        probs = torch.sigmoid(model(_ids(4)))[0].numpy()
    np.testing.assert_allclose(probs, rates, rtol=1e-4)


def test_recentring_finds_the_conditional_biases_that_hit_every_steps_target() -> None:
    torch.manual_seed(2)
    model = AITM(AITMConfig(vocab_sizes=VOCAB, head="conditional")).eval()
    with torch.no_grad():
        model.head_w.add_(torch.randn_like(model.head_w) * 3.0)  # rows spread over the rates
        model.head_b.copy_(torch.tensor([-1.0, -2.0, -0.5, -0.3]))
    ids = _ids(3000, 2)
    w = np.random.default_rng(0).uniform(0.2, 1.0, len(ids))

    def mean_rate() -> np.ndarray:
        with torch.no_grad():
            p = torch.sigmoid(model(ids).double()) * torch.as_tensor(w)[:, None]
        return p.sum(0).numpy() / w.sum()  # type: ignore[no-any-return]

    now = mean_rate()
    # a shift of step 1 alone would raise all four by 1.3: steps 2-4 need their own, smaller or larger
    for factors, lower in (([1.3, 1.4, 1.6, 1.7], False), ([0.8, 0.9, 0.7, 0.75], True)):
        target = now * np.array(factors)
        delta = output_bias_shift(model, ids, target.tolist(), w, lower=lower)
        with torch.no_grad():
            model.head_b.add_(delta.float())
        np.testing.assert_allclose(mean_rate(), target, rtol=2e-3)
        with torch.no_grad():
            model.head_b.sub_(delta.float())


def test_a_checkpoint_of_the_joint_head_still_loads_as_joint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = AITMConfig(vocab_sizes=VOCAB)
    model = AITM(cfg).eval()
    ckpt = make_checkpoint(model, cfg, {}, step=1)
    del ckpt["config"]["head"]  # as written before the field existed
    save_checkpoint(tmp_path / "old.pt", ckpt)
    loaded = load_checkpoint(tmp_path / "old.pt")
    old_cfg = config_from_dict(loaded["config"])
    assert old_cfg.head == "joint" == AITMConfig(vocab_sizes=VOCAB).head
    restored = AITM(old_cfg).eval()
    restored.load_state_dict(loaded["model_state"])
    torch.testing.assert_close(restored(_ids(32)), model(_ids(32)))
    cond = AITMConfig(vocab_sizes=VOCAB, head="conditional")  # and the field round-trips
    save_checkpoint(tmp_path / "cond.pt", make_checkpoint(AITM(cond), cond, {}, step=2))
    assert config_from_dict(load_checkpoint(tmp_path / "cond.pt")["config"]) == cond


def test_an_unknown_head_is_refused_and_the_product_serves_the_conditional(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown AITM head"):
        AITMConfig(vocab_sizes=VOCAB, head="product")  # type: ignore[arg-type]
    monkeypatch.delenv("TRAINER_AITM_HEAD", raising=False)
    assert Settings().trainer_aitm_head == "conditional"  # the product's (issue 17)
    assert AITMConfig(vocab_sizes=VOCAB).head == "joint"  # the model's own default: the paper's, old checkpoints
