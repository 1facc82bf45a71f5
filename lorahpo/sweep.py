"""The story of a run, top to bottom.

prepare   check everything that can be checked before training (storage, experiment, resources, dtype, model),
          read + split + tokenize the data once, and plan the sweep (what --dry-run prints)
run       start (or join) Ray, check the cluster, write provenance, run the Tune sweep (new or resumed)
finalise  tables and study, the best trial's checkpoint scored ONCE on the untouched test split, best/ exported,
          summary and plots: everything staged locally, then copied to storage
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray.tune import ResultGrid

from lorahpo.checks import (
    check_cluster,
    check_dtype,
    check_experiment,
    check_model_fit,
    check_resources,
    cpu_has_bf16,
    cuda_bf16,
    local_nodes,
)
from lorahpo.config import METRICS, ExperimentConfig, config_yaml, to_dict
from lorahpo.data import TaskData, load_task, split_rows
from lorahpo.module import evaluate
from lorahpo.plots import write_plots
from lorahpo.prefix import plan_prefix, prepare_prefix
from lorahpo.repro import manifest
from lorahpo.results import (
    best_checkpoint,
    best_row,
    make_summary,
    row_config,
    trial_id,
    write_summary,
    write_tables,
)
from lorahpo.sources import load_model_config, load_tokenizer
from lorahpo.storage import (
    check_storage,
    display,
    exists,
    experiment_dir,
    location,
    storage_failure,
    upload,
    upload_dir,
)
from lorahpo.trainable import CKPT_NAME, export_best, load_trained, use_gpu
from lorahpo.tuner import describe, forwarded_env, make_tuner, restore_tuner

log = logging.getLogger(__name__)


def prepare(
    cfg: ExperimentConfig,
    resume: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    dry_run: bool = False,
) -> tuple[TaskData, dict[str, Any]]:
    """Validate everything and tokenize the data once; return the data and the plan (--dry-run prints it).
    Without `address` the sweep starts its own Ray on this machine, whose resources can be checked now; a dry run
    with `address` asks the cluster."""
    check_storage(cfg)  # first: everything after it reads the storage path
    check_experiment(cfg, resume, overwrite)
    if address is None:
        check_resources(cfg, local_nodes())
    elif dry_run:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        try:
            check_cluster(cfg)
        finally:
            ray.shutdown()
    check_dtype(cfg, cpu_has_bf16(), cuda_bf16())
    model_config = load_model_config(cfg.model)
    check_model_fit(cfg, model_config)
    data = load_task(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    plan = {"config": to_dict(cfg), **describe(cfg), "data": data.info, "resume": resume, "overwrite": overwrite}
    prefix = plan_prefix(cfg, model_config, data)
    plan["prefix_cache"] = (
        f"inputs of layers {list(prefix.wanted)} of {prefix.layers}: {prefix.nbytes() / 1e9:.3f} GB "
        "(in Ray's object store if it fits, else on each node's local disk; checked when the sweep starts)"
        if prefix is not None
        else "off"
    )
    return data, plan


def run(
    cfg: ExperimentConfig,
    data: TaskData,
    plan: dict[str, Any],
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the sweep on a local or existing Ray cluster, then finalise it; returns the summary."""
    meta = manifest(cfg, data.info, plan={k: v for k, v in plan.items() if k != "config"})
    exp, fs = experiment_dir(cfg)
    # "local" starts a fresh local Ray even if a stale one from a killed run is still up (plain init would join it).
    ray.init(address=address or "local", log_to_driver=True, configure_logging=False)
    try:
        check_cluster(cfg)  # before anything is written, so a failed check leaves no half-made sweep
        prefix, spec = None, plan_prefix(cfg, load_model_config(cfg.model), data)
        if spec is not None:  # sized and placed (or refused) before anything is written; built before any trial
            prefix, meta["prefix_cache"] = prepare_prefix(cfg, data, spec, forwarded_env())
        if overwrite and exists(fs, exp):
            log.warning("--overwrite: deleting the earlier experiment at %s", display(cfg, experiment=True))
            fs.delete_dir(exp)
        if not resume:  # provenance before any training; the config is what --resume and load_experiment read back
            provenance = {
                "config.yaml": config_yaml(cfg),
                "manifest.json": json.dumps(meta, indent=2, default=str),
                "split.json": json.dumps(split_rows(data)),
            }
            upload(provenance, exp, fs)
        tuner = restore_tuner(cfg, data, prefix) if resume else make_tuner(cfg, data, prefix=prefix)
        try:
            return finalise(cfg, tuner.fit(), data, meta)
        except Exception:  # StorageWatch's error (Tune wraps it), or storage gone while results are written
            error = storage_failure(cfg)
            if error is None:
                raise
            raise error from None
    finally:
        ray.shutdown()


def finalise(cfg: ExperimentConfig, grid: ResultGrid, data: TaskData, meta: dict[str, Any]) -> dict[str, Any]:
    """Every output of a finished sweep, into the experiment directory (local or S3); returns the summary."""
    exp, fs = experiment_dir(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        df, study = write_tables(cfg, grid, out)
        best = best_row(df, cfg)
        best_cfg = row_config(cfg, best)
        with best_checkpoint(grid, best["trial_id"], cfg).as_directory() as d:
            module = load_trained(best_cfg, data, Path(d) / CKPT_NAME)
        export_best(module, best_cfg, data, out / "best")
        # the test split: scored once, here, for the chosen trial only
        test = evaluate(module, data.test, best_cfg, data.tokenizer, use_gpu(cfg)) if len(data.test) else {}
        summary = make_summary(cfg, df, best, test, len(data.test), location(cfg, experiment=True))
        if meta.get("prefix_cache"):
            summary["prefix_cache"] = {**meta["prefix_cache"], **cache_check(cfg, grid, best, module, data)}
        write_summary(summary, cfg, out)
        (out / "manifest.json").write_text(json.dumps({**meta, "summary": summary}, indent=2, default=str))
        write_plots(study, df, cfg, out)
        upload_dir(out, exp, fs)
    return summary


def cache_check(cfg: ExperimentConfig, grid: ResultGrid, best: Any, module: Any, data: TaskData) -> dict[str, Any]:
    """The prefix cache's faithfulness, on the result that matters: the best checkpoint's val metrics through the full
    model against those its trial reported from cached states (equal up to float noise)."""
    best_cfg = row_config(cfg, best)
    chosen = best_checkpoint(grid, best["trial_id"], cfg).path
    result = next(r for r in grid if trial_id(r) == best["trial_id"])
    cached = next(m for c, m in result.best_checkpoints if c.path == chosen)
    full = evaluate(module, data.val, best_cfg, data.tokenizer, use_gpu(cfg))
    diff = {k: full[k] - float(cached[f"val_{k}"]) for k in METRICS}
    worst = max(abs(v) for v in diff.values())
    log.info(
        "prefix cache check: the best trial's val metrics through the full model differ from the cached run's by at "
        "most %.2g (%s)",
        worst,
        ", ".join(f"{k} {v:+.2g}" for k, v in diff.items()),
    )
    return {
        "best_trial_cut": cached.get("prefix_cut"),
        "val_cached": {k: float(cached[f"val_{k}"]) for k in METRICS},
        "val_full_model": full,
        "max_abs_diff": worst,
    }
