"""The benchmark client's response parser: pure, fed byte by byte and in one piece."""

from __future__ import annotations

import pytest

from tools.bench_client import ParseError, ResponseParser, encode_request, sse_data

JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\nX-Cache-Layer: L1\r\n\r\n"
    b'{"ok":true}'
)
SSE_BODY = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def feed_bytewise(parser: ResponseParser, data: bytes) -> list[bool]:
    return [parser.feed(data[i : i + 1]) for i in range(len(data))]


def test_content_length_in_one_piece() -> None:
    """A Content-Length response completes exactly at its last byte, headers lower-cased."""
    parser = ResponseParser(keep_body=True)
    assert parser.feed(JSON_RESPONSE)
    assert parser.status == 200
    assert parser.headers["x-cache-layer"] == "L1"
    assert bytes(parser.body) == b'{"ok":true}'
    assert not parser.close


def test_content_length_byte_by_byte_without_keeping_the_body() -> None:
    """Fed one byte at a time, it is complete only on the last byte; the body is counted, not kept."""
    parser = ResponseParser()
    done = feed_bytewise(parser, JSON_RESPONSE)
    assert done[-1] and not any(done[:-1])
    assert parser.body == bytearray()


def test_bytes_after_the_response_are_left_over() -> None:
    """Bytes of a following response stay in `rest`."""
    parser = ResponseParser()
    assert parser.feed(JSON_RESPONSE + b"HTTP/1.1")
    assert parser.rest == b"HTTP/1.1"


def test_chunked_body() -> None:
    """A chunked body is reassembled and completes at the terminating zero chunk."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    parser = ResponseParser(keep_body=True)
    data = head + chunked(b"hello ", b"world")
    done = feed_bytewise(parser, data)
    assert done[-1] and not any(done[:-1])
    assert bytes(parser.body) == b"hello world"


def test_chunked_with_extension_and_trailer() -> None:
    """Chunk extensions and trailer fields are skipped."""
    data = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n")
    parser = ResponseParser(keep_body=True)
    assert parser.feed(data)
    assert bytes(parser.body) == b"abc"


def test_sse_stream_read_to_the_end() -> None:
    """An SSE stream in chunks is read to its end and its events parsed in order."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    events = [e + b"\n\n" for e in SSE_BODY.split(b"\n\n") if e]
    data = head + chunked(*events)
    parser = ResponseParser(keep_body=True)
    assert not parser.feed(data[:-5])  # everything but the end of the zero chunk
    assert parser.feed(data[-5:])
    assert sse_data(bytes(parser.body)) == ['{"a":1}', '{"b":2}', "[DONE]"]


def test_body_until_close() -> None:
    """Without a length or chunking the body runs until the peer closes the connection."""
    parser = ResponseParser(keep_body=True)
    assert not parser.feed(b"HTTP/1.0 200 OK\r\n\r\npartial")
    assert parser.close
    assert parser.finish()
    assert bytes(parser.body) == b"partial"


def test_no_body_statuses_and_connection_close() -> None:
    """204 has no body; `Connection: close` is reported so the client reconnects."""
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    assert parser.close


def test_garbage_is_an_error() -> None:
    """A line that is not an HTTP status line raises ParseError."""
    with pytest.raises(ParseError):
        ResponseParser().feed(b"SSH-2.0-OpenSSH\r\n\r\n")


def test_encode_request() -> None:
    """The request carries Host, Content-Length and the given headers before the body."""
    data = encode_request("POST", "/v1/chat/completions", "127.0.0.1:1", {"Authorization": "Bearer k"}, b"{}")
    head, body = data.split(b"\r\n\r\n")
    assert head.split(b"\r\n") == [b"POST /v1/chat/completions HTTP/1.1", b"Host: 127.0.0.1:1",
                                   b"Content-Length: 2", b"Authorization: Bearer k"]
    assert body == b"{}"
