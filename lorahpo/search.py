"""Sweep: YAML space -> Optuna distributions, seeded TPE (or random) via OptunaSearch, ASHA (or FIFO), resources,
storage, and the Ray Tune Tuner (new or restored)."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from lorahpo.config import ExperimentConfig, ParamSpec, UserError, tuning_metric
from lorahpo.data import TaskData
from lorahpo.trainable import tune_trial

log = logging.getLogger(__name__)


def distribution(spec: ParamSpec) -> optuna.distributions.BaseDistribution:
    if spec.type == "categorical":
        return optuna.distributions.CategoricalDistribution(list(spec.choices or ()))
    if spec.type == "int":
        return optuna.distributions.IntDistribution(int(spec.low), int(spec.high), log=spec.log)
    return optuna.distributions.FloatDistribution(float(spec.low), float(spec.high), log=spec.log)


def optuna_space(cfg: ExperimentConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    """Search space keyed by dotted config path (what each trial overrides)."""
    return {key: distribution(spec) for key, spec in cfg.search.items()}


def make_searcher(cfg: ExperimentConfig) -> OptunaSearch:
    """OptunaSearch with a seeded sampler: TPE, or random search (same machinery, for fair comparisons)."""
    if cfg.sweep.searcher == "tpe":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
            seed=cfg.seed, n_startup_trials=cfg.sweep.n_startup_trials
        )
    else:
        sampler = optuna.samplers.RandomSampler(seed=cfg.seed)
    space = optuna_space(cfg)
    points = [dict(p) for p in cfg.sweep.points_to_evaluate] or None  # partial points: Optuna samples the rest
    return OptunaSearch(
        space=space, metric=tuning_metric(cfg), mode=cfg.train.mode, sampler=sampler, points_to_evaluate=points
    )


def make_scheduler(cfg: ExperimentConfig) -> TrialScheduler:
    if cfg.sweep.scheduler == "asha":
        # time_attr "epoch": the 1-based epochs a trial has completed (survives a resume, unlike wall time)
        return ASHAScheduler(
            time_attr="epoch",
            max_t=cfg.train.max_epochs,
            grace_period=cfg.sweep.grace_period,
            reduction_factor=cfg.sweep.reduction_factor,
        )
    return FIFOScheduler()


# pyarrow's S3 defaults wait and retry an unreachable endpoint for minutes; these make a dead endpoint an error within
# seconds. The timeouts travel with the filesystem to the trials (pickled); the retry strategy does not (pyarrow's
# default there, 3 attempts).
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 60.0  # per request (socket read): a 10 MB multipart chunk on a slow link still fits
S3_MAX_ATTEMPTS = 3


@functools.lru_cache(maxsize=16)
def _bucket_region(bucket: str) -> str:
    """AWS: the bucket's region (one request, remembered; storage paths are resolved many times per run)."""
    return pyarrow.fs.resolve_s3_region(bucket)


def filesystem(path: str, s3_endpoint: str | None = None) -> tuple[str, pyarrow.fs.FileSystem]:
    """(path inside the filesystem, filesystem) for a local/NFS path or s3://bucket/prefix (optionally on an
    S3-compatible endpoint such as http://127.0.0.1:9000). S3 credentials come from the standard AWS chain:
    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the instance profile on EC2."""
    if path.startswith("s3://"):
        options: dict[str, Any] = {
            "connect_timeout": S3_CONNECT_TIMEOUT_S,
            "request_timeout": S3_REQUEST_TIMEOUT_S,
            "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        }
        inner = path.removeprefix("s3://").split("?")[0].rstrip("/")
        if s3_endpoint:
            scheme, _, host = s3_endpoint.rpartition("://")
            return inner, pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme or "https", **options)
        return inner, pyarrow.fs.S3FileSystem(region=_bucket_region(inner.split("/")[0]), **options)
    if "://" in path:
        raise UserError(f"sweep.storage_path={path}: use a local/NFS path or s3://bucket/prefix")
    return str(Path(path).expanduser().resolve()), pyarrow.fs.LocalFileSystem()


def storage(cfg: ExperimentConfig) -> tuple[str, pyarrow.fs.FileSystem]:
    """(path inside the filesystem, filesystem) of `sweep.storage_path`; local paths made absolute (Tune changes
    the working directory of trials)."""
    return filesystem(cfg.sweep.storage_path, cfg.sweep.s3_endpoint)


def experiment_dir(cfg: ExperimentConfig) -> tuple[str, pyarrow.fs.FileSystem]:
    root, fs = storage(cfg)
    return f"{root}/{cfg.sweep.name}", fs


def display_path(cfg: ExperimentConfig) -> str:
    path, fs = experiment_dir(cfg)
    return f"s3://{path}" if isinstance(fs, pyarrow.fs.S3FileSystem) else path


def trial_dirname(trial: Any) -> str:
    """`trial_<n>_<id>`: n is the searcher's suggestion order (its experiment_tag counter, restored on resume), so
    directory names sort in creation order; the params are in params.json and results.parquet."""
    index = int(str(trial.experiment_tag).split("_")[0] or 0)
    return f"trial_{index:03d}_{trial.trial_id}"


# Secrets a trial needs and no node has: the driver forwards them from its own environment through Ray's object store
# (a runtime_env would show them in the dashboard; nothing here is written to storage). On a cluster this is how trials
# on every node reach gated weights with the HF_TOKEN handed to the driver at launch (see cluster.yaml).
FORWARDED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def trial_with_env(params: dict[str, Any], base: ExperimentConfig, data: TaskData, env: dict[str, str]) -> None:
    os.environ.update(env)  # before the trial loads a model
    tune_trial(params, base, data)


def trainable(cfg: ExperimentConfig, data: TaskData) -> Any:
    """The function trainable with the tokenized data put in the object store ONCE, and the trial's resources."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    fn = tune.with_parameters(trial_with_env, base=cfg, data=data, env=env)
    return tune.with_resources(fn, {"cpu": cfg.sweep.cpus_per_trial, "gpu": cfg.sweep.gpus_per_trial})


class StorageWatch(tune.Callback):
    """When a trial fails, check storage from the driver; if storage is what failed, stop the sweep with one clear
    line (see preflight.storage_failure) rather than let every running trial burn its retries, and every pending trial
    an epoch, against it. Pickled into the experiment state, so a resumed sweep keeps watching."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    def _check(self) -> None:
        from lorahpo.preflight import storage_failure

        error = storage_failure(self.cfg)
        if error is not None:
            raise error

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check()


def make_tuner(cfg: ExperimentConfig, data: TaskData) -> tune.Tuner:
    root, fs = storage(cfg)
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
        callbacks=[StorageWatch(cfg)],
        verbose=1,
    )
    tune_config = tune.TuneConfig(
        metric=tuning_metric(cfg),
        mode=cfg.train.mode,
        search_alg=make_searcher(cfg),
        scheduler=make_scheduler(cfg),
        num_samples=cfg.sweep.num_samples,
        max_concurrent_trials=cfg.sweep.max_concurrent_trials,
        trial_dirname_creator=trial_dirname,
        # One worker process serves trial after trial (a new one costs ~7 s of imports per trial: bench/overhead.py).
        # Safe because each trial seeds everything, sets its thread count and builds its model anew; a killed or
        # failed worker is still replaced by a fresh one.
        reuse_actors=cfg.sweep.reuse_actors,
    )
    return tune.Tuner(trainable(cfg, data), tune_config=tune_config, run_config=run_config)


def can_restore(cfg: ExperimentConfig) -> bool:
    path, fs = experiment_dir(cfg)
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def restore_tuner(cfg: ExperimentConfig, data: TaskData) -> tune.Tuner:
    """Continue an interrupted sweep: finished trials kept, unfinished resumed from their last checkpoint, the
    searcher's state (TPE's history) restored so no trial runs twice."""
    path, fs = experiment_dir(cfg)
    return tune.Tuner.restore(
        path, trainable=trainable(cfg, data), resume_unfinished=True, resume_errored=True, storage_filesystem=fs
    )


def describe(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a sweep will do (for --dry-run and the log)."""
    s = cfg.sweep
    budget = s.num_samples * cfg.train.max_epochs
    return {
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
        "storage": display_path(cfg) + (f" (endpoint {s.s3_endpoint})" if s.s3_endpoint else ""),
        "search_space": {k: {a: b for a, b in vars(v).items() if b is not None} for k, v in cfg.search.items()},
    }


def run_sweep(
    cfg: ExperimentConfig,
    data: TaskData,
    plan: dict[str, Any],
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the sweep on a local or existing Ray cluster, then write every result."""
    import json
    import tempfile

    import ray

    from lorahpo.config import dump_config
    from lorahpo.data import split_rows
    from lorahpo.repro import manifest
    from lorahpo.results import write_results

    meta = manifest(cfg, data.info, plan={k: v for k, v in plan.items() if k != "config"})
    exp, fs = experiment_dir(cfg)
    # "local" starts a fresh local Ray even if a stale one from a killed run is still up (plain init would join it).
    ray.init(address=address or "local", log_to_driver=True, configure_logging=False)
    try:
        from lorahpo.preflight import check_resources, check_storage_shared, cluster_nodes

        # Checks that need the cluster come before anything is written, so a failed check leaves no half-made sweep.
        check_resources(cfg, cluster_nodes())  # before any trial: Tune would queue an unplaceable trial forever
        check_storage_shared(cfg)  # every node reads what the driver wrote (a head-local path fails here, not later)
        if overwrite and fs.get_file_info(exp).type != pyarrow.fs.FileType.NotFound:
            log.warning("--overwrite: deleting the earlier experiment at %s", display_path(cfg))
            fs.delete_dir(exp)
        if not resume:  # provenance before any training; the config is what --resume and load_experiment read back
            fs.create_dir(exp)
            with tempfile.TemporaryDirectory() as tmp:
                dump_config(cfg, f"{tmp}/config.yaml")
                Path(tmp, "manifest.json").write_text(json.dumps(meta, indent=2, default=str))
                Path(tmp, "split.json").write_text(json.dumps(split_rows(data)))
                pyarrow.fs.copy_files(tmp, exp, destination_filesystem=fs)
        tuner = restore_tuner(cfg, data) if resume else make_tuner(cfg, data)
        try:
            grid = tuner.fit()
            return write_results(cfg, grid, data, meta)
        except Exception:  # StorageWatch's error (Tune wraps it), or storage gone while results are written
            from lorahpo.preflight import storage_failure

            error = storage_failure(cfg)
            if error is None:
                raise
            raise error from None
    finally:
        ray.shutdown()
