"""L2's vector codec and the per-partition index: ordering, threshold, dropped rows, growth."""

from __future__ import annotations

import numpy as np
import pytest

from app.cache.semantic import CANDIDATES, EXACT_ROWS, PartitionIndex, decode_vector, encode_vector

DIM = 8


def unit(*values: float) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(values)] = values
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_codec_is_4_bytes_per_dimension_and_round_trips() -> None:
    """A 384-dim vector is 1536 bytes and decodes to the same float32 values."""
    rng = np.random.default_rng(1)
    vector = rng.standard_normal(384).astype(np.float32)
    data = encode_vector(vector)
    assert len(data) == 4 * 384
    back = decode_vector(data)
    assert back.dtype == np.float32 and back.shape == (384,)
    assert np.array_equal(back, vector)


def test_codec_is_explicitly_little_endian() -> None:
    """The bytes are `<f4` whatever the machine: 1.0 is 00 00 80 3f; big-endian input is converted."""
    assert encode_vector(np.array([1.0], dtype=np.float32)) == b"\x00\x00\x80\x3f"
    big = np.array([1.0, -2.5], dtype=">f4")
    assert encode_vector(big) == np.array([1.0, -2.5], dtype="<f4").tobytes()
    assert decode_vector(b"\x00\x00\x80\x3f").tolist() == [1.0]


def test_codec_converts_float64_input() -> None:
    """A float64 vector is stored as float32 (4 bytes a value), not 8."""
    assert len(encode_vector(np.ones(5, dtype=np.float64))) == 20


def test_search_returns_best_first_above_threshold() -> None:
    """Candidates come best first, and only those at or above the threshold."""
    index = PartitionIndex(DIM)
    index.add("far", unit(0, 1), "far")
    index.add("near", unit(1, 0.2), "near")
    index.add("exact", unit(1), "exact")
    index.add("mid", unit(1, 0.6), "mid")
    found = index.search(unit(1), threshold=0.5).candidates
    assert [c.entry_id for c in found] == ["exact", "near", "mid"]
    assert found[0].similarity == pytest.approx(1.0, abs=1e-6)
    assert found[0].text == "exact"
    assert all(a.similarity >= b.similarity for a, b in zip(found, found[1:], strict=False))


def test_threshold_is_inclusive_and_excludes_below() -> None:
    """A candidate exactly at the threshold counts; just below it does not."""
    index = PartitionIndex(DIM)
    index.add("a", unit(1, 1), "a")
    score = float(unit(1, 1) @ unit(1))
    assert [c.entry_id for c in index.search(unit(1), threshold=score).candidates] == ["a"]
    assert index.search(unit(1), threshold=score + 1e-4).candidates == []


def test_search_limits_to_the_best_candidates() -> None:
    """With many rows above the threshold only the CANDIDATES best come back, in order."""
    index = PartitionIndex(DIM)
    for i in range(10):
        index.add(f"e{i}", unit(1, i * 0.1), f"t{i}")
    found = index.search(unit(1), threshold=0.0).candidates
    assert [c.entry_id for c in found] == [f"e{i}" for i in range(CANDIDATES)]


def test_dropped_rows_are_never_returned() -> None:
    """A row dropped (expired or deleted in Redis) is not a candidate, even at the lowest threshold."""
    index = PartitionIndex(DIM)
    index.add("gone", unit(1), "gone")
    index.add("kept", unit(1, 0.5), "kept")
    index.drop("gone")
    assert [c.entry_id for c in index.search(unit(1), threshold=0.0).candidates] == ["kept"]
    assert [c.entry_id for c in index.search(unit(1), threshold=-1.0).candidates] == ["kept"]
    assert index.search(unit(1), threshold=0.0).best == pytest.approx(float(unit(1, 0.5) @ unit(1)))


def test_only_dropped_rows_means_no_candidates() -> None:
    """An index whose rows were all dropped finds nothing."""
    index = PartitionIndex(DIM)
    index.add("gone", unit(1), "gone")
    index.drop("gone")
    assert index.search(unit(1), threshold=0.0).candidates == []


def test_index_grows_past_its_initial_capacity() -> None:
    """Hundreds of rows fit; early and late rows are all still found."""
    index = PartitionIndex(DIM)
    rng = np.random.default_rng(7)
    vectors = [(v / np.linalg.norm(v)).astype(np.float32) for v in rng.standard_normal((300, DIM))]
    for i, v in enumerate(vectors):
        index.add(f"e{i}", v, f"t{i}")
    assert len(index) == 300
    for i in (0, 15, 16, 17, 150, 299):
        found = index.search(vectors[i], threshold=0.999).candidates
        assert found and found[0].entry_id == f"e{i}"


def test_adding_an_id_twice_keeps_one_row() -> None:
    """A resync never duplicates a row; a vector of the wrong size is ignored."""
    index = PartitionIndex(DIM)
    index.add("a", unit(1), "a")
    index.add("a", unit(0, 1), "a again")
    index.add("b", np.ones(DIM + 1, dtype=np.float32), "wrong size")
    assert len(index) == 1 and "a" in index and "b" not in index
    assert [c.text for c in index.search(unit(1), threshold=0.9).candidates] == ["a"]


def test_empty_index_finds_nothing() -> None:
    """A fresh partition has no candidates and no best score."""
    index = PartitionIndex(DIM)
    assert index.search(unit(1), threshold=0.0).candidates == []
    assert index.search(unit(1), threshold=0.0).best is None


def test_empty_index_has_no_best_score() -> None:
    """With nothing stored there is no similarity to report."""
    assert PartitionIndex(DIM).search(unit(1), threshold=0.0).best is None


def test_large_partition_shortlist_finds_near_duplicates() -> None:
    """Past EXACT_ROWS the sign-sketch shortlist still finds every planted near-duplicate, and skips dropped rows."""
    rng = np.random.default_rng(11)
    dim = 384
    n = EXACT_ROWS + 4000
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = PartitionIndex(dim)
    for i in range(n):
        index.add(f"e{i}", vectors[i], f"t{i}")
    for i in rng.choice(n, 25, replace=False):
        noise = rng.standard_normal(dim).astype(np.float32) * 0.015  # cosine about 0.96
        query = vectors[i] + noise
        query /= np.linalg.norm(query)
        found = index.search(query, threshold=0.9)
        assert found.candidates and found.candidates[0].entry_id == f"e{i}"
    index.drop("e0")
    assert all(c.entry_id != "e0" for c in index.search(vectors[0], threshold=0.0).candidates)
