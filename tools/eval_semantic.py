"""Measure the gateway's L2 (semantic cache) decision on labelled question pairs.

Runs the same embedder, threshold and :func:`app.cache.verify.is_semantic_hit` the gateway uses over a pairs file
(``{"a", "b", "label", "source", "id"}`` per line) and prints, per threshold, how many hard negatives would be served
(false hits) against how many true paraphrases would be (useful hits), with and without the verifier.

    .venv/bin/python tools/eval_semantic.py                  # all pairs, plus even/odd id halves
    .venv/bin/python tools/eval_semantic.py --limit 500 --split odd
    .venv/bin/python tools/eval_semantic.py --cache /tmp/l2-vectors.npz   # embed once, then seconds per run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.cache.verify import DEFAULT_SEMANTIC_THRESHOLD, is_semantic_hit  # noqa: E402
from app.embeddings import Embedder, build_embedder  # noqa: E402

DEFAULT_PAIRS = REPO.parent / "shared" / "data" / "paraphrase-dev.jsonl"
THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98)
USEFUL = ("qqp_dup", "gpt_paraphrase")


def load_pairs(path: Path, limit: int | None, split: str) -> list[dict]:
    pairs = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                pairs.append(json.loads(line))
    if split in ("even", "odd"):
        pairs = [p for p in pairs if p["id"] % 2 == (0 if split == "even" else 1)]
    return pairs[:limit] if limit else pairs


def embed_all(embedder: Embedder, texts: list[str], workers: int, batch: int = 64) -> dict[str, np.ndarray]:
    """Embed every distinct text once, in batches, over ``workers`` threads (onnxruntime releases the GIL)."""
    chunks = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(embedder.embed, chunks))
    return {t: v for chunk, vecs in zip(chunks, results, strict=True) for t, v in zip(chunk, vecs, strict=True)}


def cached_embed(embedder: Embedder, texts: list[str], workers: int, cache: Path | None) -> dict[str, np.ndarray]:
    """:func:`embed_all`, reusing vectors saved in ``cache`` (an .npz keyed by model and text hash; keep it out
    of the repository) and adding the missing ones to it."""
    if cache is None:
        return embed_all(embedder, texts, workers)

    def key(text: str) -> str:
        return hashlib.sha256(f"{embedder.model_id}\0{text}".encode()).hexdigest()[:32]

    known: dict[str, np.ndarray] = {}
    if cache.exists():
        with np.load(cache) as saved:
            known = dict(zip(saved["keys"].tolist(), saved["vectors"], strict=True))
    missing = [t for t in texts if key(t) not in known]
    if missing:
        for text, vector in embed_all(embedder, missing, workers).items():
            known[key(text)] = vector
        keys = sorted(known)
        np.savez(cache, keys=np.array(keys), vectors=np.stack([known[k] for k in keys]).astype(np.float32))
    return {t: known[key(t)] for t in texts}


def pct(flags: Iterable[bool]) -> float:
    values = list(flags)
    return 100.0 * sum(values) / len(values) if values else float("nan")


def table(pairs: list[dict], sims: np.ndarray, thresholds: Iterable[float], title: str) -> str:
    by_source: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_source.setdefault(p["source"], []).append(i)
    useful = [i for s in USEFUL for i in by_source.get(s, [])]
    hard, neg = by_source.get("qqp_hardneg", []), by_source.get("qqp_neg", [])
    dup, gpt = by_source.get("qqp_dup", []), by_source.get("gpt_paraphrase", [])
    counts = f"hardneg={len(hard)} neg={len(neg)} dup={len(dup)} gpt={len(gpt)}"
    lines = [
        f"== {title} ({counts})",
        "            | cosine only      | cosine + verify",
        "  threshold | FH-hard  useful  | FH-hard  FH-neg  use-dup  use-gpt  use-all",
    ]
    for th in thresholds:
        hit = np.array([bool(is_semantic_hit(float(sims[i]), p["a"], p["b"], th)) for i, p in enumerate(pairs)])
        raw = sims >= th
        mark = "  <- default" if abs(th - DEFAULT_SEMANTIC_THRESHOLD) < 1e-9 else ""
        lines.append(
            f"  {th:9.3f} | {pct(raw[hard]):6.1f}% {pct(raw[useful]):6.1f}% | "
            f"{pct(hit[hard]):6.1f}% {pct(hit[neg]):6.1f}% {pct(hit[dup]):7.1f}% {pct(hit[gpt]):7.1f}% "
            f"{pct(hit[useful]):7.1f}%{mark}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N pairs (after --split)")
    parser.add_argument(
        "--split",
        choices=("all", "even", "odd", "report"),
        default="report",
        help="report = all pairs, then even ids (tuning half) and odd ids (held out)",
    )
    parser.add_argument("--provider", default="local")
    parser.add_argument("--url", default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--workers", type=int, default=2, help="embedding threads")
    parser.add_argument("--cache", type=Path, default=None, help="an .npz of saved vectors (outside the repo)")
    parser.add_argument("--thresholds", default=",".join(f"{t:.2f}" for t in THRESHOLDS))
    args = parser.parse_args(argv)

    thresholds = sorted({float(t) for t in args.thresholds.split(",")} | {DEFAULT_SEMANTIC_THRESHOLD})
    pairs = load_pairs(args.pairs, args.limit, "all" if args.split == "report" else args.split)
    embedder = build_embedder(args.provider, url=args.url, api_key=args.api_key, model=args.model, offload=False)
    texts = sorted({p["a"] for p in pairs} | {p["b"] for p in pairs})
    started = time.perf_counter()
    vectors = cached_embed(embedder, texts, args.workers, args.cache)
    embed_s = time.perf_counter() - started
    sims = np.array([float(vectors[p["a"]] @ vectors[p["b"]]) for p in pairs], dtype=np.float32)

    started = time.perf_counter()
    for p in pairs:
        is_semantic_hit(1.0, p["a"], p["b"])
    verify_us = (time.perf_counter() - started) / max(1, len(pairs)) * 1e6

    print(
        f"pairs={len(pairs)} texts={len(texts)} model={embedder.model_id} embed={embed_s:.1f}s "
        f"verify={verify_us:.0f}us/pair default_threshold={DEFAULT_SEMANTIC_THRESHOLD}"
    )
    print("FH = false hits (pairs that must not be served, served); useful = paraphrase pairs served")
    sections: list[tuple[str, Callable[[dict], bool]]] = [(args.split, lambda p: True)]
    if args.split == "report":
        sections = [
            ("all", lambda p: True),
            ("even ids (tuning half)", lambda p: p["id"] % 2 == 0),
            ("odd ids (held out)", lambda p: p["id"] % 2 == 1),
        ]
    for title, keep in sections:
        idx = [i for i, p in enumerate(pairs) if keep(p)]
        print(table([pairs[i] for i in idx], sims[idx], thresholds, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
