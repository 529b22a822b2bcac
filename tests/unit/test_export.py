"""``aitm-stream export``: a trained version from the model store, written as ONNX or TorchScript with
its vocabulary and manifest, scores fresh simulated impressions as the scorer does (within 1e-5)."""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from stream.ops.model_store import ModelStore
from stream.serve import export
from stream.serve.versions import load_version
from tests.modelhelpers import product_shape, trained_checkpoint


@pytest.fixture(scope="module", params=["dynamic", "threshold"])
def store(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> tuple[Path, list[dict[str, str]]]:
    """Version 3: AITM trained for 40 steps on simulated impressions (with the streaming trainer's
    dynamic table, or the offline encoder in threshold mode), and fresh impressions of a later day."""
    checkpoint, fresh = trained_checkpoint(request.param, 0, 3, 10_000, epochs=2)
    root = tmp_path_factory.mktemp("models")
    ModelStore(root).publish(3, checkpoint)
    return root, fresh


def encode_with_vocabulary(vocab: dict, features: list[str], rows: list[dict[str, str]]) -> np.ndarray:
    """The manifest's encoding rule, written from its text (not the product's encoder)."""
    by_name = {f["name"]: f for f in vocab["fields"]}
    out = np.zeros((len(rows), len(features)), dtype=np.int64)
    for j, name in enumerate(features):
        field = by_name[name]
        for i, row in enumerate(rows):
            value = row.get(name, "")
            if vocab["mode"] == "hash":
                out[i, j] = 1 + zlib.crc32(value.encode()) % (field["capacity"] - 1)
            else:
                out[i, j] = field["ids"].get(value, vocab["oov_id"])
    return out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_exported_version_scores_as_the_scorer_does(store: tuple[Path, list[dict[str, str]]], tmp_path: Path,
                                                       fmt: str) -> None:
    root, fresh = store
    out = tmp_path / "export"
    assert export.main(["--version", "3", "--format", fmt, "--out", str(out), "--store", str(root)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    served = load_version(ModelStore(root), 3)
    assert manifest["model_version"] == 3 and manifest["format"] == fmt
    assert manifest["features"] == list(served.encoder.fields)
    assert manifest["tasks"] == ["click", "application", "approval", "activation"]
    assert set(manifest["files"]) == {export.MODEL_FILE[fmt], "vocabulary.json"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    vocab = json.loads((out / "vocabulary.json").read_text())
    ids = encode_with_vocabulary(vocab, manifest["features"], fresh)  # (N, F)
    assert (ids == served.encoder.encode_dicts(fresh)).all()
    assert (ids == 0).any() and (ids != 0).mean() > 0.5  # both known and unknown values
    want = served.predict(fresh)  # (N, T): what the scorer publishes
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        (got,) = session.run(["probabilities"], {"ids": ids})
    else:
        module = torch.jit.load(str(out / "model.pt"))
        with torch.no_grad():
            got = module(torch.from_numpy(ids)).numpy()
    assert got.shape == want.shape == (len(fresh), 4)
    assert np.abs(got - want).max() <= 1e-5
    assert (np.diff(got, axis=1) <= 0).all()  # funnel order, as served
    assert want.std(axis=0).min() > 1e-3  # a trained model: the rows differ, so a mix-up would show
    # one row at a time, as a single request would be scored
    if fmt == "onnx":
        one = session.run(["probabilities"], {"ids": ids[:1]})[0]
        assert np.abs(one - want[:1]).max() <= 1e-5


def test_the_products_aitm_exports_to_onnx(tmp_path: Path) -> None:
    # the trainer's shape settings as they are by default (the conditional head's end-to-end
    # logits use expm1, which the ONNX exporter has no symbolic for at this opset)
    import onnxruntime as ort

    shape = product_shape()
    checkpoint, fresh = trained_checkpoint("dynamic", 0, 3, 6_000, epochs=1, **shape)
    ModelStore(tmp_path / "models").publish(5, checkpoint)
    out = tmp_path / "export"
    assert export.main(["--version", "5", "--format", "onnx", "--out", str(out), "--store", str(tmp_path / "models")]) == 0
    served = load_version(ModelStore(tmp_path / "models"), 5)
    assert served.model.config.head == shape["head"]
    ids = served.encoder.encode_dicts(fresh)
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, served.predict(fresh), rtol=0, atol=1e-5)


def test_exporting_a_missing_or_corrupted_version_says_so(store: tuple[Path, list[dict[str, str]]], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = store
    with pytest.raises(SystemExit) as err:
        export.main(["--version", "9", "--format", "onnx", "--out", str(tmp_path / "x"), "--store", str(root)])
    assert err.value.code == 1
    assert "cannot load version 9" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    data = bytearray((root / "v00000003.ckpt").read_bytes())
    data[-10] ^= 0xFF
    (bad / "v00000003.ckpt").write_bytes(bytes(data))
    with pytest.raises(SystemExit) as err:
        export.main(["--version", "3", "--format", "torchscript", "--out", str(tmp_path / "y"), "--store", str(bad)])
    assert err.value.code == 1 and "checksum mismatch" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    with pytest.raises(SystemExit) as err:
        export.main(["--version", "3", "--format", "pmml", "--out", str(tmp_path / "z"), "--store", str(root)])
    assert err.value.code == 2
