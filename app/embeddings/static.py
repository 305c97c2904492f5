"""A static embedding: one row per WordPiece token, a text's vector is the sum of its tokens' rows.

Distilled once from the packaged MiniLM by ``tools/distill_static.py`` (model2vec's recipe) and shipped as
``data/static-minilm.npy``. Embedding a prompt costs a tokenisation and a gather-and-sum (tens of microseconds, no
model run), which is what lets the semantic cache decide whether a new prompt has any near neighbour before it pays
for the transformer. The table is memory-mapped read-only, so the workers of one machine share its pages.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from app.embeddings.base import EmbeddingError, l2_normalise
from app.embeddings.wordpiece import AsciiWordPiece

TABLE_DIM = 256
#: Tokens read per text: far beyond what a paraphrase check needs, and bounds the cost of a giant prompt.
MAX_TOKENS = 512
DEFAULT_TABLE = Path(str(resources.files("app.embeddings").joinpath("data/static-minilm.npy")))


class StaticEmbedder:
    """Sum-of-token-rows sentence vectors over the transformer's own tokenizer; unit rows, float32."""

    def __init__(self, table_path: Path = DEFAULT_TABLE, expected_model_sha256: str | None = None) -> None:
        from tokenizers import Tokenizer

        try:
            meta = json.loads(table_path.with_suffix(".json").read_text("utf-8"))
            # A plain ndarray view of the mapping: numpy's memmap subclass makes every row gather slower.
            self._table = np.load(table_path, mmap_mode="r").view(np.ndarray)
            tok_json = resources.files("app.embeddings").joinpath("data/tokenizer.json").read_text("utf-8")
        except (OSError, ValueError) as exc:
            raise EmbeddingError(f"cannot load the static embedding table {table_path}: {exc}") from exc
        if expected_model_sha256 and meta.get("model_sha256") != expected_model_sha256:
            raise EmbeddingError(
                f"{table_path} was distilled from another model file; run tools/distill_static.py again"
            )
        self.model_sha256 = str(meta.get("model_sha256", ""))
        self._tokenizer = Tokenizer.from_str(tok_json)
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self._ascii = AsciiWordPiece(json.loads(tok_json))  # the same ids, cheaper, for plain-ASCII text

    @property
    def dim(self) -> int:
        return int(self._table.shape[1])

    @property
    def model_id(self) -> str:
        return f"static-minilm-{self.model_sha256[:12]}"

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embed_counted(texts)[0]

    def embed_counted(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """The vectors, and each text's WordPiece token count (capped at MAX_TOKENS): how much of it a transformer
        reading ``n`` tokens would see. One tokenisation serves both."""
        if len(texts) == 1:  # a look-up's one prompt: fewer numpy calls, the same vector bit for bit
            return self._embed_one(texts[0])
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        counts = []
        # One `encode` per text, not `encode_batch`: the batch call hands even a single text to the tokenizers'
        # thread pool, and waking it costs an idle worker about as much CPU as the encoding (226 against 117 us
        # per prompt, measured with 30 ms between prompts).
        for row, text in enumerate(texts):
            ids = self.token_ids(text)
            counts.append(len(ids))
            if ids:
                out[row] = self._table[ids].sum(axis=0, dtype=np.float32)
        return l2_normalise(out), counts

    def _embed_one(self, text: str) -> tuple[np.ndarray, list[int]]:
        """`embed_counted` of one text, in a third of its numpy calls (each costs several microseconds on the cold
        caches a new prompt meets): the norm is computed as `l2_normalise` computes a row's."""
        ids = self.token_ids(text)
        if not ids:
            return np.zeros((1, self.dim), dtype=np.float32), [0]
        row = self._table[ids].sum(axis=0, dtype=np.float32, keepdims=True)
        norm = np.sqrt(np.add.reduce(row * row, axis=1, keepdims=True))
        np.maximum(norm, np.float32(1e-12), out=norm)
        row /= norm
        return row, [len(ids)]

    def token_ids(self, text: str) -> list[int]:
        """The text's first MAX_TOKENS WordPiece ids, without [CLS]/[SEP]."""
        ids = self._ascii.encode(text, MAX_TOKENS)
        return ids if ids is not None else self._tokenizer.encode(text, add_special_tokens=False).ids
