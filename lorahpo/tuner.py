"""The Ray Tune side of a sweep: the seeded searcher and the scheduler (deterministic: lorahpo.ordered's batch searcher
and trial-number-order scheduler; asynchronous: space.DistinctSearch, seeded TPE or random over Optuna's ask/tell,
with ASHA or FIFO), the function trainable with its resources, callbacks, and the Tuner, new or restored."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow.fs
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from lorahpo.compat import grown_search, restored_tune_config
from lorahpo.config import ExperimentConfig, tuning_metric
from lorahpo.data import TaskData
from lorahpo.ordered import BatchSearcher, OrderedScheduler
from lorahpo.space import DistinctSearch
from lorahpo.storage import display, experiment_dir, storage, storage_failure, trial_dirname
from lorahpo.tracking import ray_default_loggers, tracker_callbacks
from lorahpo.trainable import tune_trial

log = logging.getLogger(__name__)


def make_searcher(cfg: ExperimentConfig) -> Searcher:
    """Deterministic: the batch searcher (lorahpo.ordered). Asynchronous: `space.DistinctSearch`. Both draw from the
    same seeded TPE or random sampler, for fair comparisons."""
    return BatchSearcher(cfg) if cfg.sweep.deterministic else DistinctSearch(cfg)


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


# Secrets a trial needs and no node has: the driver forwards them from its own environment through Ray's object store
# (a runtime_env would show them in the dashboard; nothing here is written to storage). On a cluster this is how trials
# on every node reach gated weights with the HF_TOKEN handed to the driver at launch (see cluster.yaml).
FORWARDED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


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
    tune_trial(params, base, data, prefix)


def trainable(cfg: ExperimentConfig, data: TaskData, prefix: Any = None, trial: Callable = trial_with_env) -> Any:
    """The function trainable with the tokenized data (and the prefix cache's object-store reference) put in the
    object store ONCE, and the trial's resources. `trial`: the sweep's trial, or
    one with its signature (lorahpo.final's runs)."""
    fn = tune.with_parameters(trial, base=cfg, data=data, env=forwarded_env(), prefix=prefix)
    return tune.with_resources(fn, {"cpu": cfg.sweep.cpus_per_trial, "gpu": cfg.sweep.gpus_per_trial})


def run_config(
    cfg: ExperimentConfig,
    name: str,
    path: str,
    fs: pyarrow.fs.FileSystem,
    callbacks: Sequence[tune.Callback],
    **kw: Any,
) -> tune.RunConfig:
    """Where an experiment (the sweep, or the final runs) lives, what it keeps and how it retries: the same for both."""
    return tune.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=None if isinstance(fs, pyarrow.fs.LocalFileSystem) else fs,
        # Keep the best epoch's checkpoint (scored by the per-epoch metric, not the running best, whose ties would
        # pick a later epoch) and the latest (Ray always keeps it, for resume).
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=cfg.sweep.num_to_keep,
            checkpoint_score_attribute=cfg.train.metric,
            checkpoint_score_order=cfg.train.mode,
        ),
        failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
        callbacks=[StorageWatch(cfg), *callbacks],
        sync_config=tune.SyncConfig(sync_artifacts=True),  # each trial's trial.log (trainable.library_logs)
        verbose=1,
        **kw,
    )


class StorageWatch(tune.Callback):
    """When a trial fails, check storage from the driver; if storage is what failed, stop the sweep with one clear
    line (see storage.storage_failure) rather than let every running trial burn its retries, and every pending trial
    an epoch, against it. Pickled into the experiment state, so a resumed sweep keeps watching."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = storage_failure(self.cfg)
        if error is not None:
            raise error

    on_trial_error = on_trial_recover  # a failure with no retry left: the same check


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
    # the live study + sweep.loggers, then the caller's
    run = run_config(cfg, cfg.sweep.name, root, fs, [*tracker_callbacks(cfg), *callbacks], stop=stop)
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
        trial_name_creator=trial_dirname,  # the console's table names trials as every file does
        # One worker process serves trial after trial (a new one costs ~7 s of imports per trial: bench/overhead.py).
        # Safe because each trial seeds everything, sets its thread count and builds its model anew; a killed or
        # failed worker is still replaced by a fresh one.
        reuse_actors=cfg.sweep.reuse_actors,
    )
    return tune.Tuner(trainable(cfg, data, prefix), tune_config=tune_config, run_config=run)


def restore_tuner(cfg: ExperimentConfig, data: TaskData, prefix: Any = None, retry: bool = True) -> tune.Tuner:
    """Continue an interrupted sweep: finished trials kept, unfinished resumed from their last checkpoint (and, with
    `retry`, failed ones), the searcher's state (TPE's history) restored so no trial runs twice. With more trials than
    the sweep started with (--extend, or --resume of an extension), the restored search runs on to
    `sweep.num_samples`."""
    path, fs = experiment_dir(cfg)
    ray_default_loggers(cfg)  # the trackers themselves were pickled with the experiment
    tuner = reopen(path, fs, trainable(cfg, data, prefix), retry)
    tc = restored_tune_config(tuner)
    if cfg.sweep.deterministic:  # --resume may run more or fewer trials at once (checks.DETERMINISTIC_RELOCATABLE)
        tc.max_concurrent_trials = cfg.sweep.max_concurrent_trials
        # the pickled searcher stops at the first run's num_samples (the checks let nothing else it reads change)
        tc.search_alg.cfg = cfg
    if cfg.sweep.num_samples != tc.num_samples:  # tuner.pkl keeps the first run's TuneConfig
        tc.search_alg = grown_search(tc.search_alg, tc.max_concurrent_trials, cfg.sweep.num_samples)
        tc.max_concurrent_trials = None  # the limiter is in place; Tune would only warn that it ignores it
    return tuner


def reopen(path: str, fs: pyarrow.fs.FileSystem, fn: Any, retry: bool) -> tune.Tuner:
    """The experiment at `path` (the sweep, or the final runs) continued: finished trials kept, unfinished ones resumed
    from their last checkpoint and, with `retry`, failed ones run again."""
    return tune.Tuner.restore(path, trainable=fn, resume_unfinished=True, resume_errored=retry, storage_filesystem=fs)


def describe(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a sweep will do (for --dry-run and the log)."""
    s = cfg.sweep
    budget = s.num_samples * cfg.train.max_epochs
    if s.deterministic:
        told = "their first rung" if s.told == "first_rung" else "their end"
        cohort = f" (the first {s.rung_min_trials} judged together)" if s.rung_min_trials > 1 else ""
        mode = (
            f"deterministic: trials planned {s.trials_per_batch} at a time, batch k told the trials of batches <= "
            f"k-{s.planning_lag} at {told}, in trial-number order"
            + (f", early stopping decided in trial-number order{cohort}" if s.scheduler == "asha" else "")
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
