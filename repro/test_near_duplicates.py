"""README, data.split: "every copy of a text, and every text equal to it once case, digits, punctuation and whitespace
are dropped ... lands in the same split, so val and test never hold a text seen in training up to a digit or a full
stop". lorahpo.data.near_key does not DROP punctuation: it turns every run of non-letters into one space, so a
punctuation mark inside a word splits it ("don't" -> "don t", unlike "dont"); and it does not normalise Unicode, so
the same visible text in composed and decomposed form (NFC/NFD) or with a zero-width space is two groups."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from lorahpo.data import near_key, split_indices

from .conftest import word

PAIRS = [
    ("Don't forget the {w} meeting", "Dont forget the {w} meeting"),  # an apostrophe dropped
    ("Please e-mail the {w} report", "Please email the {w} report"),  # a hyphen dropped
    ("café {w} tonight", unicodedata.normalize("NFD", "café {w} tonight")),  # the same text, NFC vs NFD
    ("free {w} prize", "fr\u200bee {w} prize"),  # a zero-width space (invisible)
]


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=["apostrophe", "hyphen", "nfc-nfd", "zero-width"])
def test_texts_equal_once_punctuation_is_dropped_share_a_key(a: str, b: str) -> None:
    assert near_key(a.format(w="x")) == near_key(b.format(w="x"))


def test_such_twins_never_straddle_the_split() -> None:
    """40 twin pairs of each kind above (200 distinct texts in all with filler), the default split and seed: every
    twin must land in its partner's split."""
    texts, labels = [], []
    for i in range(40):
        for a, b in PAIRS:
            texts += [a.format(w=word(i)), b.format(w=word(i))]
            labels += [i % 2, i % 2]
    parts, _ = split_indices(np.array(labels), texts, (0.7, 0.15, 0.15), 42)
    where = {}
    for name, rows in parts.items():
        for r in rows:
            where[r] = name
    straddling = [(texts[j], texts[j + 1]) for j in range(0, len(texts), 2) if where[j] != where[j + 1]]
    assert not straddling, f"{len(straddling)} of {len(texts) // 2} twin pairs straddle splits, e.g. {straddling[:3]}"
