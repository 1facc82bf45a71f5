"""Tabulate a finite grid of configs of the intents task: every config trained ONCE to max_epochs, its val and test
metrics and wall times stored per epoch, so search methods can be replayed against the table without training.

The grid is the search space of `bench/intents_grid.yaml` (every key categorical): its full product, each config once,
in product order (`config_id`). It runs through the project's own sweep (`lorahpo.sweep.prepare` + `run`: checks,
provenance, Ray Tune, resumable with --resume, on a Ray cluster with --address) as a FIFO sweep whose
`points_to_evaluate` are the grid's points, with no early stopping (`train.patience` = `train.max_epochs`: every
config's full curve; a replay applies any smaller patience exactly). The one difference from a normal sweep, for
tabulation only: each trial also scores the TEST split after every epoch (`TestEveryEpoch`, through
`lorahpo.trainable.fit`'s `callbacks=` seam), timed apart so that `epoch_time_s` keeps its normal-sweep meaning.

    python bench/tabulate.py                     # the full table (~1.8 h on 2 idle cores; resumable, run it alone)
    python bench/tabulate.py --resume            # continue an interrupted run (or rebuild the table of a finished one)
    python bench/tabulate.py --smoke --out /tmp/t   # plumbing: tiny random model, 4 configs x 2 epochs, seconds
    python bench/tabulate.py --config bench/assistant_grid.yaml --out docs/benchmarks/tabulate_assistant

`--train-seed S` trains every config again with training seed S (model init, dropout, batch order) on the SAME split
(drawn with the config's root seed): training noise, in `<grid>_train<S>.parquet` (and `results_train<S>.json`,
`table_train<S>.md`), from its own Ray experiment `<sweep.name>_train<S>`.

Output (`--out`, default docs/benchmarks/tabulate/): `<grid config name>.parquet` (one row per config and epoch),
`results.json` (grid, machine, command, durations, summary) and `table.md`. The Ray experiment goes to
`sweep.storage_path` (default bench/out/; git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import ray
import torch
from common import BENCH_DIR, DOCS_DIR, REPO_ROOT, WORK_DIR, machine, md_table, quiet, write_json
from ray import tune

import lorahpo.tuner
from lorahpo import sweep
from lorahpo.config import METRICS, ExperimentConfig, apply_overrides, load_config, parse_overrides
from lorahpo.data import LengthGroupedBatches, TaskData, load_task, make_loader
from lorahpo.errors import Interrupted, SweepFailed, UserError
from lorahpo.results import history, load_experiment, ordered
from lorahpo.sources import load_tokenizer
from lorahpo.storage import experiment_dir, location, read_bytes, trial_name
from lorahpo.trainable import CKPT_NAME, TRIAL_LOG, fit, free_memory, library_logs, trial_threads, use_gpu

# This file's name is that of a PyPI package, `tabulate`, that torch imports when it can: with bench/ on sys.path (where
# `python bench/tabulate.py` puts it, and Ray copies the driver's script directory into every worker's path) that
# import would find this file instead. The helpers above are imported; nothing else needs bench/.
sys.path[:] = [p for p in sys.path if Path(os.path.realpath(p or ".")) != BENCH_DIR]

GRID_CONFIG = REPO_ROOT / "bench" / "intents_grid.yaml"
SMOKE = {
    "model.name": "tiny-random-llama",
    "model.num_layers": 4,
    "data.max_examples": 250,  # 10 per intent: the stratified split still gives every intent a val and test example
    "train.max_epochs": 2,
    "sweep.name": "tabulate_smoke",
}
# Per epoch and config; `param.<key>` columns (one per grid key) follow config_id.
METRIC_COLUMNS = [f"{split}_{m}" for split in ("val", "test") for m in ("accuracy", "f1", "fbeta", "loss")]
COLUMNS = ["config_id", "trial_id", "train_seed", "epoch", *METRIC_COLUMNS, "train_loss", "epoch_time_s", "test_time_s",
           "iter_s"]  # fmt: skip
"""epoch_time_s: the epoch's training + validation (what it costs in a normal sweep); test_time_s: this table's test
scoring (not part of a normal sweep); iter_s: Tune's time for the epoch minus the test scoring (model build included
in epoch 1, checkpoint and report in every epoch): a replay's simulated duration of the epoch."""


# ---------------------------------------------------------------------------------------------------------------------
# The grid


def grid_points(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Every combination of the (all-categorical) search space, in product order: the configs to tabulate."""
    not_grid = [k for k, spec in cfg.search.items() if spec.type != "categorical"]
    if not_grid:
        raise UserError(f"the grid config's search space must be categorical; {not_grid} are not: list their values")
    keys = list(cfg.search)
    return [dict(zip(keys, values)) for values in itertools.product(*(cfg.search[k].choices for k in keys))]


def smoke_space(cfg: ExperimentConfig) -> dict[str, Any]:
    """4 configs: the baseline's value of every key, plus one other value of each of the first two keys."""
    base = cfg.sweep.points_to_evaluate[0]
    space = {}
    for i, (key, spec) in enumerate(cfg.search.items()):
        other = [c for c in spec.choices if c != base[key]][:1] if i < 2 else []
        space[key] = dataclasses.replace(spec, choices=(base[key], *other))
    return space


def tabulation_config(
    config: Path, overrides: dict[str, Any], smoke: bool
) -> tuple[ExperimentConfig, list[dict[str, Any]], dict[str, Any] | None]:
    """The grid config as a FIFO sweep over every grid point, each trained to max_epochs (no early stopping); the
    grid's points; the config's own first point (its untuned baseline), which must be one of them."""
    cfg = apply_overrides(load_config(config), overrides)
    if smoke:
        cfg = dataclasses.replace(cfg, search=smoke_space(cfg))
    points = grid_points(cfg)
    outside = [p for p in cfg.sweep.points_to_evaluate if p not in points]
    if outside:  # a replay must be able to evaluate the config's own first trials
        raise UserError(f"sweep.points_to_evaluate {outside} of {config} are not grid points; add their values")
    baseline = dict(cfg.sweep.points_to_evaluate[0]) if cfg.sweep.points_to_evaluate else None
    cfg = apply_overrides(
        cfg,
        {
            "sweep.searcher": "random",
            "sweep.scheduler": "fifo",
            "sweep.points_to_evaluate": points,
            "sweep.num_samples": len(points),
            "sweep.num_to_keep": 1,  # only the latest epoch's checkpoint, for resume: the table is the result
            "train.patience": cfg.train.max_epochs,
        },
    )
    return cfg, points, baseline


# ---------------------------------------------------------------------------------------------------------------------
# The trial: a normal sweep's trial plus the test split scored after every epoch


class TestEveryEpoch(L.Callback):
    """Tabulation only: after each validation, score the test split the way validation scores val (the module's own
    validation_step through the Trainer's strategy: same eval batches, same precision context, no gradients), and time
    it. Runs before the epoch's report (callbacks passed to `fit` precede its reporter), which carries `latest`. The
    next epoch reseeds every generator (seed, epoch), so training is exactly that of a normal sweep."""

    def __init__(self, data: TaskData, cfg: ExperimentConfig):
        self.data, self.cfg = data, cfg
        self.latest: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        start = time.perf_counter()
        train = self.cfg.train
        # ids only: the test split runs through the full model, as in a sweep's final scoring (lorahpo.prefix
        # caches train and val; a batch without cached states takes the module's full-model path)
        loader = make_loader(self.data.test, self.data.tokenizer, train.eval_batch_size, self.cfg.seed, shuffle=False)
        was_training = module.training
        module.eval()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                trainer.strategy.validation_step(trainer.strategy.batch_to_device(batch), i)
        scores = {k: v.item() for k, v in module.eval_metrics.compute().items()}
        scores["loss"] = module.eval_loss.compute().item()
        module.eval_metrics.reset()
        module.eval_loss.reset()
        module.train(was_training)
        self.latest = {f"test_{k}": scores[k] for k in METRICS} | {"test_time_s": time.perf_counter() - start}


def tabulation_trial(
    params: dict[str, Any], base: ExperimentConfig, data: TaskData, prefix: Any = None, train_seed: int | None = None
) -> None:
    """`lorahpo.trainable.tune_trial` with `TestEveryEpoch`: the same config, seed, data, prefix cache, resume and
    report, plus the epoch's test scores in the report. `train_seed`: train with this seed instead of the root seed
    (the data, split and prefix cache stay the root seed's)."""
    cfg = apply_overrides(base, {**params, **({"seed": train_seed} if train_seed is not None else {})})
    scorer = TestEveryEpoch(data, cfg)

    def report(row: dict[str, Any], ckpt_dir: Path) -> None:
        test = scorer.latest
        row = {**row, **test, "epoch_time_s": row["epoch_time_s"] - test["test_time_s"]}
        tune.report(row, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))

    tags = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}
    ckpt = tune.get_checkpoint()
    kwargs = {"num_threads": trial_threads(base), "gpu": use_gpu(base), "tags": tags, "callbacks": [scorer],
              "prefix": prefix}  # fmt: skip
    with library_logs(Path(TRIAL_LOG).resolve()):
        try:
            if ckpt is None:
                fit(cfg, data, report, **kwargs)
            else:  # a retry or a resumed run: continue from the last epoch reported
                with ckpt.as_directory() as d:
                    fit(cfg, data, report, resume_from=Path(d) / CKPT_NAME, **kwargs)
        finally:
            free_memory()


def tabulation_trainable(
    cfg: ExperimentConfig, data: TaskData, prefix: Any = None, train_seed: int | None = None
) -> Any:
    fn = tune.with_parameters(tabulation_trial, base=cfg, data=data, prefix=prefix, train_seed=train_seed)
    return tune.with_resources(fn, {"cpu": cfg.sweep.cpus_per_trial, "gpu": cfg.sweep.gpus_per_trial})


# ---------------------------------------------------------------------------------------------------------------------
# The table


def build_table(cfg: ExperimentConfig, points: list[dict[str, Any]], train_seed: int) -> pd.DataFrame:
    """One row per config and epoch, from the finished experiment (every config, every epoch, or an error)."""
    grid, _ = load_experiment(location(cfg, experiment=True), cfg.sweep.s3_endpoint)
    index = {json.dumps(p, sort_keys=True): i for i, p in enumerate(points)}
    frames = []
    for r in ordered(grid):
        config_id = index[json.dumps({k: r.config[k] for k in points[0]}, sort_keys=True)]
        h = history(r)
        frames.append(
            h.assign(
                config_id=config_id,
                trial_id=trial_name(r),
                train_seed=train_seed,
                iter_s=h["time_this_iter_s"] - h["test_time_s"],
            )
        )
    df = pd.concat(frames, ignore_index=True)
    params = pd.DataFrame([{f"param.{k}": v for k, v in p.items()} for p in points])
    params.insert(0, "config_id", range(len(points)))
    df = params.merge(df[COLUMNS], on="config_id").sort_values(["config_id", "epoch"], ignore_index=True)
    epochs = df.groupby("config_id")["epoch"].apply(list)
    incomplete = [i for i in range(len(points)) if epochs.get(i) != list(range(1, cfg.train.max_epochs + 1))]
    if incomplete:
        raise SystemExit(f"error: configs {incomplete[:10]} lack epochs; continue the run with --resume")
    return df[["config_id", *params.columns.drop("config_id"), *COLUMNS[1:]]]


def summarise(
    df: pd.DataFrame, cfg: ExperimentConfig, points: list[dict[str, Any]], baseline: dict | None
) -> dict[str, Any]:
    """What the table says about tuning: the best config, the median config and the baseline by their best val score
    over the epochs (the sweep's tuning metric), each with its test score at that epoch."""
    val, test = cfg.train.metric, cfg.train.metric.replace("val_", "test_")
    at_best = df.loc[df.groupby("config_id")[val].idxmax()].set_index("config_id")

    def describe(i: int) -> dict[str, Any]:
        row = at_best.loc[i]
        return {"config_id": i, "params": points[i], val: float(row[val]), "epoch": int(row["epoch"]),
                test: float(row[test])}  # fmt: skip

    return {
        "configs": len(points),
        "epochs": cfg.train.max_epochs,
        "metric": val,
        "best": describe(int(at_best[val].idxmax())),
        f"median_{val}": float(at_best[val].median()),
        "baseline": describe(points.index(baseline)) if baseline is not None else None,
        "sum_iter_s": float(df["iter_s"].sum()),
        "sum_test_time_s": float(df["test_time_s"].sum()),
    }


def epoch_cost(cfg: ExperimentConfig) -> dict[str, float]:
    """What an epoch of `cfg` computes, independent of the machine's load: its training rows and their tokens once
    padded by the project's length-grouped batches (mean over max_epochs epochs), and the same for validation."""
    data = load_task(cfg.data, load_tokenizer(cfg.model), cfg.seed)

    def padded(split: Any, batch_size: int, shuffle: bool) -> float:
        lengths = [len(t) for t in split.input_ids]
        batches = LengthGroupedBatches(lengths, batch_size, cfg.seed, shuffle)
        epochs = [batches.batches(e) for e in range(cfg.train.max_epochs)]
        return sum(len(b) * max(lengths[i] for i in b) for e in epochs for b in e) / len(epochs)

    return {
        "train_examples": len(data.train),
        "train_real_tokens": sum(len(t) for t in data.train.input_ids),
        "train_padded_tokens": padded(data.train, cfg.train.batch_size, True),
        "val_examples": len(data.val),
        "val_padded_tokens": padded(data.val, cfg.train.eval_batch_size, False),
    }


def markdown(summary: dict[str, Any]) -> str:
    val = summary["metric"]
    test = val.replace("val_", "test_")
    rows = [
        [name, s["config_id"], s[val], s["epoch"], s[test], json.dumps(s["params"])]
        for name, s in (("best", summary["best"]), ("baseline", summary["baseline"]))
        if s is not None
    ]
    head = ["config", "config_id", f"best {val}", "at epoch", f"{test} there", "params"]
    return (
        f"{summary['configs']} configs x {summary['epochs']} epochs; median over configs of the best {val}: "
        f"{summary[f'median_{val}']:.4f}\n\n" + md_table(head, rows)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random model, 4 configs x 2 epochs: plumbing")
    p.add_argument("--config", type=Path, default=GRID_CONFIG, help="grid config (default bench/intents_grid.yaml)")
    p.add_argument("--out", type=Path, default=None, help="table dir (default docs/benchmarks/tabulate)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run; rebuild a finished run's table")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier tabulation run (deletes it)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else start locally)")
    p.add_argument("--train-seed", type=int, default=None, help="train every config with this seed (same split)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (e.g. sweep.storage_path)")
    args = p.parse_args(argv)
    out = (args.out or DOCS_DIR / "tabulate").resolve()
    out.mkdir(parents=True, exist_ok=True)

    quiet()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("lorahpo").setLevel(logging.INFO)
    storage = {"sweep.storage_path": str(out / "work" if args.smoke else WORK_DIR)}
    overrides = {**(SMOKE if args.smoke else {}), **storage, **parse_overrides(args.overrides)}
    suffix = "" if args.train_seed is None else f"_train{args.train_seed}"
    table = out / f"{args.config.stem}{suffix}.parquet"
    start = time.perf_counter()
    try:
        cfg, points, baseline = tabulation_config(args.config, overrides, args.smoke)
        if suffix:  # its own experiment: the root seed's stays as it is
            cfg = apply_overrides(cfg, {"sweep.name": cfg.sweep.name + suffix})
        exp, fs = experiment_dir(cfg)
        if not (args.resume and read_bytes(fs, f"{exp}/results.parquet") is not None):  # else: only the table
            # The one difference from a normal sweep: make_tuner and restore_tuner build each trial through
            # lorahpo.tuner.trainable; the tabulation's trial also scores the test split after every epoch.
            lorahpo.tuner.trainable = functools.partial(tabulation_trainable, train_seed=args.train_seed)
            address = args.address or os.environ.get("RAY_ADDRESS")
            data, plan = sweep.prepare(cfg, args.resume, args.overwrite, address)
            sweep.run(cfg, data, plan, address, args.resume, args.overwrite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e} (here: python bench/tabulate.py --resume, with the same arguments)", file=sys.stderr)
        return 130
    except SweepFailed as e:
        print(f"failed: {e}", file=sys.stderr)
        return 1
    df = build_table(cfg, points, cfg.seed if args.train_seed is None else args.train_seed)
    df.to_parquet(table, index=False)
    summary = summarise(df, cfg, points, baseline)
    # The budget the task was chosen under: an epoch costs no more than one of the default SMS config (same model)
    sms = apply_overrides(load_config(), {k: v for k, v in overrides.items() if k.startswith("model.")})
    result = {
        "machine": machine(),
        "smoke": args.smoke,
        "config": str(args.config),
        "train_seed": args.train_seed,
        "overrides": overrides,
        "grid": {k: list(spec.choices) for k, spec in cfg.search.items()},
        "rows": len(df),
        "epoch_cost": {"this task": epoch_cost(cfg), "configs/default.yaml (SMS)": epoch_cost(sms)},
        "wall_s_this_invocation": time.perf_counter() - start,
        "summary": summary,
    }
    write_json(out / f"results{suffix}.json", result)
    (out / f"table{suffix}.md").write_text(markdown(summary))
    print((out / f"table{suffix}.md").read_text())
    print(f"[tabulate] {len(df)} rows ({len(points)} configs) -> {table}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
