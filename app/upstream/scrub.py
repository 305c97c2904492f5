"""Upstream keys never reach a client: configured keys, and any tail of one, are cut from what is passed on.

Providers quote keys in their error messages, whole or masked to a tail (`sk-...abcd`); an upstream error body
is otherwise passed through verbatim, so every one goes through `KeyScrubber.scrub` first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MIN_TAIL = 4  # the shortest tail providers print (OpenAI: the last four characters)
MASK = b"***"


class KeyScrubber:
    def __init__(self, secrets: Iterable[str]) -> None:
        parts: set[str] = set()
        for secret in secrets:
            if len(secret) < MIN_TAIL:
                continue
            parts.update(secret[-n:] for n in range(MIN_TAIL, len(secret) + 1))
        # Longest first, so a whole key is cut as one; a tail only where the key would end (no token character
        # follows), so ordinary words that happen to end like a key stay readable.
        alternatives = b"|".join(re.escape(p.encode()) for p in sorted(parts, key=len, reverse=True))
        self._pattern = re.compile(b"(?:" + alternatives + rb")(?![A-Za-z0-9_\-])") if parts else None

    def scrub(self, data: bytes) -> bytes:
        if self._pattern is None:
            return data
        return self._pattern.sub(MASK, data)
