"""The final evaluation end to end through the real CLI, on a real local Ray, on the tiny random Llama: in the sweep,
then later on the finished sweep with --final (its driver killed mid-way and continued), which gives the same block."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lorahpo.results import load_journal
from lorahpo.stats import GAIN_METHOD, gain_test_variance, paired_gain

from .conftest import cli, cli_background, snapshot_trials, wait_for
from .test_sweep import write_config

pytestmark = pytest.mark.slow
METRICS = ["test_accuracy", "test_f1", "test_fbeta"]


def strict_json(path: Path) -> dict:
    """summary.json as written, refusing NaN and infinity."""
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path.name} holds {c}"))


def test_final_evaluation_in_sweep_and_later_with_a_killed_driver(tmp_path: Path, procs: list) -> None:
    # The baseline weighs spam 0.01: it predicts (almost) no spam; the second trial, weighing it 8, wins on val (both
    # given: a random second trial can draw a weight as small as the baseline's and tie it).
    config = write_config(
        tmp_path / "c.yaml",
        search={
            "train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
            "train.class_weight": {"type": "float", "low": 0.01, "high": 10.0},
        },
        points=[{"train.lr": 2e-3, "train.class_weight": 0.01}, {"train.lr": 5e-3, "train.class_weight": 8.0}],
        **{
            "sweep.num_samples": 2,
            "sweep.n_startup_trials": 2,
            "train.max_epochs": 1,  # a run's continuation is what is tested here (epochs: test_sweep's resume tests)
            "final.seeds": 2,
            "sweep.storage_path": str(tmp_path / "store"),
            "sweep.name": "fin",
        },
    )
    run = cli(["--config", str(config)])
    assert run.returncode == 0, run.stderr[-3000:]
    exp = tmp_path / "store" / "fin"
    summary = strict_json(exp / "summary.json")
    final = summary["final"]

    # 2 + 2 runs, paired seeds, none the root seed (every sweep trial's), each run's seed in its trial's params
    seeds = final["tuned"]["seeds"]
    assert len(set(seeds)) == 2 and 42 not in seeds and final["baseline"]["seeds"] == seeds
    assert not final["baseline_is_best"] and final["baseline_source"] == "sweep.points_to_evaluate[0]"
    assert final["baseline"]["params"] == {"train.lr": 2e-3, "train.class_weight": 0.01}
    assert final["tuned"]["params"] == summary["best_params"] != final["baseline"]["params"]
    runs = {p.name.rsplit("_", 2)[0]: p for p in (exp / "final_seeds2").iterdir() if p.is_dir()}
    assert sorted(runs) == ["baseline_0", "baseline_1", "tuned_0", "tuned_1"]
    for name, path in runs.items():
        role, index = name.split("_")
        run_params = json.loads((path / "params.json").read_text())["run"]
        assert (run_params["role"], run_params["seed"]) == (role, seeds[int(index)])
        assert run_params["overrides"] == {**final[role]["params"], "seed": seeds[int(index)]}
    # the seed reached training: the same config trains differently under the two seeds
    curves = [pd.read_csv(runs[f"tuned_{i}"] / "progress.csv")["train_loss"].tolist() for i in (0, 1)]
    assert curves[0] != curves[1]
    # they never fed back into the search: the sweep's tables and its live study hold its own 2 trials
    assert len(pd.read_parquet(exp / "results.parquet")) == 2
    assert len(load_journal(exp / "optuna_journal.log").trials) == 2

    # the table and the intervals: per config and metric {mean, std, values}, the paired gain (its interval from the
    # per-seed differences and the runs' test predictions, resampled with the root seed), the best's interval
    records = {(r["role"], r["index"]): r for r in json.loads((exp / "final_seeds2" / "runs.json").read_text())}
    predictions = pd.read_csv(exp / "test_predictions.csv")
    names = json.loads((exp / "manifest.json").read_text())["data"]["label_names"]
    labels = [names.index(str(label)) for label in predictions["label"]]
    preds = {role: [records[(role, i)]["test_predictions"] for i in (0, 1)] for role in ("tuned", "baseline")}
    variance = dict(zip(METRICS, gain_test_variance(preds["tuned"], preds["baseline"], labels, 2, seed=42)))
    assert final["gain_method"] == GAIN_METHOD
    for m in METRICS:
        for role in ("tuned", "baseline"):
            values = [records[(role, i)][m] for i in (0, 1)]
            assert final[role][m] == {
                "mean": pytest.approx(np.mean(values)),
                "std": pytest.approx(np.std(values, ddof=1)),
                "values": values,
            }
        gain = paired_gain(final["tuned"][m]["values"], final["baseline"][m]["values"], float(variance[m]))
        assert final["gain"][m] == gain and gain["ci95"][0] < gain["mean"] < gain["ci95"][1]
        low, high = summary["test_ci95"][m]
        assert low <= summary["test"][m] <= high and low < high
    assert summary["test_ci95_method"]["seed"] == 42 and summary["test_ci95_method"]["n_resamples"] == 9999
    assert len(predictions) == summary["test_size"]
    accuracy = (predictions["label"] == predictions["prediction"]).mean()
    assert accuracy == pytest.approx(summary["test"]["test_accuracy"], abs=1e-6)
    assert set(summary["val_test_gap"]) == {"accuracy", "f1", "fbeta"}
    # where it is reported: summary.md, the console, the plot, the manifest (seeds and plan), nothing of it in `final`
    assert "## Final evaluation: 2 fresh seeds per config" in (exp / "summary.md").read_text()
    assert "final evaluation, 2 seeds per config" in run.stdout and "test 95% interval" in run.stdout
    assert (exp / "final_seeds.png").stat().st_size > 10_000
    meta = json.loads((exp / "manifest.json").read_text())
    assert meta["finals"][0]["plan"]["seeds"] == seeds and meta["summary"]["final"] == final
    assert summary["final_run"]["experiment"] == f"{exp}/final_seeds2" and "wall_time_s" not in json.dumps(final)

    # --final with anything but final.* changed: one line, exit 2, the difference listed; nothing runs
    args = ["--final", "--config", str(config)]
    bad = cli([*args, "train.lr=0.004"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --final with a config that differs from the sweep's in more than final.* (train.lr: 0.002 -> 0.004); "
        f"pass the sweep's config (saved as {exp}/config.yaml) and change only final.seeds or final.baseline"
    ]

    dry = cli([*args, "--dry-run", "final.seeds=3"])  # another k: its own experiment; run i keeps its seed
    assert dry.returncode == 0, dry.stderr[-3000:]
    plan = yaml.safe_load(dry.stdout)
    assert plan["experiment"] == "final_seeds3" and plan["seeds"][:2] == seeds and len(plan["runs"]) == 6
    assert not (exp / "final_seeds3").exists()

    # later, on the finished sweep: the runs trained anew (the in-sweep ones moved away), the driver SIGKILLed once a
    # run has finished and is in Tune's state (saved at every step here, not every 10 s); --final again continues the
    # runs (the finished one is not trained again) and gives the same block as in-sweep
    shutil.move(exp / "final_seeds2", tmp_path / "in_sweep_runs")
    proc = cli_background(args, tmp_path / "final.log", env={"TUNE_GLOBAL_CHECKPOINT_S": "0"})
    procs.append(proc)
    later = exp / "final_seeds2"

    def finished() -> dict[str, str]:  # runs the latest state snapshot records as TERMINATED: their progress
        states = sorted(later.glob("experiment_state-*.json"))
        try:
            known = snapshot_trials(states[-1].read_text(), status="TERMINATED") if states else set()
        except json.JSONDecodeError:  # Tune is writing it (at every step here): poll again
            return {}
        progress = {p.parent.name: p.read_text() for p in later.glob("*/progress.csv") if p.parent.name in known}
        return {name: text for name, text in progress.items() if len(text.splitlines()) >= 2}

    wait_for(finished, timeout=300, what="a finished final run in the experiment state")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = finished()
    assert not (later / "runs.json").exists(), "killed after the runs had all finished: nothing left to continue"
    again = cli(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name.rsplit("_", 2)[0] for p in later.iterdir() if p.is_dir()) == sorted(runs)
    assert {name: (later / name / "progress.csv").read_text() for name in done} == done  # not trained again
    rerun = strict_json(exp / "summary.json")
    assert rerun["final"] == final
    assert len(json.loads((exp / "manifest.json").read_text())["finals"]) == 2
