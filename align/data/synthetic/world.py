"""The generator of the embedded review world: prompts (a title and a first sentence) and continuations.

Every review has a latent sentiment s ~ U(-1, 1); each sentiment slot of the review is positive with probability
(1 + 0.8 s) / 2, so a review's sentiment words agree with each other (a language model can and must infer s from
the prompt to continue well), while single slots still vary. The prompt's first sentence carries s three times in
four, so continuations of a negative prompt are mostly negative: alignment has to move that.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from . import lexicon as lx

AGREEMENT = 0.8
INTENSIFIER_RATE = 0.35
NOT_RATE = 0.2
TEMPLATE_WEIGHTS = {"aspect": 0.33, "verb": 0.15, "contrast": 0.1, "neutral": 0.25, "overall": 0.17}


@dataclass(frozen=True)
class Review:
    prompt: str
    response: str
    sentiment: float


class ReviewWorld:
    """Seeded sampler of reviews. ``random.Random`` only: deterministic across platforms for a seed."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    # ----------------------------------------------------------------------------------------- words
    def _polarity(self, s: float) -> int:
        return 1 if self.rng.random() < (1 + AGREEMENT * s) / 2 else -1

    def _adjective_phrase(self, polarity: int) -> str:
        intensifier = None
        if self.rng.random() < INTENSIFIER_RATE:
            intensifier = "not" if self.rng.random() < NOT_RATE else self.rng.choice(["very", "really", "quite",
                                                                                     "somewhat"])
        lexical = -polarity if intensifier == "not" else polarity
        adjective = self.rng.choice(list(lx.POSITIVE_ADJECTIVES if lexical > 0 else lx.NEGATIVE_ADJECTIVES))
        return f"{intensifier} {adjective}" if intensifier else adjective

    def _aspect(self) -> str:
        return self.rng.choice(lx.ASPECTS)

    # ------------------------------------------------------------------------------------- sentences
    def sentence(self, s: float, kind: str | None = None) -> str:
        kind = kind or self.rng.choices(list(TEMPLATE_WEIGHTS), weights=list(TEMPLATE_WEIGHTS.values()))[0]
        if kind == "aspect":
            return f"the {self._aspect()} was {self._adjective_phrase(self._polarity(s))} ."
        if kind == "verb":
            verbs = lx.POSITIVE_VERBS if self._polarity(s) > 0 else lx.NEGATIVE_VERBS
            return f"i {self.rng.choice(list(verbs))} the {self._aspect()} ."
        if kind == "contrast":
            first, second = self._adjective_phrase(self._polarity(s)), self._adjective_phrase(self._polarity(s))
            return f"the {self._aspect()} was {first} but the {self._aspect()} was {second} ."
        if kind == "overall":
            return f"overall it was a {self._adjective_phrase(self._polarity(s))} film ."
        return self.neutral_sentence()

    def neutral_sentence(self) -> str:
        choice = self.rng.randrange(3)
        if choice == 0:
            return (f"the story follows a {self.rng.choice(lx.CHARACTER_ADJECTIVES)} "
                    f"{self.rng.choice(lx.CHARACTERS)} in {self.rng.choice(lx.PLACES)} .")
        if choice == 1:
            return f"it lasts {self.rng.choice(lx.DURATIONS)} ."
        return f"the film is set in {self.rng.choice(lx.PLACES)} ."

    # --------------------------------------------------------------------------------------- reviews
    def prompt(self, s: float) -> str:
        title = f"the {self.rng.choice(lx.TITLE_ADJECTIVES)} {self.rng.choice(lx.TITLE_NOUNS)}"
        opening = self.sentence(s, "aspect") if self.rng.random() < 0.75 else self.neutral_sentence()
        return f"review of the {self.rng.choice(lx.GENRES)} film {title} : {opening}"

    def response(self, s: float, min_sentences: int = 2, max_sentences: int = 5) -> str:
        n = self.rng.randint(min_sentences, max_sentences)
        sentences: list[str] = []
        while len(sentences) < n:
            kind = "overall" if len(sentences) == n - 1 and self.rng.random() < 0.5 else None
            candidate = self.sentence(s, kind)
            if candidate not in sentences:  # the corpus never repeats a sentence within a review
                sentences.append(candidate)
        return " ".join(sentences)

    def review(self) -> Review:
        s = self.rng.uniform(-1.0, 1.0)
        return Review(self.prompt(s), self.response(s), s)

    def sentiment(self) -> float:
        return self.rng.uniform(-1.0, 1.0)
