"""Read and write a sweep's results (no model code): one row per trial (results.parquet), per-trial metrics.csv,
the study as optuna_res.pkl and as a journal (summary.json/.md: lorahpo/summary.py); and `load_experiment`, which
reads all of it back from local disk, NFS or S3, finished or interrupted."""

from __future__ import annotations

import io
import math
import pickle
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray import tune
from ray.tune import ExperimentAnalysis, ResultGrid

from lorahpo.config import VAL_METRICS, ExperimentConfig, apply_overrides, config_from_yaml, direction, tuning_metric
from lorahpo.reading import read_parquet
from lorahpo.schema import plain
from lorahpo.space import distribution
from lorahpo.storage import filesystem, read_bytes, read_text, trial_name, trial_number

JOURNAL = "optuna_journal.log"  # the live study, in the experiment directory (optuna-dashboard reads it)
# metrics.csv: one row per epoch, in this order.
EPOCH_COLUMNS = ["epoch", "train_loss", *VAL_METRICS, "best_epoch", "early_stopped", "epoch_time_s"]


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def load_experiment(path: str, s3_endpoint: str | None = None) -> tuple[ResultGrid, pd.DataFrame]:
    """A finished or interrupted sweep, from its experiment directory alone, as a ResultGrid and a DataFrame
    (one row per trial; `results.parquet` when the sweep finished, else rebuilt from the trials' logs)."""
    inner, fs = filesystem(path, s3_endpoint)  # built like the sweep's own (timeouts, credential chain)
    analysis = ExperimentAnalysis(inner, storage_filesystem=fs)
    grid = ResultGrid(analysis)
    parquet = read_bytes(fs, f"{inner}/results.parquet")
    if parquet is not None:
        return grid, read_parquet(parquet, f"{path}/results.parquet")
    cfg = config_from_yaml(read_text(fs, f"{inner}/config.yaml") or "")  # written by the driver before any trial
    return grid, trials_frame(grid, cfg, unfinished_trials(analysis))


def read_tables(path: str, s3_endpoint: str | None = None) -> dict[str, Any]:
    """A finished sweep without unpickling anything (safe on storage others can write): {"trials": results.parquet,
    "epochs": every trial's metrics.csv in one table with a trial_id column, "study": the Optuna journal}.
    `load_experiment` and optuna_res.pkl unpickle (Ray's experiment state, the study): use them on trusted storage."""
    inner, fs = filesystem(path, s3_endpoint)
    parquet = read_bytes(fs, f"{inner}/results.parquet")
    if parquet is None:
        raise FileNotFoundError(f"{path}/results.parquet: not a finished sweep (load_experiment reads unfinished ones)")
    trials = read_parquet(parquet, f"{path}/results.parquet")
    epochs = [
        pd.read_csv(io.BytesIO(read_bytes(fs, f"{inner}/trials/{t}/metrics.csv") or b"epoch\n")).assign(trial_id=t)
        for t in trials["trial_id"]
    ]
    study = journal_study(read_bytes(fs, f"{inner}/{JOURNAL}") or b"")
    return {"trials": trials, "epochs": pd.concat(epochs, ignore_index=True), "study": study}


def journal_study(journal: bytes) -> optuna.Study:
    """The study of a journal's bytes (read from storage), held in memory: the journal reader wants a local file."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, JOURNAL).write_bytes(journal)
        stored = JournalStorage(JournalFileBackend(str(Path(tmp, JOURNAL))))
        name = optuna.study.get_all_study_names(stored)[0]
        memory = optuna.storages.InMemoryStorage()
        optuna.copy_study(from_study_name=name, from_storage=stored, to_storage=memory)
    return optuna.load_study(study_name=name, storage=memory)


def load_journal(path: str | Path) -> optuna.Study:
    """Load the study of a journal (the live `optuna_journal.log`, or one `write_journal` wrote; no pickle)."""
    return optuna.load_study(study_name=None, storage=JournalStorage(JournalFileBackend(str(path))))


# ---------------------------------------------------------------------------------------------------------------------
# One row per trial


def ordered(results: Iterable[tune.Result]) -> list[tune.Result]:
    """Trials in creation order (directory names start with the searcher's counter)."""
    return sorted(results, key=lambda r: trial_number(trial_name(r)))


def history(result: tune.Result) -> pd.DataFrame:
    """A trial's per-epoch reports."""
    df = result.metrics_dataframe
    return df if df is not None else pd.DataFrame()


def unfinished_trials(analysis: ExperimentAnalysis) -> set[str]:
    """Trials of an interrupted sweep that had not ended (pending, running or paused when it stopped): the statuses
    Tune recorded, which the experiment's analysis holds (a Result carries none)."""
    return {Path(t.path).name for t in analysis.trials if t.status not in ("TERMINATED", "ERROR")}


def error_line(error: BaseException) -> str:
    """The line that says what went wrong: the exception at the end of a trial's (Ray-wrapped, coloured) traceback."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def stop_reason(cfg: ExperimentConfig, metrics: dict[str, Any], errored: bool, unfinished: bool = False) -> str:
    """Why a trial ended, from its last report; the same rule for the tables, the pickle and the live journal."""
    if errored:
        return "error"
    if unfinished:
        return "unfinished"
    if metrics.get("early_stopped"):
        return "early_stop"
    if int(metrics.get("epoch", 0)) >= cfg.train.max_epochs:
        return "max_epochs"
    return "asha_stop" if cfg.sweep.scheduler == "asha" else "incomplete"


def trials_frame(
    results: Iterable[tune.Result], cfg: ExperimentConfig, unfinished: set[str] = frozenset()
) -> pd.DataFrame:
    """One row per trial: params, the tuning metric, val metrics at the best and at the last epoch, epochs, stop
    reason, wall time, best checkpoint path. `unfinished`: trials an interrupted sweep had not ended."""
    metric = tuning_metric(cfg)
    rows = []
    for r in ordered(results):
        m = r.metrics or {}
        hist = history(r)
        epochs = int(m.get("epoch", 0))
        at_best = hist[hist["epoch"] == m["best_epoch"]].iloc[-1].to_dict() if "best_epoch" in m else {}
        best = r.get_best_checkpoint(cfg.train.metric, cfg.train.mode) if r.best_checkpoints else None
        rows.append(
            {
                "trial_id": trial_name(r),
                **{f"param.{k}": v for k, v in r.config.items()},
                metric: m.get(metric, math.nan),
                "best_epoch": m.get("best_epoch"),
                **{f"best_epoch_{k}": at_best.get(k, math.nan) for k in VAL_METRICS},
                **{f"last_{k}": m.get(k, math.nan) for k in VAL_METRICS},
                "epochs": epochs,
                "stop_reason": stop_reason(cfg, m, r.error is not None, trial_name(r) in unfinished),
                "wall_time_s": m.get("time_total_s", math.nan),
                "trainable_params": m.get("trainable_params"),
                "checkpoint": best.path if best is not None else None,
                "trial_path": r.path,
                "error": error_line(r.error) if r.error is not None else None,
            }
        )
    return pd.DataFrame(rows)


def best_row(df: pd.DataFrame, cfg: ExperimentConfig) -> pd.Series | None:
    """The best trial: highest (or lowest) tuning metric; ties go to the earlier trial (as Optuna's best_trial).
    None when no trial reported a metric (every trial failed)."""
    ok = df[df[tuning_metric(cfg)].notna()]
    if ok.empty:
        return None
    return ok.sort_values(tuning_metric(cfg), ascending=cfg.train.mode == "min", kind="stable").iloc[0]


def row_params(row: pd.Series) -> dict[str, Any]:
    """A trial's params ({dotted key: value}) from its results row."""
    return {k.removeprefix("param."): plain(v) for k, v in row.items() if k.startswith("param.")}


def row_config(cfg: ExperimentConfig, row: pd.Series) -> ExperimentConfig:
    """The full config a trial ran with (the base config plus its params)."""
    return apply_overrides(cfg, row_params(row))


def best_checkpoint(grid: ResultGrid, trial: str, cfg: ExperimentConfig) -> tune.Checkpoint:
    """The checkpoint of a trial's best epoch (by the per-epoch metric)."""
    result = next(r for r in grid if trial_name(r) == trial)
    return result.get_best_checkpoint(cfg.train.metric, cfg.train.mode)


def study_params(cfg: ExperimentConfig, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial's searched params and their Optuna distributions (keys outside the search space left out)."""
    dists = {k: distribution(s) for k, s in cfg.search.items()}
    params = {k: config[k] for k in dists if k in config}
    return params, {k: dists[k] for k in params}


def trial_outcome(
    cfg: ExperimentConfig, metrics: dict[str, Any], errored: bool
) -> tuple[optuna.trial.TrialState, float | None, dict[str, Any]]:
    """(state, value, user attrs) of a finished trial from its last report. The value is the tuning metric (a running
    best), as the searcher is told: an ASHA-stopped trial is COMPLETE with it, its stop reason a user attr."""
    value = metrics.get(tuning_metric(cfg))
    state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
    epochs = int(metrics.get("epoch", 0))
    return state, value, {"epochs": epochs, "stop_reason": stop_reason(cfg, metrics, errored)}


def optuna_study(results: Iterable[tune.Result], cfg: ExperimentConfig) -> optuna.Study:
    """Every trial as an Optuna trial (params, value = tuning metric, one intermediate value per epoch), so the
    predecessor's `pickle.load(...).best_trial` snippet and Optuna's plots work. The live journal
    (tracking.LiveStudy) builds the same trials from the same helpers while the sweep runs."""
    study = optuna.create_study(study_name=cfg.sweep.name, direction=direction(cfg))
    for r in ordered(results):
        hist = history(r)
        params, dists = study_params(cfg, r.config)
        state, value, attrs = trial_outcome(cfg, r.metrics or {}, r.error is not None)
        inter = {int(e): float(v) for e, v in zip(hist.get("epoch", []), hist.get(cfg.train.metric, []))}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=dists,
                value=value,
                state=state,
                intermediate_values=inter,
                user_attrs={"trial_id": trial_name(r), **attrs},
            )
        )
    return study


COMPARED = ("params", "distributions", "state", "values", "intermediate_values", "user_attrs")
"""What two studies of one sweep must agree on for each trial."""


def study_differences(a: optuna.Study, b: optuna.Study) -> list[str]:
    """How two studies of the same sweep differ, trial by trial (matched by the `trial_id` user attr): params,
    state, value, intermediate values, user attrs. Empty when they are the same study."""

    def view(study: optuna.Study) -> dict[str, tuple]:
        return {str(t.user_attrs.get("trial_id")): tuple(getattr(t, k) for k in COMPARED) for t in study.trials}

    va, vb = view(a), view(b)
    out = [f"{k}: only in one study" for k in sorted(set(va) ^ set(vb))]
    out += [f"{k}: differs" for k in sorted(set(va) & set(vb)) if va[k] != vb[k]]
    if len(a.trials) != len(va) or len(b.trials) != len(vb):
        out.append("a trial_id appears twice")
    if a.directions != b.directions:
        out.append("directions differ")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Writing (into a local staging directory; the sweep copies it to storage)


def write_tables(cfg: ExperimentConfig, grid: ResultGrid, out: Path) -> tuple[pd.DataFrame, optuna.Study]:
    """results.parquet, trials/<id>/metrics.csv and optuna_res.pkl; returns the table and study. (The journal was
    written live, by tracking.LiveStudy; tracking.finish_journal checks it against this study.)"""
    df = trials_frame(grid, cfg)
    df.to_parquet(out / "results.parquet", index=False)
    for r in ordered(grid):
        hist = history(r)
        (out / "trials" / trial_name(r)).mkdir(parents=True)
        hist[[c for c in EPOCH_COLUMNS if c in hist]].to_csv(
            out / "trials" / trial_name(r) / "metrics.csv", index=False
        )
    study = optuna_study(grid, cfg)
    with open(out / "optuna_res.pkl", "wb") as f:
        pickle.dump(study, f)
    return df, study


def write_journal(study: optuna.Study, path: Path) -> None:
    """The study as Optuna's JSON-lines journal: safe to share and load (unlike a pickle); see `load_journal`."""
    storage = JournalStorage(JournalFileBackend(str(path)))
    copy = optuna.create_study(storage=storage, study_name=study.study_name, directions=study.directions)
    copy.add_trials(study.trials)  # what optuna.copy_study does, from the study alone (its storage is not public)
