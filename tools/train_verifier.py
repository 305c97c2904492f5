"""Fit the L2 verifier's learned margin and print the constants for ``app/cache/verify.py``.

Tuning, like choosing a threshold: a logistic regression over cosine plus the lexical features of
:func:`app.cache.verify.features` (pairs a hard rule rejects are left out), fitted with numpy on the even ids of the
pairs file. Positives are ``qqp_dup`` + ``gpt_paraphrase``, negatives ``qqp_hardneg`` + ``qqp_neg``. The decision cut
is the one that serves the most useful pairs while serving at most ``--max-false-hits`` % of the even hard negatives
(every hard negative counts, including those the hard rules or the floor already reject). Odd ids are only reported.

The model is printed in cosine units: ``margin = MARGIN_BIAS + sum(MARGIN_WEIGHTS[f] * f)`` and a pair is a hit when
``cosine >= threshold + margin`` (and ``cosine >= threshold - SEARCH_SLACK``); the bias makes the margin 0 for two
texts with the same content words, and the printed threshold reproduces the fitted cut.

    .venv/bin/python tools/train_verifier.py --cache /tmp/l2-vectors.npz
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from eval_semantic import DEFAULT_PAIRS, USEFUL, cached_embed, load_pairs  # noqa: E402

from app.cache import verify  # noqa: E402
from app.embeddings import build_embedder  # noqa: E402

NAMES = tuple(verify.MARGIN_WEIGHTS)
#: Feature values of two texts with the same content words: their margin is 0 by construction.
SAME_WORDS = {"one_side_name": 0.0, "overlap": 1.0, "words_differ": 0.0, "rarest_diff": 0.0, "length_ratio": 1.0}


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 50, weight: np.ndarray | None = None
) -> np.ndarray:
    """Newton's method on the L2-penalised, sample-weighted log-loss (intercept unpenalised): [intercept, w...]."""
    xb = np.column_stack([np.ones(len(x)), x])
    sw = np.ones(len(x)) if weight is None else weight
    w = np.zeros(xb.shape[1])
    penalty = np.full(xb.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(xb @ w)))
        grad = xb.T @ (sw * (p - y)) + penalty * w
        hess = (xb * (sw * p * (1 - p))[:, None]).T @ xb + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def rates(hit: np.ndarray, sources: np.ndarray, keep: np.ndarray) -> str:
    def pct(mask: np.ndarray) -> float:
        return 100.0 * hit[mask & keep].mean() if (mask & keep).any() else float("nan")

    useful = np.isin(sources, USEFUL)
    return (
        f"FH-hard {pct(sources == 'qqp_hardneg'):5.1f}%  FH-neg {pct(sources == 'qqp_neg'):5.1f}%  "
        f"use-dup {pct(sources == 'qqp_dup'):5.1f}%  use-gpt {pct(sources == 'gpt_paraphrase'):5.1f}%  "
        f"useful {pct(useful):5.1f}%"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS)
    parser.add_argument("--cache", type=Path, default=None, help="an .npz of saved vectors (outside the repo)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--floor", type=float, default=0.70, help="lowest cosine ever served")
    parser.add_argument("--max-false-hits", type=float, default=10.0, help="percent of even hard negatives")
    parser.add_argument("--l2", type=float, default=1.0)
    parser.add_argument(
        "--neg-weight",
        type=float,
        default=1.0,
        help="training weight of qqp_neg pairs: above 1 trades useful hits for fewer false hits on related topics",
    )
    args = parser.parse_args(argv)

    pairs = load_pairs(args.pairs, None, "all")
    embedder = build_embedder("local", offload=False)
    texts = sorted({p["a"] for p in pairs} | {p["b"] for p in pairs})
    vectors = cached_embed(embedder, texts, args.workers, args.cache)
    cos = np.array([float(vectors[p["a"]] @ vectors[p["b"]]) for p in pairs])
    sources = np.array([p["source"] for p in pairs])
    even = np.array([p["id"] % 2 == 0 for p in pairs])
    found = [verify.features(p["a"], p["b"]) for p in pairs]
    passes = np.array([f is not None for f in found]) & (cos >= args.floor)
    feats = np.array([[f[n] for n in NAMES] if f is not None else [0.0] * len(NAMES) for f in found])
    y = np.isin(sources, USEFUL).astype(float)

    train = even & passes
    weight = np.where(sources == "qqp_neg", args.neg_weight, 1.0)
    w = fit_logistic(np.column_stack([cos, feats])[train], y[train], args.l2, weight=weight[train])
    bias, w_cos, w_feat = w[0], w[1], w[2:]
    score = bias + w_cos * cos + feats @ w_feat

    hard_even = even & (sources == "qqp_hardneg")
    useful_even = even & (y == 1)
    best: tuple[float, float] | None = None
    for cut in np.unique(np.round(score[train], 4)):
        hit = passes & (score >= cut)
        if 100.0 * hit[hard_even].mean() <= args.max_false_hits:
            served = hit[useful_even].mean()
            if best is None or served > best[1]:
                best = (float(cut), served)
    assert best is not None, "no cut meets the false-hit limit"
    cut = best[0]

    weights = {n: -float(wf) / w_cos for n, wf in zip(NAMES, w_feat, strict=True)}
    margin_bias = -sum(weights[n] * v for n, v in SAME_WORDS.items())
    same_words = sum(float(wf) * SAME_WORDS[n] for n, wf in zip(NAMES, w_feat, strict=True))
    threshold = (cut - bias - same_words) / w_cos  # the cosine a same-content-words pair needs
    shown = math.ceil(threshold * 1000) / 1000  # rounded up: never serve more than the fitted cut
    print(f"fitted on {int(train.sum())} even pairs (cosine >= {args.floor}, hard rules passed)")
    print("MARGIN_WEIGHTS = {")
    for n in NAMES:
        print(f'    "{n}": {weights[n]:.4f},')
    print("}")
    print(f"MARGIN_BIAS = {margin_bias:.4f}")
    print(f"DEFAULT_SEMANTIC_THRESHOLD = {shown}  # app/config.py (exact cut {threshold:.4f})")
    print(f"SEARCH_SLACK = {shown - args.floor:.3f}")

    margin = margin_bias + feats @ np.array([weights[n] for n in NAMES])
    hit = passes & (cos >= shown + margin)
    everything = np.ones(len(pairs), dtype=bool)
    for title, keep in (("even", even), ("odd ", ~even), ("all ", everything)):
        print(f"{title}: {rates(hit, sources, keep)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
