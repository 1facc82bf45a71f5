"""Given splits: a split column or one file per split, kept as given (val carved from train when absent), leaks
across them counted, their provenance checked on --resume / --final, and every bad input one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lorahpo.checks import check_same_data
from lorahpo.config import DataConfig
from lorahpo.data import TaskData, load_task
from lorahpo.errors import UserError

from .conftest import cli, tiny_args, word


def texts(n: int, start: int = 0) -> pd.DataFrame:
    """n distinct texts (no two near-duplicates), every fourth spam."""
    spam = [i % 4 == 0 for i in range(start, start + n)]
    body = [
        f"message {word(i)} " + ("win cash now" if s else "see you later")
        for i, s in zip(range(start, start + n), spam)
    ]
    return pd.DataFrame({"text": body, "label": ["spam" if s else "ham" for s in spam]})


def given_csv(path: Path) -> Path:
    """80 train, 20 validation, 22 test rows in one file (split names in mixed case); test holds one exact copy of a
    training text (up to case) and one near copy (up to punctuation)."""
    df = texts(120).assign(split=["train"] * 80 + ["Validation"] * 20 + ["TEST"] * 20)
    leaks = pd.DataFrame(
        {"text": [f"MESSAGE {word(4)} win cash now", f"message {word(5)} see you later!!"], "label": ["spam", "ham"]}
    )
    pd.concat([df, leaks.assign(split="test")], ignore_index=True).to_csv(path, index=False)
    return path


def test_split_column_kept_as_given_and_leaks_counted(tmp_path: Path, tiny_data: TaskData) -> None:
    path = given_csv(tmp_path / "given.csv")
    data = load_task(DataConfig(path=str(path), split_column="split"), tiny_data.tokenizer, seed=0)
    assert (data.train.rows, data.val.rows, data.test.rows) == (
        list(range(80)),
        list(range(80, 100)),
        list(range(100, 122)),
    )
    info = data.info
    assert info["split_sizes"] == {"train": 80, "val": 20, "test": 22}
    assert info["leaks"] == {"val": {"exact": 0, "near": 0}, "test": {"exact": 1, "near": 1}}
    assert {n: (s["source"], s["rows"]) for n, s in info["splits"].items()} == {
        n: (f"{path} (split={n})", size) for n, size in (("train", 80), ("val", 20), ("test", 22))
    }


def test_one_file_per_split_train_and_test_only(tmp_path: Path, tiny_data: TaskData) -> None:
    """No val file: val is carved out of train (15/85 of it, stratified, seeded); test stays exactly the test file.
    max_examples subsamples train only."""
    texts(100).to_csv(tmp_path / "train.csv", index=False)
    texts(30, start=500).to_csv(tmp_path / "test.csv", index=False)
    files = {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}
    data = load_task(DataConfig(files=files), tiny_data.tokenizer, seed=0)
    assert data.test.rows == list(range(30))
    assert (len(data.train), len(data.val)) == (82, 18)  # 100 * 0.15 / 0.85 = 17.6, rounded up by sklearn
    assert sorted(data.train.rows + data.val.rows) == list(range(100))
    assert np.bincount(data.val.labels).tolist() == [14, 4]  # stratified: a quarter spam (4.5, rounded down)
    assert [(n, s["source"]) for n, s in data.info["splits"].items()] == [
        ("train", str(tmp_path / "train.csv")),
        ("val", "carved from train (data.split [0.7, 0.15, 0.15])"),
        ("test", str(tmp_path / "test.csv")),
    ]
    small = load_task(DataConfig(files=files, max_examples=40), tiny_data.tokenizer, seed=0)
    assert (len(small.train) + len(small.val), small.test.rows) == (40, list(range(30)))


def bad(tmp_path: Path, case: str) -> DataConfig:
    df = texts(40).assign(split=["train"] * 30 + ["test"] * 10)
    if case == "unknown split name":
        df.loc[3, "split"] = "holdout"
    elif case == "no test rows":
        df["split"] = "train"
    elif case == "class only in test":
        df.loc[35, "label"] = "phishing"
    elif case == "unlabelled test":
        df.loc[df["split"] == "test", "label"] = None
    path = tmp_path / "bad.csv"
    df.rename(columns={"split": "part"} if case == "missing split column" else {}).to_csv(path, index=False)
    return DataConfig(path=str(path), split_column="split")


BAD = {
    "unknown split name": r"data.split_column='split' of .*bad.csv holds split names \['holdout'\]; use train, "
    r"validation \(or val, dev\) and test$",
    "no test rows": r"data.split_column='split' of .*bad.csv has no test rows; a given split needs train and test",
    "class only in test": r"the test split holds classes that train never shows: \['phishing'\]; if they are",
    "unlabelled test": r"10 rows of the test split \(.*bad.csv \(split=test\)\) have no label: it cannot be scored\. "
    r"Use the validation split as test",
    "missing split column": r"data.split_column='split' is not a column of .*bad.csv; its columns are "
    r"\['text', 'label', 'part'\]$",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_given_splits_are_one_line(tmp_path: Path, tiny_data: TaskData, case: str) -> None:
    with pytest.raises(UserError, match=BAD[case]):
        load_task(bad(tmp_path, case), tiny_data.tokenizer, seed=0)


def test_files_and_hub_keys_validated() -> None:
    with pytest.raises(UserError, match=r"data.files=\{'train': 'a.csv'\} must name train and test"):
        DataConfig(files={"train": "a.csv"})
    with pytest.raises(UserError, match="data.files and data.path=x.csv both name the data; give one of them"):
        DataConfig(path="x.csv", files={"train": "a.csv", "test": "b.csv"})
    with pytest.raises(UserError, match="data.hf_config and data.revision belong to a hub dataset"):
        DataConfig(path="x.csv", revision="v1")
    with pytest.raises(UserError, match="data.split_column=split: bundled:sms_spam_collection has no split column"):
        load_task(DataConfig(split_column="split"), None, seed=0)


def test_changed_given_split_refused_on_resume(tmp_path: Path, tiny_data: TaskData) -> None:
    path = given_csv(tmp_path / "given.csv")
    cfg = DataConfig(path=str(path), split_column="split")
    before = load_task(cfg, tiny_data.tokenizer, seed=0).info
    df = pd.read_csv(path)
    df.loc[100, "text"] = "a corrected test text"
    df.to_csv(path, index=False)
    after = load_task(cfg, tiny_data.tokenizer, seed=0).info
    with pytest.raises(UserError, match=r"--final: the given test split \(.*given.csv \(split=test\)\) differs from"):
        check_same_data(json.dumps({"data": before}), after, "results/s", flag="--final")
    assert after["splits"]["train"] == before["splits"]["train"]


def test_dry_run_plan_shows_the_given_splits_and_a_bad_one_is_one_line(tmp_path: Path) -> None:
    path = given_csv(tmp_path / "given.csv")
    args = [
        *tiny_args(tmp_path / "store", **{"data.max_examples": None}),
        f"data.path={path}",
        "data.split_column=split",
    ]
    ok = cli([*args, "--dry-run"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "split_sizes: {train: 80, val: 20, test: 22}" in ok.stdout
    assert f"source: {path} (split=test)" in ok.stdout
    assert "the given splits overlap: 0 val and 1 test texts repeat a training text (0 and 1 more" in ok.stderr
    wrong = cli([*args, "data.split_column=splits", "--dry-run"])
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        f"error: data.split_column='splits' is not a column of {path}; its columns are ['text', 'label', 'split']"
    ]


@pytest.mark.slow
def test_sweep_on_given_splits_records_them(tmp_path: Path) -> None:
    """A tiny sweep through the CLI on a file with a split column: split.json is exactly the given rows, and the
    leak across them is in the manifest and the summary."""
    path = given_csv(tmp_path / "given.csv")
    overrides = {"data.max_examples": None, "sweep.num_samples": 2, "train.max_epochs": 1, "sweep.name": "given"}
    run = cli([*tiny_args(tmp_path / "store", **overrides), f"data.path={path}", "data.split_column=split"])
    assert run.returncode == 0, run.stderr[-3000:]
    exp = tmp_path / "store" / "given"
    assert json.loads((exp / "split.json").read_text()) == {
        "train": list(range(80)),
        "val": list(range(80, 100)),
        "test": list(range(100, 122)),
    }
    leaks = {"val": {"exact": 0, "near": 0}, "test": {"exact": 1, "near": 1}}
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["data"] == {"split_sizes": {"train": 80, "val": 20, "test": 22}, "leaks": leaks}
    assert summary["test_size"] == 22
    manifest = json.loads((exp / "manifest.json").read_text())
    assert manifest["data"]["leaks"] == leaks
    assert manifest["data"]["splits"]["test"]["source"] == f"{path} (split=test)"
