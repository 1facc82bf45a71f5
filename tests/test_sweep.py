"""End-to-end sweeps through the real CLI, each on its own real local Ray, on the tiny random Llama."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
from pathlib import Path

import pandas as pd
import pytest
import yaml
from peft import PeftModel

from lorahpo.config import load_config, to_dict
from lorahpo.data import load_task
from lorahpo.model import build_base
from lorahpo.results import load_experiment, load_journal
from lorahpo.sources import load_tokenizer
from lorahpo.trainable import fit

from .conftest import (
    DELAYS_ENV,
    DET_SWEEP,
    cli,
    cli_background,
    first_report_times,
    release_in_order,
    snapshot_trials,
    sweep_record,
    tiny_args,
    tiny_config,
    wait_for,
)

pytestmark = pytest.mark.slow
VAL = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_f1", "val_fbeta"]
OUTPUTS = [
    "results.parquet",
    "optuna_res.pkl",
    "optuna_journal.log",
    "summary.json",
    "summary.md",
    "manifest.json",
    "config.yaml",
    "split.json",
    "best/adapter_model.safetensors",
    "best/adapter_config.json",
    "best/best_config.yaml",
    "best/tokenizer.json",
    "best/labels.json",
    "optimization_history.png",
    "learning_curves.png",
    "parallel_coordinates.png",
    "param_importances.png",
]


def write_config(path: Path, **overrides: object) -> Path:
    """A config file (the tiny defaults + overrides, incl. search space / points as whole values)."""
    search = overrides.pop("search", None)
    points = overrides.pop("points", None)
    raw = to_dict(tiny_config(**overrides))
    if search is not None:
        raw["search"] = search
    if points is not None:
        raw["sweep"]["points_to_evaluate"] = points
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_config(path)  # valid
    return path


def test_tpe_asha_sweep_end_to_end(tmp_path: Path) -> None:
    # Trial 1 weighs the positive class 0.01: it predicts no spam, F-beta 0 at epoch 1, below trial 0 -> ASHA stops it.
    search = {
        "train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "train.class_weight": {"type": "float", "low": 0.01, "high": 10.0},
        "lora.r": {"type": "categorical", "choices": [4, 8]},
    }
    points = [
        {"train.lr": 5e-3, "train.class_weight": 6.0, "lora.r": 8},
        {"train.lr": 5e-3, "train.class_weight": 0.01, "lora.r": 8},
    ]
    config = write_config(
        tmp_path / "c.yaml",
        search=search,
        points=points,
        **{
            "train.max_epochs": 3,
            "sweep.num_samples": 4,
            "sweep.n_startup_trials": 2,
            "sweep.grace_period": 1,
            "sweep.reduction_factor": 2,
            "sweep.storage_path": str(tmp_path / "store"),
            "sweep.name": "e2e",
            "sweep.deterministic": False,  # the asynchronous path, as before deterministic sweeps existed
        },
    )
    run = cli(["--config", str(config)])
    assert run.returncode == 0, run.stderr[-3000:]
    exp = tmp_path / "store" / "e2e"
    for name in OUTPUTS:
        assert (exp / name).is_file(), name

    grid, df = load_experiment(str(exp))
    assert len(df) == 4 == len(grid)
    assert df["trial_id"].is_unique
    assert df.loc[1, "param.train.class_weight"] == pytest.approx(0.01)
    assert df.loc[1, "stop_reason"] == "asha_stop" and df.loc[1, "epochs"] == 1
    assert set(df["stop_reason"]) <= {"asha_stop", "max_epochs", "early_stop"}
    for result in grid:  # parquet agrees with the ResultGrid, and per-trial metrics.csv with both
        row = df[df["trial_id"] == Path(result.path).name].iloc[0]
        hist = result.metrics_dataframe
        per_epoch = pd.read_csv(exp / "trials" / row["trial_id"] / "metrics.csv")
        assert per_epoch["epoch"].tolist() == list(range(1, int(row["epochs"]) + 1))
        assert per_epoch["val_fbeta"].tolist() == hist["val_fbeta"].tolist()
        assert row["best_val_fbeta"] == pytest.approx(hist["val_fbeta"].max()) == row["best_epoch_val_fbeta"]
        assert row["best_epoch_val_loss"] == hist["val_loss"].iloc[int(row["best_epoch"]) - 1]
        assert row["last_val_fbeta"] == pytest.approx(hist["val_fbeta"].iloc[-1])
        assert result.config == {k.removeprefix("param."): row[k] for k in df if k.startswith("param.")}
    # reuse_actors: one worker process ran every trial of this sequential sweep, the ASHA-stopped one included
    assert len({int(pid) for result in grid for pid in result.metrics_dataframe["pid"]}) == 1

    # the predecessor's snippet, unchanged
    study = pickle.load(open(exp / "optuna_res.pkl", "rb"))  # noqa: SIM115
    best = df.sort_values("best_val_fbeta", ascending=False, kind="stable").iloc[0]
    assert study.best_value == pytest.approx(best["best_val_fbeta"])
    assert study.best_trial.params == {k.removeprefix("param."): best[k] for k in df if k.startswith("param.")}
    assert len(study.trials) == 4 and study.trials[1].intermediate_values.keys() == {1}
    safe = load_journal(exp / "optuna_journal.log")
    assert [t.params for t in safe.trials] == [t.params for t in study.trials]
    assert safe.best_value == study.best_value

    summary = json.loads((exp / "summary.json").read_text())
    assert summary["best_trial"] == best["trial_id"] and summary["num_trials"] == 4
    assert set(summary["test"]) == {"test_accuracy", "test_f1", "test_fbeta", "test_loss"}
    assert summary["test_size"] == 60
    assert f"Results: {exp}" in run.stdout and "test split:" in run.stdout

    cfg = load_config(exp / "best" / "best_config.yaml")
    assert cfg.train.class_weight == pytest.approx(best["param.train.class_weight"])
    tok = load_tokenizer(cfg.model)
    model = PeftModel.from_pretrained(build_base(cfg.model, 2, tok.pad_token_id), exp / "best")
    assert model.peft_config["default"].r == best["param.lora.r"]


def det_sweep(tmp_path: Path, name: str, slots: int, delays: dict | None = None) -> tuple[list[str], dict]:
    """The CLI args of the deterministic sweep (tests/conftest.py DET_SWEEP) into tmp_path/name with `slots` trials
    at once, and the environment that injects per-trial delays (lorahpo.tuner.TEST_DELAYS_ENV)."""
    args = tiny_args(tmp_path, **DET_SWEEP, **{"sweep.name": name, "sweep.max_concurrent_trials": slots})
    return args, ({DELAYS_ENV: json.dumps(delays)} if delays else {})


def local_record(exp: Path) -> dict:
    return sweep_record(lambda rel: (exp / rel).read_bytes())


def test_sweep_is_reproducible_at_any_concurrency(det_reference: dict, tmp_path: Path, procs: list) -> None:
    """The same deterministic sweep one, two and three trials at a time, the first trials held back until the later
    ones have reported (so they report in reverse order): the same Optuna study, per-epoch metrics, stop reasons,
    best trial and test score."""
    reference = det_reference["record"]
    reasons = [t["stop_reason"] for t in reference["trials"]]
    assert len(reasons) == 6 and "asha_stop" in reasons and "max_epochs" in reasons  # ASHA stops some, not all
    for name in OUTPUTS:
        assert (det_reference["path"] / name).is_file(), name
    for slots in (2, 3):
        # trial n (n < slots) starts once trial n+1 has reported its first epoch: they report slots, ..., 2, 1
        gates = {n: (tmp_path / f"go{slots}-{n}", [n + 1]) for n in range(1, slots)}
        args, env = det_sweep(tmp_path, f"c{slots}", slots, {str(n): [str(g), 0] for n, (g, _) in gates.items()})
        proc = cli_background(args, tmp_path / f"c{slots}.log", env=env)
        procs.append(proc)
        release_in_order(tmp_path / f"c{slots}", gates)
        assert proc.wait(timeout=600) == 0, (tmp_path / f"c{slots}.log").read_text()[-3000:]
        first = first_report_times(tmp_path / f"c{slots}")
        assert sorted(range(1, slots + 1), key=first.get) == list(range(slots, 0, -1)), first  # reversed
        assert local_record(tmp_path / f"c{slots}") == reference, slots


def test_driver_killed_then_resume_finishes(det_reference: dict, tmp_path: Path, procs: list) -> None:
    """A deterministic sweep, three trials at a time, its driver SIGKILLed mid-sweep; --resume with two at a time
    ends with the trials of the uninterrupted one-at-a-time run."""
    args, env = det_sweep(tmp_path, "kill", 3, {"5": [120, 0]})  # trial 5 waits: the sweep is mid-flight then
    log = tmp_path / "driver.log"
    proc = cli_background(args, log, env=env)
    procs.append(proc)
    exp = tmp_path / "kill"

    def snapshot() -> set[str]:  # the trials Tune's persisted state knows (--resume restores exactly these)
        states = sorted(exp.glob("experiment_state-*.json"))
        return snapshot_trials(states[-1].read_text()) if states else set()

    wait_for(
        lambda: len(snapshot()) >= 5 and "test delay: trial_005" in log.read_text(),
        timeout=300,
        what="five trials in the experiment state, trial 5 waiting",
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = snapshot()
    assert not (exp / "results.parquet").exists()

    resume, _ = det_sweep(tmp_path, "kill", 2)  # another max_concurrent_trials: a deterministic sweep accepts it
    run = cli(["--resume", *resume])
    assert run.returncode == 0, run.stderr[-3000:]
    df = pd.read_parquet(exp / "results.parquet")
    assert len(df) == 6 and df["trial_id"].is_unique
    assert before <= set(df["trial_id"])  # the trials Tune had recorded were kept, not rerun under new ids
    assert local_record(exp) == det_reference["record"]


def test_worker_killed_in_a_parallel_deterministic_sweep(det_reference: dict, tmp_path: Path, procs: list) -> None:
    """Two trials at a time; trial 1 is held back until trials 2-4 have reported epoch 1 and wait, paused. A trial that
    then resumes from its epoch-1 checkpoint has its worker SIGKILLed before its next report: Tune retries it from
    that checkpoint, and the sweep ends with the undisturbed run's trials, values and stop decisions."""
    reference = det_reference["record"]
    victim = next((t["n"] for t in reference["trials"] if 2 <= t["n"] <= 4 and t["epochs"] == 2), None)
    assert victim is not None, "no trial of 2-4 continues past epoch 1 in the reference: nothing to kill mid-run"
    gate = tmp_path / "go"
    args, env = det_sweep(tmp_path, "wkill", 2, {"1": [str(gate), 0], str(victim): [0, 8]})
    log = tmp_path / "driver.log"
    proc = cli_background(args, log, env=env)
    procs.append(proc)
    release_in_order(tmp_path / "wkill", {1: (gate, [2, 3, 4])})
    waits = re.compile(rf"test delay: trial_{victim:03d}_\w+ waits for 8 in pid (\d+)")
    pid = int(wait_for(lambda: waits.findall(log.read_text()), 300, f"trial {victim} resuming")[0])
    os.kill(pid, signal.SIGKILL)  # resumed from its checkpoint, before its next report
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]

    assert len(waits.findall(log.read_text())) == 2  # the retry resumed from the checkpoint too
    curve = pd.read_csv(next((tmp_path / "wkill").glob(f"trial_{victim:03d}_*/progress.csv")))
    assert curve["epoch"].tolist() == [1, 2] and curve["pid"].iloc[-1] != pid  # none lost, none repeated
    assert local_record(tmp_path / "wkill") == reference


def test_worker_killed_mid_epoch_is_retried_from_checkpoint(tmp_path: Path, procs: list) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        search={"lora.dropout": {"type": "categorical", "choices": [0.1]}},
        points=[{"lora.dropout": 0.1}],
        **{
            "data.max_examples": None,
            "train.max_epochs": 3,
            "lora.dropout": 0.1,
            "sweep.max_failures": 1,
            "sweep.num_samples": 1,
            "sweep.name": "retry",
            "sweep.storage_path": str(tmp_path),
        },
    )
    args = ["--config", str(config)]
    proc = cli_background(args, tmp_path / "driver.log")
    procs.append(proc)
    progress = wait_for(lambda: next(iter((tmp_path / "retry").glob("*/progress.csv")), None), 300, "trial dir")

    def first_epoch_pid() -> int | None:
        lines = progress.read_text().splitlines()
        if len(lines) < 2:
            return None
        return int(pd.read_csv(progress)["pid"].iloc[0])

    pid = wait_for(first_epoch_pid, 300, "epoch 1 report")
    os.kill(pid, signal.SIGKILL)  # mid-epoch 2: epoch 1's checkpoint is the last one
    assert proc.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-3000:]

    hist = pd.read_csv(progress)
    assert hist["epoch"].tolist() == [1, 2, 3]  # no epoch lost, none repeated
    assert hist["pid"].iloc[0] == pid and hist["pid"].iloc[-1] != pid  # epochs 2-3 ran in the retried worker

    cfg = load_config(config)
    data = load_task(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    rows: list[dict] = []
    fit(cfg, data, lambda r, d: rows.append(r), num_threads=int(cfg.sweep.cpus_per_trial))
    uninterrupted = pd.DataFrame(rows)[VAL]
    pd.testing.assert_frame_equal(hist[VAL].reset_index(drop=True), uninterrupted, check_exact=True)


def test_dry_run_trains_nothing(tmp_path: Path) -> None:
    run = cli(tiny_args(tmp_path / "store", **{"sweep.num_samples": 5, "train.max_epochs": 3}) + ["--dry-run"])
    assert run.returncode == 0, run.stderr
    assert "5 trials x up to 3 epochs = at most 15 trial-epochs" in run.stdout
    assert "mode: 'deterministic: trials planned 4 at a time" in run.stdout
    assert "search_space:" in run.stdout and "storage:" in run.stdout and "resources:" in run.stdout
    assert not (tmp_path / "store").exists()
