"""Fit the L2 verifier's score and pick the default threshold; writes ``app/cache/data/verifier.json``.

Tuning, like choosing a threshold: a logistic regression over the pair features of :func:`app.cache.verify.features`
(pairs a hard rule rejects are left out), fitted with numpy on the EVEN ids of both dev sets (the LLM-style prompt
pairs weigh 3x: they are what users send). The default threshold and the score's cut are the pair that serves the
most paraphrases on the even ids while keeping their false hits under the targets below; the first stage's floor is
set so that it keeps 99.5 % of the pairs the decision serves at the lowest threshold tried. Odd ids are never used
here: ``make eval`` reports on them.

    .venv/bin/python tools/train_verifier.py --cache /tmp/l2-vectors.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from eval_semantic import SETS, Pair, embed_pairs, load_pairs  # noqa: E402

from app.cache import verify  # noqa: E402

OUT = ROOT / "app/cache/data/verifier.json"
PROMPTS_WEIGHT = 1.0
# Targets on the fitted half, a little stricter than the acceptance figures so the held-out half has room.
MAX_PROMPT_FH, MAX_KIND_FH, MAX_QUORA_HARD_FH = 5.0, 15.0, 7.5
THRESHOLDS = np.round(np.arange(0.60, 0.76, 0.05), 3)
CUTS = np.round(np.arange(-1.5, 2.5, 0.025), 3)


def fit_logistic(x: np.ndarray, y: np.ndarray, weight: np.ndarray, l2: float = 1.0, steps: int = 60) -> np.ndarray:
    """Newton's method on the L2-penalised, sample-weighted log-loss (intercept unpenalised): [intercept, w...]."""
    xb = np.column_stack([np.ones(len(x)), x])
    w = np.zeros(xb.shape[1])
    penalty = np.full(xb.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(xb @ w)))
        grad = xb.T @ (weight * (p - y)) + penalty * w
        hess = (xb * (weight * p * (1 - p))[:, None]).T @ xb + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def choose(pairs: list[Pair], scores: np.ndarray) -> tuple[float, float, str]:
    """(threshold, cut) serving the most paraphrases of the even ids within the false-hit targets."""
    sims = np.array([p.similarity for p in pairs])
    labels = np.array([p.label for p in pairs])
    prompts = np.array([p.dataset == "prompts" for p in pairs])
    kinds = np.array([p.kind for p in pairs])
    look_alike_kinds = sorted({p.kind for p in pairs if p.dataset == "prompts" and p.label == 0})
    best: tuple[float, float, float, str] | None = None
    for th in THRESHOLDS:
        for cut in CUTS:
            hit = (sims >= th) & (scores >= cut)
            fh = 100 * hit[prompts & (labels == 0)].mean()
            worst = max(100 * hit[kinds == k].mean() for k in look_alike_kinds)
            hard = 100 * hit[kinds == "qqp_hardneg"].mean()
            if fh > MAX_PROMPT_FH or worst > MAX_KIND_FH or hard > MAX_QUORA_HARD_FH:
                continue
            useful = hit[prompts & (labels == 1)].mean() + hit[~prompts & (labels == 1)].mean()
            if best is None or useful > best[0]:
                note = (f"even ids: prompts FH {fh:.1f}% (worst kind {worst:.1f}%), useful "
                        f"{100 * hit[prompts & (labels == 1)].mean():.1f}%; quora hard FH {hard:.1f}%, useful "
                        f"{100 * hit[~prompts & (labels == 1)].mean():.1f}%")
                best = (useful, float(th), float(cut), note)
    if best is None:
        raise SystemExit("no threshold/cut meets the targets on the even ids")
    return best[1], best[2], best[3]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--l2", type=float, default=1.0)
    args = parser.parse_args(argv)
    pairs = [p for name, path in SETS.items() for p in load_pairs(name, path)]
    embed_pairs(pairs, args.cache)
    train = [p for p in pairs if not p.held_out]
    feats = [verify.features(p.a, p.b, p.similarity, p.static_similarity) for p in train]
    names = list(next(f for f in feats if f is not None))
    fitted = [(p, f) for p, f in zip(train, feats, strict=True) if f is not None]
    x = np.array([[f[n] for n in names] for _, f in fitted])
    y = np.array([p.label for p, _ in fitted], dtype=float)
    weight = np.array([PROMPTS_WEIGHT if p.dataset == "prompts" else 1.0 for p, _ in fitted])
    # Standardised for the fit (so the penalty weighs every feature alike), folded back into raw-unit weights.
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-9
    w = fit_logistic((x - mean) / scale, y, weight, l2=args.l2, steps=100)
    w = np.concatenate([[w[0] - np.sum(w[1:] * mean / scale)], w[1:] / scale])
    by_pair = {id(p): float(w[0] + np.dot(w[1:], [f[n] for n in names])) for p, f in fitted}
    scores = np.array([by_pair.get(id(p), -np.inf) for p in train])
    threshold, cut, note = choose(train, scores)
    accepted = [p.static_similarity for p, s in zip(train, scores, strict=True)
                if s >= cut and p.similarity >= THRESHOLDS[0]]
    floor = float(np.floor(np.quantile(accepted, 0.005) * 100) / 100)
    model = {
        "about": "tools/train_verifier.py: logistic regression on the even ids of both dev sets; see make eval",
        "weights": {n: round(float(v), 4) for n, v in zip(names, w[1:], strict=True)},
        "bias": round(float(w[0]), 4),
        "cut": cut,
        "default_threshold": threshold,
        "static_floor": floor,
        "fit": note,
    }
    OUT.write_text(json.dumps(model, indent=2) + "\n", "utf-8")
    print(json.dumps(model, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
