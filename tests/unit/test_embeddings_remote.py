"""The OpenAI-compatible embeddings client, against a tiny local HTTP server started by the test."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from app.embeddings import EmbeddingError, build_embedder
from app.embeddings.remote import RemoteEmbedder, embeddings_endpoint

SECRET = "sk-test-very-secret"


class FakeAPI:
    """Records requests; answers from a queue of (status, body) or with a float answer by default."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict, dict]] = []
        self.queue: list[tuple[int, object]] = []
        self.base64 = False


def _vector(text: str) -> list[float]:
    return [float(len(text)), 1.0, 2.0, 2.0]


@pytest.fixture()
def api() -> Iterator[tuple[FakeAPI, str]]:
    state = FakeAPI()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append((self.path, dict(self.headers), body))
            if state.queue:
                status, payload = state.queue.pop(0)
            else:
                data = []
                for i, text in enumerate(body["input"]):
                    vec = _vector(text)
                    emb: object = (
                        base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode() if state.base64 else vec
                    )
                    data.append({"object": "embedding", "index": i, "embedding": emb})
                status, payload = 200, {"object": "list", "data": list(reversed(data)), "model": body["model"]}
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def make(url: str, **kw: object) -> RemoteEmbedder:
    kw.setdefault("backoff_factor", 0.0)
    return RemoteEmbedder(url, model="text-embedding-test", api_key=SECRET, **kw)  # type: ignore[arg-type]


def test_endpoint_with_or_without_v1() -> None:
    """A base url with or without /v1 (and trailing slashes) maps to one endpoint."""
    assert embeddings_endpoint("http://h:1") == "http://h:1/v1/embeddings"
    assert embeddings_endpoint("http://h:1/v1/") == "http://h:1/v1/embeddings"
    assert embeddings_endpoint("http://h:1/v1/embeddings") == "http://h:1/v1/embeddings"


def test_float_answer_normalised_in_order(api: tuple[FakeAPI, str]) -> None:
    """Vectors come back unit-length, float32, in input order even when the answer is shuffled."""
    state, url = api
    emb = make(url + "/v1")
    out = emb.embed(["a", "bbbb"])
    assert out.dtype == np.float32 and out.shape == (2, 4) and emb.dim == 4
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out[1], np.array([4, 1, 2, 2]) / 5.0, atol=1e-6)
    path, headers, body = state.requests[0]
    assert path == "/v1/embeddings"
    assert body == {"model": "text-embedding-test", "input": ["a", "bbbb"], "encoding_format": "float"}
    assert headers["Authorization"] == f"Bearer {SECRET}"


def test_base64_answer(api: tuple[FakeAPI, str]) -> None:
    """A base64 (little-endian float32) answer decodes to the same vectors."""
    state, url = api
    state.base64 = True
    out = make(url).embed(["abcd"])
    np.testing.assert_allclose(out[0], np.array([4, 1, 2, 2]) / 5.0, atol=1e-6)


def test_retries_429_and_5xx(api: tuple[FakeAPI, str]) -> None:
    """429 and 503 are retried (POST included) until an answer arrives."""
    state, url = api
    state.queue = [(429, {"error": {"message": "slow down"}}), (503, {"error": {"message": "busy"}})]
    out = make(url, max_retries=2).embed(["x"])
    assert out.shape == (1, 4) and len(state.requests) == 3


def test_gives_up_without_leaking_the_key(api: tuple[FakeAPI, str]) -> None:
    """After the retries the last status becomes an EmbeddingError that never contains the key."""
    state, url = api
    state.queue = [(500, {"error": {"message": SECRET}})] * 3
    emb = make(url, max_retries=1)
    with pytest.raises(EmbeddingError) as info:
        emb.embed(["x"])
    assert "500" in str(info.value) and SECRET not in str(info.value) and SECRET not in repr(emb)
    assert len(state.requests) == 2


@pytest.mark.parametrize(
    "payload",
    [b"not json", {"data": []}, {"data": [{"index": 0, "embedding": "!!notbase64"}]}, {"data": [{"index": 0}]}],
)
def test_malformed_answers(api: tuple[FakeAPI, str], payload: object) -> None:
    """Nonsense answers are EmbeddingErrors, not crashes."""
    state, url = api
    state.queue = [(200, payload)]
    with pytest.raises(EmbeddingError):
        make(url).embed(["x"])


def test_dimension_must_stay_the_same(api: tuple[FakeAPI, str]) -> None:
    """A configured dimension that the API does not honour is an error."""
    _, url = api
    with pytest.raises(EmbeddingError, match="dim"):
        make(url, dim=8).embed(["x"])


def test_unreachable_server_is_an_embedding_error() -> None:
    """A refused connection surfaces as EmbeddingError after the retries, without the key."""
    emb = build_embedder(
        "openai",
        url="http://127.0.0.1:9",
        api_key=SECRET,
        model="m",
        max_retries=0,
        connect_timeout=0.5,
        read_timeout=0.5,
    )
    with pytest.raises(EmbeddingError) as info:
        emb.embed(["x"])
    assert SECRET not in str(info.value)
