"""results.py on a recorded grid (Tune Result objects as a sweep leaves them), without Ray running: one row per trial,
the best trial, the study. Fast; the end-to-end sweeps check the same code on real grids."""

from __future__ import annotations

import dataclasses
import math

import optuna
import pandas as pd
import pytest
from ray import tune

from lorahpo.config import VAL_METRICS, ExperimentConfig, ParamSpec
from lorahpo.results import EPOCH_COLUMNS, best_row, optuna_study, row_config, row_params, trials_frame
from lorahpo.summary import make_summary, print_summary, summary_markdown

from .conftest import tiny_config

CFG = tiny_config(**{"train.max_epochs": 3})


def recorded(n: int, params: dict, fbeta: list[float], error: Exception | None = None, early: bool = False):
    """A trial's Result: one report per epoch with the running best, checkpoints for the best and last epochs."""
    rows, best, best_epoch = [], -1.0, 0
    for e, f in enumerate(fbeta, start=1):
        if f > best:
            best, best_epoch = f, e
        rows.append(
            {
                "epoch": e,
                "train_loss": 1.0 / e,
                **{k: f if k == "val_fbeta" else 0.5 for k in VAL_METRICS},
                "best_val_fbeta": best,
                "best_epoch": best_epoch,
                "early_stopped": early and e == len(fbeta),
                "time_total_s": 10.0 * e,
                "config": params,
            }
        )
    hist = pd.DataFrame(rows).drop(columns="config") if rows else None
    ckpts = [(tune.Checkpoint(f"/ckpt/{n}/{r['epoch']}"), r) for r in rows]
    path = f"/store/sweep/trial_{n:03d}_abc{n}"
    return tune.Result(rows[-1] if rows else {"config": params}, None, error, path, hist, ckpts)


GRID = [
    recorded(2, {"train.lr": 3e-3, "lora.r": 4}, [0.2]),  # stopped by ASHA after 1 epoch
    recorded(0, {"train.lr": 1e-3, "lora.r": 8}, [0.5, 0.8, 0.7]),
    recorded(1, {"train.lr": 2e-3, "lora.r": 8}, [0.6, 0.8, 0.8]),  # ties trial 0: the earlier trial wins
    recorded(3, {"train.lr": 4e-3, "lora.r": 16}, [0.3, 0.1], early=True),
]


def test_trials_frame_one_row_per_trial_in_creation_order() -> None:
    df = trials_frame(GRID, CFG)
    assert df["trial_id"].tolist() == ["trial_000_abc0", "trial_001_abc1", "trial_002_abc2", "trial_003_abc3"]
    assert df["stop_reason"].tolist() == ["max_epochs", "max_epochs", "asha_stop", "early_stop"]
    assert df["epochs"].tolist() == [3, 3, 1, 2]
    assert df["best_val_fbeta"].tolist() == [0.8, 0.8, 0.2, 0.3]
    assert df["best_epoch"].tolist() == [2, 2, 1, 1]
    assert df["best_epoch_val_fbeta"].tolist() == [0.8, 0.8, 0.2, 0.3]
    assert df["last_val_fbeta"].tolist() == [0.7, 0.8, 0.2, 0.1]
    assert df["checkpoint"].tolist() == ["/ckpt/0/2", "/ckpt/1/2", "/ckpt/2/1", "/ckpt/3/1"]
    assert df["param.train.lr"].tolist() == [1e-3, 2e-3, 3e-3, 4e-3]
    assert set(EPOCH_COLUMNS) >= {"epoch", "train_loss", *VAL_METRICS}


def test_best_row_ties_go_to_the_earlier_trial_and_errors_are_skipped() -> None:
    failed = recorded(
        4,
        {"train.lr": 5e-3, "lora.r": 4},
        [],
        error=RuntimeError("Traceback (...):\n  line 1\nRuntimeError: out of memory"),
    )
    df = trials_frame([*GRID, failed], CFG)
    assert df.loc[4, "stop_reason"] == "error" and df.loc[4, "error"] == "RuntimeError: out of memory"
    assert math.isnan(df.loc[4, "best_val_fbeta"])
    best = best_row(df, CFG)
    assert best["trial_id"] == "trial_000_abc0"
    assert row_params(best) == {"train.lr": 1e-3, "lora.r": 8}
    assert row_config(CFG, best).train.lr == 1e-3 and row_config(CFG, best).lora.r == 8
    assert best_row(df.iloc[[4]], CFG) is None  # every trial failed


def test_optuna_study_mirrors_the_table() -> None:
    base = tiny_config(**{"train.max_epochs": 3, "sweep.points_to_evaluate": "[]"})
    space = {"train.lr": ParamSpec("float", 1e-4, 1e-2, True), "lora.r": ParamSpec("categorical", choices=(4, 8, 16))}
    cfg = dataclasses.replace(base, search=space)
    study = optuna_study(GRID, cfg)
    assert [t.params for t in study.trials] == [
        {"train.lr": 1e-3, "lora.r": 8},
        {"train.lr": 2e-3, "lora.r": 8},
        {"train.lr": 3e-3, "lora.r": 4},
        {"train.lr": 4e-3, "lora.r": 16},
    ]
    assert [t.value for t in study.trials] == [0.8, 0.8, 0.2, 0.3]
    assert study.trials[2].intermediate_values == {1: 0.2}
    assert [t.user_attrs["stop_reason"] for t in study.trials] == [
        "max_epochs",
        "max_epochs",
        "asha_stop",
        "early_stop",
    ]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert study.best_trial.number == 0


def test_trials_sort_by_number_past_trial_999() -> None:
    """Names are zero-padded to three digits (`trial_000_...`), so `trial_1000_...` sorts before `trial_101_...` as a
    string: tables, the study and "ties go to the earlier trial" use the number."""
    grid = [recorded(n, {"train.lr": 1e-3 * (1 + n % 4), "lora.r": 8}, [f]) for n, f in
            ((1000, 0.9), (101, 0.5), (999, 0.9), (99, 0.4), (1001, 0.2))]  # fmt: skip
    df = trials_frame(grid, CFG)
    assert df["trial_id"].tolist() == [f"trial_{n:03d}_abc{n}" for n in (99, 101, 999, 1000, 1001)]
    assert best_row(df, CFG)["trial_id"] == "trial_999_abc999"  # ties 1000: the earlier trial wins
    assert [t.user_attrs["trial_id"] for t in optuna_study(grid, CFG).trials] == df["trial_id"].tolist()


def test_baseline_trial_is_the_untuned_configs_trial_beside_the_best(capsys: pytest.CaptureFixture) -> None:
    """summary.json's baseline_trial: the trial of sweep.points_to_evaluate[0] (found as a config), its val metrics
    at its best epoch; the console and summary.md show it beside the best; None without points_to_evaluate; a failed
    baseline trial has no score."""
    cfg = with_points({"train.lr": 2e-3, "lora.r": 8})
    df = trials_frame(GRID, cfg)
    s = make_summary(cfg, df, best_row(df, cfg), {}, 0, "x")
    assert s["baseline_trial"] == {
        "trial": "trial_001_abc1",
        "params": {"train.lr": 2e-3, "lora.r": 8},
        "value": 0.8,
        "val": {"val_accuracy": 0.5, "val_f1": 0.5, "val_fbeta": 0.8},
    }
    line = "baseline trial trial_001_abc1 (sweep.points_to_evaluate[0]): best_val_fbeta = 0.8000"
    line += " (the best is +0.0000 on it)"
    assert f"- {line}\n" in summary_markdown(s, cfg)
    print_summary(s)
    assert f"  {line}\n" in capsys.readouterr().out

    failed = recorded(1, {"train.lr": 2e-3, "lora.r": 8}, [], error=RuntimeError("x"))
    df = trials_frame([GRID[0], GRID[1], failed], cfg)
    assert make_summary(cfg, df, best_row(df, cfg), {}, 0, "x")["baseline_trial"]["value"] is None
    assert make_summary(with_points(), df, best_row(df, cfg), {}, 0, "x")["baseline_trial"] is None


def with_points(*points: dict) -> ExperimentConfig:
    return dataclasses.replace(CFG, sweep=dataclasses.replace(CFG.sweep, points_to_evaluate=points))
