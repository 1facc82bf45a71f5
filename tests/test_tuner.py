"""The searcher and scheduler a sweep gets from its config (constructed, not run)."""

from __future__ import annotations

import optuna
import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from lorahpo.compat import restored_tune_config
from lorahpo.ordered import BatchSearcher, OrderedScheduler
from lorahpo.space import optuna_space
from lorahpo.tuner import describe, make_scheduler, make_searcher, trial_dirname

from .conftest import tiny_config

ASYNC = {"sweep.deterministic": False}


def test_searcher_is_seeded_tpe_or_random_over_the_config_space() -> None:
    cfg = tiny_config(**{"seed": 5, "sweep.n_startup_trials": 3, **ASYNC})
    searcher = make_searcher(cfg)
    sampler = searcher._sampler
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == 3
    assert searcher.metric == "best_val_fbeta" and searcher.mode == "max"
    assert searcher._space == optuna_space(cfg)
    assert searcher._points_to_evaluate == [dict(p) for p in cfg.sweep.points_to_evaluate]
    assert optuna_space(cfg)["lora.r"] == optuna.distributions.CategoricalDistribution([4, 8, 16])
    assert optuna_space(cfg)["train.lr"] == optuna.distributions.FloatDistribution(3e-4, 5e-3, log=True)
    assert optuna_space(cfg)["lora.last_n"] == optuna.distributions.IntDistribution(1, 4)
    random = make_searcher(tiny_config(**{"sweep.searcher": "random", **ASYNC}))._sampler
    assert isinstance(random, optuna.samplers.RandomSampler)
    # seeded: two samplers of the same seed draw the same first value
    a = make_searcher(cfg)._sampler._random_sampler._rng.rng.random()
    b = make_searcher(cfg)._sampler._random_sampler._rng.rng.random()
    assert a == b


def test_scheduler_asha_on_epochs_or_fifo() -> None:
    cfg = tiny_config(**{"train.max_epochs": 5, "sweep.grace_period": 2, "sweep.reduction_factor": 3, **ASYNC})
    asha = make_scheduler(cfg)
    assert isinstance(asha, ASHAScheduler)
    assert asha._time_attr == "epoch" and asha._max_t == 5 and asha._reduction_factor == 3
    rungs = make_scheduler(tiny_config(**{"train.max_epochs": 8, "sweep.grace_period": 1, **ASYNC}))._brackets[0]._rungs
    assert [milestone for milestone, _ in rungs] == [8, 4, 2, 1]  # epochs at which ASHA compares trials
    assert isinstance(make_scheduler(tiny_config(**{"sweep.scheduler": "fifo", **ASYNC})), FIFOScheduler)


def test_deterministic_searcher_and_scheduler_share_the_records() -> None:
    cfg = tiny_config(**{"train.max_epochs": 8, "sweep.max_concurrent_trials": 3})
    searcher = make_searcher(cfg)
    scheduler = make_scheduler(cfg, searcher)
    assert isinstance(searcher, BatchSearcher) and isinstance(scheduler, OrderedScheduler)
    assert scheduler.searcher is searcher and scheduler.rungs == (1, 2, 4, 8)  # ASHA's milestones, ascending
    assert scheduler.slots == 3
    assert searcher.set_max_concurrency(5) and scheduler.slots == 5  # Tune's max_concurrent_trials reaches it
    assert make_scheduler(tiny_config(**{"sweep.scheduler": "fifo"}), make_searcher(cfg)).rungs == ()
    with pytest.raises(TypeError, match="BatchSearcher"):
        make_scheduler(cfg)


def test_restored_tune_config_is_the_one_a_tuner_runs_with() -> None:
    """restore_tuner sets --resume's max_concurrent_trials through this (Tune has no public setter)."""
    tc = tune.TuneConfig(num_samples=2, max_concurrent_trials=3)
    tuner = tune.Tuner(lambda config: None, tune_config=tc)
    assert restored_tune_config(tuner) is tc


def test_trial_dirname_sorts_in_creation_order() -> None:
    class T:
        experiment_tag, trial_id = "12_lr=0.1", "ab12"

    assert trial_dirname(T()) == "trial_012_ab12"


def test_describe_states_the_budget() -> None:
    plan = describe(tiny_config(**{"sweep.num_samples": 5, "train.max_epochs": 3}))
    assert plan["trial_budget"] == "5 trials x up to 3 epochs = at most 15 trial-epochs"
    assert plan["scheduler"] == "asha (grace 1, reduction 2, max_t 3 epochs)"
    assert plan["searcher"] == "tpe (seed 42, 4 random start-up trials)"
    assert plan["mode"].startswith("deterministic: trials planned 4 at a time")
    assert describe(tiny_config(**ASYNC))["mode"].startswith("asynchronous:")
