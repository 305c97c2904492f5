"""The plain-head parser gives the message http.client's own (the email package) gives, for every kind of head."""

from __future__ import annotations

import email.parser
import http.client
import io
from http.client import HTTPException, HTTPMessage, LineTooLong
from typing import Any

import pytest

from app.upstream import heads

DEEPSEEK = (b"Server: CW\r\nDate: Thu, 03 Dec 2026 11:00:00 GMT\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\nvary: origin, access-control-request-method\r\n"
            b"set-cookie: a=1; Path=/\r\nset-cookie: b=2; Path=/; HttpOnly\r\nx-ds-trace-id: 3f2a\r\n"
            b"access-control-allow-credentials: true\r\nx-content-type-options: nosniff\r\n\r\n")
HEADS = {
    "a provider's head, with a repeated name": DEEPSEEK,
    "OpenAI's rate-limit headers": b"x-ratelimit-limit-requests: 500\r\nx-ratelimit-reset-tokens: 6m0s\r\n"
                                   b"openai-processing-ms: 431\r\nopenai-organization: org-x\r\n\r\n",
    "no headers at all": b"\r\n",
    "LF line ends": b"Content-Type: text/plain\nContent-Length: 2\n\n",
    "an empty value, with and without a space": b"X-Empty:\r\nX-Blank: \r\n\r\n",
    "spaces and tabs kept inside and after the value": b"X-A:  \t a  b \t\r\n\r\n",
    "no space after the colon": b"X-A:b\r\n\r\n",
    "a colon inside the value": b"Location: http://x:80/a\r\n\r\n",
    "Latin-1 bytes in a value": b"X-Name: caf\xe9\r\n\r\n",
    "a folded continuation line": b"X-Long: one\r\n two\r\n\tthree\r\nX-B: c\r\n\r\n",
    "a line without a colon": b"X-A: b\r\nnot a header\r\nX-C: d\r\n\r\n",
    "a line that starts with a colon": b":weird\r\nX-A: b\r\n\r\n",
    "a space in a name": b"Bad Name: x\r\nX-A: b\r\n\r\n",
    "a bare CR inside a value": b"X-A: b\rc\r\nX-D: e\r\n\r\n",
    "the stream ends before the blank line": b"X-A: b\r\n",
    "a Unix From line first": b"From someone\r\nX-A: b\r\n\r\n",
    "a control character in a value": b"X-A: b\x01c\r\n\r\n",
}


def email_parser(raw: bytes) -> HTTPMessage:
    """What http.client itself builds: the lines it reads, joined and decoded, through the email parser."""
    lines = http.client._read_headers(io.BufferedReader(io.BytesIO(raw)))  # noqa: SLF001 - the reference
    return email.parser.Parser(_class=HTTPMessage).parsestr(b"".join(lines).decode("iso-8859-1"))


def state(message: HTTPMessage) -> dict[str, Any]:
    return {**vars(message), "policy": type(message.policy), "defects": [type(d) for d in message.defects]}


@pytest.mark.parametrize("raw", HEADS.values(), ids=HEADS.keys())
def test_the_same_message_as_the_email_parser(raw: bytes) -> None:
    sent = raw + b'{"body": 1}'
    mine = heads.parse_headers(io.BufferedReader(io.BytesIO(sent)))
    assert state(mine) == state(email_parser(sent))
    assert mine.items() == email_parser(sent).items()


@pytest.mark.parametrize("raw", [HEADS["a provider's head, with a repeated name"], HEADS["LF line ends"]])
def test_the_body_is_left_unread(raw: bytes) -> None:
    fp = io.BufferedReader(io.BytesIO(raw + b'{"body": 1}'))
    heads.parse_headers(fp)
    assert fp.read() == b'{"body": 1}'


def test_a_repeated_header_keeps_every_value_in_order() -> None:
    message = heads.parse_headers(io.BufferedReader(io.BytesIO(DEEPSEEK)))
    assert message.get_all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]
    assert message["content-type"] == "application/json"


def test_http_clients_limits_and_errors() -> None:
    too_long = b"X-A: " + b"a" * heads.MAX_LINE + b"\r\n\r\n"
    with pytest.raises(LineTooLong):
        heads.parse_headers(io.BufferedReader(io.BytesIO(too_long)))
    too_many = b"".join(b"X-%d: v\r\n" % i for i in range(heads.MAX_HEADERS + 1)) + b"\r\n"
    with pytest.raises(HTTPException, match="got more than 100 headers"):
        heads.parse_headers(io.BufferedReader(io.BytesIO(too_many)))
    exactly_enough = b"".join(b"X-%d: v\r\n" % i for i in range(heads.MAX_HEADERS - 1)) + b"\r\n"
    assert len(heads.parse_headers(io.BufferedReader(io.BytesIO(exactly_enough)))) == heads.MAX_HEADERS - 1
