"""Hooks into another library's private API, one small function each, for what it offers no public way to do. Each
has a test that fails when a new version of the library moves what it relies on (tests/test_tuner.py,
tests/test_extend.py)."""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator


def restored_tune_config(tuner: tune.Tuner) -> tune.TuneConfig:
    """The TuneConfig a restored Tuner runs with: the one pickled when the sweep started (Tune has no public way to
    change it on restore)."""
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
