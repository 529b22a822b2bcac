"""``bench models``: the ``families`` JSON shape, and Ali-CCP steps reported as n/a, never NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.models import main
from bench.models_report import render_markdown, summarise


def _no_nan(obj: object) -> bool:
    if isinstance(obj, float):
        return not math.isnan(obj)
    if isinstance(obj, dict):
        return all(_no_nan(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_no_nan(v) for v in obj)
    return True


def test_families_key_holds_mean_and_std_per_family_model_and_task(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    argv = ["--json", str(out), "--families-only", "--families", "cascade,tanh_product", "--family-n", "8000"]
    argv += ["--models", "AITM,ESMM", "--seeds", "2", "--max-epochs", "1", "--threads", "1"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    fams = report["families"]
    assert set(fams) == {"cascade", "tanh_product"}
    for table in fams.values():
        assert set(table) == {"AITM", "ESMM"}
        for by_task in table.values():
            assert set(by_task) == {"click", "application", "approval", "activation"}
            click = by_task["click"]
            assert set(click) == {"mean", "std"}
            # (too few steps to learn anything: this checks the shape, not the quality)
            assert 0.0 <= click["mean"] <= 1.0 and click["std"] > 0.0  # two seeds: a real std
    assert report["families_meta"]["cascade"]["oracle_auc"]["click"] > 0.6
    assert "### cascade" in out.with_suffix(".md").read_text()
    assert (tmp_path / "m_families.png").stat().st_size > 0
    # the paper's Figure 6 per family: AITM's weight on p_(t-1) and its value share, by labels
    weights = report["families_meta"]["cascade"]["ait_weight_by_stage"]
    assert set(weights) == {
        f"{k}{a}->{b}"
        for k in ("", "share ")
        for a, b in (("click", "application"), ("application", "approval"), ("approval", "activation"))
    }
    assert 0.0 < weights["click->application"]["00"] < 1.0  # a softmax weight
    assert "AIT weight on p_(t-1)" in out.with_suffix(".md").read_text()
    assert (tmp_path / "m_ait.png").stat().st_size > 0


def _feats(pairs: list[tuple[str, str]]) -> str:
    return "\x01".join(f"{f}\x02{i}\x031.0" for f, i in pairs)


def _write_aliccp(d: Path, split: str, n: int, rng: np.random.Generator) -> None:
    common = [f"u{u},1,{_feats([('101', str(u)), ('121', str(u % 3))])}" for u in range(20)]
    (d / f"common_features_{split}.csv").write_text("\n".join(common) + "\n")
    lines = []
    for i in range(n):
        item = int(rng.integers(0, 30))
        click = int(rng.random() < (0.5 if item < 10 else 0.1))
        buy = int(click and rng.random() < 0.4)
        lines.append(f"{i},{click},{buy},u{i % 20},1,{_feats([('205', str(item)), ('301', str(i % 2))])}")
    (d / f"sample_skeleton_{split}.csv").write_text("\n".join(lines) + "\n")


def test_aliccp_reports_missing_funnel_steps_as_na(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _write_aliccp(tmp_path, "train", 3000, rng)
    _write_aliccp(tmp_path, "test", 1000, rng)
    out = tmp_path / "a.json"
    argv = ["--json", str(out), "--aliccp", str(tmp_path), "--models", "AITM,ESMM", "--seeds", "1"]
    argv += ["--max-epochs", "1", "--threads", "1", "--min-count", "1"]
    assert main(argv) == 0
    text = out.read_text()
    assert "NaN" not in text  # strict JSON
    report = json.loads(text)
    assert report["tasks"] == ["click", "purchase"]
    assert report["funnel_steps"] == {
        "click": "click",
        "application": "purchase",
        "approval": None,
        "activation": None,
    }
    md = out.with_suffix(".md").read_text()
    assert "approval n/a" in md and "activation n/a" in md and "nan" not in md.lower()
    assert "families" not in report  # the families are simulator runs, not Ali-CCP


def test_a_task_without_positives_is_na_not_nan() -> None:
    runs = {"AITM": [{"test_auc": [0.7, math.nan]}, {"test_auc": [0.72, math.nan]}]}
    report = summarise(("click", "purchase"), runs, None, {})
    assert report["models"]["AITM"]["auc_mean"]["purchase"] is None
    assert report["models"]["AITM"]["auc_runs"] == [[0.7, None], [0.72, None]]
    assert _no_nan(report)
    json.dumps(report, allow_nan=False)
    md = render_markdown(report)
    assert "n/a" in md and "nan" not in md.lower()


@pytest.mark.parametrize("shape", [{}, {"transfer": "gated"}, {"transfer": "gated", "experts": 4}])
def test_ait_weights_by_stage_match_the_model_and_shares_are_fractions(shape: dict[str, Any]) -> None:
    import torch

    from aitm.model import AITM, AITMConfig
    from aitm.train import Split
    from bench.models import ait_weight_by_stage, ait_weights_and_shares

    torch.manual_seed(0)
    model = AITM(AITMConfig(vocab_sizes=(7, 5), n_tasks=3, **shape)).eval()
    if model.transfer_gate is not None:  # an open gate: task 3's transfer reads task 2's z = q + g * AIT
        with torch.no_grad():
            model.transfer_gate.fill_(0.7)
    ids = torch.stack([torch.randint(0, 7, (500,)), torch.randint(0, 5, (500,))], 1)
    w, share = ait_weights_and_shares(model, ids)
    np.testing.assert_allclose(w.numpy(), model.forward_with_weights(ids)[1].detach().numpy(), rtol=1e-6)
    assert ((share >= 0) & (share <= 1)).all()
    y1 = (torch.arange(500) % 2).float()
    labels = torch.stack([y1, y1 * (torch.arange(500) % 4 == 1).float(), torch.zeros(500)], 1)
    stats = ait_weight_by_stage(model, Split(ids, labels), ("a", "b", "c"))
    sel = (labels[:, 0] == 1) & (labels[:, 1] == 0)
    assert stats["a->b"]["10"] == pytest.approx(float(w[sel, 0].mean()), rel=1e-5)
    assert stats["b->c"]["11"] is None  # no impression passed step c
    assert 0.0 <= stats["share a->b"]["00"] <= 1.0
