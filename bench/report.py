"""Every bench's JSON report: written (its folder made) where ``--json`` says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, report: Any, **dumps: Any) -> str:
    """Write ``report`` as indented JSON (``dumps``: more ``json.dumps`` options); returns the text."""
    text = json.dumps(report, indent=2, **dumps) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def write_with_markdown(path: Path, report: Any, md: str, **dumps: Any) -> None:
    """``report`` as JSON at ``path``, ``md`` beside it (``.md``) and on stdout."""
    write_json(path, report, **dumps)
    path.with_suffix(".md").write_text(md)
    print(md)
