"""The L2 (semantic) cache decision: may the answer cached for ``candidate`` be served for ``query``?

Cosine similarity finds candidates but cannot tell "... in Atlanta?" from "... in Toronto?", 2016 from 2017, "to" from
"from", or "is" from "is not": those pairs embed almost identically. So :func:`verify` looks at what differs
between the two texts: hard rules reject changed numbers, negation, direction or a replaced name, and a learned
margin (a logistic regression over a few lexical features, in cosine units) prices the remaining differences. A hit
needs ``similarity >= threshold + margin`` (and never below ``threshold - SEARCH_SLACK``).

:func:`verify` is deterministic, pure (no I/O after the one-time vocabulary load), costs about 0.2 ms, and explains
itself: the verdict carries a short reason for logs and debugging. The weights come from ``tools/train_verifier.py``
(even ids of the dev pairs); ``tools/eval_semantic.py`` measures the result, odd ids held out.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from app.config import DEFAULT_SEMANTIC_THRESHOLD  # noqa: E402 - the measured default lives with the settings

__all__ = [
    "DEFAULT_SEMANTIC_THRESHOLD",
    "SEARCH_SLACK",
    "Verdict",
    "candidate_floor",
    "features",
    "is_semantic_hit",
    "verify",
]

#: The learned margin, in cosine units: the similarity a pair needs is ``threshold + margin`` with
#: ``margin = MARGIN_BIAS + sum(MARGIN_WEIGHTS[f] * value_f)`` over the lexical features of :func:`features`.
#: A logistic regression (cosine + these features) fitted by ``tools/train_verifier.py`` on the even ids of the
#: paraphrase set, divided by its cosine weight; the bias makes ``margin == 0`` for two texts with the same content
#: words, so the threshold keeps its old meaning for them. Re-run that tool and paste its output to re-tune.
MARGIN_WEIGHTS: dict[str, float] = {
    "one_side_name": 0.1176,  # a name-like word (capitalised, acronym, rare) on one side only
    "overlap": 0.1057,  # Jaccard of content words: at equal cosine, more shared words means a bigger real change
    "words_differ": -0.1448,  # content words on one side only, capped at 3: rewording spreads over several words
    "rarest_diff": 0.3297,  # rarity (0..1.15, from the tokenizer's frequency-ordered vocabulary) of the rarest one
    "length_ratio": 0.2074,  # shorter/longer word count: same length and high cosine smells of a swapped word
}
MARGIN_BIAS = -0.3131
#: How far below ``threshold`` a candidate may be and still pass on a negative margin (many reworded, common
#: words and nothing rare or name-like changed). The cache searches from ``candidate_floor(threshold)``.
SEARCH_SLACK = 0.268
#: Cap of the ``words_differ`` feature.
WORDS_DIFFER_CAP = 3


def candidate_floor(threshold: float) -> float:
    """The lowest cosine :func:`is_semantic_hit` can accept at ``threshold``: where the index search starts."""
    return threshold - SEARCH_SLACK


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a cached answer may be served, and why (the reason is meant for logs)."""

    ok: bool
    reason: str
    #: Similarity above the caller's threshold this pair needs (0 when the texts differ only in phrasing).
    margin: float = 0.0

    def __bool__(self) -> bool:
        return self.ok


def is_semantic_hit(
    similarity: float, query: str, candidate: str, threshold: float = DEFAULT_SEMANTIC_THRESHOLD
) -> Verdict:
    """The whole L2 rule: the hard checks of :func:`verify` pass and cosine reaches ``threshold + margin``.

    The margin is learned (see :data:`MARGIN_WEIGHTS`) and may be negative, down to ``-SEARCH_SLACK``.
    """
    floor = candidate_floor(threshold)
    if similarity < floor:
        return Verdict(False, f"similarity {similarity:.3f} < {floor:.3f}")
    verdict = verify(query, candidate)
    if not verdict.ok:
        return verdict
    needed = threshold + verdict.margin
    if similarity < needed:
        return Verdict(False, f"{verdict.reason}: similarity {similarity:.3f} < {needed:.3f}", verdict.margin)
    return Verdict(True, f"{verdict.reason}: similarity {similarity:.3f} >= {max(needed, floor):.3f}", verdict.margin)


# -- lexicon -------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[A-Za-z0-9_]+(?:'[A-Za-z]+)?")

_SENTENCE_END = frozenset('.?!:;"(*-')
_QUESTION_WORDS = frozenset("what why how when where who whom whose which".split())

_BOTH_WAYS = re.compile(r" or (?:\w+ )?(?:not|without|no) ")

_NEGATIONS = frozenset(
    "not no never none nobody nothing nowhere neither nor without cannot cant dont doesnt didnt isnt arent wasnt "
    "werent wont wouldnt shouldnt couldnt hasnt havent hadnt mustnt neednt aint".split()
)

#: Words whose order carries direction: "convert A to B", "A vs B", "better than".
_DIRECTION_MARKERS = frozenset("to into from vs versus than over towards toward onto".split())

_NUMBER_WORDS = {
    "zero": "0", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "twenty": "20", "hundred": "100",
    "thousand": "1000",
}  # fmt: skip

#: Function words and question scaffolding: they carry phrasing, not the entity or fact being asked about.
_STOP = frozenset(
    """
    a an the and or but if then so of in on at by for with about as is are was were be been being am do does did
    doing done have has had having i me my mine myself we us our ours you your yours he him his she her hers it its
    they them their theirs this that these those there here what which who whom whose when where why how whats
    hows whos wheres whys can could would should will shall may might must also just only very really too more most
    much many some any all each every other another such own same than any anyone someone something anything
    one ones s t ll re ve d m get gets getting got make makes making made go going goes went way ways thing things
    best good better great top possible good really ever kind sort type types like want wanted know tell let
    please use using used need should someone people person quora question questions answer answers example
    examples actually still even within among through it's i'm i've don't
    """.split()
)

#: Paraphrase pairs treated as the same word after stemming (both directions).
_SYNONYMS: dict[str, str] = {}
for _group in (
    "big large huge",
    "small little tiny",
    "fast quick rapid quickly",
    "begin start commence",
    "end finish",
    "buy purchase",
    "job career work",
    "learn study",
    "earn make",
    "money cash income",
    "movie film",
    "car vehicle automobile",
    "phone mobile cellphone smartphone",
    "doctor physician",
    "help assist",
    "create build construct generate form",
    "show display",
    "find locate discover",
    "choose select pick",
    "method approach way technique",
    "use utilize employ",
    "need require",
    "get obtain acquire receive",
    "purpose goal aim objective",
    "give provide furnish supply",
    "important significant",
    "difference differ",
    "improve enhance",
    "happen occur",
    "possible able",
    "idea concept",
    "website site",
    "women woman female",
    "men man male",
    "kid child children",
    "usa us america american",
    "uk britain british england",
    "india indian",
    "china chinese",
    "tv television",
    "pc computer laptop",
    "app application",
    "mean meaning definition define",
    "lose reduce",
    "weight fat",
    "good great nice excellent",
    "bad poor",
    "rich wealthy",
    "smart intelligent clever",
    "easy simple",
    "hard difficult",
    "happy glad",
    "sad unhappy",
    "answer reply respond",
    "ask inquire",
    "stop quit prevent avoid",
    "live reside",
    "world global",
):
    _words = _group.split()
    for _w in _words:
        _SYNONYMS.setdefault(_w, _words[0])


@lru_cache(maxsize=1)
def _vocab_ids() -> dict[str, int]:
    """The model's WordPiece vocabulary, word -> id; loaded once (the verifier's only I/O)."""
    text = resources.files("app.embeddings").joinpath("data/tokenizer.json").read_text("utf-8")
    return dict(json.loads(text)["model"]["vocab"])


@lru_cache(maxsize=1)
def _common_words() -> frozenset[str]:
    """Whole words of the model's WordPiece vocabulary: a word outside it is rare, hence likely a name."""
    return frozenset(w for w in _vocab_ids() if w.isalpha() and w.islower() and len(w) > 1)


def _stem(word: str) -> str:
    """Cheap suffix folding so "impacted"/"impact" and "countries"/"country" compare equal."""
    if len(word) <= 3 or word in _NUMBER_WORDS:
        return word
    for suffix, repl in (("ies", "y"), ("ied", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", ""), ("ly", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)] + repl
            break
    if len(word) > 4 and word[-1] == word[-2] and word[-1] not in "aeiouls":  # "stopp" -> "stop"
        word = word[:-1]
    return word.rstrip("e") if len(word) > 4 else word


@dataclass(frozen=True, slots=True)
class _Text:
    words: tuple[str, ...]  # lower-cased tokens in order
    content: tuple[str, ...]  # normalised content keys in order (stop words dropped)
    strong: frozenset[str]  # content keys that look like names: capitalised mid-sentence, acronyms, rare
    numbers: frozenset[str]
    negated: bool
    question_words: frozenset[str]
    surface: dict[str, str]  # content key -> first surface form, for reasons


def _key(word: str) -> str:
    stem = _stem(word)
    return _SYNONYMS.get(word) or _SYNONYMS.get(stem) or stem


@lru_cache(maxsize=4096)
def _analyse(text: str) -> _Text:
    common = _common_words()
    raw: list[tuple[str, bool]] = []
    prev_end = 0
    for m in _TOKEN.finditer(text):
        gap = text[prev_end : m.start()].strip()
        raw.append((m.group(), prev_end == 0 or (gap != "" and gap[-1] in _SENTENCE_END)))
        prev_end = m.end()
    # "why or why not", "with or without": the negation offers both options and asserts neither
    text_l = " " + " ".join(w.lower() for w, _ in raw) + " "
    both_ways = _BOTH_WAYS.search(text_l) is not None
    words: list[str] = []
    content: list[str] = []
    strong: set[str] = set()
    numbers: set[str] = set()
    surface: dict[str, str] = {}
    negated = False
    for match, at_start in raw:
        lower = match.lower()
        if lower.endswith("n't"):
            negated = not both_ways
            lower = lower[:-3]
        elif "'" in lower:
            lower = lower.split("'", 1)[0]
        words.append(lower)
        if lower in _NEGATIONS:
            negated = negated or not both_ways
            continue
        if any(c.isdigit() for c in lower) or lower in _NUMBER_WORDS:
            value = _NUMBER_WORDS.get(lower, lower.replace(",", ""))
            if value.isdigit():
                value = value.lstrip("0") or "0"
            numbers.add(value)
            continue
        capitalised = match[0].isupper() and not at_start and match != "I"
        if lower in _STOP and not capitalised:  # "Go", "Swift", "Make": a capitalised stop word is a name
            continue
        key = _key(lower)
        content.append(key)
        surface.setdefault(key, match)
        acronym = len(match) >= 2 and match.isupper()
        rare = lower not in common and not _is_inflection_of_common(lower, common)
        if acronym or (capitalised and (rare or not at_start)) or "_" in lower:
            strong.add(key)
    questions = frozenset(w for w in words if w in _QUESTION_WORDS)
    return _Text(tuple(words), tuple(content), frozenset(strong), frozenset(numbers), negated, questions, surface)


def _is_inflection_of_common(word: str, common: frozenset[str]) -> bool:
    for suffix in ("s", "es", "ed", "d", "ing", "ly", "er", "ers", "ies", "ied"):
        if word.endswith(suffix):
            base = word[: -len(suffix)]
            if base in common or base + "e" in common or base + "y" in common:
                return True
    return False


def _fuzzy_in(key: str, others: frozenset[str]) -> bool:
    """Same key, or one is a long prefix of the other ("biolog"/"biological")."""
    if key in others:
        return True
    if len(key) >= 5:
        for other in others:
            if len(other) >= 5 and (other.startswith(key[:5]) and (key.startswith(other) or other.startswith(key))):
                return True
    return False


def _direction_swapped(a: _Text, b: _Text, shared: frozenset[str]) -> tuple[str, str] | None:
    """Find shared words x, y with "x <marker> y" in one text and "y <marker> x" in the other."""
    sides_a = _around_markers(a.words, shared)
    if not sides_a:
        return None
    sides_b = _around_markers(b.words, shared)
    for left_a, right_a in sides_a:
        for left_b, right_b in sides_b:
            xs, ys = left_a & right_b, right_a & left_b
            if xs and ys and xs != ys:
                return min(xs), min(ys)
    return None


def _around_markers(words: tuple[str, ...], shared: frozenset[str]) -> list[tuple[frozenset[str], frozenset[str]]]:
    """For each direction marker, the shared words just before it and just after it (4-word windows)."""
    found = []
    for i, w in enumerate(words):
        if w not in _DIRECTION_MARKERS:
            continue
        left = frozenset(k for x in words[max(0, i - 4) : i] if (k := _key(x)) in shared)
        right = frozenset(k for x in words[i + 1 : i + 5] if (k := _key(x)) in shared)
        if left and right:
            found.append((left, right))
    return found


_LOG_VOCAB = math.log(30522)
#: Rarity of a word the vocabulary does not hold whole (WordPiece splits it): rarer than any whole word.
_RARITY_UNKNOWN = 1.15


def _rarity(word: str) -> float:
    """0..1 for whole words, by rank in the WordPiece vocabulary (ordered roughly by frequency after id ~2000)."""
    rank = _vocab_ids().get(word.lower())
    if rank is None or rank < 1000:  # ids below ~1000 are [unused] slots and single characters
        return _RARITY_UNKNOWN
    return math.log(rank) / _LOG_VOCAB


@dataclass(frozen=True, slots=True)
class _Comparison:
    rejected: Verdict | None
    features: dict[str, float]
    notes: tuple[str, ...]


def _compare(query: str, candidate: str) -> _Comparison:
    a, b = _analyse(query), _analyse(candidate)
    if a.numbers != b.numbers:
        only_a = sorted(a.numbers - b.numbers) or ["-"]
        only_b = sorted(b.numbers - a.numbers) or ["-"]
        return _Comparison(Verdict(False, f"numbers differ: {','.join(only_a)} vs {','.join(only_b)}"), {}, ())
    if a.negated != b.negated:
        return _Comparison(Verdict(False, "negation on one side only"), {}, ())
    keys_a, keys_b = frozenset(a.content), frozenset(b.content)
    shared = keys_a & keys_b
    swapped = _direction_swapped(a, b, shared)
    if swapped:
        return _Comparison(Verdict(False, f"direction swapped: {swapped[0]} / {swapped[1]}"), {}, ())
    only_a = sorted(k for k in keys_a - keys_b if not _fuzzy_in(k, keys_b))
    only_b = sorted(k for k in keys_b - keys_a if not _fuzzy_in(k, keys_a))
    names_a = sorted(a.surface[k] for k in only_a if k in a.strong)
    names_b = sorted(b.surface[k] for k in only_b if k in b.strong)
    if names_a and names_b:  # one name replaced by another: "in Atlanta" / "in Toronto"
        return _Comparison(Verdict(False, f"different entity: {','.join(names_a)} vs {','.join(names_b)}"), {}, ())
    union = len(keys_a | keys_b)
    differing = [a.surface[k] for k in only_a] + [b.surface[k] for k in only_b]
    rarities = [_rarity(w) for w in differing]
    longer = max(len(a.words), len(b.words), 1)
    features = {
        "one_side_name": 1.0 if names_a or names_b else 0.0,
        "overlap": len(shared) / union if union else 1.0,
        "words_differ": float(min(len(differing), WORDS_DIFFER_CAP)),
        "rarest_diff": max(rarities, default=0.0),
        "length_ratio": min(len(a.words), len(b.words)) / longer,
    }
    notes = []
    if names_a or names_b:
        notes.append("name on one side: " + ",".join(names_a or names_b))
    if differing:
        rarest = differing[rarities.index(max(rarities))]
        notes.append(f"{len(differing)} words differ ({','.join(differing[:4])}; rarest {rarest})")
    return _Comparison(None, features, tuple(notes))


def features(query: str, candidate: str) -> dict[str, float] | None:
    """The lexical features the learned margin weighs, or None when a hard rule rejects the pair (for tuning)."""
    return _compare(query, candidate).features or None


def margin_of(values: dict[str, float]) -> float:
    """Extra cosine (negative: less) a pair with these feature values needs above the threshold."""
    return MARGIN_BIAS + sum(MARGIN_WEIGHTS[name] * values[name] for name in MARGIN_WEIGHTS)


def verify(query: str, candidate: str) -> Verdict:
    """Reject a cosine-similar candidate whose text differs in a way that changes the answer; else price the rest.

    Hard rules, in order: numbers and versions must match exactly; negation must be on both sides or neither;
    shared words must not swap sides around "to/from/vs/than"; a name-like word (capitalised, acronym, outside the
    model's vocabulary) must not be replaced by another. What remains is priced by a learned margin
    (:data:`MARGIN_WEIGHTS`): a rare or name-like word on one side only asks for more similarity, rewording spread
    over several common words for less.
    """
    if query.strip().lower() == candidate.strip().lower():
        return Verdict(True, "same text")
    compared = _compare(query, candidate)
    if compared.rejected is not None:
        return compared.rejected
    margin = round(margin_of(compared.features), 4)
    reason = (
        "; ".join((*compared.notes, f"margin {margin:+.3f}"))
        if compared.notes
        else f"same content words; margin {margin:+.3f}"
    )
    return Verdict(True, reason, margin)
