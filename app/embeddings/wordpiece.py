"""WordPiece for plain-ASCII text, with a word cache: the packaged tokenizer's ids at a fraction of its cost.

`tokenizers.Tokenizer.encode` costs 50-70 us for a one-line prompt (its normalizer, pre-tokenizer, offsets and
the crossing into Rust), most of the static stage of an L2 look-up. For text made only of printable ASCII, tab,
newline and carriage return - most prompts - BERT's normalizer and pre-tokenizer come down to lower-casing and
splitting on whitespace and punctuation (every printable ASCII character that is not a letter or a digit is BERT
punctuation), and a word always splits into the same pieces: cached per word, a prompt costs one regex scan and a
dict look-up per word. Any other text (non-ASCII, control characters, or a special token such as ``[MASK]``, which
the library matches in the raw text) gets None, and the caller asks the library: the ids are always its ids
(tests/unit/test_wordpiece.py compares the two).
"""

from __future__ import annotations

import re
from typing import Any

_PLAIN = re.compile(r"[\t\n\r\x20-\x7e]*")
_WORDS = re.compile(r"[a-z0-9]+|[!-/:-@\[-`{-~]")  # after lower-casing: runs of letters and digits, or one mark
CACHED_WORDS = 20_000  # the cache starts again when full (numbers and ids make many one-off words)


class AsciiWordPiece:
    """The WordPiece of a BERT tokenizer.json, for the texts where it is this simple; None for the others."""

    def __init__(self, tokenizer: dict[str, Any]) -> None:
        model, normalizer = tokenizer.get("model") or {}, tokenizer.get("normalizer") or {}
        if (model.get("type") != "WordPiece" or normalizer.get("type") != "BertNormalizer"
                or not normalizer.get("lowercase") or (tokenizer.get("pre_tokenizer") or {}).get("type")
                != "BertPreTokenizer"):
            raise ValueError("not an uncased BERT WordPiece tokenizer")
        self._vocab: dict[str, int] = model["vocab"]
        self._unknown = (self._vocab[model["unk_token"]],)
        self._prefix: str = model["continuing_subword_prefix"]
        self._max_chars: int = model["max_input_chars_per_word"]
        self._specials = tuple(token["content"] for token in tokenizer.get("added_tokens") or ())
        self._words: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str, max_tokens: int) -> list[int] | None:
        """The first ``max_tokens`` ids of ``text`` without special tokens, or None: ask the library."""
        if not _PLAIN.fullmatch(text) or any(special in text for special in self._specials):
            return None
        ids: list[int] = []
        words = self._words
        for word in _WORDS.findall(text.lower()):
            pieces = words.get(word)
            if pieces is None:
                if len(words) >= CACHED_WORDS:
                    words.clear()
                pieces = words[word] = self._pieces(word)
            ids += pieces
            if len(ids) >= max_tokens:
                return ids[:max_tokens]
        return ids

    def _pieces(self, word: str) -> tuple[int, ...]:
        """Greedy longest-match-first, as BERT's WordPiece: the whole word is unknown if any part has no piece."""
        if len(word) > self._max_chars:
            return self._unknown
        vocab, pieces, start = self._vocab, [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = vocab.get(word[start:end] if start == 0 else self._prefix + word[start:end])
                if piece is not None:
                    break
                end -= 1
            else:
                return self._unknown
            pieces.append(piece)
            start = end
        return tuple(pieces)
