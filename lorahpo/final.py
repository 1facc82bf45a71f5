"""The final evaluation of a finished sweep: the best config re-trained with fresh seeds next to the untuned baseline,
each run's best-val checkpoint scored ONCE on the test split, and the statistics a paper reports.

plan   k seeds derived from the root seed and the run index, none equal to a seed a sweep trial used; the tuned and
       the baseline run i share seed i (paired): what the two configs draw alike cancels out of each difference (the
       head's init always; the LoRA init, batches, dropout masks only while the values they depend on are equal).
       The split stays the sweep's (the data are tokenized once, with the root seed). The baseline is the first
       `sweep.points_to_evaluate` entry, else the config's own values; when the best config IS the baseline, its runs
       are the tuned runs (not repeated) and the gain is 0 with interval [0, 0].
run    the runs as their own Ray Tune experiment inside the sweep's directory (`final_seeds<k>`): the sweep's trainable,
       resources, early stopping and checkpoints; FIFO (no ASHA), no searcher, so they never feed back into the search;
       parallel where slots allow; resumable (a killed driver + `--final` again continues them). Each run's best-val
       checkpoint is then scored on a worker with a trial's resources (trainable.score_checkpoint).
block  the summary's `final` block: per config and test metric {mean, std, values}, the paired gain with an interval
       over seed and test-set noise (stats.GAIN_METHOD).
       No wall time or path in it: two evaluations of the same sweep give equal blocks.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pandas as pd
import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import FIFOScheduler

from lorahpo.config import ExperimentConfig, apply_overrides, to_dict, tuning_metric
from lorahpo.data import TaskData
from lorahpo.errors import Interrupted, SweepFailed, UserError
from lorahpo.repro import trial_task_options
from lorahpo.results import error_line
from lorahpo.schema import flatten
from lorahpo.stats import (
    GAIN_METHOD,
    TEST_METRICS,
    gain_test_variance,
    paired_gain,
    spread,
)
from lorahpo.storage import display, experiment_dir, read_text, trial_name, upload
from lorahpo.trainable import score_checkpoint
from lorahpo.tuner import reopen, run_config, trainable, trial_with_env

ROLES = ("tuned", "baseline")
# The final runs' own stream of seeds from the root seed (numpy's SeedSequence: independent streams per spawn key),
# apart from the sweep's trials, which are seeded with the root seed itself.
SEED_STREAM = 0x66696E616C  # "final"


# ---------------------------------------------------------------------------------------------------------------------
# Plan


def final_seeds(root: int, k: int, used: set[int]) -> list[int]:
    """k distinct seeds from (root seed, run index), skipping any in `used` (the seeds the sweep's trials ran with)."""
    seeds: list[int] = []
    seen = set(used)  # a set: final.seeds may be large, and a list's `in` would make this quadratic
    index = 0
    while len(seeds) < k:
        state = np.random.SeedSequence(root, spawn_key=(SEED_STREAM, index)).generate_state(1)[0]
        seed = int(state) >> 1  # 31 bits: a valid seed for every library (and for repro.epoch_seed)
        if seed not in seen:
            seeds.append(seed)
            seen.add(seed)
        index += 1
    return seeds


def trial_seeds(cfg: ExperimentConfig, trials: pd.DataFrame) -> set[int]:
    """The seeds the sweep's trials ran with: the root seed (every trial's), and any a trial's params set."""
    used = {cfg.seed}
    if "param.seed" in trials:
        used |= {int(s) for s in trials["param.seed"].dropna()}
    return used


def baseline_params(cfg: ExperimentConfig) -> tuple[dict[str, Any], str]:
    """The untuned baseline as search-space values, and where they come from."""
    if cfg.sweep.points_to_evaluate:
        return dict(cfg.sweep.points_to_evaluate[0]), "sweep.points_to_evaluate[0]"
    values = flatten(to_dict(cfg))
    return {key: values[key] for key in cfg.search}, "the config's own values"


def experiment_name(cfg: ExperimentConfig, extended: bool = False) -> str:
    """The final runs' Tune experiment, inside the sweep's directory: one per plan, so another final.seeds or
    final.baseline never touches (or deletes) the runs of an earlier one. A sweep given more trials (--extend) may have
    another best and its trials more seeds: its final runs go beside the earlier ones, named by the sweep's size."""
    size = f"_trials{cfg.sweep.num_samples}" if extended else ""
    return f"final_seeds{cfg.final.seeds}" + ("" if cfg.final.baseline else "_tuned_only") + size


def make_plan(
    cfg: ExperimentConfig, best_params: dict[str, Any], used_seeds: set[int], extended: bool = False
) -> dict[str, Any]:
    """Everything the runs and the block depend on (written to the experiment as plan.json; recorded in the manifest).
    Runs interleave the configs seed by seed, so the first finished pairs come early. `extended`: the sweep has had
    more trials since it was run (manifest.json's `extensions`)."""
    seeds = final_seeds(cfg.seed, cfg.final.seeds, used_seeds)
    plan: dict[str, Any] = {
        "experiment": experiment_name(cfg, extended),
        "seeds": seeds,
        "tuned": dict(best_params),
        "baseline": None,
        "baseline_source": None,
        "baseline_is_best": False,
    }
    if cfg.final.baseline:
        params, source = baseline_params(cfg)
        # compared as configs: 6 and 6.0, [q_proj] and (q_proj,) are the same setting
        same = apply_overrides(cfg, params) == apply_overrides(cfg, best_params)
        plan.update(baseline=params, baseline_source=source, baseline_is_best=same)
    roles = ["tuned"] + (["baseline"] if cfg.final.baseline and not plan["baseline_is_best"] else [])
    plan["runs"] = [
        {"role": role, "index": i, "seed": seed, "overrides": {**plan[role], "seed": seed}}
        for i, seed in enumerate(seeds)
        for role in roles
    ]
    return json.loads(json.dumps(plan))  # as stored: lists, not tuples (plan.json is compared on restore)


def describe(cfg: ExperimentConfig, extended: bool = False) -> str:
    """The final evaluation in one line, for --dry-run (the best config is known only after the sweep)."""
    if cfg.final.seeds == 0:
        return "off (final.seeds=0)"
    seeds = final_seeds(cfg.seed, cfg.final.seeds, {cfg.seed})
    baseline = f" and the baseline ({baseline_params(cfg)[1]})" if cfg.final.baseline else ""
    return (
        f"the best config{baseline} re-trained with seeds {seeds}, up to {cfg.train.max_epochs} epochs each with "
        f"early stopping (no ASHA), each run's best-val checkpoint scored once on the test split; into "
        f"{display(cfg, experiment=True)}/{experiment_name(cfg, extended)}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Runs


def final_trial(
    params: dict[str, Any], base: ExperimentConfig, data: TaskData, env: dict[str, str], prefix: None = None
) -> None:
    """A final run is a sweep trial whose overrides are the config's params plus its seed (the full model: no prefix
    cache)."""
    trial_with_env(params["run"]["overrides"], base, data, env)


def run_dirname(trial: Any) -> str:
    run = trial.config["run"]
    return f"{run['role']}_{run['index']}_{trial.trial_id}"


def make_tuner(cfg: ExperimentConfig, data: TaskData, plan: dict[str, Any]) -> tune.Tuner:
    exp, fs = experiment_dir(cfg)
    # The best epoch's checkpoint and the latest, as in the sweep. No trackers and no live study: the runs are not
    # part of the search. CSV + JSON: Tune's results reader.
    run = run_config(cfg, plan["experiment"], exp, fs, [CSVLoggerCallback(), JsonLoggerCallback()])
    tune_config = tune.TuneConfig(
        scheduler=FIFOScheduler(),  # every run up to max_epochs, stopped only by its own early stopping
        num_samples=1,  # x the grid below: one trial per run
        trial_dirname_creator=run_dirname,
        reuse_actors=cfg.sweep.reuse_actors,
    )  # no max_concurrent_trials: the runs are independent, so as many run at once as the resources allow
    return tune.Tuner(
        trainable(cfg, data, trial=final_trial),
        param_space={"run": tune.grid_search(plan["runs"])},
        tune_config=tune_config,
        run_config=run,
    )


def fit_runs(cfg: ExperimentConfig, data: TaskData, plan: dict[str, Any]) -> tune.ResultGrid:
    """Train the runs: a new experiment, or the one an earlier (killed) driver left, continued."""
    exp, fs = experiment_dir(cfg)
    path = f"{exp}/{plan['experiment']}"
    where = f"{display(cfg, experiment=True)}/{plan['experiment']}"
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # the loggers are the ones passed above, on restore too
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        stored = json.loads(read_text(fs, f"{path}/plan.json") or "null")
        if stored != plan:
            raise UserError(
                f"--final: {where} holds final runs of another plan (plan.json differs: other code or another sweep); "
                "move that directory away to run them anew"
            )
        tuner = reopen(path, fs, trainable(cfg, data, trial=final_trial), retry=True)
    else:
        upload({"plan.json": json.dumps(plan, indent=2)}, path, fs)
        tuner = make_tuner(cfg, data, plan)
    grid = tuner.fit()
    unfinished = len(plan["runs"]) - grid.num_terminated - grid.num_errors
    if unfinished > 0:
        raise Interrupted(
            f"the final evaluation at {where} stopped with {unfinished} of {len(plan['runs'])} runs unfinished; run "
            "tune_lora.py --final with the same config to continue it"
        )
    if grid.num_errors:
        first = next(r for r in grid if r.error is not None)
        raise SweepFailed(
            f"{grid.num_errors} of {len(plan['runs'])} final runs failed (first error: {error_line(first.error)}); "
            f"each run's error is in its directory under {where}; tune_lora.py --final retries them"
        )
    return grid


def score_runs(cfg: ExperimentConfig, data: TaskData, plan: dict[str, Any], grid: tune.ResultGrid) -> list[dict]:
    """Each run's best-val checkpoint scored once on the test split, in parallel where slots allow, on workers with a
    trial's resources; one record per run (runs.json), in plan order."""
    exp, fs = experiment_dir(cfg)
    path = f"{exp}/{plan['experiment']}"
    results = {(r.config["run"]["role"], r.config["run"]["index"]): r for r in grid}
    task = ray.remote(score_checkpoint).options(**trial_task_options(cfg), max_retries=0)
    data_ref = ray.put(data)  # once, not once per task
    refs, records = [], []
    for run in plan["runs"]:
        result = results[(run["role"], run["index"])]
        checkpoint = result.get_best_checkpoint(cfg.train.metric, cfg.train.mode)
        run_cfg = apply_overrides(cfg, run["overrides"])
        refs.append(task.remote(run_cfg, data_ref, checkpoint, f"{path}/{trial_name(result)}", fs, export=False))
        m = result.metrics
        records.append(
            {
                **{k: run[k] for k in ("role", "index", "seed")},
                "trial_id": trial_name(result),
                "epochs": int(m["epoch"]),
                "best_epoch": int(m["best_epoch"]),
                "stop_reason": "early_stop" if m.get("early_stopped") else "max_epochs",
                tuning_metric(cfg): float(m[tuning_metric(cfg)]),
            }
        )
    for record, scored in zip(records, ray.get(refs)):
        record.update({f"test_{k}": v for k, v in scored["test"].items()}, test_predictions=scored["test_predictions"])
    upload({"runs.json": json.dumps(records, indent=1)}, path, fs)
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


def final_block(cfg: ExperimentConfig, plan: dict[str, Any], records: list[dict], data: TaskData) -> dict[str, Any]:
    """The summary's `final` block (see the module docstring): deterministic, no wall time, no path."""
    metrics = [f"test_{m}" for m in TEST_METRICS]
    selected = tuning_metric(cfg)
    runs = {role: sorted((r for r in records if r["role"] == role), key=lambda r: r["index"]) for role in ROLES}

    def config_block(role: str, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "params": params,
            "seeds": [r["seed"] for r in runs[role]],
            **{m: spread([r[m] for r in runs[role]]) for m in metrics},
            selected: spread([r[selected] for r in runs[role]]),  # the val score each run's checkpoint was chosen by
            "epochs": [r["epochs"] for r in runs[role]],
        }

    k = len(plan["seeds"])
    block: dict[str, Any] = {
        "num_seeds": k,
        "tuned": config_block("tuned", plan["tuned"]),
        "baseline": None,
        "baseline_source": plan["baseline_source"],
        "baseline_is_best": plan["baseline_is_best"],
        "gain": None,
        "gain_method": GAIN_METHOD,
        "notes": [],
    }
    if plan["baseline"] is None:
        block["notes"].append("final.baseline=false: no baseline runs, no gain")
        return block
    if plan["baseline_is_best"]:
        block["baseline"] = {**block["tuned"], "params": plan["baseline"]}
        block["gain"] = {m: {"mean": 0.0, "ci95": [0.0, 0.0], "values": [0.0] * k} for m in metrics}
        block["notes"].append(
            "the best config is the baseline: the baseline's runs are the tuned runs (not repeated); gain 0, [0, 0]"
        )
        return block
    block["baseline"] = config_block("baseline", plan["baseline"])
    preds = {role: [r["test_predictions"] for r in runs[role]] for role in ROLES}
    variance = gain_test_variance(preds["tuned"], preds["baseline"], data.test.labels, data.num_labels, cfg.seed)
    block["gain"] = {
        m: paired_gain(block["tuned"][m]["values"], block["baseline"][m]["values"], float(v))
        for m, v in zip(metrics, variance)
    }
    block["notes"] += sorted({g["note"] for g in block["gain"].values() if "note" in g})
    if k == 1:
        block["notes"].append("final.seeds=1: the gain's interval holds test-set noise only; seed noise needs k >= 2")
    return block
