"""The only place lorahpo reaches into another library's private API: one small function per hook, each where the
library offers no public way, each checked by a test that names the library and its version when the hook is gone
(tests/test_compat.py, tests/test_extend.py). pyproject.toml bounds these libraries' versions to those the tests passed
with."""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator


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


def grown_search(searcher: Searcher, max_concurrent: int, num_samples: int) -> SearchGenerator:
    """The search of a restored experiment, wrapped as Tune wraps a Searcher (a ConcurrencyLimiter in a
    SearchGenerator, so the saved state fits it), that runs until `num_samples` trials exist. Tune restores the trial
    count and the finished flag of the SearchGenerator's saved state and ignores TuneConfig.num_samples on restore:
    a finished experiment would stay finished (restoring a finished run with more samples is not supported)."""
    search = SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent))
    restore = search.set_state

    def set_state(state: dict[str, Any]) -> None:
        restore(state)
        search._total_samples, search._finished = num_samples, False

    search.set_state = set_state  # type: ignore[method-assign]
    return search
