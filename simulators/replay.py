"""Ali-CCP replay: read the public dataset's CSV files and map them into the event contract.

Ali-CCP has two tasks, click and purchase. They map to the funnel's first two steps (click and
application); approval and activation never occur. Each line of ``sample_skeleton_*.csv`` is
``sample_id,click,conversion,common_md5,n_features,feature_list`` and each line of
``common_features_*.csv`` is ``common_md5,n_features,feature_list``; a feature list joins
entries with ``\\x01`` and each entry is ``field_id \\x02 feature_id \\x03 value``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from simulators.faults import Record

# The 18 single-valued fields the original AITM code keeps.
ALICCP_FIELDS = (
    "101", "121", "122", "124", "125", "126", "127", "128", "129",
    "205", "206", "207", "216", "508", "509", "702", "853", "301",
)  # fmt: skip
_KEPT = frozenset(ALICCP_FIELDS)


class AliccpFormatError(ValueError):
    """A line of an Ali-CCP file does not follow the dataset's format."""


@dataclass(frozen=True, slots=True)
class AliccpRow:
    sample_id: str
    click: int
    purchase: int
    features: dict[str, str]


def parse_feature_list(text: str, where: str) -> dict[str, str]:
    """``field\\x02feature\\x03value`` entries joined by ``\\x01`` -> {field: feature} (kept fields)."""
    out: dict[str, str] = {}
    for entry in text.split("\x01"):
        if not entry:
            continue
        try:
            field_id, rest = entry.split("\x02", 1)
            feature_id, _value = rest.split("\x03", 1)
        except ValueError:
            raise AliccpFormatError(
                f"{where}: feature entry {entry!r:.60} is not field\\x02id\\x03value"
            ) from None
        if field_id in _KEPT:
            out.setdefault(field_id, feature_id)  # single-valued: the first one wins
    return out


def _read_common(path: Path) -> dict[str, dict[str, str]]:
    common: dict[str, dict[str, str]] = {}
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            parts = line.rstrip("\n").split(",", 2)
            if len(parts) != 3:
                raise AliccpFormatError(f"{path}:{n}: expected md5,count,features")
            common[parts[0]] = parse_feature_list(parts[2], f"{path}:{n}")
    return common


def read_aliccp(skeleton_csv: Path, common_csv: Path) -> Iterator[AliccpRow]:
    """Rows of one split, user features joined in; purchase-without-click rows dropped."""
    common = _read_common(common_csv)
    with skeleton_csv.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            parts = line.rstrip("\n").split(",", 5)
            if len(parts) != 6:
                raise AliccpFormatError(f"{skeleton_csv}:{n}: expected 6 comma-separated columns")
            sample_id, click_s, conv_s, md5, _count, feats = parts
            if click_s not in ("0", "1") or conv_s not in ("0", "1"):
                raise AliccpFormatError(f"{skeleton_csv}:{n}: click and conversion must be 0 or 1")
            click, purchase = int(click_s), int(conv_s)
            if purchase and not click:
                continue  # rare, inconsistent rows: purchase must imply click
            features = {**common.get(md5, {}), **parse_feature_list(feats, f"{skeleton_csv}:{n}")}
            yield AliccpRow(sample_id, click, purchase, features)


def aliccp_records(
    rows: Iterator[AliccpRow], start_ms: int, spacing_ms: int = 100, prefix: str = "ccp"
) -> Iterator[Record]:
    """Replay rows as contract events: impression, click 10 s later, purchase as application."""
    for i, row in enumerate(rows):
        iid = f"{prefix}-{row.sample_id}"
        key, t0 = iid.encode(), start_ms + i * spacing_ms
        steps = [("impression", t0)]
        if row.click:
            steps.append(("click", t0 + 10_000))
        if row.purchase:
            steps.append(("application", t0 + 60_000))
        for step, ts in steps:
            value = {
                "schema_version": 1,
                "event_type": step,
                "event_id": f"{iid}/{step}",
                "impression_id": iid,
                "event_time_ms": ts,
                "bank_id": "aliccp",
            }
            if step == "impression":
                value["features"] = row.features
            yield Record(step, key, json.dumps(value, separators=(",", ":")).encode(), ts, ts)
