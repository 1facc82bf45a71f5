"""Watch a sweep while it runs: a live Optuna study (`optuna-dashboard <experiment>/optuna_journal.log`) and the
trackers named in `sweep.loggers` (TensorBoard, MLflow, W&B), all fed by Tune callbacks on the driver.

They observe and never steer: nothing written here reaches the searcher or the scheduler, which learn only from the
trials' reports, so what a sweep decides cannot depend on when (or whether) a tracker wrote. At the end of a sweep
`finish_journal` checks the live study against optuna_res.pkl and `log_summary` puts the summary on the trackers'
sweep-level runs."""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, LoggerCallback, TBXLoggerCallback
from ray.tune.utils import flatten_dict

from lorahpo.config import ExperimentConfig, direction
from lorahpo.errors import UserError
from lorahpo.results import JOURNAL, journal_study, study_differences, study_params, trial_outcome, write_journal
from lorahpo.storage import experiment_dir, location, read_bytes, trial_name, write_bytes

log = logging.getLogger(__name__)

# sweep.loggers name -> (module it needs, pip extra that installs it)
PACKAGES = {"tensorboard": ("tensorboardX", "ray[tune]"), "mlflow": ("mlflow", "lorahpo[mlflow]"),
            "wandb": ("wandb", "lorahpo[wandb]")}  # fmt: skip
MIRROR_EVERY_S = 30.0  # S3: the local journal is copied to the bucket this often (and at the end)


def check_loggers(cfg: ExperimentConfig) -> None:
    """Before any training (and at --dry-run): each named logger's package imports, or one line saying how to get it."""
    for name in cfg.sweep.loggers:
        module, extra = PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(
                f"sweep.loggers names {name}, but its package {module!r} is not installed ({e}); "
                f"pip install '{extra}', or remove {name} from sweep.loggers"
            ) from None


def tracker_callbacks(cfg: ExperimentConfig) -> list[tune.Callback]:
    """The live study plus the trackers of `sweep.loggers`, as Tune callbacks."""
    callbacks: list[tune.Callback] = [LiveStudy(cfg)]
    if "tensorboard" in cfg.sweep.loggers:
        callbacks.append(TBXLoggerCallback())  # scalars per epoch; HParams (params + final metrics) at trial end
    else:  # Ray adds its TensorBoard writer unless told not to; it still needs CSV and JSON (ExperimentAnalysis)
        callbacks += [CSVLoggerCallback(), JsonLoggerCallback()]
    if "mlflow" in cfg.sweep.loggers:
        callbacks.append(MLflowSweep(cfg))
    if "wandb" in cfg.sweep.loggers:
        callbacks.append(WandbSweep(cfg))
    return callbacks


def ray_default_loggers(cfg: ExperimentConfig) -> None:
    """Ray adds its CSV, JSON and TensorBoard loggers to every sweep (new or restored) unless this variable is set. With
    TensorBoard on, tracker_callbacks passes Ray's TensorBoard logger and Ray adds the other two; with it off, the
    variable keeps Ray's out and tracker_callbacks passes CSV and JSON. Set either way: it lives in the process."""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0" if "tensorboard" in cfg.sweep.loggers else "1"


# ---------------------------------------------------------------------------------------------------------------------
# The live Optuna study


def _observer(method: Callable[..., None]) -> Callable[..., None]:
    """A failed journal write must not end a sweep of many hours: say so once and go on (the study is checked and,
    where needed, rebuilt from the results at the end)."""

    @functools.wraps(method)
    def wrapper(self: LiveStudy, *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if not self._failed:
                log.warning("live study: %s failed (%s); the sweep goes on, the study is rebuilt at the end", method, e)
            self._failed = True

    return wrapper


class LiveStudy(tune.Callback):
    """`<experiment>/optuna_journal.log` written as the sweep runs: a trial appears when it starts (its params and
    `trial_id`), gets one intermediate value per epoch (`train.metric`, as in optuna_res.pkl) and, when it ends, the
    value, state and stop reason the pickle will hold. Local disk and NFS: written in place (Optuna's journal lock
    works on NFS). S3: a local journal copied to the bucket every MIRROR_EVERY_S and at the end. A resumed sweep
    continues the same journal: its trials are found again by `trial_id`, never added twice."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg, self._failed = cfg, False

    def __getstate__(self) -> dict[str, Any]:  # pickled into the experiment (tuner.pkl): the config only
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.cfg, self._failed = state["cfg"], False

    @_observer
    def setup(self, **info: Any) -> None:
        exp, fs = experiment_dir(self.cfg)
        if isinstance(fs, pyarrow.fs.LocalFileSystem):
            Path(exp).mkdir(parents=True, exist_ok=True)
            self.path, self.remote = Path(exp) / JOURNAL, None
        else:
            self.path = Path(tempfile.mkdtemp(prefix="lorahpo-journal-")) / JOURNAL
            self.remote = (fs, f"{exp}/{JOURNAL}")
            earlier = read_bytes(fs, self.remote[1])
            if earlier is not None:  # a resumed sweep continues the bucket's journal
                self.path.write_bytes(earlier)
        self.storage = JournalStorage(JournalFileBackend(str(self.path)))
        name = self.cfg.sweep.name
        optuna.create_study(storage=self.storage, study_name=name, direction=direction(self.cfg), load_if_exists=True)
        self.study_id = self.storage.get_study_id_from_name(name)
        self.ids: dict[str, int] = {}
        self.done: set[str] = set()
        for t in self.storage.get_all_trials(self.study_id, deepcopy=False):
            key = str(t.user_attrs.get("trial_id"))
            self.ids[key] = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)
            if t.state.is_finished():
                self.done.add(key)
        self.mirrored = time.monotonic()
        self.reconciled = False

    def _trial(self, trial: Any) -> int:
        key = trial_name(trial)
        if key not in self.ids:
            params, dists = study_params(self.cfg, trial.config)
            template = optuna.trial.create_trial(
                state=optuna.trial.TrialState.RUNNING, params=params, distributions=dists, user_attrs={"trial_id": key}
            )
            self.ids[key] = self.storage.create_new_trial(self.study_id, template_trial=template)
        return self.ids[key]

    @_observer
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial_name(trial) not in self.done:  # a retried or resumed trial keeps its Optuna trial
            self._trial(trial)

    @_observer
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial_name(trial) in self.done or self.cfg.train.metric not in result:
            return
        tid = self._trial(trial)
        self.storage.set_trial_intermediate_value(tid, int(result["epoch"]), float(result[self.cfg.train.metric]))
        self.storage.set_trial_user_attr(tid, "epochs", int(result["epoch"]))

    def _finish(self, trial: Any, errored: bool) -> None:
        key = trial_name(trial)
        if key in self.done:
            return
        tid = self._trial(trial)
        state, value, attrs = trial_outcome(self.cfg, trial.last_result or {}, errored)
        for k, v in attrs.items():
            self.storage.set_trial_user_attr(tid, k, v)
        self.storage.set_trial_state_values(tid, state, None if value is None else [float(value)])
        self.done.add(key)

    @_observer
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, errored=False)

    @_observer
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, errored=True)

    @_observer
    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """Once, at the first step: a resumed sweep's trials that had ended before the driver stopped, but after the
        journal was last written (on S3 it is copied every MIRROR_EVERY_S), are closed now, as they ended (value,
        state, stop reason and last epoch), not left RUNNING until the sweep ends. Tune reports nothing more of
        them."""
        if self.reconciled:
            return
        self.reconciled = True
        ended = [t for t in trials if t.status in ("TERMINATED", "ERROR") and trial_name(t) not in self.done]
        for trial in ended:
            result = trial.last_result or {}
            if self.cfg.train.metric in result and "epoch" in result:
                self.on_trial_result(iteration, trials, trial, result)
            self._finish(trial, errored=trial.status == "ERROR")
        if ended and self.remote is not None:
            self._mirror()

    @_observer
    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.remote is not None and time.monotonic() - self.mirrored >= MIRROR_EVERY_S:
            self._mirror()

    @_observer
    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.remote is not None:
            self._mirror()

    def _mirror(self) -> None:
        write_bytes(*self.remote, self.path.read_bytes())
        self.mirrored = time.monotonic()


def finish_journal(cfg: ExperimentConfig, study: optuna.Study, out: Path) -> None:
    """End of a sweep: the live journal must be the study optuna_res.pkl holds (same trials by `trial_id`: params,
    state, value, intermediate values, stop reason). It is when the driver saw every trial from start to end; after a
    driver crash a trial can be lost between Tune's snapshots and run again under a new id. Then (and only then) the
    journal is rebuilt from the results into `out` (the sweep copies it over the live one)."""
    exp, fs = experiment_dir(cfg)
    data = read_bytes(fs, f"{exp}/{JOURNAL}")
    diff = ["no live journal"] if data is None else study_differences(journal_study(data), study)
    if diff:
        log.warning("%s rebuilt from the results (%s)", JOURNAL, "; ".join(diff[:3]) + ("; ..." if diff[3:] else ""))
        write_journal(study, out / JOURNAL)


# ---------------------------------------------------------------------------------------------------------------------
# MLflow and W&B


def chartable(result: dict[str, Any]) -> dict[str, float]:
    """A report's values as numbers, flattened (`a/b`): those `float()` takes; the others are not charted."""
    out = {}
    for key, value in flatten_dict(result).items():
        with contextlib.suppress(TypeError, ValueError):
            out[key] = float(value)
    return out


class MLflowSweep(LoggerCallback):
    """One MLflow run per trial (experiment = sweep.name; MLFLOW_TRACKING_URI and MLflow's own token variables
    honoured, never stored), each nested under one run for the sweep, which `log_summary` finishes with the best
    params and the test score. A trial's params are logged when it starts, its metrics once per report (one batch:
    metric by metric costs a second per epoch on a SQLite store). A resumed sweep keeps its sweep run and each trial's
    run (Tune's callback state)."""

    def __init__(self, cfg: ExperimentConfig):
        self.name, self.where = cfg.sweep.name, location(cfg, experiment=True)
        self.parent: str | None = None
        self.runs: dict[str, str] = {}  # trial_id -> MLflow run id, restored on resume

    def setup(self, *args: Any, **kwargs: Any) -> None:
        client = mlflow_client()
        known = client.get_experiment_by_name(self.name)
        self.experiment = known.experiment_id if known else client.create_experiment(self.name)
        if self.parent is None:
            self.parent = self._sweep_run(client, {})

    def _sweep_run(self, client: Any, tags: dict[str, str]) -> str:
        tags = {"lorahpo.experiment": self.where, "lorahpo.role": "sweep", **tags}
        return client.create_run(self.experiment, run_name=Path(self.where).name, tags=tags).info.run_id

    def _follow_finished(self, client: Any) -> None:
        """A new trial under a finished sweep run: the sweep was given more trials (--extend). The finished run keeps
        the numbers it was finished with; a new run, linked both ways, takes the new trials and the new summary. (A
        --resume of a finished sweep starts no trial, so it opens none.) A sweep run deleted in MLflow is not linked."""
        import mlflow  # optional dependency (lorahpo[mlflow]): checked by check_loggers

        try:
            run = client.get_run(self.parent)
            finished, linkable = run.info.status == "FINISHED", run.info.lifecycle_stage == "active"
        except mlflow.exceptions.MlflowException:  # deleted for good
            finished, linkable = True, False
        if finished:
            new = self._sweep_run(client, {"lorahpo.extends": self.parent} if linkable else {})
            if linkable:
                client.set_tag(self.parent, "lorahpo.extended_by", new)
            self.parent = new

    def log_trial_start(self, trial: Any) -> None:
        from mlflow.entities import Param  # optional dependency (lorahpo[mlflow]): checked by check_loggers

        client, key = mlflow_client(), trial_name(trial)
        if key not in self.runs:  # a resumed trial continues its run
            self._follow_finished(client)
            tags = {"mlflow.parentRunId": self.parent, "lorahpo.experiment": self.where, "trial_name": str(trial)}
            self.runs[key] = client.create_run(self.experiment, run_name=str(trial), tags=tags).info.run_id
        client.log_batch(self.runs[key], params=[Param(k, str(v)) for k, v in flatten_dict(trial.config).items()])

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        from mlflow.entities import Metric  # optional dependency (lorahpo[mlflow]): checked by check_loggers

        step, now = int(result.get("training_iteration", iteration)), int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in chartable(result).items()]
        mlflow_client().log_batch(self.runs[trial_name(trial)], metrics=metrics)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        mlflow_client().set_terminated(self.runs[trial_name(trial)], "FAILED" if failed else "FINISHED")

    def get_state(self) -> dict[str, Any]:
        return {"parent": self.parent, "runs": dict(self.runs)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.parent, self.runs = state["parent"], state["runs"]


def mlflow_client() -> Any:
    """MLflow's client for MLFLOW_TRACKING_URI (it keeps one store per URI: cheap to make per call)."""
    import mlflow  # optional dependency (lorahpo[mlflow]): checked by check_loggers

    return mlflow.MlflowClient()


def wandb_run(group: str, **kwargs: Any) -> Any:
    """A new W&B run in the sweep's group, in WANDB_PROJECT (W&B's own variable; Ray's reads WANDB_PROJECT_NAME), else
    `lorahpo`: silent and without capturing the driver's console (the run's files hold what W&B would print)."""
    import wandb  # optional dependency (lorahpo[wandb]): checked by check_loggers

    settings = wandb.Settings(silent=True, console="off")
    project = os.environ.get("WANDB_PROJECT") or "lorahpo"
    return wandb.init(project=project, group=group, reinit="create_new", resume="allow", settings=settings, **kwargs)


class WandbSweep(LoggerCallback):
    """One W&B run per trial (`wandb_run`; its id is Tune's trial id, so a resumed trial continues its run), grouped
    under the sweep's name; WANDB_MODE=offline, WANDB_DIR, and the API key from W&B's own login or WANDB_API_KEY (never
    stored). The runs live in the driver's process."""

    def __init__(self, cfg: ExperimentConfig):
        self.group = cfg.sweep.name
        self.runs: dict[str, Any] = {}  # trial_id -> open run

    def __getstate__(self) -> dict[str, Any]:  # pickled into the experiment (tuner.pkl): no open runs
        return {"group": self.group, "runs": {}}

    def log_trial_start(self, trial: Any) -> None:
        if trial.trial_id not in self.runs:  # not again when a paused trial goes on
            run = wandb_run(self.group, job_type="trial", id=trial.trial_id, name=str(trial), config=trial.config)
            self.runs[trial.trial_id] = run

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        self.runs[trial.trial_id].log(chartable(result))

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        self.runs.pop(trial.trial_id).finish(exit_code=int(failed))


def log_summary(cfg: ExperimentConfig, summary: dict[str, Any]) -> None:
    """The end of a sweep on the trackers' sweep level: best params, best value and the test score onto MLflow's sweep
    run (then finished), and a `summary` run in the W&B group (one per finalisation: an extended sweep has one more,
    its config says how many trials it summarises)."""
    flat = {f"best.{k}": v for k, v in summary["best_params"].items()}
    metrics = {"best_value": summary["best_value"], **summary["test"]}
    if "mlflow" in cfg.sweep.loggers:
        import mlflow  # optional dependency (lorahpo[mlflow]): checked by check_loggers

        where = location(cfg, experiment=True)
        runs = mlflow.search_runs(
            experiment_names=[cfg.sweep.name],
            filter_string=f"tags.`lorahpo.experiment` = '{where}' and tags.`lorahpo.role` = 'sweep' "
            "and attributes.status = 'RUNNING'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
            output_format="list",
        )
        if runs:
            client = mlflow_client()
            run_id = runs[0].info.run_id
            for k, v in {**flat, "best_trial": summary["best_trial"]}.items():
                client.log_param(run_id, k, v)
            for k, v in metrics.items():
                client.log_metric(run_id, k, float(v))
            client.set_terminated(run_id, "FINISHED")
    if "wandb" in cfg.sweep.loggers:
        config = {**flat, "best_trial": summary["best_trial"], "num_trials": summary["num_trials"]}
        run = wandb_run(cfg.sweep.name, job_type="summary", name=f"{cfg.sweep.name}-summary", config=config)
        run.summary.update(metrics)
        run.finish()
