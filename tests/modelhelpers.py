"""Shared helpers for the serving tests: a small AITM trained on simulated impressions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from aitm.checkpoint import config_from_dict, load_checkpoint, make_checkpoint, save_checkpoint
from aitm.embedding_table import DynamicTable
from aitm.features import FeatureEncoder
from aitm.model import AITM, AITMConfig
from aitm.train import make_optimizer, train_step
from simulators.funnel import FunnelSimulator, SimConfig


def trained_checkpoint(
    kind: str, torch_seed: int, sim_seed: int, impressions_per_day: int, epochs: int, **shape: Any
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """A checkpoint of AITM trained ``epochs`` times over one simulated day (``kind`` "dynamic": the
    streaming trainer's dynamic table; else the offline encoder in threshold mode), in batches of
    500, and 3,000 fresh impressions of a later day, the first with values never seen and the
    second with a field missing."""
    torch.manual_seed(torch_seed)
    sim = FunnelSimulator(SimConfig(seed=sim_seed, impressions_per_day=impressions_per_day))
    train = sim.day_batch(0)
    rows = sim.feature_dicts(train)
    enc: FeatureEncoder | DynamicTable
    if kind == "dynamic":
        enc = DynamicTable(sim.field_names, rows=4096, min_count=5)
        ids = torch.from_numpy(enc.encode_dicts(rows, update=True, event_time_ms=np.zeros(len(rows), np.int64)))
    else:
        enc = FeatureEncoder(sim.field_names, capacity=512, min_count=5)
        ids = torch.from_numpy(enc.encode_dicts(rows, update=True))  # (N, F)
    labels = torch.as_tensor(train.labels, dtype=torch.float32)  # (N, T)
    cfg = AITMConfig(vocab_sizes=enc.vocab_sizes, **shape)  # shape: AITMConfig's options (the paper's by default)
    model = AITM(cfg)
    opt = make_optimizer(model, lr=3e-3)
    for _ in range(epochs):
        for i in range(0, len(ids), 500):
            train_step(model, opt, ids[i:i + 500], labels[i:i + 500])
    checkpoint = make_checkpoint(model.eval(), cfg, enc.state_dict(), 0)
    fresh = sim.feature_dicts(sim.day_batch(5, 3000))
    fresh[0] = {**fresh[0], "city": "a city never seen", "creative_id": "new"}  # out of vocabulary
    fresh[1] = {k: v for k, v in fresh[1].items() if k != "hour"}  # a field missing
    return checkpoint, fresh


def random_ids(vocab: tuple[int, ...], b: int, seed: int = 0) -> torch.Tensor:
    """(b, F) int64 local feature ids, column f uniform in [0, vocab[f]), from a generator seeded
    with ``seed`` (the same rows for the same arguments)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, v, (b,), generator=g) for v in vocab], dim=1)

def product_shape(**overrides: Any) -> dict[str, Any]:
    """AITMConfig's shape options as the trainer builds its network from the settings (the
    environment's, else the defaults: ``stream.learn.learner.model_options``), with ``overrides``."""
    from stream.learn.learner import model_options
    from stream.ops.settings import Settings

    return {**model_options(Settings()), **overrides}


def assert_checkpoint_keeps(model: AITM, tmp_path: Path, ids: torch.Tensor, field: str) -> AITMConfig:
    """Save ``model`` and load it back: the config and the scores of ``ids`` must be the same.
    Returns the config a checkpoint written before ``field`` existed loads as (the field dropped)."""
    cfg = model.config
    save_checkpoint(tmp_path / "m.pt", make_checkpoint(model, cfg, {}, step=1))
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert config_from_dict(loaded["config"]) == cfg
    restored = AITM(cfg).eval()
    restored.load_state_dict(loaded["model_state"])
    torch.testing.assert_close(restored(ids), model.eval()(ids))
    old = dict(loaded["config"])
    del old[field]
    return config_from_dict(old)
