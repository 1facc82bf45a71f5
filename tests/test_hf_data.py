"""Hugging Face datasets as a source: a `save_to_disk` DatasetDict (with and without a validation split) and a hub
dataset read offline from a pre-filled datasets cache (written by `datasets` itself; nothing is downloaded), each
kept as given; ClassLabel names kept; every bad input one line."""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pytest

from lorahpo.config import DataConfig
from lorahpo.data import TaskData, load_task
from lorahpo.errors import UserError

from .conftest import word

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def rows(split: str, n: int, label: list[int] | None = None) -> dict[str, list]:
    return {"sentence": [f"{split} sentence {word(i)}" for i in range(n)], "label": label or [i % 2 for i in range(n)]}


def saved(tmp_path: Path, with_val: bool = True, test_label: list[int] | None = None) -> Path:
    """A DatasetDict with ClassLabel labels (0 neg, 1 pos), saved with save_to_disk."""
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    splits = {"train": rows("train", 40), "test": rows("test", 10, test_label)}
    if with_val:
        splits["validation"] = rows("validation", 12)
    dd = datasets.DatasetDict({n: datasets.Dataset.from_dict(r, features=features) for n, r in splits.items()})
    dd.save_to_disk(tmp_path / "dd")
    return tmp_path / "dd"


def test_saved_dataset_dict_kept_as_given_with_label_names(tmp_path: Path, tiny_data: TaskData) -> None:
    path = saved(tmp_path)
    data = load_task(DataConfig(path=str(path), text_column="sentence"), tiny_data.tokenizer, seed=0)
    assert data.label_names == ["neg", "pos"]
    assert (data.train.rows, data.val.rows, data.test.rows) == (list(range(40)), list(range(12)), list(range(10)))
    assert data.test.labels == [i % 2 for i in range(10)]
    assert data.info["splits"]["val"]["source"] == f"{path} split validation"


def test_saved_train_and_test_only_carves_val_from_train(tmp_path: Path, tiny_data: TaskData) -> None:
    path = saved(tmp_path, with_val=False)
    data = load_task(DataConfig(path=str(path), text_column="sentence"), tiny_data.tokenizer, seed=0)
    assert data.test.rows == list(range(10))
    assert (len(data.train), len(data.val)) == (32, 8)  # 40 * 0.15 / 0.85 = 7.06, rounded up
    assert sorted(data.train.rows + data.val.rows) == list(range(40))


def prefill_hub_cache(tmp_path: Path) -> Path:
    """The datasets cache as a first online `load_dataset("lorahpo-tests/tiny_sst")` leaves it: built by datasets from
    a local copy of the repository, then filed under the hub id and a commit."""
    repo = tmp_path / "tiny_sst" / "data"
    repo.mkdir(parents=True)
    for split, n in (("train", 40), ("validation", 12), ("test", 10)):
        pd.DataFrame(rows(split, n)).to_parquet(repo / f"{split}-00000-of-00001.parquet")
    datasets.load_dataset(str(repo.parent), cache_dir=str(tmp_path / "build"))
    built = next((tmp_path / "build" / "tiny_sst" / "default" / "0.0.0").glob("*/dataset_info.json")).parent
    cache = tmp_path / "cache"
    shutil.move(built, cache / "lorahpo-tests___tiny_sst" / "default" / "0.0.0" / COMMIT)
    return cache


def test_hub_dataset_offline_from_the_cache(tmp_path: Path, tiny_data: TaskData, monkeypatch) -> None:
    cache = prefill_hub_cache(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    cfg = DataConfig(path="hf:lorahpo-tests/tiny_sst", text_column="sentence", revision=COMMIT[:12])
    data = load_task(cfg, tiny_data.tokenizer, seed=0)
    assert data.label_names == ["0", "1"]  # plain integers: no names to keep
    assert (len(data.train), len(data.val), data.test.rows) == (40, 12, list(range(10)))
    assert data.info["source"] == f"hf:lorahpo-tests/tiny_sst commit {COMMIT}"
    with pytest.raises(UserError, match=f"data.revision=v2 cannot be resolved offline: .* is commit {COMMIT}; set"):
        load_task(DataConfig(path=cfg.path, text_column="sentence", revision="v2"), tiny_data.tokenizer, seed=0)
    with pytest.raises(UserError, match=r"data.path=hf:lorahpo-tests/absent .*could not be loaded: Couldn't reach"):
        load_task(DataConfig(path="hf:lorahpo-tests/absent"), tiny_data.tokenizer, seed=0)


def test_bad_dataset_sources_are_one_line(tmp_path: Path, tiny_data: TaskData, monkeypatch) -> None:
    path = saved(tmp_path, test_label=[-1] * 10)  # SST-2's official test: no labels
    tok = tiny_data.tokenizer
    with pytest.raises(UserError, match=r"10 rows of the test split \(.* split test\) have no label: .*validation"):
        load_task(DataConfig(path=str(path), text_column="sentence"), tok, seed=0)
    as_test = {"train": "train", "test": "validation"}  # what that message advises: scores
    assert len(load_task(DataConfig(path=str(path), text_column="sentence", hf_splits=as_test), tok, 0).test) == 12
    with pytest.raises(UserError, match=r"has no split 'dev' for val \(its splits: \['train', 'test', 'validation'\]"):
        load_task(DataConfig(path=str(path), text_column="sentence", hf_splits={**as_test, "val": "dev"}), tok, 0)
    with pytest.raises(
        UserError, match=r"data.text_column='text' is not a column of .*; its columns are \['sentence', "
    ):
        load_task(DataConfig(path=str(path)), tok, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"data.path=.*empty holds no dataset saved with save_to_disk"):
        load_task(DataConfig(path=str(tmp_path / "empty")), tok, seed=0)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"needs the datasets package: pip install 'lorahpo\[datasets\]'$"):
        load_task(DataConfig(path=str(path), text_column="sentence"), tok, seed=0)


def test_a_poisoned_saved_dataset_is_refused_unread(tmp_path: Path, tiny_data: TaskData) -> None:
    """A split's Arrow file with a column of Ray's pickled-object extension type (unpickled when converted): one line,
    and the pickle never runs."""
    from ray.data.extensions import ArrowPythonObjectType  # importing it registers the type with pyarrow

    from .test_untrusted import Payload

    path, marker = saved(tmp_path), tmp_path / "pwned"
    cells = pa.array([pickle.dumps(Payload(marker))] * 2, type=pa.large_binary())
    table = pa.table({"sentence": ["a b", "c d"], "label": [0, 1]})
    table = table.append_column("note", pa.ExtensionArray.from_storage(ArrowPythonObjectType(), cells))
    with (
        pa.OSFile(str(next((path / "test").glob("*.arrow"))), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)
    with pytest.raises(UserError, match=r"could not be read as a saved dataset: Arrow type extension<ray.data.arrow"):
        load_task(DataConfig(path=str(path), text_column="sentence"), tiny_data.tokenizer, seed=0)
    assert not marker.exists()
