"""Data: read (lorahpo/reading.py), map labels and split (lorahpo/splitting.py), tokenize ONCE, batch.

The driver runs all of this once per sweep; trials receive the result (`TaskData`) through the Ray object store and
only batch it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lorahpo.config import DataConfig
from lorahpo.reading import read_data
from lorahpo.repro import epoch_seed
from lorahpo.splitting import check_classes, given_parts, label_map, leaks, near_groups, split_indices, subsample

log = logging.getLogger(__name__)


@dataclass
class Split:
    """One tokenized split: token ids per example (unpadded), label indices, and original row numbers."""

    input_ids: list[list[int]]
    labels: list[int]
    rows: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    """Everything a trial needs from the data, prepared once on the driver."""

    train: Split
    val: Split
    test: Split
    label_names: list[str]
    """Index -> original label (as a string). Binary: the positive class is index 1."""
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)
    """Provenance: data checksum, split hash, class counts, truncation counts."""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def load_task(cfg: DataConfig, tokenizer: Any, seed: int) -> TaskData:
    """Read, label, split and tokenize; the single entry point trials and the sweep use."""
    df, info = read_data(cfg)
    given = "split" in df
    if not given and cfg.max_examples is not None and cfg.max_examples < len(df):
        df = df.iloc[subsample(df["label"].astype(str), cfg.max_examples, seed)]
    names = label_map(df["label"], cfg.positive_label)
    index = {n: i for i, n in enumerate(names)}
    y = df["label"].map(lambda v: index[str(v)]).to_numpy()
    texts = df["text"].tolist()
    if given:
        check_classes(y, df["split"].to_numpy(), names)
        parts, duplicates = given_parts(df["split"].to_numpy(), y, texts, cfg, seed), near_groups(y, texts)[1]
    else:
        parts, duplicates = split_indices(y, texts, cfg.split, seed)
    if not given and (duplicates["duplicate_rows"] or duplicates["near_duplicate_rows"]):
        log.warning(
            "%d of %d texts repeat another one (ignoring case and whitespace) and %d more differ from another only in "
            "digits or punctuation; all of them stay in one split with their twins%s",
            duplicates["duplicate_rows"],
            len(df),
            duplicates["near_duplicate_rows"],
            f"; {duplicates['conflicting_labels']} such groups carry more than one label"
            if duplicates["conflicting_labels"]
            else "",
        )
    if given and "val" not in info["splits"]:  # reproducible from train, data.split and the seed: nothing to hash
        carved = {"source": f"carved from train (data.split {list(cfg.split)})", "sha256": None}
        info["splits"] = {"train": info["splits"]["train"], "val": carved, "test": info["splits"]["test"]}
    leaked = leaks(texts, parts)
    if any(n for split in leaked.values() for n in split.values()):
        log.warning(
            "the given splits overlap: %d val and %d test texts repeat a training text (%d and %d more up to digits "
            "and punctuation); reported as data.leaks, the splits are kept as given",
            *(leaked[s][k] for k in ("exact", "near") for s in ("val", "test")),
        )
    rows = df.index.to_numpy()  # row numbers in the source (file, or given split), so a reader can audit the split

    # One tokenizer call for the rows used; truncation is done here so it can be counted.
    used = np.sort(np.concatenate(list(parts.values())))
    ids = dict(zip(used.tolist(), tokenizer([texts[i] for i in used], truncation=False)["input_ids"]))
    truncated = {}
    splits = {}
    for name, sel in parts.items():
        toks = [ids[i] for i in sel]
        truncated[name] = sum(len(t) > cfg.max_length for t in toks)
        splits[name] = Split([t[: cfg.max_length] for t in toks], y[sel].tolist(), rows[sel].tolist())
    split_doc = {n: s.rows for n, s in splits.items()}
    info = {
        **info,
        "num_examples": len(used),
        "label_names": names,
        "class_counts": {names[k]: int(v) for k, v in enumerate(np.bincount(y[used], minlength=len(names)))},
        "split_sizes": {n: len(s) for n, s in splits.items()},
        "split_sha256": hashlib.sha256(json.dumps(split_doc).encode()).hexdigest(),
        "duplicates": duplicates,
        "leaks": leaked,
        "truncated": truncated,
        "mean_tokens": float(np.mean([len(t) for t in ids.values()])),
    }
    if sum(truncated.values()):
        log.warning(
            "%d of %d texts are longer than data.max_length=%d tokens and were truncated",
            sum(truncated.values()),
            len(used),
            cfg.max_length,
        )
    return TaskData(splits["train"], splits["val"], splits["test"], names, tokenizer, info)


def split_rows(data: TaskData) -> dict[str, list[int]]:
    """The split as source-file row numbers (written to split.json)."""
    return {"train": data.train.rows, "val": data.val.rows, "test": data.test.rows}


class LengthGroupedBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of similar length: pads cost compute, and SMS lengths vary 10x. Shuffled per epoch with a generator
    seeded by (seed, epoch), so a trial resumed at epoch k sees exactly the batches an uninterrupted one would.

    Lightning calls `set_epoch` on a DataLoader's sampler, never on its batch sampler: the training module tells this
    one the epoch itself (module.LoraClassifier.on_train_epoch_start). Lightning may create the epoch's iterator
    before that hook runs (first epoch of a run, a resumed epoch), so the order is drawn lazily, at the first batch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, shuffle: bool = True, group: int = 50):
        self.lengths, self.batch_size, self.seed, self.shuffle, self.group = lengths, batch_size, seed, shuffle, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)  # a generator: runs at the first next(), after the epoch hook

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch, in order."""
        order = list(range(len(self.lengths)))
        rng = random.Random(epoch_seed(self.seed, epoch))
        if self.shuffle:
            rng.shuffle(order)
        # Sort within windows of `group` batches: nearly as little padding as a global sort, still random.
        window = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


class _Examples(torch.utils.data.Dataset):
    def __init__(self, split: Split, states: Sequence[np.ndarray] | None = None):
        self.split, self.states = split, states

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"input_ids": self.split.input_ids[i], "labels": self.split.labels[i]}
        if self.states is not None:
            item["states"] = self.states[i]
        return item


def pad_states(rows: list[np.ndarray], length: int) -> torch.Tensor:
    """Per-example cached hidden states [tokens, hidden] as one right-padded batch [rows, length, hidden], laid out
    exactly like their padded ids. Pads are zeros: the attention mask hides them from every real token, and the head
    pools a real token. bfloat16 travels as its raw bits (uint16: numpy has no bfloat16)."""
    out = np.zeros((len(rows), length, rows[0].shape[-1]), dtype=rows[0].dtype)
    for j, row in enumerate(rows):
        out[j, : len(row)] = row
    batch = torch.from_numpy(out)
    return batch.view(torch.bfloat16) if out.dtype == np.uint16 else batch


def make_loader(
    split: Split,
    tokenizer: Any,
    batch_size: int,
    seed: int,
    shuffle: bool,
    states: Sequence[np.ndarray] | None = None,
) -> torch.utils.data.DataLoader:
    """DataLoader with length-grouped batches and tokenizer-driven dynamic padding (right side, to the batch max).
    `states` (example i's cached hidden states, see lorahpo.prefix) adds them to every batch, padded like the ids."""

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = tokenizer.pad({"input_ids": [it["input_ids"] for it in items]}, padding="longest", return_tensors="pt")
        batch["labels"] = torch.tensor([it["labels"] for it in items])
        if states is not None:
            batch["states"] = pad_states([it["states"] for it in items], batch["input_ids"].shape[1])
        return dict(batch)

    sampler = LengthGroupedBatches([len(t) for t in split.input_ids], batch_size, seed, shuffle)
    return torch.utils.data.DataLoader(_Examples(split, states), batch_sampler=sampler, collate_fn=collate)
