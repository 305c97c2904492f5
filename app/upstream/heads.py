"""An upstream answer's header lines, parsed as http.client parses them, without the email package for a plain head.

http.client hands every response head to `email.parser`, a general MIME parser: for the few `Name: value` lines
of an API answer it cost more instructions than anything else the gateway does per request (side by side under
callgrind: 133,000 of 2.12 million per cache-off chat request, with the mock's three headers; a provider's head
has ten to fifteen). `parse_headers` reads the lines as http.client does, with its limits and errors, and builds
the same `HTTPMessage` itself when every line is a plain `Name: value`; a head with anything else (a folded
continuation line, a line without a name, a bare CR) goes to the email parser as before, so the result is the
same message in every case (tests/unit/test_upstream_heads.py compares the two on such heads).
`app/upstream/connection.py` installs it in http.client; nothing else uses it.
"""

from __future__ import annotations

import email.parser
import re
from http.client import HTTPException, HTTPMessage, LineTooLong
from typing import IO

# http.client's own limits (its _MAXLINE and _MAXHEADERS), with the same errors past them.
MAX_LINE = 65536
MAX_HEADERS = 100
# What the email parser takes for a header line: a name of printable ASCII without ':' or space, then ':'.
# The value may not hold CR or LF (the parser would split the line there); the line ends in CRLF or LF.
_PLAIN_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+:[^\r\n]*\r?\n")


def read_head(fp: IO[bytes]) -> list[bytes]:
    """The head's lines through the blank line that ends it (or the end of the stream), as http.client reads them."""
    lines: list[bytes] = []
    while True:
        line = fp.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise LineTooLong("header line")
        lines.append(line)
        if len(lines) > MAX_HEADERS:
            raise HTTPException(f"got more than {MAX_HEADERS} headers")
        if line in (b"\r\n", b"\n", b""):
            return lines


def parse_headers(fp: IO[bytes], _class: type[HTTPMessage] = HTTPMessage) -> HTTPMessage:
    """`http.client.parse_headers`, with the same signature and result."""
    lines = read_head(fp)
    fields = lines[:-1] if lines[-1] in (b"\r\n", b"\n") else lines
    if not all(_PLAIN_LINE.fullmatch(line) for line in fields):
        return email.parser.Parser(_class=_class).parsestr(b"".join(lines).decode("iso-8859-1"))
    message = _class()
    for line in fields:
        name, _, value = line.decode("iso-8859-1").partition(":")
        # The email parser's compat32 policy keeps the value as sent, less the spaces after ':' and the line end.
        message.set_raw(name, value.lstrip(" \t").rstrip("\r\n"))
    message.set_payload("")  # the email parser leaves the (empty) rest of the text as the payload
    return message
