"""Everything written after (or read back from) a sweep: results.parquet, per-trial metrics.csv, optuna_res.pkl and a
journal copy of the study, best/ adapter, the one test-split score, plots, summary.json/.md, manifest.json."""

from __future__ import annotations

import json
import logging
import math
import pickle
import tempfile
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pyarrow.fs
from ray import tune
from ray.tune import ExperimentAnalysis, ResultGrid

from lorahpo.config import ExperimentConfig, apply_overrides, config_from_yaml, tuning_metric
from lorahpo.data import TaskData
from lorahpo.search import distribution, experiment_dir, filesystem

log = logging.getLogger(__name__)
EPOCH_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_f1",
    "val_fbeta",
    "best_epoch",
    "early_stopped",
    "epoch_time_s",
]


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def load_experiment(path: str, s3_endpoint: str | None = None) -> tuple[ResultGrid, pd.DataFrame]:
    """A finished or interrupted sweep, from its experiment directory alone, as a ResultGrid and a DataFrame
    (one row per trial; `results.parquet` when the sweep finished, else rebuilt from the trials' logs)."""
    inner, fs = filesystem(path, s3_endpoint)  # built like the sweep's own (timeouts, credential chain)
    grid = ResultGrid(ExperimentAnalysis(inner, storage_filesystem=fs))
    parquet = f"{inner}/results.parquet"
    if fs.get_file_info(parquet).type == pyarrow.fs.FileType.File:
        with fs.open_input_file(parquet) as f:
            return grid, pd.read_parquet(f)
    with fs.open_input_stream(f"{inner}/config.yaml") as f:  # written by the driver before the first trial
        cfg = config_from_yaml(f.read().decode())
    return grid, trials_frame(grid, cfg)


# ---------------------------------------------------------------------------------------------------------------------
# One row per trial


def _stop_reason(cfg: ExperimentConfig, result: tune.Result, epochs: int) -> str:
    if result.error is not None:
        return "error"
    last = result.metrics or {}
    if last.get("early_stopped"):
        return "early_stop"
    if epochs >= cfg.train.max_epochs:
        return "max_epochs"
    return "asha_stop" if cfg.sweep.scheduler == "asha" else "incomplete"


def ordered(grid: ResultGrid) -> list[tune.Result]:
    """Trials in creation order (directory names start with the searcher's counter, see search.trial_dirname)."""
    return sorted((r for r in grid), key=lambda r: Path(r.path).name)


VAL_METRICS = ("val_fbeta", "val_f1", "val_accuracy", "val_loss")


def trials_frame(grid: ResultGrid, cfg: ExperimentConfig) -> pd.DataFrame:
    """One row per trial: params, the tuning metric, val metrics at the best and at the last epoch, epochs, stop
    reason, wall time, best checkpoint path."""
    metric = tuning_metric(cfg)
    rows = []
    for r in ordered(grid):
        m = r.metrics or {}
        hist = _history(r)
        epochs = int(m.get("epoch", 0))
        at_best = hist[hist["epoch"] == m["best_epoch"]].iloc[-1].to_dict() if "best_epoch" in m else {}
        best = r.get_best_checkpoint(cfg.train.metric, cfg.train.mode) if r.best_checkpoints else None
        rows.append(
            {
                "trial_id": Path(r.path).name,
                **{f"param.{k}": v for k, v in r.config.items()},
                metric: m.get(metric, math.nan),
                "best_epoch": m.get("best_epoch"),
                **{f"best_epoch_{k}": at_best.get(k, math.nan) for k in VAL_METRICS},
                **{f"last_{k}": m.get(k, math.nan) for k in VAL_METRICS},
                "epochs": epochs,
                "stop_reason": _stop_reason(cfg, r, epochs),
                "wall_time_s": m.get("time_total_s", math.nan),
                "trainable_params": m.get("trainable_params"),
                "checkpoint": best.path if best is not None else None,
                "trial_path": r.path,
                "error": str(r.error).splitlines()[0] if r.error is not None else None,
            }
        )
    return pd.DataFrame(rows)


def best_row(df: pd.DataFrame, cfg: ExperimentConfig) -> pd.Series:
    """The best trial: highest (or lowest) tuning metric; ties go to the earlier trial (as Optuna's best_trial)."""
    ok = df[df[tuning_metric(cfg)].notna()]
    if ok.empty:
        raise RuntimeError("no trial reported a metric; see the trials' error.txt files")
    return ok.sort_values(tuning_metric(cfg), ascending=cfg.train.mode == "min", kind="stable").iloc[0]


def optuna_study(grid: ResultGrid, cfg: ExperimentConfig) -> optuna.Study:
    """Every trial as an Optuna trial (params, value = tuning metric, one intermediate value per epoch), so the
    predecessor's `pickle.load(...).best_trial` snippet and Optuna's plots work."""
    study = optuna.create_study(
        study_name=cfg.sweep.name, direction="maximize" if cfg.train.mode == "max" else "minimize"
    )
    dists = {k: distribution(s) for k, s in cfg.search.items()}
    for r in ordered(grid):
        m = r.metrics or {}
        hist = _history(r)
        params = {k: r.config[k] for k in dists if k in r.config}
        value = m.get(tuning_metric(cfg))
        state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
        inter = {int(e): float(v) for e, v in zip(hist.get("epoch", []), hist.get(cfg.train.metric, []))}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: dists[k] for k in params},
                value=value,
                state=state,
                intermediate_values=inter,
                user_attrs={
                    "trial_id": Path(r.path).name,
                    "epochs": int(m.get("epoch", 0)),
                    "stop_reason": _stop_reason(cfg, r, int(m.get("epoch", 0))),
                },
            )
        )
    return study


def _history(r: tune.Result) -> pd.DataFrame:
    df = r.metrics_dataframe
    return df if df is not None else pd.DataFrame()


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def write_results(cfg: ExperimentConfig, grid: ResultGrid, data: TaskData, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write every output into the experiment directory (local or S3) and return the summary."""
    from lorahpo.trainable import CKPT_NAME, evaluate, export_best, load_trained

    exp, fs = experiment_dir(cfg)
    metric = tuning_metric(cfg)
    df = trials_frame(grid, cfg)
    best = best_row(df, cfg)
    best_cfg = apply_overrides(cfg, {k.removeprefix("param."): v for k, v in best.items() if k.startswith("param.")})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        df.to_parquet(out / "results.parquet", index=False)
        for r in ordered(grid):
            hist = _history(r)
            (out / "trials" / Path(r.path).name).mkdir(parents=True)
            hist[[c for c in EPOCH_COLUMNS if c in hist]].to_csv(
                out / "trials" / Path(r.path).name / "metrics.csv", index=False
            )
        study = optuna_study(grid, cfg)
        with open(out / "optuna_res.pkl", "wb") as f:
            pickle.dump(study, f)
        write_journal(study, out / "optuna_journal.log")

        test: dict[str, float] = {}
        ckpt = grid_checkpoint(grid, best["trial_id"], cfg)
        with ckpt.as_directory() as d:
            module = load_trained(best_cfg, data, Path(d) / CKPT_NAME)
        export_best(module, best_cfg, data, out / "best")
        if len(data.test):  # scored once, here, for the chosen trial only
            test = evaluate(module, data.test, data.tokenizer, cfg.train.batch_size * 2)

        summary = {
            "experiment": f"s3://{exp}" if isinstance(fs, pyarrow.fs.S3FileSystem) else exp,
            "metric": metric,
            "num_trials": len(df),
            "stop_reasons": df["stop_reason"].value_counts().to_dict(),
            "trial_epochs": int(df["epochs"].sum()),
            "best_trial": best["trial_id"],
            "best_params": {k.removeprefix("param."): _plain(v) for k, v in best.items() if k.startswith("param.")},
            "best_value": float(best[metric]),
            "best_epoch": _plain(best["best_epoch"]),
            "test": test,
            "test_size": len(data.test),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "summary.md").write_text(summary_markdown(summary, df, cfg))
        (out / "manifest.json").write_text(json.dumps({**manifest, "summary": summary}, indent=2, default=str))
        from lorahpo.plots import write_plots

        write_plots(study, df, grid, cfg, out)
        pyarrow.fs.copy_files(str(out), exp, destination_filesystem=fs)
    return summary


def write_journal(study: optuna.Study, path: Path) -> None:
    """The study as Optuna's JSON-lines journal: safe to share and load (unlike a pickle). Load with
    `optuna.load_study(study_name=..., storage=JournalStorage(JournalFileBackend(path)))`, see `load_journal`."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(path)))
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage, to_storage=storage)


def load_journal(path: str | Path) -> optuna.Study:
    """Load the study written by `write_journal` (no pickle involved)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name=None, storage=storage)


def grid_checkpoint(grid: ResultGrid, trial_id: str, cfg: ExperimentConfig) -> tune.Checkpoint:
    r = next(r for r in grid if Path(r.path).name == trial_id)
    return r.get_best_checkpoint(cfg.train.metric, cfg.train.mode)


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def summary_markdown(s: dict[str, Any], df: pd.DataFrame, cfg: ExperimentConfig) -> str:
    params = "\n".join(
        f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in s["best_params"].items()
    )
    test = ", ".join(f"{k.removeprefix('test_')} {v:.4f}" for k, v in s["test"].items()) or "no test split"
    return (
        f"# Sweep `{cfg.sweep.name}`\n\n"
        f"- {s['num_trials']} trials, {s['trial_epochs']} trial-epochs; stop reasons: {s['stop_reasons']}\n"
        f"- best trial `{s['best_trial']}`: {s['metric']} = {s['best_value']:.4f} "
        f"(epoch {s['best_epoch']})\n"
        f"- test split ({s['test_size']} examples, scored once): {test}\n\n"
        f"| param | best value |\n|---|---|\n{params}\n"
    )


def print_summary(s: dict[str, Any]) -> None:
    print(f"\nResults: {s['experiment']}")
    print(f"  best trial {s['best_trial']}: {s['metric']} = {s['best_value']:.4f}")
    print(
        "  best params: "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s["best_params"].items())
    )
    if s["test"]:
        print("  test split: " + ", ".join(f"{k} {v:.4f}" for k, v in s["test"].items()))
    print(f"  {s['num_trials']} trials, {s['trial_epochs']} trial-epochs; stop reasons: {s['stop_reasons']}")
