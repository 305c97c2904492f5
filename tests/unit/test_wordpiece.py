"""The ASCII WordPiece gives the packaged tokenizer's ids exactly, or steps aside (None) where it cannot.

Its ids decide which cached answers a new prompt is compared with: one id off and the static stage would see
another vector than the one it was distilled for. So every text here is checked against the tokenizers library.
"""

from __future__ import annotations

import json
import random
import string
from importlib import resources

import numpy as np
import pytest
from tokenizers import Tokenizer

from app.embeddings.static import MAX_TOKENS, StaticEmbedder
from app.embeddings.wordpiece import AsciiWordPiece

TOKENIZER_JSON = resources.files("app.embeddings").joinpath("data/tokenizer.json").read_text("utf-8")


@pytest.fixture(scope="module")
def library() -> Tokenizer:
    tokenizer = Tokenizer.from_str(TOKENIZER_JSON)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    return tokenizer


@pytest.fixture()
def fast() -> AsciiWordPiece:
    return AsciiWordPiece(json.loads(TOKENIZER_JSON))


def library_ids(library: Tokenizer, text: str) -> list[int]:
    return library.encode(text, add_special_tokens=False).ids


EDGE_CASES = [
    "", "   ", "\t\n\r", "Hello, World!", "HOW do I convert a LIST to a dict in Python?",
    "Summarise support ticket 1234567 in one line for the on-call engineer.",
    "e1234 E5678x error_code=0x1F; x+=1 && y--", "don't won't it's o'clock", "a.b,c;d:e!f?g(h)i[j]k{l}m<n>o",
    "~`!@#$%^&*()-_=+[]{}\\|;:'\",.<>/?", "unaffable unbelievably antidisestablishmentarianism",
    "qqqqxzzzqq zzxxqqjj", "##ing ## #", "x" * 100, "y" * 101, "ab" * 60 + " tail",
    "SELECT * FROM orders WHERE customer_id = 42 AND created_at >= now() - interval '1 month';",
    "def f(x):\n\treturn {'a': [1, 2, 3]}\r\n", "mask MASK Mask [mask] [ MASK ] CLS SEP",
    "word " * 600,  # past MAX_TOKENS: truncated as the library truncates
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_plain_ascii_gets_the_library_ids(fast: AsciiWordPiece, library: Tokenizer, text: str) -> None:
    assert fast.encode(text, MAX_TOKENS) == library_ids(library, text)


@pytest.mark.parametrize("text", [
    "naïve café", "curly “quotes”", "emoji 🙂 here", "中文 text", "nul\x00byte", "bell\x07", "form\x0cfeed",
    "vertical\x0btab", "delete\x7f", "a [MASK] token", "[CLS] first", "ends with [SEP]", "[PAD][UNK]",
])
def test_other_text_is_left_to_the_library(fast: AsciiWordPiece, text: str) -> None:
    assert fast.encode(text, MAX_TOKENS) is None


def test_random_ascii_texts_match_the_library(fast: AsciiWordPiece, library: Tokenizer) -> None:
    """Vocabulary words (whole and as pieces), mixed case, digits and punctuation, glued together at random."""
    rng = random.Random(20261202)
    specials = {token["content"] for token in json.loads(TOKENIZER_JSON)["added_tokens"]}
    vocab = [word.lstrip("#") for word in json.loads(TOKENIZER_JSON)["model"]["vocab"]
             if word.isascii() and word not in specials]
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n\r"
    for _ in range(3000):
        parts = []
        for _ in range(rng.randint(0, 40)):
            roll = rng.random()
            if roll < 0.6:
                word = rng.choice(vocab)
                parts.append(word.upper() if rng.random() < 0.1 else word.capitalize() if rng.random() < 0.2 else word)
            else:
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
            parts.append(rng.choice(["", " ", " ", "  ", "\n", ", ", "-"]))
        text = "".join(parts)
        ids = fast.encode(text, MAX_TOKENS)
        assert ids is not None and ids == library_ids(library, text), text


def test_static_vectors_are_those_of_the_library_ids(library: Tokenizer) -> None:
    """The embedder's vector and token count for a plain prompt are the ones the library's ids give."""
    embedder = StaticEmbedder()
    texts = ["Explain error code E4012 to a user who is not technical.", "naïve question about café prices"]
    vectors, counts = embedder.embed_counted(texts)
    for text, vector, count in zip(texts, vectors, counts, strict=True):
        ids = library_ids(library, text)
        expected = embedder._table[ids].sum(axis=0, dtype=np.float32)
        assert count == len(ids)
        np.testing.assert_array_equal(vector, expected / np.linalg.norm(expected))


def test_one_text_gets_the_vector_a_batch_gives_it() -> None:
    """A look-up embeds one prompt on a shorter path: its vector and count are those of the batch path, bit for bit
    (a stored vector and a query's must not differ by rounding), for plain, non-ASCII, empty and over-long text."""
    embedder = StaticEmbedder()
    for text in [*EDGE_CASES, "naïve question about café prices", "中文 text", "Explain error code E4012."]:
        (one,), (count,) = embedder.embed_counted([text])
        batch, counts = embedder.embed_counted([text, "another text"])
        assert one.dtype == np.float32 and count == counts[0]
        assert np.array_equal(one, batch[0]), text[:40]


def test_the_word_cache_stays_bounded(fast: AsciiWordPiece, library: Tokenizer,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.embeddings.wordpiece.CACHED_WORDS", 50)
    for n in range(500):
        text = f"ticket {n} item{n * 7} code{n * 13}"
        assert fast.encode(text, MAX_TOKENS) == library_ids(library, text)
    assert len(fast._words) <= 50
