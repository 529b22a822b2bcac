"""``bench online``: every model through the same online learner on the same joined samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aitm.model import AITM
from bench.online import MODELS, init_prior_bias, learner_for, main, network_for
from stream.ops.settings import Settings

TASKS = ["click", "application", "approval", "activation"]
RATES = (0.2, 0.02, 0.01, 0.005)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_starts_at_the_prior_rates(name: str) -> None:
    model = network_for(name, Settings(trainer_dense_init="glorot"), (5, 7, 3)).eval()
    init_prior_bias(model, RATES)
    # with near-zero embeddings the towers' outputs are small: the start sits near the rates
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.shape[1] == 5:  # the embedding table
                p.zero_()
        probs = torch.sigmoid(model(torch.zeros(1, 3, dtype=torch.int64)))[0].numpy()
    assert np.allclose(probs, RATES, rtol=0.35), (name, probs)


def test_the_learner_trains_the_named_network() -> None:
    learner = learner_for("ESMM", Settings(), ("a", "b"), seed=0)
    assert type(learner.model).__name__ == "ESMM"
    assert isinstance(learner_for("AITM", Settings(), ("a", "b"), seed=0).model, AITM)


def test_aitm_cond_is_aitm_with_conditional_heads_and_aitm_joint_the_papers() -> None:
    cond = learner_for("AITM-cond", Settings(), ("a", "b"), seed=0).model
    joint = learner_for("AITM-joint", Settings(), ("a", "b"), seed=0).model
    assert isinstance(cond, AITM) and (cond.config.head, cond.config.transfer) == ("conditional", "ait")
    assert isinstance(joint, AITM) and (joint.config.head, joint.config.transfer) == ("joint", "ait")


def test_the_row_aitm_is_the_products_configured_aitm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAINER_AITM_HEAD", raising=False)
    monkeypatch.delenv("TRAINER_AITM_TRANSFER", raising=False)
    product = learner_for("AITM", Settings(), ("a", "b"), seed=0).model
    assert isinstance(product, AITM)
    assert (product.config.head, product.config.transfer) == ("conditional", "gated")  # the defaults
    monkeypatch.setenv("TRAINER_AITM_HEAD", "joint")
    monkeypatch.setenv("TRAINER_AITM_TRANSFER", "ait")
    papers = learner_for("AITM", Settings(), ("a", "b"), seed=0).model
    assert (papers.config.head, papers.config.transfer) == ("joint", "ait")
    # it starts at the prior rates whichever head: end-to-end for the joint, conditionals else
    rates = np.asarray(Settings().trainer_prior_rates)
    cond = rates / np.concatenate(([1.0], rates[:-1]))
    np.testing.assert_allclose(product.head_b.detach().numpy(), np.log(cond / (1 - cond)), rtol=1e-5)
    np.testing.assert_allclose(papers.head_b.detach().numpy(), np.log(rates / (1 - rates)), rtol=1e-5)


def test_the_networks_start_with_the_products_dense_init_unless_told() -> None:
    for name in ("AITM", "ESMM"):
        torch.manual_seed(0)
        product = learner_for(name, Settings(), ("a", "b"), seed=0).model
        glorot = learner_for(name, Settings(trainer_dense_init="glorot"), ("a", "b"), seed=0).model
        assert float(product.towers.biases[0].detach().abs().max()) > 0  # "torch": nn.Linear's biases
        assert float(glorot.towers.biases[0].detach().abs().max()) == 0


def test_a_tiny_online_run_writes_auc_final_per_model_and_the_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINER_FREEZE_AFTER_DAYS", "1")
    out = tmp_path / "online.json"
    argv = ["--json", str(out), "--days", "4", "--impressions-per-day", "600", "--skip-days", "1"]
    assert main([*argv, "--seeds", "2", "--models", "AITM,MLP"]) == 0
    report = json.loads(out.read_text())
    assert report["seeds"] == [0, 1]
    assert report["dense_init"] == Settings().trainer_dense_init == "torch"  # the product's
    assert set(report["auc_final"]) == {"AITM", "MLP"}
    for name in ("AITM", "MLP"):
        aucs = report["auc_final"][name]
        assert list(aucs) == TASKS
        runs = report["auc_final_runs"][name]
        assert len(runs) == 2 and runs[0] != runs[1]  # two training seeds, two different learners
        assert aucs["click"] == pytest.approx(np.mean([r["click"] for r in runs]), abs=1e-4)
        assert aucs["click"] > 0.55  # learned something on the busiest step in four days
        # the frozen copy (after day 1) and the live model on the same finals: two models, the
        # frozen one trained on day 1 (which of the two wins on a run this small is noise: AITM's
        # live click AUC was above the frozen one at 4 days and below it at 6, on the same code;
        # bench online measures it at size)
        assert list(report["auc_frozen"][name]) == TASKS
        assert report["auc_frozen"][name]["click"] > 0.55
        assert any(report["auc_live_paired"][name][t] != report["auc_frozen"][name][t] for t in TASKS)
    assert report["judged_impressions"] > 1500
    # the same samples and seeds give the same figures (no broker, no wall clock in the loop)
    assert main([*argv, "--seeds", "1", "--models", "AITM", "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["auc_final_runs"]["AITM"][0] == report["auc_final_runs"]["AITM"][0]
    # --dense-init overrides the product's: another start, other figures
    glorot = tmp_path / "glorot.json"
    assert main([*argv, "--seeds", "1", "--models", "AITM", "--dense-init", "glorot", "--json", str(glorot)]) == 0
    other = json.loads(glorot.read_text())
    assert other["dense_init"] == "glorot"
    assert other["auc_final_runs"]["AITM"][0] != report["auc_final_runs"]["AITM"][0]
    # what was served: for AITM its published versions (the weight average), none for the MLP
    assert report["auc_served"]["MLP"] is None
    assert report["auc_served"]["AITM"]["click"] != report["auc_final"]["AITM"]["click"]
    assert report["auc_served"]["AITM"]["click"] > 0.55
    # --delivery and --carry draw another stream (daily files; the adverse world): other figures
    for flag, value in (("--delivery", "batch-feeds"), ("--carry", "0.5,-0.8,0.5")):
        path = tmp_path / f"{flag[2:]}.json"
        assert main([*argv, "--seeds", "1", "--models", "AITM", flag, value, "--json", str(path)]) == 0
        world = json.loads(path.read_text())
        assert world[flag[2:]] == (value if flag == "--delivery" else [0.5, -0.8, 0.5])
        assert world["auc_final_runs"]["AITM"][0] != report["auc_final_runs"]["AITM"][0]


def test_without_the_average_a_version_every_batch_serves_what_the_live_model_predicted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no weight average: a version is the trained model itself; published after every batch, it is
    # the very model that scores the next batch, so the served figures are the live ones - but for
    # the values a batch admits to the table, which the version reads as out of vocabulary
    monkeypatch.setenv("TRAINER_EMA_HALF_LIFE_ROWS", "0")
    out = tmp_path / "live.json"
    argv = ["--json", str(out), "--days", "3", "--impressions-per-day", "500", "--skip-days", "1",
            "--seeds", "1", "--models", "AITM", "--version-every", "1"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    for t in TASKS:  # within 0.01: a batch's new values, out of the version's vocabulary, move it a little
        assert report["auc_served"]["AITM"][t] == pytest.approx(report["auc_final"]["AITM"][t], abs=0.01)


def test_unknown_models_are_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as err:
        main(["--json", str(tmp_path / "x.json"), "--models", "AITM,GPT"])
    assert err.value.code == 2


def test_carry_takes_three_weights(tmp_path: Path) -> None:
    from bench.online import build_parser

    assert build_parser().parse_args(["--carry", "0.5,-0.8,0.5"]).carry == (0.5, -0.8, 0.5)
    with pytest.raises(SystemExit) as err:
        main(["--json", str(tmp_path / "x.json"), "--carry", "0.5,-0.8"])
    assert err.value.code == 2
