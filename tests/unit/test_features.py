"""Feature encoder: frequency threshold, OOV, capacity, hashing, dict/array parity, plain state."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from aitm.features import OOV, FeatureEncoder


def test_threshold_admits_after_min_count() -> None:
    enc = FeatureEncoder(("a", "b"), capacity=10, min_count=3)
    rows = [{"a": "x", "b": "p"}, {"a": "x", "b": "q"}]
    assert enc.encode_dicts(rows, update=True).tolist() == [[OOV, OOV], [OOV, OOV]]
    ids = enc.encode_dicts([{"a": "x", "b": "q"}], update=True)  # x seen 3 times now
    assert ids.tolist() == [[1, OOV]]
    assert enc.encode_dicts([{"a": "unseen", "b": "p"}]).tolist() == [[OOV, OOV]]


def test_no_update_never_learns() -> None:
    enc = FeatureEncoder(("a",), min_count=1)
    for _ in range(3):
        assert enc.encode_dicts([{"a": "x"}]).tolist() == [[OOV]]
    assert enc.vocab == [{}]


def test_missing_field_is_empty_string_value() -> None:
    enc = FeatureEncoder(("a", "b"), min_count=1)
    ids = enc.encode_dicts([{"a": "x"}], update=True)
    assert ids.tolist() == [[1, 1]] and enc.vocab[1] == {"": 1}


def test_capacity_full_maps_new_values_to_oov() -> None:
    enc = FeatureEncoder(("a",), capacity=3, min_count=1)  # OOV + 2 values
    ids = enc.encode_dicts([{"a": v} for v in "xyzw"], update=True)
    assert sorted(ids[:, 0].tolist()) == [0, 0, 1, 2]
    assert enc.vocab_sizes == (3,)
    assert ids.max() < 3


def test_hash_mode_is_stable_and_in_range() -> None:
    enc = FeatureEncoder(("a",), capacity=17, mode="hash")
    values = [{"a": str(i)} for i in range(200)]
    ids = enc.encode_dicts(values)
    assert ids.min() >= 1 and ids.max() < 17
    again = FeatureEncoder(("a",), capacity=17, mode="hash").encode_dicts(values)
    assert np.array_equal(ids, again)  # crc32, not Python's salted hash


def test_array_and_dict_paths_agree() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 30, size=(500, 3))
    a = FeatureEncoder(("f0", "f1", "f2"), min_count=5)
    b = FeatureEncoder(("f0", "f1", "f2"), min_count=5)
    ids_array = a.encode_array(codes, update=True)
    dicts = [{f"f{j}": str(v) for j, v in enumerate(row)} for row in codes.tolist()]
    ids_dicts = b.encode_dicts(dicts, update=True)
    assert a.vocab == b.vocab
    assert np.array_equal(ids_array, ids_dicts)


def test_state_round_trip_is_plain_data() -> None:
    enc = FeatureEncoder(("a", "b"), capacity=[5, 9], min_count=2)
    rows = [{"a": "x", "b": "y"}, {"a": "x", "b": "z"}]
    enc.encode_dicts(rows, update=True)
    buf = io.BytesIO()
    torch.save(enc.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # refuses anything but plain data
    restored = FeatureEncoder.from_state_dict(state)
    assert restored.vocab == enc.vocab and restored.pending == enc.pending
    assert restored.capacities == (5, 9)
    probe = [{"a": "x", "b": "y"}, {"a": "q", "b": "z"}]
    assert np.array_equal(restored.encode_dicts(probe), enc.encode_dicts(probe))


def test_pending_counts_are_bounded() -> None:
    enc = FeatureEncoder(("a",), min_count=5, max_pending=10)
    enc.encode_dicts([{"a": str(i)} for i in range(50)], update=True)
    assert len(enc.pending[0]) <= 10


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="mode"):
        FeatureEncoder(("a",), mode="bloom")
    with pytest.raises(ValueError, match="capacity"):
        FeatureEncoder(("a", "b"), capacity=[4])
    with pytest.raises(ValueError, match="expected"):
        FeatureEncoder(("a", "b")).encode_array(np.zeros((3, 3), dtype=np.int64))
