"""The live Optuna journal across a driver crash (lorahpo.tracking.LiveStudy), driven with the calls Ray Tune makes.
On S3 the journal is a local file copied to the bucket every 30 s, so a trial that ended in the seconds before the
driver died is RUNNING in the bucket's copy; Tune restores it as TERMINATED and reports nothing more of it. The
resumed driver must close it at its first step, not leave it RUNNING until the sweep ends. (The trials are stand-ins
carrying what Tune's Trial objects carry: path, status, config, last result.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna

from lorahpo.results import JOURNAL, load_journal
from lorahpo.tracking import LiveStudy

from .conftest import tiny_config


def trial(exp: Path, n: int, status: str, epoch: int, value: float) -> SimpleNamespace:
    last = {"epoch": epoch, "val_fbeta": value, "best_val_fbeta": value, "early_stopped": False}
    config = {"train.lr": 1e-3 * (n + 1), "lora.r": 8}
    return SimpleNamespace(path=str(exp / f"trial_{n:03d}_t{n}"), status=status, config=config, last_result=last)


def test_resumed_driver_closes_trials_that_ended_after_the_journal_was_last_written(tmp_path: Path) -> None:
    cfg = tiny_config(**{"sweep.storage_path": str(tmp_path), "sweep.name": "s", "train.max_epochs": 2})
    exp = tmp_path / "s"
    first = LiveStudy(cfg)
    first.setup()
    running = [trial(exp, n, "RUNNING", 1, 0.5 + 0.1 * n) for n in range(3)]
    for t in running:
        first.on_trial_start(0, running, t)
        first.on_trial_result(0, running, t, t.last_result)
    # the driver dies; when the sweep is resumed, Tune holds trial 0 finished, trial 1 failed, trial 2 to continue
    restored = [trial(exp, 0, "TERMINATED", 2, 0.8), trial(exp, 1, "ERROR", 1, 0.6), trial(exp, 2, "PENDING", 1, 0.7)]
    second = LiveStudy(cfg)
    second.setup()
    second.on_step_begin(1, restored)
    trials = {t.user_attrs["trial_id"]: t for t in load_journal(exp / JOURNAL).trials}
    t0, t1, t2 = (trials[f"trial_{n:03d}_t{n}"] for n in range(3))
    assert (t0.state, t0.value, t0.intermediate_values, t0.user_attrs["stop_reason"]) == (
        optuna.trial.TrialState.COMPLETE, 0.8, {1: 0.5, 2: 0.8}, "max_epochs")  # fmt: skip
    assert (t1.state, t1.user_attrs["stop_reason"]) == (optuna.trial.TrialState.COMPLETE, "error")
    assert t2.state == optuna.trial.TrialState.RUNNING  # it runs again and reports as usual
    second.on_step_begin(2, restored)  # once only: nothing is added twice
    assert len(load_journal(exp / JOURNAL).trials) == 3
