"""The L2 (semantic) cache decision: may the answer cached for ``candidate`` be served for ``query``?

Cosine similarity finds candidates but cannot tell "... in Atlanta?" from "... in Toronto?", "ascending" from
"descending", "love" from "hate", a tweet from an essay, or a request from the same request with a condition added:
those pairs embed almost identically. So the decision reads what changed between the two texts:

1. hard rules reject a change that alters the answer: other numbers, a negation or negated word on one side, an
   opposite word, a direction swapped around "to/from/than", one name replaced by another, another output format or
   genre, another given text (quoted or after a colon);
2. what remains is scored by a small logistic regression over pair features (cosine, words left unmatched on each
   side, their rarity, a condition added on one side, ...), fitted by ``tools/train_verifier.py``;
3. the cosine must reach the threshold, whatever the score: raising ``SEMANTIC_CACHE_THRESHOLD`` never serves more.

Paraphrases are tolerated: typing errors (a word within a small edit distance of the other side's), case,
punctuation, chat abbreviations, politeness and filler, context sentences around an unchanged request.

Everything here is pure and deterministic (no I/O after the one-time load of ``data/``); a pair costs ~0.1 ms and
the verdict names its reason, for the log line and the rejection metric.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from app.cache.lexicon import lexicon, verifier_model, vocabulary_ranks

__all__ = ["Verdict", "decide", "features", "normalise", "repair_typos", "rule_check"]

_TOKEN = re.compile(r"\d+(?:[.,:/]\d+)*|[A-Za-z][A-Za-z0-9_]*(?:'[A-Za-z]+)?|[0-9]+[A-Za-z_][A-Za-z0-9_]*")
_SENTENCE_END = frozenset('.?!:;"(*-')
_BOTH_WAYS = re.compile(r" or (?:\w+ )?(?:not|without|no) ")
_QUOTED = re.compile(r'"([^"]{2,})"|\u201c([^\u201d]{2,})\u201d|`([^`]{2,})`')
_ABBREVIATION = re.compile(r"(?<![\w/])(w/o|w/|b/c|[A-Za-z]+)(?![\w/])")
_LOG_VOCAB = math.log(30522)
_RARITY_UNKNOWN = 1.15  # a word WordPiece splits: rarer than any whole word
_CAP = 4.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a cached answer may be served, and why. ``rule`` names the check that decided (for metrics)."""

    ok: bool
    reason: str
    rule: str
    score: float = 0.0

    def __bool__(self) -> bool:
        return self.ok


# -- text analysis -------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8192)
def normalise(text: str) -> str:
    """Expand chat abbreviations ("pls", "w/o", "thx") and fold white space: the text that is embedded and compared."""
    table = lexicon().abbreviations

    def expand(match: re.Match[str]) -> str:
        word = match.group(0)
        return table.get(word.lower(), word) if word.lower() in table else word

    return " ".join(_ABBREVIATION.sub(expand, text).split())


def _stem(word: str) -> str:
    """Cheap suffix folding so "impacted"/"impact" and "countries"/"country" compare equal."""
    if len(word) <= 3:
        return word
    for suffix, repl in (("ies", "y"), ("ied", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", ""), ("ly", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)] + repl
            break
    if len(word) > 4 and word[-1] == word[-2] and word[-1] not in "aeiouls":
        word = word[:-1]
    return word.rstrip("e") if len(word) > 4 else word


def _key(word: str) -> str:
    synonyms = lexicon().synonyms
    stem = _stem(word)
    return synonyms.get(word) or synonyms.get(stem) or stem


@dataclass(frozen=True, slots=True)
class _Text:
    words: tuple[str, ...]  # lower-cased tokens in order
    content: tuple[tuple[str, str, int], ...]  # (key, surface, sentence number) of content words, in order
    strong: frozenset[str]  # keys that look like names: capitalised mid-sentence, acronyms, rare
    numbers: frozenset[str]
    negated: bool  # in the request (the last sentence); a negated context sentence is only a feature
    negated_context: bool
    formats: frozenset[str]  # output forms named in the request (the last sentence)
    framed: bool  # one of them asked for as a form: "as a tweet", "into a table", "in JSON", "in the style of"
    modifiers: frozenset[str]  # the word just before each form: "multiple-choice quiz", "true/false quiz"
    markers: frozenset[str]
    given: tuple[str, ...]  # quoted or colon-introduced text, normalised
    symbols: str  # the operators in the given text, in order ("3x - 7" is not "3x + 7")
    quoted: tuple[str, ...]  # quoted or backticked text as written, white space folded (code must match exactly)
    sentences: int


@lru_cache(maxsize=8192)
def _analyse(text: str) -> _Text:
    lex = lexicon()
    common = _common_words()
    raw: list[tuple[str, bool, int]] = []
    prev_end, sentence = 0, 0
    for m in _TOKEN.finditer(text):
        gap = text[prev_end : m.start()].strip()
        at_start = prev_end == 0 or (gap != "" and gap[-1] in _SENTENCE_END)
        if prev_end and gap and gap[-1] in ".?!":
            sentence += 1
        raw.append((m.group(), at_start, sentence))
        prev_end = m.end()
    lowered = " " + " ".join(w.lower() for w, _, _ in raw) + " "
    both_ways = _BOTH_WAYS.search(lowered) is not None
    words: list[str] = []
    content: list[tuple[str, str, int]] = []
    strong: set[str] = set()
    numbers: set[str] = set()
    negated = negated_context = framed = False
    formats: set[str] = set()
    modifiers: set[str] = set()
    for match, at_start, sent in raw:
        lower = match.lower()
        negation = lower in lex.negations or lower.endswith("n't")
        lower = _folded(lower)
        words.append(lower)
        if negation and not both_ways:
            if sent == sentence:
                negated = True
            else:
                negated_context = True
        if lower in lex.negations:
            continue
        if sent == sentence and lower in lex.formats:
            formats.add(lower[:-1] if lower.endswith("s") and lower[:-1] in lex.formats else lower)
            framed = framed or bool(lex.framing & set(words[-6:-1]))
            if len(words) > 1 and words[-2] not in lex.stop:
                modifiers.add(words[-2])
        value = _number(lower, lex.numbers)
        if value is not None:
            numbers.add(value)
            continue
        capitalised = match[0].isupper() and not at_start and match != "I"
        if (lower in lex.stop or lower in lex.filler) and not capitalised:
            continue
        key = _key(lower)
        content.append((key, match, sent))
        acronym = len(match) >= 2 and match.isupper()
        rare = lower not in common and not _inflection_of(lower, common)
        if acronym or (capitalised and (rare or not at_start)) or "_" in lower:
            strong.add(key)
    return _Text(
        words=tuple(words),
        content=tuple(content),
        strong=frozenset(strong),
        numbers=frozenset(numbers),
        negated=negated,
        negated_context=negated_context,
        formats=frozenset(formats),
        framed=framed,
        modifiers=frozenset(modifiers),
        markers=frozenset(words) & lex.constraint_markers,
        given=(given := _given_text(text)),
        symbols="".join(_given_symbols(text)) if given else "",
        quoted=tuple(" ".join("".join(g).lower().split()) for g in _QUOTED.findall(text)),
        sentences=sentence + 1,
    )


def _folded(lower: str) -> str:
    """A lower-cased token as the rules compare it: "don't" -> "do", "user's" -> "user"."""
    if lower.endswith("n't"):
        return lower[:-3]
    return lower.split("'", 1)[0] if "'" in lower else lower


def _number(lower: str, words: dict[str, str]) -> str | None:
    """The number a folded token stands for ("007" -> "7", "1,000" -> "1000", "three" -> "3"), or None."""
    if not (lower in words or any(c.isdigit() for c in lower)):
        return None
    value = words.get(lower, lower.replace(",", ""))
    return (value.lstrip("0") or "0") if value.isdigit() else value


@lru_cache(maxsize=8192)
def _numbers(text: str) -> frozenset[str]:
    """`_analyse(text).numbers` without the rest of its work.

    Most look-alikes an index finds for a new prompt are the same template with another number ("ticket 1042" /
    "ticket 1043"): the number rule refuses them from this alone, and the new prompt's full analysis (about a
    quarter of a millisecond on a cold CPU) is left for when a pair gets past it.
    """
    lex = lexicon()
    found = set()
    for m in _TOKEN.finditer(text):
        lower = _folded(m.group().lower())
        if lower in lex.negations:
            continue
        value = _number(lower, lex.numbers)
        if value is not None:
            found.add(value)
    return frozenset(found)


def _given_text(text: str) -> tuple[str, ...]:
    """Text the request works on: quoted segments, or what follows a colon when it is not a question."""
    found = ["".join(g) for g in _QUOTED.findall(text)]
    if not found and ":" in text:
        head, _, tail = text.partition(":")
        if tail.strip() and "?" not in tail and len(tail.split()) >= 2 and len(head.split()) >= 2:
            found.append(tail)
    return tuple(" ".join(m.group().lower() for m in _TOKEN.finditer(g)) for g in found)


def _given_symbols(text: str) -> list[str]:
    return [c for c in text.partition(":")[2] or text if c in "+-*/=<>%&|^!~"]


@lru_cache(maxsize=1)
def _common_words() -> frozenset[str]:
    """Whole words of the model's WordPiece vocabulary: a word outside it is rare, hence likely a name."""
    return frozenset(w for w in vocabulary_ranks() if w.isalpha() and w.islower() and len(w) > 1)


def _inflection_of(word: str, common: frozenset[str]) -> bool:
    for suffix in ("s", "es", "ed", "d", "ing", "ly", "er", "ers", "ies", "ied"):
        if word.endswith(suffix):
            base = word[: -len(suffix)]
            if base in common or base + "e" in common or base + "y" in common:
                return True
    return False


def _rarity(word: str) -> float:
    """0..1 for whole words, by rank in the WordPiece vocabulary (ordered roughly by frequency after id ~2000)."""
    rank = vocabulary_ranks().get(word.lower())
    if rank is None or rank < 1000:
        return _RARITY_UNKNOWN
    return math.log(rank) / _LOG_VOCAB


# -- alignment -----------------------------------------------------------------------------------------------------


def _within_typo(a: str, b: str) -> bool:
    """Two words a fast typist could confuse: same first letter, edit distance 1 (2 for words of 7+ letters), and
    at least one of them not a word of the vocabulary ("Austria" / "Australia" are two names, not a typo)."""
    if a[0] != b[0] or min(len(a), len(b)) < 4:
        return False
    common = _common_words()
    if (a in common or _inflection_of(a, common)) and (b in common or _inflection_of(b, common)):
        return False
    limit = 2 if min(len(a), len(b)) >= 7 else 1
    return abs(len(a) - len(b)) <= limit and _edit_distance(a, b, limit) <= limit


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Optimal string alignment distance (adjacent swaps count once), stopping early past ``limit``."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


def _prefix_match(key: str, others: frozenset[str]) -> bool:
    """One key a long prefix of another ("biolog"/"biological")."""
    if len(key) < 5:
        return False
    return any(len(o) >= 5 and o[:5] == key[:5] and (key.startswith(o) or o.startswith(key)) for o in others)


@dataclass(frozen=True, slots=True)
class _Alignment:
    only_a: tuple[tuple[str, str, int], ...]  # content words of a with no counterpart in b
    only_b: tuple[tuple[str, str, int], ...]
    typos: tuple[tuple[str, str], ...]  # (surface in a, surface in b) matched as typing errors
    shared: int
    only_a_request: bool  # a has unmatched content words in its request (last) sentence
    only_b_request: bool


def _align(a: _Text, b: _Text) -> _Alignment:
    keys_a = frozenset(k for k, _, _ in a.content)
    keys_b = frozenset(k for k, _, _ in b.content)
    rest_a = [c for c in a.content if c[0] not in keys_b]
    rest_b = [c for c in b.content if c[0] not in keys_a]
    typos: list[tuple[str, str]] = []
    for ca in list(rest_a):
        wa = ca[1].lower()
        for cb in rest_b:
            if _within_typo(wa, cb[1].lower()):
                typos.append((ca[1], cb[1]))
                rest_a.remove(ca)
                rest_b.remove(cb)
                break
    only_a = [c for c in rest_a if not _prefix_match(c[0], keys_b)]
    only_b = [c for c in rest_b if not _prefix_match(c[0], keys_a)]
    return _Alignment(tuple(_dedupe(only_a)), tuple(_dedupe(only_b)), tuple(typos), len(keys_a & keys_b),
                      any(sent == a.sentences - 1 for _, _, sent in only_a),
                      any(sent == b.sentences - 1 for _, _, sent in only_b))


def _dedupe(items: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item[0] not in seen:
            seen.add(item[0])
            out.append(item)
    return out


# -- hard rules ----------------------------------------------------------------------------------------------------


def rule_check(query: str, candidate: str, static_similarity: float | None = None) -> Verdict | None:
    """The rejection a hard rule makes for this pair, or None when no rule objects (cheap: no embedding needed).

    With ``static_similarity``, also refuse a pair whose learned score stays below its cut even at a transformer
    cosine of 1: no embedding could make it a hit.
    """
    query, candidate = normalise(query), normalise(candidate)
    refused = _number_rule(_numbers(query), _numbers(candidate))
    if refused is not None:
        return refused
    a, b = _analyse(query), _analyse(candidate)
    refused, al = _checked(a, b)
    if refused is not None or static_similarity is None:
        return refused
    model = verifier_model()
    best = model.score(_features(1.0, static_similarity, a, b, al))
    if best < model.cut:
        return Verdict(False, f"{_describe(al)}; score {best:.2f} < {model.cut:.2f} even at cosine 1", "score", best)
    return None


def _checked(a: _Text, b: _Text) -> tuple[Verdict | None, _Alignment | None]:
    """The hard rules' rejection of the pair (None: no rule objects), and the pair's word alignment (None when a
    rule that needs none refused the pair).

    The rules that need no alignment go first and end the check: most look-alikes an index finds differ in a
    number ("ticket 1042" / "ticket 1043"), and aligning their words would be wasted on them.
    """
    refused = _unaligned_rules(a, b)
    if refused is not None:
        return refused, None
    al = _align(a, b)
    return _rules(a, b, al), al


def _number_rule(a: frozenset[str], b: frozenset[str]) -> Verdict | None:
    if a == b:
        return None
    only_a = sorted(a - b) or ["-"]
    only_b = sorted(b - a) or ["-"]
    return Verdict(False, f"numbers differ: {','.join(only_a)} vs {','.join(only_b)}", "number")


def _unaligned_rules(a: _Text, b: _Text) -> Verdict | None:
    refused = _number_rule(a.numbers, b.numbers)
    if refused is not None:
        return refused
    if a.negated != b.negated:
        return Verdict(False, "negation on one side only", "negation")
    return None


def _rules(a: _Text, b: _Text, al: _Alignment) -> Verdict | None:
    """The rules that weigh the aligned words (after `_unaligned_rules` found nothing)."""
    keys_a = frozenset(k for k, _, _ in a.content)
    keys_b = frozenset(k for k, _, _ in b.content)
    for x, y in _opposed(al, keys_a, keys_b, a.words, b.words):
        return Verdict(False, f"opposite words: {x} / {y}", "opposite")
    swapped = _direction_swapped(a, b, keys_a & keys_b) or _transposed(a.words, b.words)
    if swapped:
        return Verdict(False, f"direction swapped: {swapped[0]} / {swapped[1]}", "direction")
    # A form asked for on one side ("... as a limerick") facing other words in the other's request.
    one_sided = (a.framed and not b.formats and al.only_b_request) or (b.framed and not a.formats and al.only_a_request)
    other_kind = (a.formats & b.formats and a.modifiers and b.modifiers and not a.modifiers & b.modifiers
                  and al.only_a and al.only_b)
    if (a.formats and b.formats and a.formats != b.formats) or one_sided or other_kind:
        shown = "/".join(sorted(a.formats - b.formats) or ["-"])
        shown += " vs " + "/".join(sorted(b.formats - a.formats) or ["-"])
        return Verdict(False, f"output format differs: {shown}", "format")
    names_a = sorted(s for k, s, _ in al.only_a if k in a.strong and not _spelled_out(s, b))
    names_b = sorted(s for k, s, _ in al.only_b if k in b.strong and not _spelled_out(s, a))
    if names_a and names_b:
        return Verdict(False, f"different entity: {','.join(names_a)} vs {','.join(names_b)}", "entity")
    if not _same_given(a, b):
        return Verdict(False, "the given text differs", "given_text")
    added = _added_condition(a, b, al) or _added_condition(b, a, al, swapped=True)
    if added:
        return Verdict(False, f"a condition on one side only: {added}", "condition")
    return None


def _added_condition(a: _Text, b: _Text, al: _Alignment, swapped: bool = False) -> str | None:
    """``a`` is the one-sentence request ``b`` plus a clause opened by a condition word ("... without recursion",
    "... excluding the highest values"): an answer to one is not an answer to the other."""
    more, fewer = (al.only_b, al.only_a) if swapped else (al.only_a, al.only_b)
    if fewer or len(more) < 2 or b.sentences != 1:
        return None
    in_request = [surface for _, surface, sent in more if sent == a.sentences - 1]
    markers = (a.markers - b.markers) - lexicon().negations
    if len(in_request) < 2 or not markers:
        return None
    return f"{min(markers)} {' '.join(in_request[:3])}"


def _spelled_out(acronym: str, other: _Text) -> bool:
    """An acronym whose letters start consecutive words of the other text: "US" / "United States"."""
    if not (2 <= len(acronym) <= 5 and acronym.isupper()):
        return False
    letters = acronym.lower()
    initials = "".join(w[0] for w in other.words if w)
    return letters in initials and len(letters) > 1


def _opposed(
    al: _Alignment, keys_a: frozenset[str], keys_b: frozenset[str], a_words: tuple[str, ...], b_words: tuple[str, ...]
) -> list[tuple[str, str]]:
    """Pairs (x in a only, y in b only) that are opposites, or where one is the other with a negating prefix."""
    lex = lexicon()
    found = []
    words_b = [s.lower() for _, s, _ in al.only_b]
    for _, surface_a, _ in al.only_a:
        wa = surface_a.lower()
        opposite = lex.opposites.get(wa, frozenset())
        for wb in words_b:
            if wb in opposite or _stem(wb) in {_stem(o) for o in opposite}:
                found.append((surface_a, wb))
            elif _negated_form(wa, wb, keys_a) or _negated_form(wb, wa, keys_b):
                found.append((surface_a, wb))
    # Opposite function words ("zoom in" / "zoom out", "from most to least" / "from least to most" is a swap).
    diff_a = set(a_words) - set(b_words)
    diff_b = set(b_words) - set(a_words)
    for wa in sorted(diff_a):
        for wb in sorted(lex.opposites.get(wa, frozenset()) & diff_b):
            found.append((wa, wb))
    # A prefixed word facing its base word that the other side shares: "healthy" vs "unhealthy".
    for _, surface, _ in al.only_a:
        base = _strip_negating_prefix(surface.lower())
        if base and _key(base) in keys_b and _key(base) not in keys_a:
            found.append((surface, base))
    for _, surface, _ in al.only_b:
        base = _strip_negating_prefix(surface.lower())
        if base and _key(base) in keys_a and _key(base) not in keys_b:
            found.append((base, surface))
    return found


def _strip_negating_prefix(word: str) -> str | None:
    for prefix in lexicon().negating_prefixes:
        rest = word[len(prefix) :].lstrip("-")
        if word.startswith(prefix) and len(rest) >= 4 and rest in _common_words():
            return rest
    return None


def _negated_form(word: str, other: str, own_keys: frozenset[str]) -> bool:
    base = _strip_negating_prefix(word)
    return base is not None and _key(base) == _key(other) and _key(other) not in own_keys


def _same_given(a: _Text, b: _Text) -> bool:
    """The text each side works on appears in the other (words in any order, typos aside; operators exactly)."""
    if not (a.given or b.given):
        return True
    if a.given and b.given and a.symbols != b.symbols:
        return False
    if a.quoted and b.quoted and a.quoted != b.quoted and not (set(a.quoted) & set(b.quoted)):
        return False
    return _given_in(a.given, b) and _given_in(b.given, a)


def _given_in(given: tuple[str, ...], other: _Text) -> bool:
    words = set(" ".join(given).split())
    if not words:
        return True
    others = set(other.words)
    found = sum(1 for w in words if w in others or any(_within_typo(w, o) for o in others if len(o) >= 4))
    return found / len(words) >= 0.8


def _direction_swapped(a: _Text, b: _Text, shared: frozenset[str]) -> tuple[str, str] | None:
    """Shared words x, y with "x <marker> y" in one text and "y <marker> x" in the other."""
    sides_a = _around_markers(a.words, shared)
    if not sides_a:
        return None
    for marker_a, left_a, right_a in sides_a:
        for marker_b, left_b, right_b in _around_markers(b.words, shared):
            if marker_a != marker_b:
                continue
            xs, ys = left_a & right_b, right_a & left_b
            if xs and ys and xs != ys:
                return min(xs), min(ys)
    return None


def _transposed(words_a: tuple[str, ...], words_b: tuple[str, ...]) -> tuple[str, str] | None:
    """The same words with a short run in the middle reordered: "pounds is 50 kilograms" / "kilograms is 50 pounds".

    A paraphrase reorders whole clauses; a swap of two terms inside an otherwise identical request reverses it.
    """
    if len(words_a) != len(words_b) or words_a == words_b:
        return None
    start = 0
    while words_a[start] == words_b[start]:
        start += 1
    end = len(words_a)
    while words_a[end - 1] == words_b[end - 1]:
        end -= 1
    middle_a, middle_b = words_a[start:end], words_b[start:end]
    if len(middle_a) > 8 or len(middle_a) >= len(words_a) or sorted(middle_a) != sorted(middle_b):
        return None
    return middle_a[0], middle_b[0]


def _around_markers(
    words: tuple[str, ...], shared: frozenset[str]
) -> list[tuple[str, frozenset[str], frozenset[str]]]:
    """For each direction marker, the shared words just before and just after it (3-word windows)."""
    markers = lexicon().direction
    found = []
    for i, w in enumerate(words):
        if w not in markers:
            continue
        left = frozenset(k for x in words[max(0, i - 3) : i] if (k := _key(x)) in shared)
        right = frozenset(k for x in words[i + 1 : i + 4] if (k := _key(x)) in shared)
        if left and right:
            found.append((w, left, right))
    return found


# -- features and the decision -------------------------------------------------------------------------------------


def features(query: str, candidate: str, similarity: float, static_similarity: float) -> dict[str, float] | None:
    """The pair features the learned score weighs, or None when a hard rule rejects the pair (for tuning)."""
    a, b = _analyse(normalise(query)), _analyse(normalise(candidate))
    refused, al = _checked(a, b)
    if refused is not None:
        return None
    return _features(similarity, static_similarity, a, b, al)


def _features(similarity: float, static_similarity: float, a: _Text, b: _Text, al: _Alignment) -> dict[str, float]:
    lex = lexicon()
    more, fewer = (al.only_a, al.only_b) if len(al.only_a) >= len(al.only_b) else (al.only_b, al.only_a)
    longer_text = a if more is al.only_a else b
    rarities = [_rarity(s) for _, s, _ in (*al.only_a, *al.only_b)]
    union = al.shared + len(al.only_a) + len(al.only_b) + len(al.typos)
    last = longer_text.sentences - 1
    in_request = sum(1 for _, _, sent in more if sent == last) if more else 0
    markers_one_side = bool((a.markers ^ b.markers) - lex.negations)
    names = [s for k, s, _ in al.only_a if k in a.strong] + [s for k, s, _ in al.only_b if k in b.strong]
    values = {
        "cosine": similarity,
        "static_cosine": static_similarity,
        "unmatched_more": min(float(len(more)), _CAP),
        "unmatched_fewer": min(float(len(fewer)), _CAP),
        "one_sided": 1.0 if more and not fewer else 0.0,
        "substitution": 1.0 if len(more) == 1 and len(fewer) == 1 else 0.0,
        "rarest": max(rarities, default=0.0),
        "in_request": min(float(in_request), _CAP),
        "marker_one_side": 1.0 if markers_one_side and more else 0.0,
        "overlap": (al.shared + len(al.typos)) / union if union else 1.0,
        "name_one_side": 1.0 if names else 0.0,
        "negated_context": 1.0 if a.negated_context != b.negated_context else 0.0,
        "added_clause": 1.0 if not fewer and in_request >= 2 else 0.0,
        "length_ratio": min(len(a.words), len(b.words)) / max(len(a.words), len(b.words), 1),
    }
    # How much cosine is worth depends on what differs: the same cosine means more when many words were reworded
    # (a paraphrase) than when one rare word changed (a look-alike).
    values["cosine_x_unmatched"] = similarity * values["unmatched_more"]
    values["cosine_x_overlap"] = similarity * values["overlap"]
    values["cosine_x_rarest"] = similarity * values["rarest"]
    return values


def repair_typos(query: str, candidate: str) -> str | None:
    """The query with each word that looks like a typing error of a candidate word replaced by that word.

    None when there is nothing to repair. The cache embeds the repaired text again, so "how to conver a list to a
    set in pyton" is compared with its candidate as the typist meant it.
    """
    a, b = _analyse(normalise(query)), _analyse(normalise(candidate))
    typos = _align(a, b).typos
    if not typos:
        return None
    repaired = normalise(query)
    for wrong, right in typos:
        repaired = re.sub(rf"\b{re.escape(wrong)}\b", right, repaired)
    return repaired


def decide(query: str, candidate: str, *, similarity: float, static_similarity: float, threshold: float) -> Verdict:
    """The whole L2 rule: cosine >= ``threshold``, no hard rule objects, and the learned score reaches its cut.

    ``similarity`` is the transformer's cosine (of the typo-repaired query, when there was one), ``static_similarity``
    the first stage's. ``threshold`` is a floor on cosine and nothing else, so raising it can only serve less.
    """
    if similarity < threshold:
        return Verdict(False, f"similarity {similarity:.3f} < {threshold:.3f}", "similarity")
    a, b = _analyse(normalise(query)), _analyse(normalise(candidate))
    rejected, al = _checked(a, b)
    if rejected is not None:
        return rejected
    if a.words == b.words:
        return Verdict(True, f"same words; similarity {similarity:.3f}", "same_text", math.inf)
    model = verifier_model()
    score = model.score(_features(similarity, static_similarity, a, b, al))
    what = _describe(al)
    if score < model.cut:
        return Verdict(False, f"{what}; score {score:.2f} < {model.cut:.2f}", "score", score)
    return Verdict(True, f"{what}; score {score:.2f} >= {model.cut:.2f}; similarity {similarity:.3f}", "score", score)


def _describe(al: _Alignment) -> str:
    parts = []
    if al.only_a or al.only_b:
        shown = ",".join(s for _, s, _ in al.only_a[:3]) or "-"
        shown += " / " + (",".join(s for _, s, _ in al.only_b[:3]) or "-")
        parts.append(f"unmatched {shown}")
    if al.typos:
        parts.append("typos " + ",".join(f"{x}~{y}" for x, y in al.typos[:3]))
    return "; ".join(parts) or "same content words"
