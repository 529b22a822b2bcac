"""Checkpoints: round trip gives identical predictions; corruption is refused with CheckpointError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aitm.checkpoint import (
    CheckpointError,
    config_from_dict,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from aitm.features import FeatureEncoder
from aitm.model import AITM, AITMConfig


def _setup() -> tuple[AITM, AITMConfig, FeatureEncoder, torch.Tensor]:
    enc = FeatureEncoder(("a", "b"), capacity=[6, 4], min_count=1)
    rows = [{"a": str(i % 5), "b": str(i % 3)} for i in range(40)]
    ids = torch.as_tensor(enc.encode_dicts(rows, update=True))  # (40, 2)
    cfg = AITMConfig(vocab_sizes=enc.vocab_sizes)
    torch.manual_seed(0)
    return AITM(cfg), cfg, enc, ids


def test_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    model, cfg, enc, ids = _setup()
    path = tmp_path / "ckpt" / "model.pt"
    extra = {"offsets": {"samples-0": 1234, "samples-1": 99}, "model_version": "v7"}
    save_checkpoint(path, make_checkpoint(model, cfg, enc.state_dict(), step=42, extra=extra))
    ckpt = load_checkpoint(path)
    restored_cfg = AITMConfig(**ckpt["config"])  # tuples survive as tuples
    restored = AITM(restored_cfg)
    restored.load_state_dict(ckpt["model_state"])
    restored_enc = FeatureEncoder.from_state_dict(ckpt["feature_maps"])
    assert restored_cfg == cfg
    assert ckpt["step"] == 42 and ckpt["extra"] == extra
    model.eval()
    restored.eval()
    rows = [{"a": "1", "b": "2"}, {"a": "new", "b": "0"}]
    with torch.no_grad():
        a = model(torch.as_tensor(enc.encode_dicts(rows)))
        b = restored(torch.as_tensor(restored_enc.encode_dicts(rows)))
        assert torch.equal(model(ids), restored(ids))
    assert torch.equal(a, b)


def test_overwrite_leaves_no_temp_files(tmp_path: Path) -> None:
    model, cfg, enc, _ = _setup()
    path = tmp_path / "model.pt"
    for step in (1, 2):
        save_checkpoint(path, make_checkpoint(model, cfg, enc.state_dict(), step=step))
    assert load_checkpoint(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.mark.parametrize("where", ["payload", "digest", "truncate", "header"])
def test_corrupted_checkpoint_is_refused(tmp_path: Path, where: str) -> None:
    model, cfg, enc, _ = _setup()
    path = tmp_path / "model.pt"
    save_checkpoint(path, make_checkpoint(model, cfg, enc.state_dict(), step=1))
    data = bytearray(path.read_bytes())
    if where == "payload":
        data[len(data) // 2] ^= 0xFF
    elif where == "digest":
        data[25] = ord("0") if data[25] != ord("0") else ord("1")
    elif where == "truncate":
        data = data[: len(data) - 100]
    else:
        data[:4] = b"JUNK"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_missing_or_foreign_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "absent.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": 1}, foreign)  # a plain torch file: no header, no checksum
    with pytest.raises(CheckpointError, match="not an AITM checkpoint"):
        load_checkpoint(foreign)


def test_arbitrary_objects_are_refused_by_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    save_checkpoint(path, {"step": 1, "obj": Path("/x")})  # not plain data: valid checksum
    with pytest.raises(CheckpointError, match="unpickle"):
        load_checkpoint(path)


def test_a_config_written_before_dense_init_loads_with_the_default(tmp_path: Path) -> None:
    model, cfg, enc, ids = _setup()
    ckpt = make_checkpoint(model, cfg, enc.state_dict(), step=1)
    del ckpt["config"]["dense_init"]  # as checkpoints and artifacts written before the field
    path = tmp_path / "old.pt"
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path)
    old_cfg = config_from_dict(loaded["config"])
    assert old_cfg.dense_init == "glorot" and old_cfg.vocab_sizes == cfg.vocab_sizes
    restored = AITM(old_cfg)
    restored.load_state_dict(loaded["model_state"])
    torch.testing.assert_close(restored.eval()(ids), model.eval()(ids))
    torch_cfg = AITMConfig(vocab_sizes=enc.vocab_sizes, dense_init="torch")  # and the field round-trips
    save_checkpoint(path, make_checkpoint(AITM(torch_cfg), torch_cfg, enc.state_dict(), step=2))
    assert config_from_dict(load_checkpoint(path)["config"]) == torch_cfg
