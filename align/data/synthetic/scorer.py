"""The hidden ground-truth scorer of the embedded review world.

score(response) = (sum of sentence values - 1.0 * invalid sentences - 0.5 * repeated sentences) / max(n, 4)

where n is the number of sentences. A sentence's value comes from a small grammar (see ``TEMPLATES``): an
adjective phrase is polarity * weight(adjective) * multiplier(intensifier) ("not" flips and softens), a verb is
polarity * weight(verb), an "overall" verdict counts 1.5x, in "X but Y" the first clause counts half. Neutral
sentences are worth 0 but are valid. The design closes the obvious hacks: the denominator never drops below 4, so
one strong word cannot reach the top score; repeating a sentence is penalised; ungrammatical or unterminated text is
penalised; the empty response scores -1. The maximum needs several different, strongly positive sentences.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import lexicon as lx

_ADJ = {**{w: v for w, v in lx.POSITIVE_ADJECTIVES.items()}, **{w: -v for w, v in lx.NEGATIVE_ADJECTIVES.items()}}
_VERB = {**{w: v for w, v in lx.POSITIVE_VERBS.items()}, **{w: -v for w, v in lx.NEGATIVE_VERBS.items()}}


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_A, _I, _V, _S = _alt(_ADJ), _alt(lx.INTENSIFIERS), _alt(_VERB), _alt(lx.ASPECTS)
TEMPLATES = {
    "aspect": re.compile(rf"the ({_S}) was (?:({_I}) )?({_A})"),
    "verb": re.compile(rf"i ({_V}) the ({_S})"),
    "overall": re.compile(rf"overall it was a (?:({_I}) )?({_A}) film"),
    "contrast": re.compile(rf"the ({_S}) was (?:({_I}) )?({_A}) but the ({_S}) was (?:({_I}) )?({_A})"),
    "plot": re.compile(rf"the story follows a ({_alt(lx.CHARACTER_ADJECTIVES)}) ({_alt(lx.CHARACTERS)}) in "
                       rf"({_alt(lx.PLACES)})"),
    "length": re.compile(rf"it lasts ({_alt(lx.DURATIONS)})"),
    "setting": re.compile(rf"the film is set in ({_alt(lx.PLACES)})"),
}
MIN_DENOMINATOR = 4
INVALID_PENALTY = 1.0
REPEAT_PENALTY = 0.5
EMPTY_SCORE = -1.0


def phrase_value(intensifier: str | None, adjective: str) -> float:
    """Signed value of '[intensifier] adjective'."""
    return _ADJ[adjective] * (lx.INTENSIFIERS[intensifier] if intensifier else 1.0)


def sentence_value(sentence: str) -> float | None:
    """Value of one sentence (without its final '.'), or None when it is not in the grammar."""
    if m := TEMPLATES["aspect"].fullmatch(sentence):
        return phrase_value(m[2], m[3])
    if m := TEMPLATES["verb"].fullmatch(sentence):
        return _VERB[m[1]]
    if m := TEMPLATES["overall"].fullmatch(sentence):
        return 1.5 * phrase_value(m[1], m[2])
    if m := TEMPLATES["contrast"].fullmatch(sentence):
        return 0.5 * phrase_value(m[2], m[3]) + phrase_value(m[5], m[6])
    if any(TEMPLATES[k].fullmatch(sentence) for k in ("plot", "length", "setting")):
        return 0.0
    return None


@dataclass(frozen=True)
class ScoreBreakdown:
    score: float
    sentences: int
    invalid: int
    repeated: int
    sentiment: float  # sum of valid sentence values


def split_sentences(text: str) -> list[str]:
    """Sentences of a response; a trailing fragment without '.' is kept (and is invalid)."""
    words = re.findall(r"\.|[^\s.]+", text)  # '.' is a word even when a decoder glued it to the previous one
    sentences, current = [], []
    for word in words:
        if word == ".":
            sentences.append(" ".join(current))
            current = []
        else:
            current.append(word)
    if current:
        sentences.append(" ".join(current) + " <unterminated>")
    return sentences


def score_breakdown(response: str) -> ScoreBreakdown:
    sentences = split_sentences(response)
    if not sentences:
        return ScoreBreakdown(EMPTY_SCORE, 0, 0, 0, 0.0)
    seen: set[str] = set()
    total = sentiment = 0.0
    invalid = repeated = 0
    for sentence in sentences:
        if sentence in seen:
            repeated += 1
            total -= REPEAT_PENALTY
            continue
        seen.add(sentence)
        value = sentence_value(sentence)
        if value is None:
            invalid += 1
            total -= INVALID_PENALTY
        else:
            sentiment += value
            total += value
    return ScoreBreakdown(total / max(len(sentences), MIN_DENOMINATOR), len(sentences), invalid, repeated, sentiment)


def score(response: str) -> float:
    """The ground-truth score of a response (higher = more positive review). Roughly in [-2, 2]."""
    return score_breakdown(response).score
