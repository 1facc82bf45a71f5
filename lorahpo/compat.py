"""The only place lorahpo reaches into another library's private API: one small function per hook, each where the
library offers no public way, each checked by tests/test_compat.py, which names the library and its version when the
hook is gone. pyproject.toml bounds these libraries' versions to those the tests passed with."""

from __future__ import annotations

from typing import Any

from ray import tune


def park_trial(tune_controller: Any, trial: Any, status: str) -> None:
    """Set a trial's status from a scheduler's hook. Tune starts every PENDING trial that fits the cluster, and a
    scheduler can PAUSE a trial only in answer to its report: a queued trial (new, retried or restored by --resume)
    has none, so the deterministic scheduler parks it as PAUSED this way until it is that trial's turn
    (TuneController's `pause_trial` ignores a trial without a worker; it has no public setter)."""
    tune_controller._set_trial_status(trial, status)


def restored_tune_config(tuner: tune.Tuner) -> tune.TuneConfig:
    """The TuneConfig a restored Tuner runs with: the one pickled when the sweep started. --resume of a deterministic
    sweep may run more or fewer trials at once, and `Tuner.restore` takes no TuneConfig."""
    return tuner._local_tuner._tune_config
