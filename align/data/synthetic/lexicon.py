"""The words of the embedded review world and their hidden sentiment weights.

Weights are the ground truth the scorer uses; no model ever sees them. They differ from word to word so two
responses rarely tie, and strong words are rarer than mild ones in the corpus.
"""

from __future__ import annotations

POSITIVE_ADJECTIVES = {
    "good": 1.0, "great": 1.2, "wonderful": 1.3, "brilliant": 1.4, "enjoyable": 0.9, "fine": 0.5,
    "charming": 1.0, "moving": 1.1, "superb": 1.5, "fun": 0.8, "clever": 0.9, "beautiful": 1.2,
}
NEGATIVE_ADJECTIVES = {
    "bad": 1.0, "awful": 1.3, "boring": 1.0, "dull": 0.9, "weak": 0.7, "terrible": 1.4,
    "poor": 0.9, "messy": 0.8, "bland": 0.6, "painful": 1.2, "forgettable": 0.8, "clumsy": 0.7,
}
POSITIVE_VERBS = {"loved": 1.2, "liked": 0.8, "enjoyed": 1.0, "admired": 1.0}
NEGATIVE_VERBS = {"hated": 1.3, "disliked": 0.9, "regretted": 1.1, "endured": 0.6}
# Multipliers on the adjective that follows; "not" flips its polarity (and softens it).
INTENSIFIERS = {"very": 1.25, "really": 1.15, "quite": 0.9, "somewhat": 0.6, "not": -0.7}

ASPECTS = [
    "acting", "plot", "music", "ending", "dialogue", "cast", "pacing", "script", "soundtrack", "story",
    "direction", "visuals", "characters", "humor", "editing",
]
GENRES = ["drama", "comedy", "thriller", "western", "musical", "documentary", "romance", "mystery"]
TITLE_ADJECTIVES = ["silent", "last", "golden", "broken", "hidden", "distant", "little", "red", "endless", "quiet"]
TITLE_NOUNS = ["harbor", "garden", "mountain", "letter", "river", "station", "winter", "promise", "island", "city"]
CHARACTERS = ["detective", "sailor", "robot", "teacher", "painter", "soldier", "doctor", "farmer", "singer", "thief"]
CHARACTER_ADJECTIVES = ["young", "old", "lonely", "clever", "tired", "brave"]
PLACES = ["paris", "space", "a small town", "the desert", "a big city", "the mountains", "a village", "the sea"]
NEUTRAL_VERBS = ["follows", "shows", "describes", "remembers"]
DURATIONS = ["two hours", "ninety minutes", "three hours", "an hour"]
FUNCTION_WORDS = [
    "a", "an", "the", "of", "was", "is", "i", "it", "in", "but", "overall", "film", "review", "about", "and",
    "lasts", "set", "story", "movie", ".", ",", ":",
]


def all_words() -> list[str]:
    """Every word the world can produce, each once, in a fixed order (the tokenizer's vocabulary)."""
    groups = [
        FUNCTION_WORDS, list(POSITIVE_ADJECTIVES), list(NEGATIVE_ADJECTIVES), list(POSITIVE_VERBS),
        list(NEGATIVE_VERBS), list(INTENSIFIERS), ASPECTS, GENRES, TITLE_ADJECTIVES, TITLE_NOUNS, CHARACTERS,
        CHARACTER_ADJECTIVES, NEUTRAL_VERBS, [w for p in PLACES for w in p.split()],
        [w for d in DURATIONS for w in d.split()],
    ]
    seen: dict[str, None] = {}
    for group in groups:
        for word in group:
            seen.setdefault(word, None)
    return list(seen)
