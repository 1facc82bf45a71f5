"""Splitting the data: labels to indices, near-duplicate groups, the leak-safe stratified seeded split, subsamples."""

from __future__ import annotations

import unicodedata

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from lorahpo.config import DataConfig
from lorahpo.errors import UserError


def label_map(labels: pd.Series, positive_label: str | None) -> list[str]:
    """Deterministic index -> label: sorted (numerically when all labels are integers); binary: positive last."""
    uniq = sorted(
        labels.unique().tolist(), key=lambda v: (0, v, "") if isinstance(v, (int, np.integer)) else (1, 0, str(v))
    )
    names = [str(v) for v in uniq]
    if len(names) < 2:
        raise UserError(f"the labels hold only one class ({names}); a classifier needs at least two")
    if positive_label is not None:
        if str(positive_label) not in names:
            raise UserError(
                f"data.positive_label={positive_label!r} is not among the labels {names}; set data.positive_label to "
                "one of them (the class F-beta is reported for), or null (the second in sorted order)"
            )
        if len(names) == 2:
            names = [n for n in names if n != str(positive_label)] + [str(positive_label)]
    return names


def normalise(text: str) -> str:
    """Two texts equal after this are the same example: case and whitespace never make a new one."""
    return " ".join(text.lower().split())


def near_key(text: str) -> str:
    """The project's near-duplicate rule: two texts are near-duplicates when they are equal once case, digits,
    punctuation and whitespace are dropped: the key is the text's letters (with their marks), lower-case, after NFKC
    (so composed and decomposed accents, ligatures and full-width forms are one text) and without anything else,
    invisible format characters such as a zero-width space included. "Call 0800 123 now!" and "call 0800 124 now" are
    one text: a template with another number, which a classifier that saw one in training recognises in val or test;
    so are "Don't" and "Dont" (punctuation inside a word does not split it). A text with no letter at all keeps its
    exact form (`normalise`), so "123" and "456" stay two texts."""
    letters = (c for c in unicodedata.normalize("NFKC", text).lower() if unicodedata.category(c)[0] in "LM")
    return "".join(letters) or normalise(text)


def near_groups(labels: np.ndarray, texts: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """Each row's group of near-duplicates (`near_key`), and the counts: exact duplicates, near-duplicates beyond
    them, groups whose rows carry more than one label."""
    exact = pd.Series([normalise(t) for t in texts]).nunique()
    codes, uniques = pd.factorize(pd.Series([near_key(t) for t in texts]))
    conflicts = int((pd.Series(labels).groupby(codes).nunique() > 1).sum())
    return codes, {
        "distinct_texts": exact,
        "duplicate_rows": len(texts) - exact,
        "near_duplicate_rows": exact - len(uniques),
        "conflicting_labels": conflicts,
    }


def split_indices(
    labels: np.ndarray, texts: list[str], fractions: tuple[float, float, float], seed: int
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Stratified, seeded train/val/test row indices in which every copy and every near-duplicate of a text (equal
    under `near_key`) lands in the same split: a text in val or test that training saw, up to a digit or a full stop,
    would reward memorisation. The split is drawn over the groups of near-duplicates (stratified by the label of each
    group's first row), then each group brings its rows. With test=0 it is ONE train_test_split(test_size=val), the
    predecessor's 70/30 setting. Also returns the counts of `near_groups`."""
    codes, stats = near_groups(labels, texts)
    first = np.unique(codes, return_index=True)[1]  # row of each group's first occurrence
    group_labels = labels[first]
    groups = np.arange(len(first))
    train_f, val_f, test_f = fractions
    counts = np.bincount(group_labels, minlength=labels.max() + 1)
    for name, frac in (("val", val_f), ("test", test_f)):
        if frac > 0 and counts.min() * frac < 1:
            raise UserError(
                f"the smallest class has {counts.min()} distinct texts: too few for a stratified {name} split of "
                f"{frac}; add data or raise data.split's {name} fraction"
            )
    try:
        if test_f > 0:
            rest, test = train_test_split(groups, test_size=test_f, stratify=group_labels, random_state=seed)
        else:
            rest, test = groups, groups[:0]
        train, val = train_test_split(
            rest, test_size=val_f / (train_f + val_f), stratify=group_labels[rest], random_state=seed
        )
    except ValueError as e:
        raise UserError(f"cannot split the data as data.split={list(fractions)}: {e}") from None
    parts = {name: np.flatnonzero(np.isin(codes, g)) for name, g in (("train", train), ("val", val), ("test", test))}
    return parts, stats


def subsample(labels: pd.Series, n: int, seed: int) -> np.ndarray:
    """Sorted positions of a stratified, seeded sample of n rows (a plain seeded sample where too few rows are left
    out to stratify what is dropped)."""
    try:
        keep, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed)
    except ValueError:
        keep = np.random.default_rng(seed).choice(len(labels), size=n, replace=False)
    return np.sort(keep)


def given_parts(
    given: np.ndarray, labels: np.ndarray, texts: list[str], cfg: DataConfig, seed: int
) -> dict[str, np.ndarray]:
    """Row indices of the splits a data set ships (`given`: each row's train/val/test), kept as they are, except:
    `data.max_examples` subsamples train, and a data set without a val split gets one carved out of train by
    `split_indices` (val takes split[1] / (split[0] + split[1]) of it); test is never touched."""
    parts = {n: np.flatnonzero(given == n) for n in ("train", "val", "test")}
    train = parts["train"]
    if cfg.max_examples is not None and cfg.max_examples < len(train):
        train = train[subsample(pd.Series(labels[train]), cfg.max_examples, seed)]
    if len(parts["val"]) == 0:
        carved, _ = split_indices(labels[train], [texts[i] for i in train], (*cfg.split[:2], 0.0), seed)
        return {"train": train[carved["train"]], "val": train[carved["val"]], "test": parts["test"]}
    return {**parts, "train": train}


def check_classes(labels: np.ndarray, given: np.ndarray, names: list[str]) -> None:
    """A class in a given val or test split that train never shows cannot be learned; it is usually a placeholder."""
    for split in ("val", "test"):
        unseen = sorted({names[k] for k in set(labels[given == split]) - set(labels[given == "train"])})
        if unseen:
            raise UserError(
                f"the {split} split holds classes that train never shows: {unseen[:5]}; if they are placeholders of "
                "an unlabelled test split (SST-2's official test has label -1), use the validation split as test"
            )


def leaks(texts: list[str], parts: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """How many val and test rows repeat a training text: `exact` (up to case and whitespace) and `near` (beyond
    those, equal under `near_key`). Given splits are reported, never changed: an official test split is not ours
    to edit. Zero for lorahpo's own split by construction."""
    out = {}
    for split in ("val", "test"):
        found = {}
        for name, key in (("exact", normalise), ("near", near_key)):
            train = {key(texts[i]) for i in parts["train"]}
            found[name] = sum(key(texts[i]) in train for i in parts[split])
        out[split] = {"exact": found["exact"], "near": found["near"] - found["exact"]}
    return out
