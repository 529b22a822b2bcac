"""The ablation bench: the reference AITM, variant knobs, and one tiny run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from aitm.model import AITM
from bench.ablation import build_variant, main, make_variant_optimizer, parse_variant
from bench.reference import ReferenceAITM, ReferenceConfig
from tests.modelhelpers import random_ids

VOCAB = (7, 30, 5)


def _ids(b: int) -> torch.Tensor:
    return random_ids(VOCAB, b)


def test_reference_maps_ids_to_logits_and_weights() -> None:
    model = ReferenceAITM(VOCAB, 4).eval()
    logits, w = model.forward_with_weights(_ids(16))
    assert logits.shape == (16, 4) and w.shape == (16, 3)
    assert ((w > 0) & (w < 1)).all()
    assert len(model.attentions) == 1  # one attention for every transition, as AITM_standard.py
    assert len(ReferenceAITM(VOCAB, 4, ReferenceConfig(shared_attention=False)).attentions) == 3
    # the original code's N(0, 0.01) attention starts near uniform weights
    assert torch.allclose(w, torch.full_like(w, 0.5), atol=0.01)
    reg = {id(p) for p in model.regularized_parameters()}
    assert all(id(e.weight) in reg for e in model.embeddings if isinstance(e, nn.Embedding))
    assert len(reg) == len(VOCAB) + 3


def test_reference_init_follows_keras_defaults() -> None:
    model = ReferenceAITM(VOCAB, 2)
    first = model.towers[0][0]
    assert isinstance(first, nn.Linear)
    assert first.bias.abs().max() == 0  # Keras: zero biases
    bound = math.sqrt(6 / (first.in_features + first.out_features))
    assert first.weight.abs().max() <= bound and first.weight.abs().max() > 0.9 * bound
    emb = model.embeddings[1]
    assert isinstance(emb, nn.Embedding)
    assert 0.005 < float(emb.weight.detach().std()) < 0.02


def test_knobs_reach_the_product_model() -> None:
    assert parse_variant("ours+emb=0.01+tdrop=0") == ("ours", {"emb": "0.01", "tdrop": "0"})
    with pytest.raises(ValueError, match="key=value"):
        parse_variant("ours+emb")
    model, _ = build_variant("ours+emb=0.3+dense=torch+tdrop=0", VOCAB, 4)
    assert isinstance(model, AITM)
    assert 0.2 < float(model.embedding.table.weight.detach().std()) < 0.4
    assert model.towers.biases[0].abs().max() > 0  # torch's default: random biases
    assert all(isinstance(seq[2], nn.Identity) for seq in model.transfers)  # type: ignore[index]
    glorot, _ = build_variant("ours+dense=glorot", VOCAB, 4)
    assert isinstance(glorot, AITM)
    assert glorot.towers.biases[0].abs().max() == 0
    # head=: the heads' weights alone (k = 32: Glorot bound sqrt(6/33) vs torch's 1/sqrt(32))
    torch.manual_seed(0)
    wide, _ = build_variant("ours+dense=torch+head=glorot", VOCAB, 4)
    narrow, _ = build_variant("ours+head=torch", VOCAB, 4)
    assert isinstance(wide, AITM) and isinstance(narrow, AITM)
    assert float(wide.head_w.abs().max()) > 1 / math.sqrt(32)
    assert float(narrow.head_w.abs().max()) <= 1 / math.sqrt(32)
    assert wide.towers.biases[0].abs().max() > 0  # the towers keep torch's init


def test_l2_targets_and_adam_kernel() -> None:
    model, knobs = build_variant("ours+l2=none+opt=plain", VOCAB, 4)
    opt = make_variant_optimizer(model, knobs, 1e-3, 1e-6)
    assert opt.param_groups[0]["params"] == [] and opt.param_groups[0]["fused"] in (False, None)
    model, knobs = build_variant("ours", VOCAB, 4)
    opt = make_variant_optimizer(model, knobs, 1e-3, 1e-6)
    assert isinstance(model, AITM)
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.regularized_parameters()}


def test_a_tiny_ablation_run_writes_mean_and_std(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    argv = ["--json", str(out), "--family", "cascade", "--n", "6000", "--seeds", "2", "--epochs", "1"]
    assert main([*argv, "--variants", "ours,ref+attn=torch", "--threads", "1"]) == 0
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"ours", "ref+attn=torch"}
    assert report["summary"]["ours"]["n"] == 2 and len(report["summary"]["ours"]["std"]) == 4
    # a second call resumes: nothing is trained again, the file keeps both variants
    before = out.read_text()
    assert main([*argv, "--variants", "ours", "--threads", "1"]) == 0
    assert json.loads(out.read_text())["runs"] == json.loads(before)["runs"]
    assert "| ours | 2 |" in out.with_suffix(".md").read_text()
