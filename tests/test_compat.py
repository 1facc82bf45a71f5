"""Each hook of lorahpo/compat.py (another library's private API, where it offers no public way) against the installed
library. A failure names the library, its version and the hook that needs a new way in (pyproject.toml bounds the
versions these tests passed with)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler

from lorahpo.compat import park_trial, restored_tune_config


def hook_gone(hook: str, error: BaseException) -> None:
    pytest.fail(
        f"ray {ray.__version__}: lorahpo/compat.py {hook} no longer works with this version ({error!r}); find its new "
        "way in (or bound ray's version in pyproject.toml below this one)"
    )


@pytest.fixture
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


class OneByOne(FIFOScheduler):
    """Parks every queued trial but one (`park_trial`) and starts the next parked one once nothing runs, so two
    trials that fit the cluster together run one after the other."""

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        trials = tune_controller.get_trials()
        busy = [t for t in trials if t.status == Trial.RUNNING]
        queued = [t for t in trials if t.status == Trial.PENDING]
        for t in queued[1:] if not busy else queued:
            park_trial(tune_controller, t, Trial.PAUSED)
        if busy:
            return None
        return next((t for t in trials if t.status in (Trial.PENDING, Trial.PAUSED)), None)


def test_park_trial_holds_a_queued_trial_until_the_scheduler_starts_it(local_ray: None, tmp_path: Path) -> None:
    def trainable(config: dict) -> None:
        start = time.time()
        time.sleep(1.0)
        tune.report({"start": start, "end": time.time()})

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),  # two fit the two CPUs at once
        param_space={"i": tune.grid_search([0, 1])},
        tune_config=tune.TuneConfig(scheduler=OneByOne()),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
    )
    try:
        grid = tuner.fit()
    except AttributeError as e:
        hook_gone("park_trial (TuneController._set_trial_status)", e)
    runs = sorted((r.metrics["start"], r.metrics["end"]) for r in grid)
    assert len(runs) == 2 and grid.num_terminated == 2
    assert runs[1][0] >= runs[0][1], f"the parked trial ran alongside the other: {runs}"


def test_restored_tune_config_is_the_one_a_tuner_runs_with() -> None:
    """restore_tuner sets --resume's max_concurrent_trials through it (Tune has no public setter)."""
    tc = tune.TuneConfig(num_samples=2, max_concurrent_trials=3)
    tuner = tune.Tuner(lambda config: None, tune_config=tc)
    try:
        found = restored_tune_config(tuner)
    except AttributeError as e:
        hook_gone("restored_tune_config (Tuner._local_tuner._tune_config)", e)
    assert found is tc
