"""End-to-end sweeps through the real CLI, each on its own real local Ray, on the tiny random Llama."""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import signal
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lorahpo.config import load_config, to_dict
from lorahpo.data import load_task
from lorahpo.prefix import build_in_memory, plan_prefix
from lorahpo.reading import BUNDLED_PATH
from lorahpo.results import load_experiment, load_journal, read_tables, study_differences
from lorahpo.sources import load_model_config, load_tokenizer
from lorahpo.trainable import fit

from .conftest import (
    DELAYS_ENV,
    DET_SWEEP,
    cli,
    cli_background,
    hooked,
    load_best,
    release_in_order,
    snapshot_trials,
    sweep_record,
    tiny_args,
    tiny_config,
    wait_for,
)

pytestmark = pytest.mark.slow
VAL = ["val_loss", "val_accuracy", "val_f1", "val_fbeta"]
EPOCH = ["epoch", "train_loss", *VAL]
OUTPUTS = [
    "results.parquet",
    "optuna_res.pkl",
    "optuna_journal.log",
    "summary.json",
    "summary.md",
    "manifest.json",
    "config.yaml",
    "split.json",
    "best/model.safetensors",
    "best/config.json",
    "best/adapter/adapter_model.safetensors",
    "best/adapter/adapter_config.json",
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
    # the trials trained from the prefix cache (lora.last_n=2 of 4: the inputs of layer 2); the best checkpoint's val
    # metrics through the full model match what its trial reported from the cache
    check = summary["prefix_cache"]
    assert check["cuts"] == [2] and check["best_trial_cut"] == 2
    assert check["passed"] and check["val_cached"]["fbeta"] == best["best_epoch_val_fbeta"]
    assert (df["trainable_params"] > 0).all()
    assert f"Results: {exp}" in run.stdout and "test split (scored once):" in run.stdout

    cfg = load_config(exp / "best" / "best_config.yaml")
    assert cfg.train.class_weight == pytest.approx(best["param.train.class_weight"])
    assert json.loads((exp / "best" / "adapter" / "adapter_config.json").read_text())["r"] == best["param.lora.r"]
    # the reloaded best checkpoint reproduces its epoch's val metrics (float32 as recorded), and so does best/ through
    # the standard transformers loader in a process whose lorahpo cache is empty, as on another machine
    recorded = {k: best[f"best_epoch_{k}"] for k in VAL}
    assert summary["best_val_rescored"] == pytest.approx(recorded, abs=1e-6)
    portable = load_best(exp / "best", exp / "split.json", tmp_path)
    for k in ("accuracy", "f1", "fbeta"):
        assert portable[k] == pytest.approx(best[f"best_epoch_val_{k}"], abs=1e-6), k
    assert portable["loss"] == pytest.approx(best["best_epoch_val_loss"], abs=1e-4)
    assert not (exp / "best" / "adapter_config.json").exists()

    # the pickle-free reader gives the same tables and study
    tables = read_tables(str(exp))
    pd.testing.assert_frame_equal(tables["trials"], df)
    assert sorted(tables["epochs"]["trial_id"].unique()) == sorted(df["trial_id"])
    assert len(tables["epochs"]) == int(df["epochs"].sum())
    assert [t.params for t in tables["study"].trials] == [t.params for t in study.trials]


def det_sweep(tmp_path: Path, name: str, slots: int, delays: dict | None = None) -> tuple[list[str], dict]:
    """The CLI args of the deterministic sweep (tests/conftest.py DET_SWEEP) into tmp_path/name with `slots` trials
    at once, and the environment that injects per-trial delays (tests/worker_hooks/sitecustomize.py)."""
    args = tiny_args(tmp_path, **DET_SWEEP, **{"sweep.name": name, "sweep.max_concurrent_trials": slots})
    # RAY_DEDUP_LOGS=0: Ray folds log lines that differ only in words with digits ("test delay: trial_002_... waits
    # for ... in pid 123") into "[repeated Nx]" lines that keep the first one's text; tests read each trial's line
    return args, (hooked(**{DELAYS_ENV: json.dumps(delays)}, RAY_DEDUP_LOGS="0") if delays else {})


def local_record(exp: Path) -> dict:
    return sweep_record(lambda rel: (exp / rel).read_bytes())


def test_sweep_is_reproducible_at_any_concurrency(det_reference: dict, tmp_path: Path, procs: list) -> None:
    """The same deterministic sweep one and three trials at a time (two: the kill tests below), the first trials held
    back until the later ones have reported (so they report in reverse order): the same Optuna study, per-epoch
    metrics, stop reasons, best trial and test score."""
    reference = det_reference["record"]
    reasons = [t["stop_reason"] for t in reference["trials"]]
    assert len(reasons) == 6 and "asha_stop" in reasons and "max_epochs" in reasons  # ASHA stops some, not all
    for name in OUTPUTS:
        assert (det_reference["path"] / name).is_file(), name
    # reuse_actors: one trial at a time, one worker process ran all six (trials are suggested as slots free up)
    pids = {int(p) for f in det_reference["path"].glob("trial_*/progress.csv") for p in pd.read_csv(f)["pid"]}
    assert len(pids) == 1, pids
    slots = 3
    # trial n (n < slots) starts once trial n+1 has reported its first epoch: they report slots, ..., 2, 1
    gates = {n: (tmp_path / f"go{slots}-{n}", [n + 1]) for n in range(1, slots)}
    args, env = det_sweep(tmp_path, f"c{slots}", slots, {str(n): [str(g), 0] for n, (g, _) in gates.items()})
    proc = cli_background(args, tmp_path / f"c{slots}.log", env=env)
    procs.append(proc)
    exp = tmp_path / f"c{slots}"
    release_in_order(exp, gates)
    assert proc.wait(timeout=600) == 0, (tmp_path / f"c{slots}.log").read_text()[-3000:]
    # reversed: when each trial's first checkpoint was stored (nanoseconds; Tune's `timestamp` is whole seconds, and
    # a tiny epoch can end in the same second as the report that released it)
    stored = {int(p.parent.name.split("_")[1]): p.stat().st_mtime_ns for p in exp.glob("trial_*/checkpoint_000000")}
    assert sorted(range(1, slots + 1), key=stored.get) == list(range(slots, 0, -1)), stored
    assert local_record(exp) == reference


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
    # the live journal continued across the crash: each trial once, the same study as the pickle, not rebuilt
    journal = load_journal(exp / "optuna_journal.log")
    assert sorted(t.user_attrs["trial_id"] for t in journal.trials) == sorted(df["trial_id"])
    assert study_differences(journal, pickle.load(open(exp / "optuna_res.pkl", "rb"))) == []  # noqa: SIM115
    ops = [json.loads(line)["op_code"] for line in (exp / "optuna_journal.log").read_text().splitlines()]
    assert ops.count(4) == len(df) and "rebuilt" not in run.stderr  # each trial created once, written live


def test_worker_killed_in_a_parallel_deterministic_sweep(det_reference: dict, tmp_path: Path, procs: list) -> None:
    """Two trials at a time; trial 1 is held back until trials 2-4 have reported epoch 1 and wait, paused. A trial that
    then resumes from its epoch-1 checkpoint has its worker SIGKILLed before its next report: Tune retries it from
    that checkpoint, and the sweep ends with the undisturbed run's trials, values and stop decisions."""
    reference = det_reference["record"]
    victim = next((t["n"] for t in reference["trials"] if 2 <= t["n"] <= 4 and t["epochs"] == 2), None)
    assert victim is not None, "no trial of 2-4 continues past epoch 1 in the reference: nothing to kill mid-run"
    gate, hold = tmp_path / "go", tmp_path / "killed"
    # the victim, resumed, waits for `hold`: created only after its worker is killed (a fixed wait could end before
    # the driver's log shows the worker's line); its retry, resumed again, finds it and goes on
    args, env = det_sweep(tmp_path, "wkill", 2, {"1": [str(gate), 0], str(victim): [0, str(hold)]})
    log = tmp_path / "driver.log"
    proc = cli_background(args, log, env=env)
    procs.append(proc)
    release_in_order(tmp_path / "wkill", {1: (gate, [2, 3, 4])})
    waits = re.compile(rf"test delay: trial_{victim:03d}_\w+ waits for {re.escape(str(hold))} in pid (\d+)")
    pid = int(wait_for(lambda: waits.findall(log.read_text()), 300, f"trial {victim} resuming")[0])
    os.kill(pid, signal.SIGKILL)  # resumed from its checkpoint, before its next report
    hold.touch()
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]

    assert len(waits.findall(log.read_text())) == 2  # the retry resumed from the checkpoint too
    curve = pd.read_csv(next((tmp_path / "wkill").glob(f"trial_{victim:03d}_*/progress.csv")))
    assert curve["epoch"].tolist() == [1, 2] and curve["pid"].iloc[-1] != pid  # none lost, none repeated
    assert local_record(tmp_path / "wkill") == reference


V2_SWEEP = {"sweep.trials_per_batch": 2, "sweep.planning_lag": 1, "sweep.told": "first_rung",
            "sweep.rung_min_trials": 4, "sweep.reduction_factor": 4, "sweep.n_startup_trials": 2}  # fmt: skip


def test_search_v2_sweep_is_the_same_at_one_and_three_slots(tmp_path: Path) -> None:
    """The search v2 settings (configs/intents.yaml's kind, scaled down) through real Ray: batch k planned once batch
    k-1 has reported its first rung, the first 4 trials paused there until all 4 have, then judged together at rf 4
    (one goes on). One and three trials at a time: the same trials, values and stop decisions."""
    records = []
    for slots in (1, 3):
        name = f"v2_{slots}"
        args = tiny_args(
            tmp_path, **{**DET_SWEEP, **V2_SWEEP, "sweep.name": name, "sweep.max_concurrent_trials": slots}
        )
        run = cli(args)
        assert run.returncode == 0, run.stderr[-3000:]
        records.append(local_record(tmp_path / name))
    cohort = [t["epochs"] for t in sorted(records[0]["trials"], key=lambda t: t["n"])[:4]]  # the first 4 trials
    assert sorted(cohort) == [1, 1, 1, 2], cohort  # max_epochs 2: one rung, at epoch 1; 4 judged together at rf 4
    assert records[1] == records[0]


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
    # the sweep's trial trained from the prefix cache a Ray task built; one built here holds the same bits
    cache = build_in_memory(cfg, data, plan_prefix(cfg, load_model_config(cfg.model), data))
    rows: list[dict] = []
    fit(cfg, data, lambda r, d: rows.append(r), num_threads=int(cfg.sweep.cpus_per_trial), prefix=cache)
    uninterrupted = pd.DataFrame(rows)[EPOCH]
    pd.testing.assert_frame_equal(hist[EPOCH].reset_index(drop=True), uninterrupted, check_exact=True)


def test_dry_run_trains_nothing(tmp_path: Path) -> None:
    run = cli(tiny_args(tmp_path / "store", **{"sweep.num_samples": 5, "train.max_epochs": 3}) + ["--dry-run"])
    assert run.returncode == 0, run.stderr
    assert "5 trials x up to 3 epochs = at most 15 trial-epochs" in run.stdout
    assert "mode: 'deterministic: trials planned 4 at a time" in run.stdout
    assert "search_space:" in run.stdout and "storage:" in run.stdout and "resources:" in run.stdout
    assert not (tmp_path / "store").exists()


def sms_csv(path: Path, rows: int = 400) -> Path:
    """A user's own data file: the first `rows` SMS messages as a CSV."""
    df = pd.read_csv(BUNDLED_PATH, sep="\t", header=None, names=["label", "text"], quoting=csv.QUOTE_NONE, dtype=str)
    df.iloc[:rows][["text", "label"]].to_csv(path, index=False)
    return path


def test_bf16_sweep_on_a_cpu_without_native_bf16(tmp_path: Path) -> None:
    """Half precision end to end on any CPU (bf16 forced to the emulated path): trials, the test-split score and the
    export all run under the trial's autocast."""
    overrides = {"model.dtype": "bfloat16", "sweep.num_samples": 2, "train.max_epochs": 1, "data.max_examples": 200}
    run = cli(tiny_args(tmp_path, **{"sweep.name": "bf16", **overrides}), env=hooked(LORAHPO_TEST_CPU_BF16="0"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "model.dtype=bfloat16 on a CPU without native bf16" in run.stderr
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert set(summary["test"]) == {"test_accuracy", "test_f1", "test_fbeta", "test_loss"}
    assert json.loads((tmp_path / "bf16" / "best" / "config.json").read_text())["dtype"] == "bfloat16"


def test_ctrl_c_keeps_the_sweep_for_resume_which_refuses_changed_data(tmp_path: Path, procs: list) -> None:
    """Ctrl-C (SIGINT to the driver's process group, as a terminal sends it) mid-sweep: exit 130, no summary, test score
    or best/; --resume with an edited data file is refused; with the original it finishes (in bf16, emulated), and
    manifest.json keeps the original record plus one entry per resume."""
    data = sms_csv(tmp_path / "sms.csv")
    original = data.read_bytes()
    args = tiny_args(
        tmp_path,
        **{
            "sweep.name": "intr",
            "data.path": str(data),
            "data.max_examples": None,
            "model.dtype": "bfloat16",
            "sweep.num_samples": 3,
            "sweep.scheduler": "fifo",
        },
    )
    env = hooked(LORAHPO_TEST_CPU_BF16="0")
    proc = cli_background(args, tmp_path / "driver.log", env=env)
    procs.append(proc)
    exp = tmp_path / "intr"
    wait_for(lambda: any(len(p.read_text().splitlines()) >= 2 for p in exp.glob("*/progress.csv")), 300, "an epoch")
    created = json.loads((exp / "manifest.json").read_text())["created"]
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 130, (tmp_path / "driver.log").read_text()[-3000:]
    last = (tmp_path / "driver.log").read_text().strip().splitlines()[-1]
    assert last.startswith(f"interrupted: the sweep at {exp} stopped with ") and "--resume" in last
    for name in ("summary.json", "results.parquet", "best", "optuna_res.pkl"):
        assert not (exp / name).exists(), name

    data.write_bytes(original + b"one more message,ham\n")
    changed = cli(["--resume", *args], env=env)
    assert changed.returncode == 2 and changed.stderr.strip().splitlines()[-1].startswith(
        f"error: --resume: the data file differs from the one the sweep at {exp} started with (sha256 "
    )
    data.write_bytes(original)
    resumed = cli(["--resume", *args], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    df = pd.read_parquet(exp / "results.parquet")
    assert len(df) == 3 and (df["stop_reason"] == "max_epochs").all()
    meta = json.loads((exp / "manifest.json").read_text())
    assert meta["created"] == created and len(meta["resumes"]) == 1 and "summary" in meta


def test_every_trial_failing_still_writes_the_table(tmp_path: Path) -> None:
    """A diverging learning rate: every trial fails (NaN/inf is a failure, not a value); the sweep still writes its
    table with each trial's error, says so in one line and exits 1."""
    config = write_config(
        tmp_path / "c.yaml",
        search={"lora.r": {"type": "categorical", "choices": [4, 8]}},  # every trial keeps the diverging lr
        points=[],
        **{"train.lr": 1e30, "train.warmup_ratio": 0.0, "sweep.num_samples": 2, "train.max_epochs": 1},
        **{"sweep.max_failures": 0, "sweep.name": "nan", "sweep.storage_path": str(tmp_path), "data.max_examples": 200},
    )
    run = cli(["--config", str(config)])
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr.strip().splitlines()[-1]
    assert run.stderr.strip().splitlines()[-1].startswith("failed: every trial of the sweep failed (first error: ")
    df = pd.read_parquet(tmp_path / "nan" / "results.parquet")
    assert len(df) == 2 and (df["stop_reason"] == "error").all()
    assert df["error"].str.contains("not finite at epoch 1: training diverged").all()
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["best_trial"] is None and summary["stop_reasons"] == {"error": 2}
    assert not (tmp_path / "nan" / "best").exists()


def test_two_drivers_never_share_a_sweep(tmp_path: Path, procs: list) -> None:
    """Two drivers start the same sweep name at once: exactly one runs it, the other stops with one line."""
    args = tiny_args(tmp_path, **{"sweep.name": "race", "sweep.num_samples": 1, "train.max_epochs": 1})
    drivers = [cli_background(args, tmp_path / f"d{i}.log") for i in range(2)]
    procs.extend(drivers)
    codes = [p.wait(timeout=300) for p in drivers]
    assert sorted(codes) == [0, 2], [(tmp_path / f"d{i}.log").read_text()[-2000:] for i in range(2)]
    loser = (tmp_path / f"d{codes.index(2)}.log").read_text().strip().splitlines()[-1]
    assert loser.startswith("error: ") and any(
        why in loser for why in ("at the same time", "already exists", "is in use by a running driver")
    ), loser
    assert len(pd.read_parquet(tmp_path / "race" / "results.parquet")) == 1
