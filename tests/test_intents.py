"""The second bundled task: Banking77's 25 payment intents (`data.path=bundled:banking77_payments`), bundled names,
configs/intents.yaml, and bench/tabulate.py's table (its smoke mode, checked against a normal trial)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import tune_lora
from lorahpo.config import DataConfig, ExperimentConfig, apply_overrides, config_from_yaml, load_config
from lorahpo.data import (
    BUNDLED,
    BUNDLED_SHA256,
    RESOURCES,
    TaskData,
    file_sha256,
    label_map,
    load_task,
    read_table,
    source,
)
from lorahpo.errors import UserError
from lorahpo.module import evaluate
from lorahpo.prefix import build_in_memory, plan_prefix
from lorahpo.sources import load_model_config
from lorahpo.trainable import CKPT_NAME, fit, load_trained

from .conftest import ROOT, tiny_args
from .test_bench_smoke import run_smoke
from .test_data import split_texts
from .test_errors import fails

INTENTS_CONFIG = ROOT / "configs" / "intents.yaml"
INTENTS = [
    "automatic_top_up",
    "balance_not_updated_after_bank_transfer",
    "cancel_transfer",
    "card_payment_fee_charged",
    "card_payment_not_recognised",
    "card_payment_wrong_exchange_rate",
    "declined_card_payment",
    "declined_transfer",
    "failed_transfer",
    "pending_card_payment",
    "pending_top_up",
    "pending_transfer",
    "reverted_card_payment?",
    "top_up_by_bank_transfer_charge",
    "top_up_by_card_charge",
    "top_up_by_cash_or_cheque",
    "top_up_failed",
    "top_up_limits",
    "top_up_reverted",
    "topping_up_by_card",
    "transfer_fee_charged",
    "transfer_into_account",
    "transfer_not_received_by_recipient",
    "transfer_timing",
    "verify_top_up",
]
TINY = ["model.name=tiny-random-llama", "model.num_layers=4"]


def test_bundled_intents_verified_and_counted() -> None:
    df, digest = read_table(DataConfig(path="bundled:banking77_payments"))
    assert digest == file_sha256(RESOURCES / "banking77_payments.tsv") == BUNDLED["banking77_payments"]
    assert digest == "9b3de8e5f572d6a84b0b53287bc36abf068dcf9386cedcbcc1371a0c4ebe248d"
    assert len(df) == 2500
    assert df["label"].value_counts().to_dict() == dict.fromkeys(INTENTS, 100)
    assert label_map(df["label"], None) == INTENTS  # index order of the classifier's outputs
    assert not df["text"].str.contains(r"\s\s|^\s|\s$").any()  # one query per line, whitespace runs collapsed


def test_bundled_names_resolve_and_a_wrong_one_is_one_line() -> None:
    default, named = read_table(DataConfig()), read_table(DataConfig(path="bundled:sms_spam_collection"))
    assert default[1] == named[1] == BUNDLED_SHA256
    assert default[0].equals(named[0])
    assert source(None) == source("bundled:sms_spam_collection") == "bundled:sms_spam_collection"
    assert source("bundled:banking77_payments") == "bundled:banking77_payments"
    with pytest.raises(UserError) as e:
        read_table(DataConfig(path="bundled:banking77"))
    assert str(e.value) == (
        "data.path=bundled:banking77: there is no bundled data set 'banking77'; choose one of "
        "bundled:banking77_payments, bundled:hwu64_assistant, bundled:sms_spam_collection, or give a CSV, TSV, JSONL "
        "or Parquet file"
    )


def test_wrong_bundled_name_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    storage = tmp_path / "store"
    err = fails([*tiny_args(storage), "data.path=bundled:nope"], capsys, storage)
    assert err.startswith("error: data.path=bundled:nope: there is no bundled data set 'nope'; choose one of ")


def test_intents_split_per_intent_and_no_text_in_two_splits(tiny_data: TaskData) -> None:
    cfg = load_config(INTENTS_CONFIG)
    data = load_task(cfg.data, tiny_data.tokenizer, cfg.seed)
    assert data.label_names == INTENTS
    assert data.info["duplicates"] == {
        "distinct_texts": 2500,
        "duplicate_rows": 0,
        "near_duplicate_rows": 10,
        "conflicting_labels": 0,
    }
    # 70/15/15 of each intent's 100 queries, drawn over groups of near-duplicates: a pair that moves together shifts
    # one query of intents 0 and 18 between train and val
    expected = {"train": [70] * 25, "val": [15] * 25, "test": [15] * 25}
    expected["train"][0], expected["val"][0], expected["train"][18], expected["val"][18] = 69, 16, 71, 14
    for split, per_intent in expected.items():
        assert np.bincount(getattr(data, split).labels).tolist() == per_intent, split
    by_split = split_texts(data, read_table(cfg.data)[0]["text"].tolist())  # from the rows split.json records
    assert by_split["train"] & by_split["val"] == set()
    assert by_split["train"] & by_split["test"] == set()
    assert by_split["val"] & by_split["test"] == set()
    assert sum(len(v) for v in by_split.values()) == 2500


def test_intents_config_is_its_own_task() -> None:
    cfg = load_config(INTENTS_CONFIG)
    assert cfg.data.path == "bundled:banking77_payments" and cfg.data.positive_label is None
    assert cfg.train.metric == "val_f1" and "train.class_weight" not in cfg.search
    # trial 0 is the untuned baseline: the lora/train values of the file itself
    (baseline,) = cfg.sweep.points_to_evaluate
    assert apply_overrides(cfg, baseline) == cfg
    assert baseline["train.lr"] == 2e-4 and baseline["lora.r"] == 16 and baseline["lora.alpha"] == 32


def test_intents_dry_run_lists_the_classes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--config", str(INTENTS_CONFIG), "--dry-run", *TINY, f"sweep.storage_path={tmp_path / 'store'}"]
    assert tune_lora.main(args) == 0
    plan = yaml.safe_load(capsys.readouterr().out)
    data = plan["data"]
    assert data["source"] == "bundled:banking77_payments"
    assert data["sha256"] == BUNDLED["banking77_payments"]
    assert data["label_names"] == INTENTS
    assert data["class_counts"] == dict.fromkeys(INTENTS, 100)
    assert data["split_sizes"] == {"train": 1750, "val": 375, "test": 375}
    assert plan["metric"] == "best_val_f1 (max)"
    assert not (tmp_path / "store").exists()


# ------------------------------------------------------------------------------------------------------ tabulation
GRID_KEYS = ["train.lr", "lora.last_n", "lora.r", "lora.alpha", "train.batch_size"]
METRIC_COLUMNS = [f"{s}_{m}" for s in ("val", "test") for m in ("accuracy", "f1", "fbeta", "loss")]
TABLE_COLUMNS = ["config_id", *(f"param.{k}" for k in GRID_KEYS), "trial_id", "train_seed", "epoch", *METRIC_COLUMNS,
                 "train_loss", "epoch_time_s", "test_time_s", "iter_s"]  # fmt: skip


@pytest.mark.slow
def test_tabulate_smoke_table_matches_normal_trials(tmp_path: Path, tiny_data: TaskData) -> None:
    """The smoke table: 4 configs (the baseline first) x 2 epochs, every column; its val scores are those of the same
    config trained as a normal sweep's trial (from the prefix cache) without the tabulation's test scoring, and its
    test scores those of `evaluate` on each epoch's checkpoint (what a sweep's final scoring computes)."""
    res = run_smoke("tabulate.py", tmp_path)
    df = pd.read_parquet(tmp_path / "intents_grid.parquet")
    assert list(df.columns) == TABLE_COLUMNS
    assert df["config_id"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and df["epoch"].tolist() == [1, 2] * 4
    assert set(df["train_seed"]) == {42}  # the root seed (--train-seed S trains with S on the same split)
    # the baseline's value of every key, and one other value of each of the first two
    assert set(zip(df["param.train.lr"], df["param.lora.last_n"])) == {(2e-4, 4), (2e-4, 1), (3e-5, 4), (3e-5, 1)}
    assert set(df["param.lora.r"]) == {16} and set(df["param.lora.alpha"]) == {32}
    assert df.groupby("config_id")["trial_id"].nunique().tolist() == [1] * 4
    assert (df[[c for c in df if c.endswith(("_time_s", "iter_s"))]] > 0).all().all()
    summary = res["summary"]
    assert summary["configs"] == 4 and summary["baseline"]["config_id"] == 0
    assert res["rows"] == 8 and res["grid"]["train.lr"] == [2e-4, 3e-5]

    cfg: ExperimentConfig = config_from_yaml((tmp_path / "work" / "tabulate_smoke" / "config.yaml").read_text())
    assert cfg.train.patience == cfg.train.max_epochs == 2  # no early stopping: every curve is whole
    data = load_task(cfg.data, tiny_data.tokenizer, cfg.seed)
    row = df[df["config_id"] == 1]
    trial_cfg = apply_overrides(cfg, {k: row[f"param.{k}"].iloc[0].item() for k in GRID_KEYS})
    epochs: list[dict] = []

    def report(metrics: dict, ckpt_dir: Path) -> None:
        kept = shutil.copytree(ckpt_dir, tmp_path / f"epoch{metrics['epoch']}")
        epochs.append({**metrics, "checkpoint": kept / CKPT_NAME})

    # a normal trial: the sweep's prefix cache (built with fixed threads: the same bits), no test scoring
    cache = build_in_memory(cfg, data, plan_prefix(cfg, load_model_config(cfg.model), data))
    assert cache.plan.cuts == (3,)  # last_n 1 trains from cached states: the cached path is the one compared
    fit(trial_cfg, data, report, num_threads=2, prefix=cache)
    for e in epochs:
        scores = evaluate(load_trained(trial_cfg, data, e["checkpoint"]), data.test, trial_cfg, data.tokenizer)
        e.update({f"test_{k}": v for k, v in scores.items()})
    for column in [*METRIC_COLUMNS, "train_loss"]:
        assert [e[column] for e in epochs] == row[column].tolist(), column
    assert json.loads((tmp_path / "results.json").read_text())["smoke"] is True
