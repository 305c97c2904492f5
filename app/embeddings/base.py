"""The embedding interface the semantic cache depends on.

Every provider returns float32 rows that are already L2-normalised, so the cache compares vectors with a plain dot
product and never has to normalise on the request path.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


class EmbeddingError(Exception):
    """Any failure to embed: the caller treats it as an L2 miss, never as a failed request."""


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit-length float32 vectors of one fixed dimension."""

    @property
    def dim(self) -> int:
        """Length of every vector (0 until known, for a remote model not yet asked)."""
        ...

    @property
    def model_id(self) -> str:
        """Names the vector space: vectors from different model ids must never be compared."""
        ...

    def embed(self, texts: list[str]) -> np.ndarray:
        """Return an (n, dim) float32 array, each row L2-normalised; raise EmbeddingError on failure."""
        ...


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Scale each row to unit length (zero rows stay zero) and return float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.maximum(norms, np.float32(1e-12), out=norms)
    return (vectors / norms).astype(np.float32, copy=False)


def build_embedder(
    provider: str,
    *,
    url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    max_retries: int = 2,
    dim: int | None = None,
    offload: bool | None = None,
    pool_maxsize: int = 10,
) -> Embedder:
    """Build the embedder named by ``provider`` (``local`` or ``openai``) from explicit settings.

    Called by the app factory after the worker forks; nothing here reads the environment.
    """
    name = (provider or "").strip().lower()
    if name == "local":
        from app.embeddings.local import LocalEmbedder

        return LocalEmbedder(offload=offload)
    if name in ("openai", "remote"):
        from app.embeddings.remote import RemoteEmbedder

        if not url or not model:
            raise EmbeddingError("the openai embedding provider needs a url and a model")
        return RemoteEmbedder(
            url,
            model=model,
            api_key=api_key,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_retries=max_retries,
            dim=dim,
            pool_maxsize=pool_maxsize,
        )
    raise EmbeddingError(f"unknown embedding provider {provider!r} (expected 'local' or 'openai')")
