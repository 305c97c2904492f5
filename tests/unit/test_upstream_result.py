"""An upstream answer as the proxy reads it: one read of a declared length, otherwise bounded piece by piece."""

from __future__ import annotations

import io

import pytest
from urllib3 import HTTPResponse

from app.errors import UpstreamResponseTooLarge
from app.upstream.client import UpstreamResult


def answer(body: bytes, headers: dict[str, str], max_bytes: int = 0) -> UpstreamResult:
    response = HTTPResponse(body=io.BytesIO(body), status=200, headers=headers, preload_content=False)
    result = UpstreamResult(status=200, content_type="application/json", response=response, backend="b",
                            key_id="k", retries=0, upstream_ms=1.0)
    result.max_bytes = max_bytes
    return result


@pytest.mark.parametrize(("headers", "sized"), [
    ({"Content-Length": "2"}, True),
    ({}, False),  # no length: it may still be queueing upstream (DeepSeek's blank lines)
    ({"Transfer-Encoding": "chunked"}, False),
    ({"Content-Length": "2", "Transfer-Encoding": "chunked"}, False),  # HTTP: chunked wins, the length is ignored
    ({"Content-Length": "2", "Content-Encoding": "gzip"}, False),
])
def test_an_answer_is_read_whole_only_when_its_length_is_declared(headers: dict[str, str], sized: bool) -> None:
    assert answer(b"{}", headers).sized is sized


def test_a_declared_length_does_not_lift_the_bound_of_a_chunked_answer() -> None:
    """An upstream sending both headers is read chunked, so the length says nothing: MAX_RESPONSE_BYTES holds."""
    result = answer(b"x" * 5000, {"Content-Length": "10", "Transfer-Encoding": "chunked"}, max_bytes=1000)
    with pytest.raises(UpstreamResponseTooLarge):
        result.read()


def test_a_sized_answer_is_read_in_one_piece() -> None:
    assert answer(b'{"ok": true}', {"Content-Length": "12"}, max_bytes=1000).read() == b'{"ok": true}'
