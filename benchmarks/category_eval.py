"""Slot category names (adag.describe.categories) on word groups that were not used to choose the
vocabulary or the agreement rule: each group's strings (as a tokenizer writes them, with a leading space)
should get the expected category, or none for mixed groups. Prints one line per group and the totals.

    python benchmarks/category_eval.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adag.describe.categories import slot_category  # noqa: E402

# Expected category (one of the vocabulary's words, or "" for none) and five strings.
GROUPS = [
    ("month", ["March", "July", "October", "January", "May"]),
    ("metal", ["iron", "copper", "silver", "zinc", "gold"]),
    ("vegetable", ["carrot", "potato", "onion", "cabbage", "spinach"]),
    ("sport", ["football", "tennis", "cricket", "rugby", "golf"]),
    ("musical instrument", ["violin", "piano", "guitar", "flute", "trumpet"]),
    ("job", ["teacher", "doctor", "plumber", "lawyer", "nurse"]),
    ("body part", ["elbow", "knee", "shoulder", "ankle", "wrist"]),
    ("vehicle", ["truck", "bicycle", "bus", "tractor", "van"]),
    ("drink", ["coffee", "tea", "juice", "lemonade", "beer"]),
    ("language", ["French", "Spanish", "Hindi", "Swahili", "Polish"]),
    ("city", ["Chicago", "Manchester", "Osaka", "Lyon", "Munich"]),
    ("bird", ["sparrow", "eagle", "pigeon", "robin", "parrot"]),
    ("emotion", ["anger", "joy", "fear", "sadness", "surprise"]),
    ("number", ["17", "42", "365", "8", "1000"]),
    ("", ["quickly", "table", "seven", "Paris", "blue"]),
    ("", ["the", "of", "and", "is", "to"]),
    ("", ["run", "happy", "window", "Tuesday", "salt"]),
    ("", ["lamp", "ocean", "pencil", "jump", "Greek"]),
]


def main() -> None:
    right = 0
    for expected, words in GROUPS:
        got = slot_category([f" {w}" for w in words])
        right += got == expected
        print(f"  {'ok ' if got == expected else 'NO '} expected {expected or '(none)':20s} got {got or '(none)':20s} "
              f"{', '.join(words)}")
    named = [g for g in GROUPS if g[0]]
    print(f"{right}/{len(GROUPS)} groups right ({sum(slot_category([f' {w}' for w in ws]) == e for e, ws in named)}/"
          f"{len(named)} named groups, the rest mixed groups that must get none)")


if __name__ == "__main__":
    main()
