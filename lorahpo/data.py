"""Data: read a table (or a bundled data set), map labels, split (stratified, seeded), tokenize ONCE.

The driver runs all of this once per sweep; trials receive the result (`TaskData`) through the Ray object store and
only batch it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from sklearn.model_selection import train_test_split

from lorahpo.config import DataConfig
from lorahpo.errors import UserError
from lorahpo.repro import epoch_seed

log = logging.getLogger(__name__)

# Data sets shipped inside the package, reachable as `data.path=bundled:<name>`: name -> sha256 of its file
# lorahpo/resources/<name>.tsv (`label<TAB>text`, no header, no quoting), verified at every load. Sources, selection and
# licences (all CC BY 4.0): lorahpo/resources/NOTICE.md.
BUNDLED: dict[str, str] = {
    # SMS Spam Collection v.1 (Almeida and Gomez Hidalgo 2011, UCI): 4,862 messages, ham 4,220 / spam 642.
    "sms_spam_collection": "883079d805cda90c823827a5237496f114d1eb823d95fe909dbea2038707180d",
    # Banking77 (PolyAI, Casanueva et al. 2020): its 25 card-payment, top-up and transfer intents, 100 queries each.
    "banking77_payments": "9b3de8e5f572d6a84b0b53287bc36abf068dcf9386cedcbcc1371a0c4ebe248d",
    # HWU64 (Liu et al. 2019): 25 home-assistant intents (alarm, audio, calendar, email, iot, lists, play), 100 each.
    "hwu64_assistant": "02f98a9bc6d41f6c4350fe56e9fe040023f3b6feb9ba4c150ed0ff0334ffdc0b",
}
BUNDLED_PREFIX = "bundled:"
DEFAULT_BUNDLED = "sms_spam_collection"  # what `data.path: null` reads
RESOURCES = Path(__file__).parent / "resources"
BUNDLED_PATH = RESOURCES / f"{DEFAULT_BUNDLED}.tsv"
BUNDLED_SHA256 = BUNDLED[DEFAULT_BUNDLED]
READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundled_name(path: str | None) -> str | None:
    """The bundled data set `data.path` names (null: the default one), or None for a user's file."""
    if path is None:
        return DEFAULT_BUNDLED
    if not path.startswith(BUNDLED_PREFIX):
        return None
    name = path.removeprefix(BUNDLED_PREFIX)
    if name not in BUNDLED:
        raise UserError(
            f"data.path={path}: there is no bundled data set {name!r}; choose one of "
            f"{', '.join(BUNDLED_PREFIX + n for n in sorted(BUNDLED))}, or give a CSV, TSV, JSONL or Parquet file"
        )
    return name


def read_bundled(name: str) -> tuple[pd.DataFrame, str]:
    """A bundled data set (checksum verified) as `text` and `label` columns, and its sha256."""
    path = RESOURCES / f"{name}.tsv"
    digest = file_sha256(path)
    if digest != BUNDLED[name]:
        raise RuntimeError(f"bundled data {path} is corrupt (sha256 {digest}); reinstall lorahpo")
    df = pd.read_csv(
        path, sep="\t", header=None, names=["label", "text"], quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False
    )
    return df[["text", "label"]], digest


def read_table(cfg: DataConfig) -> tuple[pd.DataFrame, str]:
    """Return a DataFrame with `text` and `label` columns, and the sha256 of the source file."""
    name = bundled_name(cfg.path)
    if name is not None:
        return read_bundled(name)
    path = Path(cfg.path)
    if not path.is_file():
        raise UserError(f"data.path={cfg.path} does not exist (give a CSV, TSV, JSONL or Parquet file)")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"data.path={cfg.path}: unrecognised format {path.suffix!r}; use one of {sorted(READERS)}")
    if path.stat().st_size == 0:
        raise UserError(f"data.path={cfg.path} is empty")
    try:
        if kind in ("csv", "tsv"):
            # only an empty cell is missing: a class or a text "None", "NA" or "null" is a string (as in read_bundled)
            df = pd.read_csv(
                path, sep="," if kind == "csv" else "\t", encoding="utf-8", keep_default_na=False, na_values=[""]
            )
        elif kind == "jsonl":
            df = pd.read_json(path, lines=True, encoding="utf-8")
        else:
            df = read_parquet(path, f"data.path={cfg.path}")
    except UnicodeDecodeError as e:
        raise UserError(
            f"data.path={cfg.path} is not valid UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8"
        ) from None
    except (ValueError, pd.errors.ParserError, OSError) as e:
        raise UserError(f"data.path={cfg.path} could not be read as {kind}: {str(e).splitlines()[0]}") from None
    for col, key in ((cfg.text_column, "data.text_column"), (cfg.label_column, "data.label_column")):
        if col not in df.columns:
            raise UserError(
                f"{key}={col!r} is not a column of {cfg.path}; its columns are {list(map(str, df.columns))}"
            )
    if df.empty:
        raise UserError(f"data.path={cfg.path} has no rows (only a header); add data")
    df = df[[cfg.text_column, cfg.label_column]].set_axis(["text", "label"], axis=1)
    missing = df["text"].isna() | (df["text"].astype(str).str.strip() == "")
    if missing.any():
        raise UserError(
            f"{int(missing.sum())} of {len(df)} rows of {cfg.path} have an empty or missing text "
            f"(column {cfg.text_column!r}); they were rejected, not dropped: remove them or fill them in"
        )
    if df["label"].isna().any():
        raise UserError(
            f"{int(df['label'].isna().sum())} rows of {cfg.path} have no label "
            f"(column {cfg.label_column!r}); remove them or label them"
        )
    nested = df["label"].map(lambda v: isinstance(v, (list, dict)))
    if nested.any():
        raise UserError(
            f"{int(nested.sum())} labels of {cfg.path} are lists or objects; a label is one string or number"
        )
    return df.assign(text=df["text"].astype(str)), file_sha256(path)


def read_parquet(source: str | Path | bytes, what: str) -> pd.DataFrame:
    """A parquet file (a path, or its bytes) as a DataFrame, unable to run code whatever is imported: importing
    ray.tune imports ray.data, which registers with pyarrow an extension type whose values are pickles, and converting
    such a column to pandas unpickles them (so does a pandas extension dtype named in the file's pandas metadata). A
    column of any Arrow extension type is refused with one line, and the pandas metadata is not read (lorahpo's own
    tables need neither). `what` names the file in the error."""
    table = pq.read_table(pa.BufferReader(source) if isinstance(source, bytes) else source)
    unsafe = [f.name for f in table.schema if _extension_inside(f.type)]
    if unsafe:
        raise UserError(
            f"{what}: columns {unsafe} hold an Arrow extension type (e.g. Ray's pickled Python objects), which could "
            "run code when read; refused. Store plain columns (strings, numbers, lists of them)"
        )
    return table.to_pandas(ignore_metadata=True)


def _extension_inside(dtype: pa.DataType) -> bool:
    if isinstance(dtype, pa.ExtensionType):
        return True
    if pa.types.is_dictionary(dtype):  # reports no fields of its own
        return _extension_inside(dtype.value_type)
    return any(_extension_inside(dtype.field(i).type) for i in range(dtype.num_fields))


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


def split_indices(
    labels: np.ndarray, texts: list[str], fractions: tuple[float, float, float], seed: int
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Stratified, seeded train/val/test row indices in which every copy and every near-duplicate of a text (equal
    under `near_key`) lands in the same split: a text in val or test that training saw, up to a digit or a full stop,
    would reward memorisation. The split is drawn over the groups of near-duplicates (stratified by the label of each
    group's first row), then each group brings its rows. With test=0 it is ONE train_test_split(test_size=val), the
    predecessor's 70/30 setting. Also returns the counts: exact duplicates, near-duplicates beyond them, groups whose
    rows carry more than one label."""
    exact = pd.Series([normalise(t) for t in texts]).nunique()
    codes, uniques = pd.factorize(pd.Series([near_key(t) for t in texts]))
    first = np.unique(codes, return_index=True)[1]  # row of each group's first occurrence
    group_labels = labels[first]
    conflicts = int((pd.Series(labels).groupby(codes).nunique() > 1).sum())
    stats = {
        "distinct_texts": exact,
        "duplicate_rows": len(texts) - exact,
        "near_duplicate_rows": exact - len(uniques),
        "conflicting_labels": conflicts,
    }
    groups = np.arange(len(uniques))
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


def load_task(cfg: DataConfig, tokenizer: Any, seed: int) -> TaskData:
    """Read, label, split and tokenize; the single entry point trials and the sweep use."""
    df, digest = read_table(cfg)
    if cfg.max_examples is not None and cfg.max_examples < len(df):
        df = df.iloc[subsample(df["label"].astype(str), cfg.max_examples, seed)]
    names = label_map(df["label"], cfg.positive_label)
    index = {n: i for i, n in enumerate(names)}
    y = df["label"].map(lambda v: index[str(v)]).to_numpy()
    parts, duplicates = split_indices(y, df["text"].tolist(), cfg.split, seed)
    if duplicates["duplicate_rows"] or duplicates["near_duplicate_rows"]:
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
    rows = df.index.to_numpy()  # row numbers in the source file, so a reader can audit the split

    # One tokenizer call for the whole data; truncation is done here so it can be counted.
    ids = tokenizer(df["text"].tolist(), add_special_tokens=True, truncation=False)["input_ids"]
    truncated = {}
    splits = {}
    for name, sel in parts.items():
        toks = [ids[i] for i in sel]
        truncated[name] = sum(len(t) > cfg.max_length for t in toks)
        splits[name] = Split([t[: cfg.max_length] for t in toks], y[sel].tolist(), rows[sel].tolist())
    split_doc = {n: s.rows for n, s in splits.items()}
    info = {
        "source": source(cfg.path),
        "sha256": digest,
        "num_examples": len(df),
        "label_names": names,
        "class_counts": {names[k]: int(v) for k, v in enumerate(np.bincount(y))},
        "split_sizes": {n: len(s) for n, s in splits.items()},
        "split_sha256": hashlib.sha256(json.dumps(split_doc).encode()).hexdigest(),
        "duplicates": duplicates,
        "truncated": truncated,
        "mean_tokens": float(np.mean([len(t) for t in ids])),
    }
    if sum(truncated.values()):
        log.warning(
            "%d of %d texts are longer than data.max_length=%d tokens and were truncated",
            sum(truncated.values()),
            len(df),
            cfg.max_length,
        )
    return TaskData(splits["train"], splits["val"], splits["test"], names, tokenizer, info)


def source(path: str | None) -> str:
    """What the manifest records as the data's origin: `bundled:<name>`, or the file's absolute path."""
    name = bundled_name(path)
    return BUNDLED_PREFIX + name if name is not None else str(Path(path).resolve())


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
