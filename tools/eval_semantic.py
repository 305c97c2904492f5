"""Measure the semantic (L2) cache's decision on the labelled dev pairs: false hits and useful hits per threshold.

Runs the gateway's own decision, step for step as app/cache/service.py takes it: the static first stage (its cosine
must reach the floor), the verifier's hard rules, the transformer's cosine (of the typo-repaired query when there is
one), the learned score, and the threshold as a floor on cosine. Both dev sets, the held-out part (odd ids; the
verifier is fitted on even ids by tools/train_verifier.py) and all of it:

    make eval                                   # = .venv/bin/python tools/eval_semantic.py
    .venv/bin/python tools/eval_semantic.py --cache /tmp/l2-vectors.npz   # reuse embeddings between runs

FH = false hits: pairs that must not share an answer, served. useful = paraphrase pairs served.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.cache import verify  # noqa: E402
from app.cache.lexicon import verifier_model  # noqa: E402
from app.cache.semantic import CANDIDATES  # noqa: E402
from app.embeddings.local import LocalEmbedder  # noqa: E402
from app.embeddings.static import StaticEmbedder  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SETS = {"prompts": DATA / "prompt-pairs-dev.jsonl", "quora": DATA / "paraphrase-dev.jsonl"}
THRESHOLDS = (0.6, 0.65, 0.7, 0.72, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99)
KIND_THRESHOLDS = (0.7, 0.8, 0.9, 0.95, 0.99)
QUORA_NEGATIVE = ("qqp_hardneg", "qqp_neg")


@dataclass
class Pair:
    dataset: str
    number: int
    label: int
    kind: str
    a: str
    b: str
    similarity: float = 0.0
    static_similarity: float = 0.0

    @property
    def held_out(self) -> bool:
        return self.number % 2 == 1


def load_pairs(dataset: str, path: Path) -> list[Pair]:
    pairs = []
    for line in path.read_text("utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        number = int(str(row["id"]).rsplit("-", 1)[-1])
        kind = row.get("kind") or row.get("source") or ""
        pairs.append(Pair(dataset, number, int(row["label"]), kind, row["a"], row["b"]))
    return pairs


def embed_pairs(pairs: list[Pair], cache: Path | None, log: bool = True) -> None:
    """Fill each pair's cosines, embedding every text once (the query side as the service embeds it)."""
    transformer, static = LocalEmbedder(offload=False), StaticEmbedder()
    texts: set[str] = set()
    repairs: dict[int, str | None] = {}
    for i, p in enumerate(pairs):
        repairs[i] = verify.repair_typos(p.a, p.b)
        texts.update(t for t in (verify.normalise(p.a), verify.normalise(p.b), repairs[i]) if t)
    ordered = sorted(texts)
    vectors = _cached_embed(transformer, ordered, cache, log)
    statics = dict(zip(ordered, static.embed(ordered), strict=True))
    for i, p in enumerate(pairs):
        a, b = verify.normalise(p.a), verify.normalise(p.b)
        p.similarity = float(vectors[a] @ vectors[b])
        if repairs[i]:
            p.similarity = max(p.similarity, float(vectors[repairs[i]] @ vectors[b]))
        p.static_similarity = float(statics[a] @ statics[b])


def _cached_embed(embedder: LocalEmbedder, texts: list[str], cache: Path | None, log: bool) -> dict[str, np.ndarray]:
    keys = [hashlib.sha256(t.encode()).hexdigest()[:24] for t in texts]
    known: dict[str, np.ndarray] = {}
    if cache is not None and cache.exists():
        saved = np.load(cache)
        known = dict(zip(saved["keys"].tolist(), saved["vectors"], strict=True))
    missing = [(t, k) for t, k in zip(texts, keys, strict=True) if k not in known]
    if missing:
        started = time.perf_counter()
        vectors = embedder.embed([t for t, _ in missing])
        for (_, k), v in zip(missing, vectors, strict=True):
            known[k] = v
        if log:
            print(f"embedded {len(missing)} texts in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        if cache is not None:
            np.savez(cache, keys=np.array(list(known)), vectors=np.array(list(known.values())))
    return {t: known[k] for t, k in zip(texts, keys, strict=True)}


def served(p: Pair, threshold: float) -> bool:
    """The gateway's decision for a stored ``b`` and a new ``a``, from the first stage to the threshold."""
    if p.static_similarity < verifier_model().static_floor:
        return False
    return verify.decide(p.a, p.b, similarity=p.similarity, static_similarity=p.static_similarity,
                         threshold=threshold).ok


def pct(values: list[bool]) -> float:
    return 100.0 * sum(values) / len(values) if values else float("nan")


def prompts_table(pairs: list[Pair], thresholds: Iterable[float], default: float) -> list[str]:
    lines = ["  threshold |    FH  useful   typo | worst look-alike kind   | cosine only: FH  useful"]
    for th in thresholds:
        hits = {id(p): served(p, th) for p in pairs}
        neg = [hits[id(p)] for p in pairs if p.label == 0]
        pos = [hits[id(p)] for p in pairs if p.label == 1]
        typo = [hits[id(p)] for p in pairs if p.kind == "para-typo"]
        kinds = {k for p in pairs if p.label == 0 for k in [p.kind]}
        worst = max(kinds, key=lambda k: pct([hits[id(p)] for p in pairs if p.kind == k]))
        worst_pct = pct([hits[id(p)] for p in pairs if p.kind == worst])
        raw_neg = pct([p.similarity >= th for p in pairs if p.label == 0])
        raw_pos = pct([p.similarity >= th for p in pairs if p.label == 1])
        mark = "  <- default" if abs(th - default) < 1e-9 else ""
        lines.append(f"  {th:9.3f} | {pct(neg):5.1f}% {pct(pos):5.1f}% {pct(typo):5.1f}% | {worst:14s} "
                     f"{worst_pct:5.1f}% |         {raw_neg:5.1f}% {raw_pos:5.1f}%{mark}")
    return lines


def kinds_table(pairs: list[Pair], thresholds: Iterable[float]) -> list[str]:
    thresholds = list(thresholds)
    lines = ["  kind (label)       pairs | " + " ".join(f"{t:>6.3f}" for t in thresholds)]
    for kind in sorted({p.kind for p in pairs}, key=lambda k: (k.startswith("para"), k)):
        members = [p for p in pairs if p.kind == kind]
        rates = [pct([served(p, t) for p in members]) for t in thresholds]
        label = "FH" if members[0].label == 0 else "use"
        lines.append(f"  {kind:15s} {label:>3s} {len(members):5d} | " + " ".join(f"{r:5.1f}%" for r in rates))
    return lines


def quora_table(pairs: list[Pair], thresholds: Iterable[float], default: float) -> list[str]:
    lines = ["  threshold | FH-hard  FH-neg  use-dup  use-gpt  use-all | cosine only: FH-hard  use-all"]
    for th in thresholds:
        hits = {id(p): served(p, th) for p in pairs}

        def rate(kinds: tuple[str, ...], h: dict[int, bool] = hits) -> float:
            return pct([h[id(p)] for p in pairs if p.kind in kinds])

        raw_hard = pct([p.similarity >= th for p in pairs if p.kind == "qqp_hardneg"])
        raw_use = pct([p.similarity >= th for p in pairs if p.label == 1])
        mark = "  <- default" if abs(th - default) < 1e-9 else ""
        lines.append(
            f"  {th:9.3f} | {rate(('qqp_hardneg',)):6.1f}% {rate(('qqp_neg',)):6.1f}% {rate(('qqp_dup',)):7.1f}% "
            f"{rate(('gpt_paraphrase',)):7.1f}% {pct([hits[id(p)] for p in pairs if p.label == 1]):7.1f}% |"
            f"              {raw_hard:6.1f}% {raw_use:6.1f}%{mark}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="an .npz of saved vectors (outside the repo)")
    parser.add_argument("--thresholds", default=",".join(str(t) for t in THRESHOLDS))
    parser.add_argument("--all", action="store_true", help="also print the tables over every pair (even ids too)")
    args = parser.parse_args(argv)
    default = verifier_model().default_threshold
    thresholds = sorted({float(t) for t in args.thresholds.split(",")} | {default})
    pairs = {name: load_pairs(name, path) for name, path in SETS.items()}
    everything = [p for ps in pairs.values() for p in ps]
    embed_pairs(everything, args.cache)
    decide_us = []
    for p in everything:
        started = time.perf_counter()
        served(p, default)
        decide_us.append((time.perf_counter() - started) * 1e6)
    print(f"pairs: prompts={len(pairs['prompts'])} quora={len(pairs['quora'])}; default threshold {default}; "
          f"static floor {verifier_model().static_floor}")
    print(f"verifier time per pair (first call per text; a request checks at most {CANDIDATES}): "
          f"p50 {np.percentile(decide_us, 50):.0f} us, p99 {np.percentile(decide_us, 99):.0f} us")
    print("FH = false hits (must not be served, served); useful = paraphrases served; typo = para-typo served")
    parts = [("held out (odd ids)", lambda p: p.held_out)] + ([("all", lambda p: True)] if args.all else [])
    for title, keep in parts:
        prompts = [p for p in pairs["prompts"] if keep(p)]
        quora = [p for p in pairs["quora"] if keep(p)]
        print(f"\n== prompt-pairs-dev, {title}: {len(prompts)} pairs")
        print("\n".join(prompts_table(prompts, thresholds, default)))
        print(f"-- per kind (FH for look-alikes, useful for paraphrases), {title}")
        print("\n".join(kinds_table(prompts, sorted(set(KIND_THRESHOLDS) | {default}))))
        print(f"\n== paraphrase-dev (Quora + GPT paraphrases), {title}: {len(quora)} pairs")
        print("\n".join(quora_table(quora, thresholds, default)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
