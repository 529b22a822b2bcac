"""``aitm-stream export``: a model version as a file another runtime can serve.

``aitm-stream export --version N --format onnx|torchscript --out DIR`` loads version N through the
scorer's own loader (``stream.serve.versions.load_served``: verified, as served) and writes:

- ``model.onnx`` (opset 17) or ``model.pt`` (TorchScript): local feature ids ``ids`` (N, F) int64
  in -> ``probabilities`` (N, T) float32 out, the end-to-end probabilities in funnel order, exactly
  what ``ScoringModel.predict`` serves (sigmoid of the logits, each step capped by the one before);
- ``vocabulary.json``: how a feature dict becomes ids - per field, in the model's input order, the
  value -> id map (``threshold`` mode) or the hash rule (``hash`` mode); anything else is id 0;
- ``manifest.json``: the feature order, tasks, model version, input/output names and shapes, the
  encoding rule, and the sha256 of each file written (verify them before serving).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, Final

import torch

from aitm.embedding_table import DynamicTable
from stream.contract.events import TASKS
from stream.serve.onnx_export import to_onnx
from stream.serve.scoring import ScoringModel, ServedModel

FORMATS: Final = ("onnx", "torchscript")
MODEL_FILE: Final = {"onnx": "model.onnx", "torchscript": "model.pt"}
MANIFEST_SCHEMA: Final = 1


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vocabulary(m: ScoringModel) -> dict[str, Any]:
    """The encoder as plain data another runtime can apply (no pending counts: it never learns)."""
    enc = m.encoder
    fields: list[dict[str, Any]]
    if isinstance(enc, DynamicTable):  # the streaming trainer's table: every value with a row listed
        fields = [{"name": name, "ids": dict(vocab)} for name, vocab in zip(enc.fields, enc.vocab, strict=True)]
    else:
        fields = [{"name": name, "capacity": cap, **({"ids": dict(vocab)} if enc.mode == "threshold" else {})}
                  for name, cap, vocab in zip(enc.fields, enc.capacities, enc.vocab, strict=True)]
    return {"mode": enc.mode, "oov_id": 0, "fields": fields}


def _example_ids(m: ScoringModel, n: int = 2) -> torch.Tensor:
    return torch.zeros((n, len(m.encoder.fields)), dtype=torch.int64)  # (n, F)


def export(m: ScoringModel, fmt: str, out: Path) -> dict[str, Any]:
    """Write the model file, ``vocabulary.json`` and ``manifest.json`` to ``out``; the manifest."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    out.mkdir(parents=True, exist_ok=True)
    served = ServedModel(m.model).eval()
    model_path = out / MODEL_FILE[fmt]
    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(served, _example_ids(m)), str(model_path))
        else:
            to_onnx(served, len(m.encoder.fields), model_path)
    vocab_path = out / "vocabulary.json"
    vocab_path.write_text(json.dumps(vocabulary(m), separators=(",", ":"), sort_keys=True))
    manifest = {
        "schema_version": MANIFEST_SCHEMA,
        "model_version": m.version,
        "created_at_ms": m.created_at_ms,
        "format": fmt,
        "features": list(m.encoder.fields),
        "tasks": list(TASKS),
        "input": {"name": "ids", "dtype": "int64", "shape": ["N", len(m.encoder.fields)],
                  "meaning": "local feature ids in 'features' order, from vocabulary.json"},
        "output": {"name": "probabilities", "dtype": "float32", "shape": ["N", len(TASKS)],
                   "meaning": "end-to-end probability of each task, in funnel order (each step capped by the one before)"},
        "encoding": ("per field: mode 'threshold' or 'dynamic' -> fields[i].ids.get(value, 0); mode 'hash' -> "
                     "1 + crc32(utf8(value)) % (capacity - 1); a missing field is the value ''"),
        "files": {p.name: sha256_of(p) for p in (model_path, vocab_path)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Export a model version from the model store (``MODEL_STORE_DIR``, else ``DATA_DIR/models``)."""
    p = argparse.ArgumentParser(prog="aitm-stream export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", type=int, required=True, help="model version number in the model store")
    p.add_argument("--format", choices=FORMATS, required=True, help="onnx or torchscript")
    p.add_argument("--out", type=Path, required=True, help="directory to write (created if missing)")
    p.add_argument("--store", type=Path, default=None,
                   help="model store directory (default: MODEL_STORE_DIR, else DATA_DIR/models)")
    args = p.parse_args(argv)
    from stream.ops.model_store import ModelStore, ModelStoreError
    from stream.ops.settings import load_settings
    from stream.serve.versions import load_served

    root = args.store if args.store is not None else load_settings().model_store_path()
    if not root.is_dir():
        p.error(f"no model store at {root}; pass --store or set MODEL_STORE_DIR")
    store = ModelStore(root)
    try:
        m = load_served(store, args.version)
    except (ModelStoreError, KeyError, RuntimeError, ValueError) as exc:
        have = sorted({*store.versions(), *store.artifacts()})
        p.exit(1, f"aitm-stream export: cannot load version {args.version} from {root}: {exc} "
                  f"(versions there: {have[0] if have else 'none'}..{have[-1] if have else ''})\n")
    manifest = export(m, args.format, args.out)
    print(f"exported model version {args.version} as {args.format} to {args.out}: "
          f"{', '.join(manifest['files'])}, manifest.json")
    return 0
