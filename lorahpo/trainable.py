"""One trial: params -> config -> seed -> model -> Lightning fit; one report (metrics + small checkpoint) per epoch.

`fit` is Ray-free; `tune_trial` wraps it for Ray Tune; `python -m lorahpo.trainable` runs ONE trial without Ray:

    python -m lorahpo.trainable --out runs/one [--config configs/default.yaml] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import ray
import torch
import transformers
from ray import tune

from lorahpo.checks import check_model_fit
from lorahpo.config import ExperimentConfig, apply_overrides, dump_config, load_config, tuning_metric
from lorahpo.data import TaskData, load_task, make_loader, split_rows
from lorahpo.errors import UserError
from lorahpo.model import build_classifier, trainable_parameters
from lorahpo.module import LoraClassifier, class_weights, make_trainer
from lorahpo.prefix import PrefixCache, cut_for, open_prefix, split_states
from lorahpo.repro import manifest, seed_everything_everywhere
from lorahpo.sources import load_model_config, load_tokenizer

log = logging.getLogger(__name__)
CKPT_NAME = "trial.ckpt"
ReportFn = Callable[[dict[str, Any], Path], None]
"""Called once per epoch with the metrics row and a directory holding that epoch's checkpoint."""


class EpochReporter(L.Callback):
    """After each validation: running best, early stopping by patience, checkpoint, one report.

    Early stopping lives here rather than in Lightning's EarlyStopping so the report that ends a trial can say so
    (the stop reason in results.parquet). Its state travels in the checkpoint, so a resumed trial stops when an
    uninterrupted one would.
    """

    def __init__(self, cfg: ExperimentConfig, report: ReportFn, extra: dict[str, Any]):
        self.cfg, self.report, self.extra = cfg, report, extra
        self.best: float | None = None
        self.best_epoch = -1
        self.epoch_start = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.epoch_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        name, mode = self.cfg.train.metric, self.cfg.train.mode
        epoch = trainer.current_epoch + 1  # epochs completed, 1-based: ASHA's time axis
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        row["train_loss"] = module.train_loss_epoch()
        value = row[name]
        if self.best is None or (value > self.best if mode == "max" else value < self.best):
            self.best, self.best_epoch = value, epoch
        row[tuning_metric(self.cfg)] = self.best
        early = epoch - self.best_epoch >= self.cfg.train.patience and epoch < self.cfg.train.max_epochs
        if early:
            trainer.should_stop = True
        row.update(
            epoch=epoch,
            best_epoch=self.best_epoch,
            early_stopped=early,
            epoch_time_s=time.perf_counter() - self.epoch_start,
            **self.extra,
        )
        with tempfile.TemporaryDirectory() as tmp:
            trainer.save_checkpoint(Path(tmp) / CKPT_NAME)
            self.report(row, Path(tmp))


def quiet_logs() -> None:
    """Trials log through Ray to the driver's console: keep per-trial banners, tips and load reports out of it."""
    transformers.logging.set_verbosity_error()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|weights_only|litlogger).*")


def build_module(cfg: ExperimentConfig, data: TaskData, cut: int | None = None) -> LoraClassifier:
    """Seed, then build base + LoRA + Lightning wrapper (seeding first makes init independent of earlier trials).
    `cut`: the layer its batches of cached states enter at (lorahpo.prefix); None: batches of ids only."""
    seed_everything_everywhere(cfg.seed)
    model = build_classifier(cfg, data.num_labels, data.tokenizer.pad_token_id)
    if cfg.model.dtype != "float32":  # train adapters and head in fp32 (mixed precision); the frozen base stays low
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    weights = class_weights(data.train.labels, data.num_labels, cfg.train.class_weight)
    return LoraClassifier(model, cfg.train, data.num_labels, weights, cfg.seed, cut)


def fit(
    cfg: ExperimentConfig,
    data: TaskData,
    report: ReportFn,
    resume_from: Path | None = None,
    num_threads: int | None = None,
    gpu: bool = False,
    tags: dict[str, Any] | None = None,
    callbacks: Sequence[L.Callback] = (),
    prefix: PrefixCache | None = None,
) -> LoraClassifier:
    """Train one trial; `report` gets one call per epoch. `resume_from` continues a checkpoint exactly. `callbacks`
    run before the reporter (benchmarks time epochs with them). `prefix`: the sweep's frozen-prefix cache; training
    and validation then run only the layers above the cut it has for this trial's `lora.last_n`."""
    torch.set_num_threads(cfg.train.num_threads or num_threads or torch.get_num_threads())
    cut = cut_for(prefix, cfg.lora.last_n) if prefix is not None else None
    module = build_module(cfg, data, cut)
    extra = {"trainable_params": trainable_parameters(module.model), "prefix_cut": cut, **(tags or {})}

    def states(name: str) -> list | None:
        return None if cut is None else split_states(prefix, cut, name, getattr(data, name))

    train_dl = make_loader(data.train, data.tokenizer, cfg.train.batch_size, cfg.seed, True, states("train"))
    val_dl = make_loader(data.val, data.tokenizer, cfg.train.eval_batch_size, cfg.seed, False, states("val"))
    trainer = make_trainer(cfg, [*callbacks, EpochReporter(cfg, report, extra)], gpu)
    module.train()  # from_pretrained leaves the model in eval mode, and Lightning keeps it: dropout would be off
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers|strict_loading).*")
        trainer.fit(module, train_dl, val_dl, ckpt_path=str(resume_from) if resume_from else None)
    return module


def load_trained(cfg: ExperimentConfig, data: TaskData, ckpt: Path) -> LoraClassifier:
    """Base model + the adapter and head weights of a checkpoint."""
    module = build_module(cfg, data)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    missing = set(state) - set(module.state_dict())
    if missing:
        raise RuntimeError(f"checkpoint {ckpt} holds tensors this model lacks: {sorted(missing)[:3]}")
    module.load_state_dict(state, strict=False)
    return module.eval()


def export_best(module: LoraClassifier, cfg: ExperimentConfig, data: TaskData, out: Path) -> None:
    """Adapter + head (peft format), tokenizer, label map and a re-runnable config."""
    out.mkdir(parents=True, exist_ok=True)
    module.model.save_pretrained(out)
    data.tokenizer.save_pretrained(out)
    (out / "labels.json").write_text(json.dumps({"label_names": data.label_names}, indent=2))
    dump_config(cfg, out / "best_config.yaml")


def use_gpu(cfg: ExperimentConfig) -> bool:
    """Trials (and evaluations) run on the GPU when the sweep gives them one and this process sees one."""
    return torch.cuda.is_available() and cfg.sweep.gpus_per_trial > 0


def trial_threads(cfg: ExperimentConfig) -> int:
    """torch threads of a trial: its CPU share (Ray does not pin threads; too many oversubscribe the node)."""
    return max(1, int(cfg.sweep.cpus_per_trial))


# ---------------------------------------------------------------------------------------------------------------------
# Ray Tune


def tune_trial(
    params: dict[str, Any], base: ExperimentConfig, data: TaskData, prefix: PrefixCache | None = None
) -> None:
    """Function trainable: a trial is the base config plus the searcher's dotted overrides. `prefix`: the sweep's
    frozen-prefix cache (from the object store, or the plan of this node's disk cache)."""
    cfg = apply_overrides(base, params)
    quiet_logs()
    gpu = use_gpu(base)
    if gpu and cfg.model.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        # the driver (e.g. a CPU head node) could not see this node's GPU; fail the trial with the same advice
        raise UserError(f"model.dtype=bfloat16 but {torch.cuda.get_device_name()} has no bf16; set model.dtype=float16")
    report: ReportFn = lambda row, d: tune.report(row, checkpoint=tune.Checkpoint.from_directory(str(d)))  # noqa: E731
    # Where each epoch ran: audit trail for retries and multi-node placement.
    tags = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}
    ckpt = tune.get_checkpoint()
    cache = open_prefix(prefix, base, data) if prefix is not None else None
    try:
        if ckpt is None:
            fit(cfg, data, report, num_threads=trial_threads(base), gpu=gpu, tags=tags, prefix=cache)
        else:  # a retry after a failure, or a restored sweep: continue from the last epoch reported
            with ckpt.as_directory() as d:
                fit(cfg, data, report, Path(d) / CKPT_NAME, trial_threads(base), gpu, tags, prefix=cache)
    finally:
        if torch.cuda.is_available():  # fractional GPUs: the next trial on this GPU needs the memory
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# One trial without Ray


def run_single(cfg: ExperimentConfig, out: Path, data: TaskData | None = None) -> dict[str, Any]:
    """One trial into `out`: manifest.json, split.json, metrics.csv, checkpoints/{last,best}, best/ adapter."""
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty; choose a new --out (earlier results are kept)")
    check_model_fit(cfg, load_model_config(cfg.model))
    out.mkdir(parents=True, exist_ok=True)
    data = data or load_task(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    (out / "split.json").write_text(json.dumps(split_rows(data)))
    rows: list[dict[str, Any]] = []
    meta = manifest(cfg, data.info)
    (out / "manifest.json").write_text(json.dumps(meta, indent=2))  # provenance first, before any training

    def report(row: dict[str, Any], ckpt_dir: Path) -> None:
        rows.append(row)
        for name in ["last"] + (["best"] if row["best_epoch"] == row["epoch"] else []):
            shutil.rmtree(out / "checkpoints" / name, ignore_errors=True)
            shutil.copytree(ckpt_dir, out / "checkpoints" / name)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(out / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(rows)

    start = time.perf_counter()
    module = fit(cfg, data, report, gpu=use_gpu(cfg))
    meta["trainable_params"] = trainable_parameters(module.model)
    meta["wall_time_s"] = time.perf_counter() - start
    (out / "manifest.json").write_text(json.dumps(meta, indent=2))
    best = load_trained(cfg, data, out / "checkpoints" / "best" / CKPT_NAME)
    export_best(best, cfg, data, out / "best")
    return {**rows[-1], "wall_time_s": meta["wall_time_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lorahpo.trainable", description="Run ONE trial without Ray.")
    p.add_argument("--config", default=None)
    p.add_argument("--out", required=True, help="new directory for this trial's outputs")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        result = run_single(cfg, Path(args.out))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
