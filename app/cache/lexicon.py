"""The verifier's word lists (``data/lexicon.toml``) and learned weights (``data/verifier.json``), loaded once.

Kept as data beside the code so that re-tuning or extending a list is an edit to a data file, not to logic; the
lists hold general English and programming vocabulary, nothing taken from an evaluation set.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

_WORD = re.compile(r"[a-z0-9_'/-]+")


@dataclass(frozen=True)
class Lexicon:
    stop: frozenset[str]
    filler: frozenset[str]
    abbreviations: dict[str, str]
    negations: frozenset[str]
    direction: frozenset[str]
    negating_prefixes: tuple[str, ...]
    formats: frozenset[str]
    framing: frozenset[str]  # words that ask for an output form just before it
    numbers: dict[str, str]  # number word -> its digits
    constraint_markers: frozenset[str]
    synonyms: dict[str, str]  # word -> the first word of its group
    opposites: dict[str, frozenset[str]]  # word -> its opposites (both directions)


@dataclass(frozen=True)
class VerifierModel:
    """A logistic regression over the pair features of :func:`app.cache.verify.features`.

    A candidate is served when ``bias + sum(weights[f] * value_f) >= cut`` (and its cosine reaches the threshold).
    """

    weights: dict[str, float]
    bias: float
    cut: float
    default_threshold: float
    static_floor: float  # the first stage's cosine below which no candidate is looked at

    def score(self, values: dict[str, float]) -> float:
        return self.bias + sum(w * values[name] for name, w in self.weights.items())


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _read(name: str) -> str:
    return resources.files("app.cache").joinpath(f"data/{name}").read_text("utf-8")


@lru_cache(maxsize=1)
def lexicon() -> Lexicon:
    raw: dict[str, Any] = tomllib.loads(_read("lexicon.toml"))
    words = raw["words"]
    synonyms: dict[str, str] = {}
    for group in raw["synonyms"]["groups"]:
        members = group.split()
        for member in members:
            synonyms.setdefault(member, members[0])
    opposites: dict[str, set[str]] = {}
    for pair in raw["opposites"]["pairs"]:
        a, b = pair.split()
        opposites.setdefault(a, set()).add(b)
        opposites.setdefault(b, set()).add(a)
    return Lexicon(
        stop=frozenset(_words(raw["stop"])),
        filler=frozenset(_words(raw["filler"])),
        abbreviations={k.lower(): v for k, v in raw["abbreviations"].items()},
        negations=frozenset(_words(words["negations"])),
        direction=frozenset(_words(words["direction"])),
        negating_prefixes=tuple(sorted(_words(words["negating_prefixes"]), key=len, reverse=True)),
        formats=frozenset(_words(words["formats"])),
        framing=frozenset(_words(words["framing"])),
        numbers={str(k).lower(): str(v) for k, v in raw["numbers"].items()},
        constraint_markers=frozenset(_words(words["constraint_markers"])),
        synonyms=synonyms,
        opposites={k: frozenset(v) for k, v in opposites.items()},
    )


@lru_cache(maxsize=1)
def verifier_model() -> VerifierModel:
    raw = json.loads(_read("verifier.json"))
    return VerifierModel(
        weights={str(k): float(v) for k, v in raw["weights"].items()},
        bias=float(raw["bias"]),
        cut=float(raw["cut"]),
        default_threshold=float(raw["default_threshold"]),
        static_floor=float(raw["static_floor"]),
    )


@lru_cache(maxsize=1)
def vocabulary_ranks() -> dict[str, int]:
    """The embedding model's WordPiece vocabulary, word -> id (ids above ~2000 run roughly by falling frequency)."""
    text = resources.files("app.embeddings").joinpath("data/tokenizer.json").read_text("utf-8")
    return dict(json.loads(text)["model"]["vocab"])
