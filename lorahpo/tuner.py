"""The Ray Tune side of a sweep: the seeded searcher and the scheduler (deterministic: lorahpo.ordered's batch searcher
and trial-number-order scheduler; asynchronous: TPE or random through OptunaSearch, with ASHA or FIFO), the function
trainable with its resources, callbacks, and the Tuner, new or restored."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import optuna
import pyarrow.fs
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from lorahpo.compat import grown_search, restored_tune_config
from lorahpo.config import ExperimentConfig, tuning_metric
from lorahpo.data import TaskData
from lorahpo.ordered import BatchSearcher, OrderedScheduler
from lorahpo.results import trial_number
from lorahpo.space import ask_new, optuna_space
from lorahpo.storage import display, experiment_dir, storage, storage_failure
from lorahpo.tracking import ray_default_loggers, tracker_callbacks
from lorahpo.trainable import tune_trial

log = logging.getLogger(__name__)


class DistinctOptunaSearch(OptunaSearch):
    """OptunaSearch that suggests no config an earlier trial has (`space.ask_new`): the asynchronous sweep's searcher
    skips repeats as the deterministic one does. `seed` seeds its random draws after repeats."""

    def __init__(self, seed: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.seed = seed

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id not in self._ot_trials:
            # the trial OptunaSearch.suggest then returns (it asks only for a trial id it has no trial for)
            self._ot_trials[trial_id] = ask_new(self._ot_study, self._space, self.seed)
        return super().suggest(trial_id)


def make_searcher(cfg: ExperimentConfig) -> Searcher:
    """Deterministic: the batch searcher (seeded TPE or random per batch). Asynchronous: OptunaSearch with a seeded
    sampler, TPE or random search (same machinery, for fair comparisons)."""
    if cfg.sweep.deterministic:
        return BatchSearcher(cfg)
    if cfg.sweep.searcher == "tpe":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
            seed=cfg.seed, n_startup_trials=cfg.sweep.n_startup_trials
        )
    else:
        sampler = optuna.samplers.RandomSampler(seed=cfg.seed)
    points = [dict(p) for p in cfg.sweep.points_to_evaluate] or None  # partial points: Optuna samples the rest
    return DistinctOptunaSearch(
        seed=cfg.seed,
        space=optuna_space(cfg),
        metric=tuning_metric(cfg),
        mode=cfg.train.mode,
        sampler=sampler,
        points_to_evaluate=points,
    )


def make_scheduler(cfg: ExperimentConfig, searcher: Searcher | None = None) -> TrialScheduler:
    """Deterministic: the trial-number-order scheduler, which decides from `searcher`'s records (the BatchSearcher of
    the same sweep). Asynchronous: ASHA or FIFO."""
    if cfg.sweep.deterministic:
        if not isinstance(searcher, BatchSearcher):
            raise TypeError("a deterministic sweep's scheduler needs the sweep's BatchSearcher (make_searcher(cfg))")
        return OrderedScheduler(cfg, searcher)
    if cfg.sweep.scheduler == "asha":
        # time_attr "epoch": the 1-based epochs a trial has completed (survives a resume, unlike wall time)
        return ASHAScheduler(
            time_attr="epoch",
            max_t=cfg.train.max_epochs,
            grace_period=cfg.sweep.grace_period,
            reduction_factor=cfg.sweep.reduction_factor,
        )
    return FIFOScheduler()


def trial_dirname(trial: Any) -> str:
    """`trial_<n>_<id>`: n is the searcher's suggestion order (its experiment_tag counter, restored on resume), so
    directory names sort in creation order; the params are in params.json and results.parquet."""
    index = int(str(trial.experiment_tag).split("_")[0] or 0)
    return f"trial_{index:03d}_{trial.trial_id}"


# Secrets a trial needs and no node has: the driver forwards them from its own environment through Ray's object store
# (a runtime_env would show them in the dashboard; nothing here is written to storage). On a cluster this is how trials
# on every node reach gated weights with the HF_TOKEN handed to the driver at launch (see cluster.yaml).
FORWARDED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


# Tests only: {"<n>": [first, later]}: trial_<n>_* waits `first` before it starts and `later` before it resumes from a
# checkpoint (after a pause or a failure), each a number of seconds or the path of a file the test creates when the
# trial may go on; it logs its pid. This reorders when trials report and opens a window in which to kill a trial's
# worker; a deterministic sweep must give the same trials all the same (tests/test_sweep.py).
TEST_DELAYS_ENV = "LORAHPO_TEST_TRIAL_DELAYS"


def injected_wait(trial_dir: str, resuming: bool) -> None:
    delays = json.loads(os.environ.get(TEST_DELAYS_ENV) or "{}")
    wait = delays.get(str(trial_number(os.path.basename(trial_dir))), (0, 0))[1 if resuming else 0]
    if not wait:
        return
    log.warning("test delay: %s waits for %s in pid %d", os.path.basename(trial_dir), wait, os.getpid())
    if isinstance(wait, str):
        deadline = time.monotonic() + 600  # a test that died creates nothing: go on eventually
        while not os.path.exists(wait) and time.monotonic() < deadline:
            time.sleep(0.1)
    else:
        time.sleep(wait)


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def trial_with_env(
    params: dict[str, Any], base: ExperimentConfig, data: TaskData, env: dict[str, str], prefix: Any = None
) -> None:
    os.environ.update(env)  # before the trial loads a model
    # Tune hands a worker to the next trial only if the last trial's thread ended within TUNE_FUNCTION_THREAD_TIMEOUT_S
    # (2 s by default), else that next trial FAILS ("reset_config() ... return True"); on a busy machine a trial's end
    # (its last checkpoint, its memory freed) takes longer. Set here, in the worker, where Tune reads it.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "120")
    if os.environ.get(TEST_DELAYS_ENV):
        injected_wait(tune.get_context().get_trial_dir(), resuming=tune.get_checkpoint() is not None)
    tune_trial(params, base, data, prefix)


def trainable(cfg: ExperimentConfig, data: TaskData, prefix: Any = None) -> Any:
    """The function trainable with the tokenized data (and the prefix cache: an object-store reference, or the plan of
    the nodes' disk caches) put in the object store ONCE, and the trial's resources."""
    fn = tune.with_parameters(trial_with_env, base=cfg, data=data, env=forwarded_env(), prefix=prefix)
    return tune.with_resources(fn, {"cpu": cfg.sweep.cpus_per_trial, "gpu": cfg.sweep.gpus_per_trial})


class StorageWatch(tune.Callback):
    """When a trial fails, check storage from the driver; if storage is what failed, stop the sweep with one clear
    line (see storage.storage_failure) rather than let every running trial burn its retries, and every pending trial
    an epoch, against it. Pickled into the experiment state, so a resumed sweep keeps watching."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    def _check(self) -> None:
        error = storage_failure(self.cfg)
        if error is not None:
            raise error

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check()


def make_tuner(
    cfg: ExperimentConfig,
    data: TaskData,
    stop: Any = None,
    callbacks: Sequence[tune.Callback] = (),
    prefix: Any = None,
) -> tune.Tuner:
    """A new sweep. `stop` (a Tune Stopper or dict) and extra `callbacks` are for benchmarks and tests; `prefix` is
    what lorahpo.prefix.prepare_prefix returned (None: trials run the full model)."""
    root, fs = storage(cfg)
    ray_default_loggers(cfg)
    run_config = tune.RunConfig(
        name=cfg.sweep.name,
        storage_path=root,
        storage_filesystem=None if isinstance(fs, pyarrow.fs.LocalFileSystem) else fs,
        # Keep the best epoch's checkpoint (scored by the per-epoch metric, not the running best, whose ties would
        # pick a later epoch) and the latest (Ray always keeps it, for resume).
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=cfg.sweep.num_to_keep,
            checkpoint_score_attribute=cfg.train.metric,
            checkpoint_score_order=cfg.train.mode,
        ),
        failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
        callbacks=[StorageWatch(cfg), *tracker_callbacks(cfg), *callbacks],  # the live study + sweep.loggers
        sync_config=tune.SyncConfig(sync_artifacts=True),  # each trial's trial.log (trainable.library_logs)
        stop=stop,
        verbose=1,
    )
    searcher = make_searcher(cfg)
    tune_config = tune.TuneConfig(
        metric=tuning_metric(cfg),
        mode=cfg.train.mode,
        search_alg=searcher,
        scheduler=make_scheduler(cfg, searcher),
        num_samples=cfg.sweep.num_samples,
        # Deterministic: Tune hands this to the BatchSearcher, whose scheduler admits trials itself (see ordered.py)
        max_concurrent_trials=cfg.sweep.max_concurrent_trials,
        trial_dirname_creator=trial_dirname,
        # One worker process serves trial after trial (a new one costs ~7 s of imports per trial: bench/overhead.py).
        # Safe because each trial seeds everything, sets its thread count and builds its model anew; a killed or
        # failed worker is still replaced by a fresh one.
        reuse_actors=cfg.sweep.reuse_actors,
    )
    return tune.Tuner(trainable(cfg, data, prefix), tune_config=tune_config, run_config=run_config)


def restore_tuner(cfg: ExperimentConfig, data: TaskData, prefix: Any = None, retry: bool = True) -> tune.Tuner:
    """Continue an interrupted sweep: finished trials kept, unfinished resumed from their last checkpoint (and, with
    `retry`, failed ones), the searcher's state (TPE's history) restored so no trial runs twice. With more trials than
    the sweep started with (--extend, or --resume of an extension), the restored search runs on to
    `sweep.num_samples`."""
    path, fs = experiment_dir(cfg)
    ray_default_loggers(cfg)  # the trackers themselves were pickled with the experiment
    tuner = tune.Tuner.restore(
        path,
        trainable=trainable(cfg, data, prefix),
        resume_unfinished=True,
        resume_errored=retry,
        storage_filesystem=fs,
    )
    tc = restored_tune_config(tuner)
    if cfg.sweep.deterministic:  # --resume may run more or fewer trials at once (checks.DETERMINISTIC_RELOCATABLE)
        tc.max_concurrent_trials = cfg.sweep.max_concurrent_trials
        # the pickled searcher stops at the first run's num_samples (the checks let nothing else it reads change)
        tc.search_alg.cfg = cfg
    if cfg.sweep.num_samples != tc.num_samples:  # tuner.pkl keeps the first run's TuneConfig
        tc.search_alg = grown_search(tc.search_alg, tc.max_concurrent_trials, cfg.sweep.num_samples)
        tc.max_concurrent_trials = None  # the limiter is in place; Tune would only warn that it ignores it
    return tuner


def describe(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a sweep will do (for --dry-run and the log)."""
    s = cfg.sweep
    budget = s.num_samples * cfg.train.max_epochs
    if s.deterministic:
        mode = (
            f"deterministic: trials planned {s.trials_per_batch} at a time from finished trials in trial-number "
            "order"
            + (", early stopping decided in trial-number order" if s.scheduler == "asha" else "")
            + "; the same trials and metrics at any concurrency and timing"
        )
    else:
        mode = "asynchronous: the searcher and scheduler act in the order trials report (reproducible in distribution)"
    return {
        "mode": mode,
        "searcher": f"{s.searcher} (seed {cfg.seed}"
        + (f", {s.n_startup_trials} random start-up trials)" if s.searcher == "tpe" else ")"),
        "scheduler": s.scheduler
        + (
            f" (grace {s.grace_period}, reduction {s.reduction_factor}, max_t {cfg.train.max_epochs} epochs)"
            if s.scheduler == "asha"
            else ""
        ),
        "metric": f"{tuning_metric(cfg)} ({cfg.train.mode})",
        "trial_budget": f"{s.num_samples} trials x up to {cfg.train.max_epochs} epochs = at most {budget} trial-epochs",
        "resources": f"{s.cpus_per_trial} CPU + {s.gpus_per_trial} GPU per trial, at most "
        f"{s.max_concurrent_trials} at once",
        "storage": display(cfg, experiment=True),
        "search_space": {k: {a: b for a, b in vars(v).items() if b is not None} for k, v in cfg.search.items()},
    }
