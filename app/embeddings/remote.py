"""Client for an OpenAI-compatible ``/v1/embeddings`` API.

Used when the gateway should not run a model in-process. The bearer key is sent in a header only: it is never
logged, never part of an exception message, never in ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

import numpy as np
import requests

from app.embeddings.base import EmbeddingError, l2_normalise
from app.upstream.http import build_retry, build_session

log = logging.getLogger(__name__)


def embeddings_endpoint(url: str) -> str:
    """``{root}/v1/embeddings`` whether ``url`` is the API root or already ends with ``/v1``."""
    base = url.strip().rstrip("/")
    if base.endswith("/v1/embeddings"):
        return base
    if base.endswith("/v1"):
        return base + "/embeddings"
    return base + "/v1/embeddings"


def _decode_embedding(item: Any, index: int) -> np.ndarray:
    vector = item.get("embedding") if isinstance(item, dict) else None
    if isinstance(vector, str):  # encoding_format "base64": little-endian float32 bytes
        try:
            raw = base64.b64decode(vector, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise EmbeddingError(f"embedding {index} is not valid base64") from exc
        if not raw or len(raw) % 4:
            raise EmbeddingError(f"embedding {index} has {len(raw)} bytes, not a float32 vector")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if (
        isinstance(vector, list)
        and vector
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector)
    ):
        return np.asarray(vector, dtype=np.float32)
    raise EmbeddingError(f"embedding {index} is missing or not a list of numbers")


def parse_embeddings_response(payload: Any, expected: int) -> np.ndarray:
    """Turn an OpenAI embeddings answer into an (expected, dim) float32 array in input order."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or len(data) != expected:
        got = len(data) if isinstance(data, list) else "no"
        raise EmbeddingError(f"embeddings answer has {got} items, expected {expected}")
    rows: list[np.ndarray | None] = [None] * expected
    for pos, item in enumerate(data):
        index = item.get("index", pos) if isinstance(item, dict) else pos
        if not isinstance(index, int) or not 0 <= index < expected or rows[index] is not None:
            raise EmbeddingError(f"embeddings answer has a bad or repeated index {index!r}")
        rows[index] = _decode_embedding(item, index)
    dims = {r.shape[0] for r in rows if r is not None}
    if len(dims) != 1:
        raise EmbeddingError(f"embeddings answer mixes dimensions {sorted(dims)}")
    matrix = np.vstack(rows)  # type: ignore[arg-type]
    if not np.all(np.isfinite(matrix)):
        raise EmbeddingError("embeddings answer contains non-finite numbers")
    return l2_normalise(matrix)


class RemoteEmbedder:
    """Embeds through an OpenAI-compatible API; ``dim`` is learnt from the first answer unless given."""

    def __init__(
        self,
        url: str,
        *,
        model: str,
        api_key: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_retries: int = 2,
        backoff_factor: float = 0.25,
        backoff_max: float = 2.0,
        retry_after_max: int = 5,
        dim: int | None = None,
        pool_maxsize: int = 10,
        session: requests.Session | None = None,
    ) -> None:
        if not url:
            raise EmbeddingError("the remote embedder needs a url")
        if not model:
            raise EmbeddingError("the remote embedder needs a model name")
        self._endpoint = embeddings_endpoint(url)
        self._model = model
        self._timeout = (connect_timeout, read_timeout)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._dim = int(dim) if dim else 0
        # The gateway's HTTP policy (429/5xx retried with jittered backoff, Retry-After honoured). The embedding sits
        # in front of a cache look-up, so waits stay short: `retry_after_max` is a few seconds, and a server asking
        # for longer is given up on at once. The environment's proxy settings apply, as they always did here.
        self._session = session or build_session(
            retry=build_retry(retries=max_retries, backoff_factor=backoff_factor, backoff_max=backoff_max,
                              retry_after_max=retry_after_max, read=max_retries, methods=frozenset({"POST"})),
            pool_size=pool_maxsize, trust_env=True)

    def __repr__(self) -> str:
        return f"RemoteEmbedder(endpoint={self._endpoint!r}, model={self._model!r}, dim={self._dim})"

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def model_id(self) -> str:
        return f"remote:{self._model}"

    @property
    def endpoint(self) -> str:
        """Where it posts (no credentials: the key goes in a header)."""
        return self._endpoint

    def close(self) -> None:
        self._session.close()

    def embed(self, texts: list[str]) -> np.ndarray:
        """POST the texts in one request and return their unit-length vectors."""
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        body = {"model": self._model, "input": list(texts), "encoding_format": "float"}
        try:
            response = self._session.post(self._endpoint, json=body, headers=self._headers, timeout=self._timeout)
        except requests.RequestException as exc:
            # Name the exception type only: some carry the request (and with it the Authorization header).
            raise EmbeddingError(f"embedding request to {self._endpoint} failed: {type(exc).__name__}") from exc
        try:
            if response.status_code != 200:
                log.warning("embedding API answered %s", response.status_code, extra={"endpoint": self._endpoint})
                raise EmbeddingError(f"embedding API answered HTTP {response.status_code}")
            try:
                payload = response.json()
            except ValueError as exc:
                raise EmbeddingError("embedding API answered with invalid JSON") from exc
        finally:
            response.close()
        vectors = parse_embeddings_response(payload, len(texts))
        if self._dim and vectors.shape[1] != self._dim:
            raise EmbeddingError(f"embedding API returned dim {vectors.shape[1]}, expected {self._dim}")
        self._dim = vectors.shape[1]
        return vectors
