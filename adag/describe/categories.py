"""Category names for the tokens that fill a slot, computed offline: each token string's nearest word in
a fixed vocabulary of category words, by sentence embeddings of the model the embedding simulator
already ships (all-MiniLM-L6-v2). A slot gets a category only where most of its strongest strings agree
on one; otherwise it is named by its strings alone."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import cache

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

# General category words, none of them about one dataset. A slot's strings are compared with each.
VOCABULARY = (
    "animal", "bird", "fish", "insect", "plant", "tree", "flower", "fruit", "vegetable", "food", "drink",
    "colour", "shape", "number", "year", "month", "day", "time", "unit", "money", "country", "city",
    "place", "continent", "river", "mountain", "ocean", "island", "language", "nationality", "person",
    "name", "family", "job", "body part", "disease", "medicine", "chemical element", "metal", "material",
    "planet", "weather", "season", "sport", "game", "musical instrument", "music", "art", "book", "film",
    "tool", "vehicle", "machine", "building", "room", "furniture", "clothing", "weapon", "emotion",
    "religion", "science", "subject", "company", "letter", "symbol", "punctuation", "verb", "adjective",
)
AGREE = 0.6  # share of a slot's strongest strings that must share their nearest category word
STRINGS = 5  # strongest strings of a slot that are compared

Namer = Callable[[list[str]], str]


@cache
def _embedder():
    from adag.llm import make_backend

    return make_backend("embed:minilm", "simulator")


def nearest_categories(strings: list[str], embed: Callable[[list[str]], np.ndarray] | None = None) -> list[str]:
    """Each string's nearest category word by cosine similarity of unit-length embeddings."""
    embed = embed or _embedder().embed
    similarity = embed([s.strip() for s in strings]) @ embed(list(VOCABULARY)).T
    return [VOCABULARY[i] for i in similarity.argmax(1)]


def content_strings(strings: list[str]) -> list[str]:
    """The distinct stripped strings with letters or digits that are not English function words ("Who",
    "the"): a category or a name is read from content words only."""
    return [s for s in dict.fromkeys(s.strip() for s in strings)
            if any(c.isalnum() for c in s) and s.lower() not in ENGLISH_STOP_WORDS]


def slot_category(strings: list[str], embed: Callable[[list[str]], np.ndarray] | None = None) -> str:
    """The category most of the strongest content strings share, or '' (fewer than two, or no category
    held by AGREE of them)."""
    words = content_strings(strings)[:STRINGS]
    if len(words) < 2:
        return ""
    category, count = Counter(nearest_categories(words, embed)).most_common(1)[0]
    return category if count >= max(2, AGREE * len(words)) else ""
