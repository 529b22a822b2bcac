"""Files the installed package needs at run time: the Procfile (``demo``, benches) and the
Prometheus configs and rules (``prometheus``). Symbolic links to the repository's top-level
``Procfile`` and ``deploy/prometheus``; a built wheel holds copies (see ``path``)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The packaged resource ``name`` (``Procfile``, ``prometheus/rules``, ...)."""
    found = HERE / name
    if not found.exists():
        raise FileNotFoundError(f"packaged resource {name!r} missing from {HERE}: reinstall aitm-stream")
    return found
