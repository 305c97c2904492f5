"""The in-process MiniLM embedder, with the real model from the installed wheel."""

from __future__ import annotations

import numpy as np
import pytest

from app.embeddings import Embedder, EmbeddingError, build_embedder
from app.embeddings.local import LocalEmbedder


@pytest.fixture(scope="module")
def embedder() -> LocalEmbedder:
    emb = LocalEmbedder(offload=False)
    emb.load()
    return emb


def test_rows_are_unit_float32_384(embedder: LocalEmbedder) -> None:
    """Each row is a float32 unit vector of the model's 384 dimensions."""
    vectors = embedder.embed(["hello world", "How do I bake bread?", ""])
    assert vectors.shape == (3, 384) and embedder.dim == 384
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[:2], axis=1), 1.0, atol=1e-5)
    assert isinstance(embedder, Embedder)


def test_paraphrases_score_higher_than_unrelated(embedder: LocalEmbedder) -> None:
    """A paraphrase is closer than an unrelated sentence."""
    a, b, c = embedder.embed(
        ["How can I learn Python quickly?", "What is the fastest way to learn Python?", "What is the capital of Peru?"]
    )
    assert a @ b > 0.7
    assert a @ b > a @ c + 0.3


def test_batch_matches_single(embedder: LocalEmbedder) -> None:
    """Padding in a batch does not change any row: batched and one-at-a-time results agree."""
    texts = ["short", "a considerably longer sentence, so the batch needs padding for the others", "mid length text"]
    batched = embedder.embed(texts)
    single = np.vstack([embedder.embed([t]) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_long_input_is_truncated(embedder: LocalEmbedder) -> None:
    """Texts far beyond the model's window embed without error."""
    vectors = embedder.embed(["word " * 5000])
    assert vectors.shape == (1, 384)


def test_empty_list_and_bad_input(embedder: LocalEmbedder) -> None:
    """No texts gives an empty (0, 384) array; a non-string is an EmbeddingError."""
    assert embedder.embed([]).shape == (0, 384)
    with pytest.raises(EmbeddingError):
        embedder.embed([123])  # type: ignore[list-item]


def test_works_without_gevent_patching() -> None:
    """Built by the factory in a plain process, it runs inference on the calling thread."""
    emb = build_embedder("local")
    assert isinstance(emb, LocalEmbedder)
    assert emb._offload is False
    assert emb.embed(["plain script"]).shape == (1, 384)


def test_bad_model_checksum_is_refused(tmp_path) -> None:
    """A model file whose SHA-256 does not match is never loaded."""
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not a model")
    emb = LocalEmbedder(offload=False, model_path=fake, expected_sha256="0" * 64)
    with pytest.raises(EmbeddingError, match="sha256"):
        emb.embed(["x"])


def test_unknown_provider() -> None:
    """An unknown provider name fails at build time."""
    with pytest.raises(EmbeddingError):
        build_embedder("nope")
