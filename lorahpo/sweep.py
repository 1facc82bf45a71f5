"""The story of a run, top to bottom.

prepare   check everything that can be checked before training (the config's points, storage, experiment,
          resources, dtype, model), read + split + tokenize the data once (on --resume: the same data as before),
          and plan the sweep (what --dry-run prints)
run       start (or join) Ray, check the cluster, hold the experiment directory (lorahpo/owner.py: a second driver
          is refused), write provenance, run the Tune sweep (new or resumed); an interrupted sweep stops here, its
          state kept for --resume
finalise  tables and study; for the best trial, on a worker with a trial's resources: its checkpoint scored
          ONCE on the untouched test split (with a bootstrap interval over its examples) and exported as best/;
          summary and plots; staged, then copied to storage
final     with final.seeds = k > 0: the best config and the baseline re-trained with k fresh seeds each, as their own
          Tune experiment in the sweep's directory, each run's best-val checkpoint scored once on the test split; the
          summary gains the `final` block (lorahpo/final.py). `--final` runs this step alone on a finished sweep.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray.tune import ResultGrid

from lorahpo.checks import (
    check_cluster,
    check_dtype,
    check_experiment,
    check_extend,
    check_finished,
    check_model_fit,
    check_points,
    check_resources,
    check_same_data,
    local_nodes,
)
from lorahpo.config import METRICS, ExperimentConfig, config_yaml, to_dict
from lorahpo.data import TaskData, load_task, split_rows
from lorahpo.errors import Interrupted, SweepFailed, UserError
from lorahpo.final import describe as describe_final
from lorahpo.final import final_block, fit_runs, make_plan, score_runs, trial_seeds
from lorahpo.owner import claim, hold, wipe
from lorahpo.plots import write_final_plot, write_plots
from lorahpo.prefix import ORDER, noise_rtol, plan_prefix, prepare_prefix
from lorahpo.reading import read_parquet
from lorahpo.repro import cpu_has_bf16, cuda_bf16, git_state, hardware, manifest, trial_task_options, versions
from lorahpo.results import best_checkpoint, best_row, row_config, write_tables
from lorahpo.sources import load_model_config, load_tokenizer
from lorahpo.stats import TEST_METRICS
from lorahpo.storage import (
    check_storage,
    display,
    experiment_dir,
    location,
    read_bytes,
    read_json,
    storage_failure,
    trial_name,
    upload,
    upload_dir,
)
from lorahpo.summary import best_statistics, make_summary, predictions_table, write_summary
from lorahpo.tracking import check_loggers, finish_journal, log_summary
from lorahpo.trainable import score_checkpoint
from lorahpo.tuner import describe, forwarded_env, make_tuner, restore_tuner

log = logging.getLogger(__name__)


def prepare(
    cfg: ExperimentConfig,
    resume: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    dry_run: bool = False,
    extend: bool = False,
) -> tuple[TaskData, dict[str, Any]]:
    """Validate everything and tokenize the data once; return the data and the plan (--dry-run prints it).
    Without `address` the sweep starts its own Ray on this machine, whose resources can be checked now; a dry run
    with `address` asks the cluster. `extend`: more trials for the finished sweep (its first N stand)."""
    check_points(cfg)
    check_storage(cfg)  # first of the storage checks: everything after it reads the storage path
    check_loggers(cfg)  # a named tracker that is not installed: one line now, not a crash mid-sweep
    ran = check_extend(cfg) if extend else check_experiment(cfg, resume, overwrite)
    data = _check_and_load(cfg, address, dry_run)
    if resume or extend:
        exp, fs = experiment_dir(cfg)
        flag = "--extend" if extend else "--resume"
        check_same_data(read_bytes(fs, f"{exp}/manifest.json"), data.info, display(cfg, experiment=True), flag)
    plan = {"config": to_dict(cfg), **describe(cfg), "final": describe_final(cfg, extend), "data": data.info}
    prefix = plan_prefix(cfg, load_model_config(cfg.model), data)
    plan["prefix_cache"] = (
        f"inputs of layers {list(prefix.wanted)} of {prefix.layers}: {prefix.nbytes() / 1e9:.3f} GB; placed when the "
        f"sweep starts (its nodes' room is known then) in the first that fits of {ORDER}; the choice and why are logged"
        if prefix is not None
        else "off"
    )
    if extend:  # trial numbers as the trial directories carry them (trial_<n>_<id>), from 1
        new = list(range(ran + 1, cfg.sweep.num_samples + 1))
        plan["extend"] = {"from": ran, "to": cfg.sweep.num_samples, "new_trials": new}
    return data, {**plan, "resume": resume, "overwrite": overwrite}


def _check_and_load(cfg: ExperimentConfig, address: str | None, dry_run: bool) -> TaskData:
    """The checks that need the nodes, the hardware or the model, then the data, read + split + tokenized once."""
    if address is None:
        check_resources(cfg, local_nodes())
    elif dry_run:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        try:
            check_cluster(cfg)
        finally:
            ray.shutdown()
    check_dtype(cfg, cpu_has_bf16(), cuda_bf16())
    check_model_fit(cfg, load_model_config(cfg.model))
    return load_task(cfg.data, load_tokenizer(cfg.model), cfg.seed)


def run(
    cfg: ExperimentConfig,
    data: TaskData,
    plan: dict[str, Any],
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    extend: bool = False,
) -> dict[str, Any]:
    """Run (resume, extend) the sweep on a local or existing Ray cluster, then finalise it; returns the summary."""
    exp, fs = experiment_dir(cfg)
    start_ray(address)
    with contextlib.ExitStack() as stack:
        stack.callback(ray.shutdown)
        check_cluster(cfg)  # before anything is written, so a failed check leaves no half-made sweep
        # the prefix cache: sized and placed (or refused) before anything is written, built before any trial
        prefix, spec, cache_info = None, plan_prefix(cfg, load_model_config(cfg.model), data), None
        if spec is not None:
            prefix, cache_info = prepare_prefix(cfg, data, spec, forwarded_env())
        # held by this driver from before its first write to the end (released before Ray shuts down)
        flag = "--resume" if resume else "--overwrite" if overwrite else "--extend" if extend else None
        held = stack.enter_context(hold(cfg, flag))
        if resume or extend:
            meta = read_json(fs, f"{exp}/manifest.json")
            entry = {"at": _now(), "flag": flag, "git": git_state(), "versions": versions(), "hardware": hardware()}
            if extend:  # the stored config takes the new size first: a killed extension continues with --resume
                done = plan["extend"]["from"]
                meta.setdefault("extensions", []).append({**entry, "from": done, "to": cfg.sweep.num_samples})
            meta.setdefault("resumes", []).append({**entry, "prefix_cache": cache_info})
            upload({"manifest.json": json.dumps(meta, indent=2, default=str)}, exp, fs)
            if extend:
                upload({"config.yaml": config_yaml(cfg)}, exp, fs)
            tuner = restore_tuner(cfg, data, prefix, retry=not extend)  # a finished sweep's failures stand
        else:
            meta = manifest(cfg, data.info, plan={k: v for k, v in plan.items() if k != "config"})
            meta["prefix_cache"] = cache_info
            tuner = start(cfg, data, meta, overwrite, prefix, held)
        with storage_errors(cfg):  # StorageWatch's error (Tune wraps it), or storage gone while results are written
            grid = tuner.fit()
            unfinished = cfg.sweep.num_samples - grid.num_terminated - grid.num_errors
            if unfinished > 0:
                raise Interrupted(
                    f"the sweep at {display(cfg, experiment=True)} stopped with {unfinished} of "
                    f"{cfg.sweep.num_samples} trials unfinished; no results were written: run the same command with "
                    + ("--resume in place of --extend" if extend else "--resume")
                    + " to continue it"
                )
            return finalise(cfg, grid, data, meta)


def start_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start a fresh local Ray: "local" even if a stale one from a killed run is
    still up (plain init would join it)."""
    ray.init(address=address or "local", log_to_driver=True, configure_logging=False)


@contextlib.contextmanager
def storage_errors(cfg: ExperimentConfig) -> Iterator[None]:
    """An error while storage is gone becomes its one-line cause (lorahpo.storage.storage_failure); others pass."""
    try:
        yield
    except (Interrupted, SweepFailed):
        raise
    except Exception:
        error = storage_failure(cfg)
        if error is None:
            raise
        raise error from None


def start(cfg: ExperimentConfig, data: TaskData, meta: dict[str, Any], overwrite: bool, prefix: Any, held: str) -> Any:
    """A new sweep in the directory this driver holds (`held`: its owner record): the earlier sweep deleted with
    --overwrite, the marker claimed, the Tuner built, then provenance written before any training. A failure here
    removes what this driver created, so no half-made sweep is left behind."""
    exp, fs = experiment_dir(cfg)
    if overwrite:
        wipe(cfg, keep=held)
    owner = json.dumps(
        {"name": cfg.sweep.name, "created": meta["created"], "host": socket.gethostname(), "pid": os.getpid()}
    )
    if not claim(fs, exp, owner):
        raise UserError(
            f"another driver started a sweep named {cfg.sweep.name!r} at {display(cfg, experiment=True)} at the "
            "same time; let it run (or --resume it later), or choose a new sweep.name"
        )
    try:
        tuner = make_tuner(cfg, data, prefix=prefix)
        provenance = {
            "config.yaml": config_yaml(cfg),
            "manifest.json": json.dumps(meta, indent=2, default=str),
            "split.json": json.dumps(split_rows(data)),
        }
        upload(provenance, exp, fs)
    except BaseException:
        fs.delete_dir(exp)
        raise
    return tuner


def finalise(cfg: ExperimentConfig, grid: ResultGrid, data: TaskData, meta: dict[str, Any]) -> dict[str, Any]:
    """Every output of a finished sweep, into the experiment directory (local or S3); returns the summary."""
    exp, fs = experiment_dir(cfg)
    where = location(cfg, experiment=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        df, study = write_tables(cfg, grid, out)
        finish_journal(cfg, study, out)  # the live optuna_journal.log is this study (else rebuilt into out)
        best = best_row(df, cfg)
        if best is None:  # every trial failed: the tables (with each trial's error) are the result
            summary = make_summary(cfg, df, None, {}, len(data.test), where)
            write_summary(summary, cfg, out)
            upload_dir(out, exp, fs)
            raise SweepFailed(
                f"every trial of the sweep failed (first error: {df['error'].dropna().iloc[0]}); each trial's error is "
                f"in {where}/results.parquet"
            )
        best_cfg = row_config(cfg, best)
        task = ray.remote(score_checkpoint).options(**trial_task_options(cfg), max_retries=0)
        ckpt = best_checkpoint(grid, best["trial_id"], cfg)
        scored = ray.get(task.remote(best_cfg, data, ckpt, exp, fs, export=True))
        summary = make_summary(cfg, df, best, scored["test"], len(data.test), where)
        summary["test_scored"] = 1 + len(meta.get("extensions", []))  # once per finalisation: the sweep, each extension
        summary["data"] = {k: data.info[k] for k in ("split_sizes", "leaks")}
        summary["best_export"] = scored["format"]
        summary["best_val_rescored"] = {f"val_{k}": v for k, v in scored["val"].items()}
        recorded = {f"val_{m}": float(best[f"best_epoch_val_{m}"]) for m in TEST_METRICS}  # what the search saw
        summary.update(best_statistics(cfg, data, recorded, scored["test"], scored["test_predictions"]))
        if scored["test"]:
            (out / "test_predictions.csv").write_text(predictions_table(data, scored["test_predictions"]))
        cache_info = (meta.get("resumes") or [{}])[-1].get("prefix_cache") or meta.get("prefix_cache")
        if cache_info:
            result = next(r for r in grid if trial_name(r) == best["trial_id"])
            cached = next(m for c, m in result.best_checkpoints if c.path == ckpt.path)  # that checkpoint's report
            summary["prefix_cache"] = {**cache_info, **cache_check(cached, scored["val"], cache_info)}
        write_summary(summary, cfg, out)
        (out / "manifest.json").write_text(json.dumps({**meta, "summary": summary}, indent=2, default=str))
        write_plots(study, df, cfg, out)
        upload_dir(out, exp, fs)  # a finished sweep from here on: a driver killed below continues with --final
    log_summary(cfg, summary)  # onto the trackers' sweep-level runs
    if summary.get("prefix_cache", {}).get("error"):  # loud, once the results are written
        raise SweepFailed(summary["prefix_cache"]["error"])
    if cfg.final.seeds > 0:
        plan = make_plan(cfg, summary["best_params"], trial_seeds(cfg, df), bool(meta.get("extensions")))
        summary = final(cfg, data, plan, summary)
    return summary


def cache_check(cached: dict[str, Any], full: dict[str, float], info: dict[str, Any]) -> dict[str, Any]:
    """The prefix cache's faithfulness, on the result that matters: the best checkpoint's val metrics through the full
    model (`full`, from the final scoring) against those its trial reported from cached states (`cached`: the report
    of that same checkpoint, so tied epochs cannot show a false difference). The val loss decides, within float noise
    (prefix.noise_rtol of the dtype and depth, times the loss or 1): it moves smoothly with the logits, while float
    noise can flip a near-tie prediction and move accuracy and F-scores by a whole example. Beyond it, `error`."""
    diff = {k: full[k] - float(cached[f"val_{k}"]) for k in METRICS}
    rtol = noise_rtol(info["dtype"], info["layers"])
    tol = rtol * max(1.0, abs(full["loss"]))
    log.info(
        "prefix cache check: the best trial's val metrics through the full model differ from the cached run's by %s "
        "(loss tolerance %.2g)",
        ", ".join(f"{k} {v:+.2g}" for k, v in diff.items()),
        tol,
    )
    out = {
        "best_trial_cut": cached.get("prefix_cut"),
        "val_cached": {k: float(cached[f"val_{k}"]) for k in METRICS},
        "val_full_model": full,
        "max_abs_diff": max(abs(v) for v in diff.values()),
        "loss_tolerance": tol,
        "passed": abs(diff["loss"]) <= tol,
    }
    if not out["passed"]:
        out["error"] = (
            f"prefix cache check: the best checkpoint's val loss is {full['loss']:.6f} through the full model but "
            f"{cached['val_loss']:.6f} from the cached states (cut {out['best_trial_cut']}), beyond float noise "
            f"({info['dtype']}, {info['layers']} layers: tolerance {tol:.2g}): its trials trained on wrong states. The "
            "results are written; run again with --overwrite (or sweep.prefix_cache=false)"
        )
    return out


def final(cfg: ExperimentConfig, data: TaskData, plan: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The final evaluation (lorahpo/final.py) on a connected Ray, then the summary with its `final` block, the
    per-seed plot and a manifest entry, copied to storage; returns the summary. Its wall time and place go next to
    the block, not into it (two evaluations of the same sweep give equal blocks)."""
    exp, fs = experiment_dir(cfg)
    start = time.perf_counter()
    records = score_runs(cfg, data, plan, fit_runs(cfg, data, plan))
    summary = {
        **summary,
        "final": final_block(cfg, plan, records, data),
        "final_run": {
            "experiment": f"{location(cfg, experiment=True)}/{plan['experiment']}",
            "wall_time_s": round(time.perf_counter() - start, 1),  # this driver's part, if it continued another's
        },
    }
    meta = read_json(fs, f"{exp}/manifest.json")
    runs = [{k: r[k] for k in ("role", "index", "seed", "trial_id")} for r in records]
    entry = {"at": _now(), "plan": {**plan, "runs": runs}, "git": git_state(), "versions": versions()}
    meta.setdefault("finals", []).append({**entry, "hardware": hardware()})
    meta["summary"] = summary
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_summary(summary, cfg, out)
        (out / "manifest.json").write_text(json.dumps(meta, indent=2, default=str))
        write_final_plot(summary["final"], out)
        upload_dir(out, exp, fs)
    return summary


def prepare_final(cfg: ExperimentConfig, address: str | None = None, dry_run: bool = False) -> tuple[TaskData, dict]:
    """--final: check the finished sweep at the address (its config up to final.*, its data and split), tokenize the
    data once as the sweep did, and plan the runs (what --final --dry-run prints)."""
    check_storage(cfg)
    check_finished(cfg)
    data = _check_and_load(cfg, address, dry_run)
    exp, fs = experiment_dir(cfg)
    where = display(cfg, experiment=True)
    manifest = read_bytes(fs, f"{exp}/manifest.json")
    check_same_data(manifest, data.info, where, flag="--final")
    summary = read_json(fs, f"{exp}/summary.json")
    trials = read_parquet(read_bytes(fs, f"{exp}/results.parquet") or b"", f"{where}/results.parquet")
    extended = bool(json.loads(manifest or b"{}").get("extensions"))
    return data, make_plan(cfg, summary["best_params"], trial_seeds(cfg, trials), extended)


def run_final(cfg: ExperimentConfig, data: TaskData, plan: dict[str, Any], address: str | None = None) -> dict:
    """--final: the final evaluation of a finished sweep (new, or continued where a killed driver left it)."""
    exp, fs = experiment_dir(cfg)
    start_ray(address)
    try:
        check_cluster(cfg)
        with hold(cfg, "--final"), storage_errors(cfg):  # storage gone while the runs train or results are written
            return final(cfg, data, plan, read_json(fs, f"{exp}/summary.json"))
    finally:
        ray.shutdown()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
