"""L2's vector codec and the per-partition index: ordering, floor, dropped and expired rows, growth."""

from __future__ import annotations

import numpy as np
import pytest

from app.cache.semantic import CANDIDATES, SORTED_IN_PYTHON, PartitionIndex, decode_vector, encode_vector

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


NOW = 1_000_000.0
LATER = NOW + 3600


def test_search_returns_best_first_above_the_floor() -> None:
    """Candidates come best first, and only those at or above the floor."""
    index = PartitionIndex(DIM)
    index.add("far", unit(0, 1), "far", LATER)
    index.add("near", unit(1, 0.2), "near", LATER)
    index.add("exact", unit(1), "exact", LATER)
    index.add("mid", unit(1, 0.6), "mid", LATER)
    found = index.search(unit(1), 0.5, NOW)
    assert [c.entry_id for c in found] == ["exact", "near", "mid"]
    assert found[0].static_similarity == pytest.approx(1.0, abs=1e-6)
    assert found[0].text == "exact"


def test_floor_is_inclusive() -> None:
    index = PartitionIndex(DIM)
    index.add("a", unit(1, 1), "a", LATER)
    similarity = float(unit(1, 1) @ unit(1))
    assert [c.entry_id for c in index.search(unit(1), similarity, NOW)] == ["a"]
    assert index.search(unit(1), similarity + 1e-4, NOW) == []


def test_search_limits_to_the_best_candidates() -> None:
    index = PartitionIndex(DIM)
    for i in range(20):
        index.add(f"e{i}", unit(1, i / 20), f"t{i}", LATER)
    found = index.search(unit(1), 0.0, NOW)
    assert len(found) == CANDIDATES
    assert [c.entry_id for c in found] == [f"e{i}" for i in range(CANDIDATES)]


def test_dropped_and_expired_rows_are_never_returned() -> None:
    """A deleted entry and one past its expiry are not candidates, whatever their similarity."""
    index = PartitionIndex(DIM)
    index.add("gone", unit(1), "gone", LATER)
    index.add("old", unit(1, 0.01), "old", NOW - 1)
    index.add("kept", unit(1, 0.5), "kept", LATER)
    assert index.drop("gone") == "gone"
    assert index.drop("gone") is None
    assert [c.entry_id for c in index.search(unit(1), 0.0, NOW)] == ["kept"]
    assert index.expired(NOW) == ["old"]
    assert len(index) == 2


def test_index_grows_and_compacts_keeping_live_rows() -> None:
    """Past its capacity it grows; once most rows are dropped it compacts, and what is left is still found."""
    index = PartitionIndex(DIM)
    for i in range(200):
        index.add(f"e{i}", unit(1, i / 200, 0.3), f"t{i}", LATER)
    for i in range(150):
        index.drop(f"e{i}")
    assert len(index) == 50
    found = index.search(unit(1, 199 / 200, 0.3), 0.99, NOW)
    assert found and found[0].entry_id == "e199" and found[0].text == "t199"
    assert "e10" not in index and index.is_live("e160")


def test_adding_an_id_twice_keeps_one_row() -> None:
    index = PartitionIndex(DIM)
    assert index.add("x", unit(1), "first", LATER)
    assert not index.add("x", unit(0, 1), "second", LATER)
    assert len(index) == 1
    assert index.search(unit(1), 0.9, NOW)[0].text == "first"


def test_wrong_dimension_is_refused_and_empty_index_finds_nothing() -> None:
    index = PartitionIndex(DIM)
    assert not index.add("x", np.ones(DIM + 1, dtype=np.float32), "x", LATER)
    assert index.search(unit(1), -1.0, NOW) == []


@pytest.mark.parametrize("seed", range(20))
def test_search_matches_a_brute_force_over_live_rows(seed: int) -> None:
    """Whatever rows died or expired, and wherever they rank, a search returns exactly the best live, unexpired rows
    above the floor, best first, with their scores: what a plain sort over the usable rows gives."""
    rng = np.random.default_rng(seed)
    index, now = PartitionIndex(DIM), 1000.0
    rows = int(rng.integers(1, 80))
    for i in range(rows):
        vector = rng.standard_normal(DIM).astype(np.float32)
        index.add(f"e{i}", (vector / np.linalg.norm(vector)).astype(np.float32), f"text {i}",
                  now + float(rng.choice([-5.0, 60.0, 60.0, 60.0])))
    for i in rng.choice(rows, size=int(rng.integers(0, rows)), replace=False):
        index.drop(f"e{i}")
    query = rng.standard_normal(DIM).astype(np.float32)
    query /= np.linalg.norm(query)
    floor = float(rng.uniform(-0.5, 0.5))
    usable = [(float(index._matrix[i] @ query), index._ids[i]) for i in range(len(index._ids))
              if index._alive[i] and index._expires[i] > now]
    expected = [(entry_id, score) for score, entry_id in sorted(usable, reverse=True)[:CANDIDATES] if score >= floor]
    found = index.search(query, floor, now)
    assert [(c.entry_id, pytest.approx(c.static_similarity, abs=1e-6)) for c in found] == expected


@pytest.mark.parametrize("gone", ["dropped", "expired"])
def test_search_finds_live_rows_behind_more_close_rows_than_it_ranks_in_python(gone: str) -> None:
    """Many rows above the floor, the best of them dropped or expired: the search still returns the best live
    ones, however many unusable rows rank above them."""
    index = PartitionIndex(DIM)
    count = 3 * SORTED_IN_PYTHON
    for i in range(count):  # row i's cosine with the query grows with i: the last rows are the best
        index.add(f"e{i}", unit(1, 1 - i / count), f"text {i}", NOW - 1 if gone == "expired" and i >= count // 2
                  else LATER)
    for i in range(count // 2, count):
        if gone == "dropped":
            index.drop(f"e{i}")
    best_live = [f"e{i}" for i in range(count // 2 - 1, count // 2 - 1 - CANDIDATES, -1)]
    assert [c.entry_id for c in index.search(unit(1), 0.5, NOW)] == best_live


def test_an_id_stored_again_after_its_row_was_dropped_gets_a_new_row() -> None:
    """A prompt whose entry expired (or left Redis) and is stored again has the same id: it is indexed again, found
    by a search, and its old row stays dead."""
    index = PartitionIndex(DIM)
    assert index.add("same", unit(1), "first", NOW - 1)
    assert index.add("same", unit(1), "again", LATER) is False  # live: one row per id
    assert index.drop("same") == "first"
    assert "same" not in index
    assert index.add("same", unit(1, 0.1), "again", LATER)
    assert "same" in index and len(index) == 1
    assert [(c.entry_id, c.text) for c in index.search(unit(1), 0.0, NOW)] == [("same", "again")]
    assert index.drop("same") == "again" and len(index) == 0
