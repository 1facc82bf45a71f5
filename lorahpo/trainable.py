"""One trial: params -> config -> seed -> model -> Lightning fit; one report (metrics + small checkpoint) per epoch.

`fit` is Ray-free; `tune_trial` wraps it for Ray Tune; `python -m lorahpo.trainable` runs ONE trial without Ray:

    python -m lorahpo.trainable --out runs/one [--config configs/default.yaml] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pyarrow.fs
import ray
import torch
import transformers
from ray import tune

from lorahpo.checks import check_model_fit
from lorahpo.config import ExperimentConfig, apply_overrides, config_yaml, load_config, tuning_metric
from lorahpo.data import TaskData, load_task, make_loader, split_rows
from lorahpo.errors import UserError
from lorahpo.model import build_classifier, trainable_parameters
from lorahpo.module import LoraClassifier, class_weights, evaluate, make_trainer, score_split
from lorahpo.prefix import PrefixCache, cut_for, split_states
from lorahpo.repro import manifest, seed_everything_everywhere, trial_threads, use_gpu
from lorahpo.sources import load_model_config, load_tokenizer, on_hub
from lorahpo.storage import upload_dir

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
        diverged = sorted(k for k, v in row.items() if not math.isfinite(v))
        if diverged:  # a failed trial, not a running best that stays NaN
            raise FloatingPointError(f"{', '.join(diverged)} not finite at epoch {epoch}: training diverged")
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


# What the libraries log inside a trial (their banners and tips, deprecations, Ray's per-checkpoint notices) goes to the
# trial's own log file, not to the driver's console, where Ray's table and one line per trial start/stop remain.
LIBRARY_LOGGERS = ("transformers", "peft", "torch", "lightning", "lightning.pytorch", "lightning.fabric", "ray.train",
                   "py.warnings")  # fmt: skip
TRIAL_LOG = "trial.log"


@contextlib.contextmanager
def library_logs(path: Path) -> Iterator[None]:
    """During a trial: library log records (INFO and up) and Python warnings go to `path`, in full, instead of the
    console; everything is put back afterwards (a reused worker runs the next trial with the same setup)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = {name: logging.getLogger(name) for name in LIBRARY_LOGGERS}
    state = {name: (lg.handlers[:], lg.level, lg.propagate) for name, lg in saved.items()}
    for lg in saved.values():
        lg.handlers, lg.propagate = [handler], False
        lg.setLevel(logging.INFO)
    logging.captureWarnings(True)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # tqdm writes to the console directly, not through logging
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # every distinct warning once, into the file
            yield
    finally:
        logging.captureWarnings(False)
        if bars:
            transformers.utils.logging.enable_progress_bar()
        for name, lg in saved.items():
            lg.handlers, lg.level, lg.propagate = state[name]
        handler.close()


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
        trainer.fit(module, train_dl, val_dl, ckpt_path=str(resume_from) if resume_from else None, weights_only=True)
    return module


def load_trained(cfg: ExperimentConfig, data: TaskData, ckpt: Path) -> LoraClassifier:
    """Base model + the adapter and head weights of a checkpoint."""
    module = build_module(cfg, data)
    # weights_only: a checkpoint on shared storage must not be able to run code in whoever loads it
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    missing = set(state) - set(module.state_dict())
    if missing:
        raise RuntimeError(f"checkpoint {ckpt} holds tensors this model lacks: {sorted(missing)[:3]}")
    module.load_state_dict(state, strict=False)
    return module.eval()


def export_best(module: LoraClassifier, cfg: ExperimentConfig, data: TaskData, out: Path) -> str:
    """A `best/` that loads anywhere with the standard loaders and gives the trial's predictions; returns its format.

    - A full hub base (`model.num_layers` null): the adapter + head in peft format, naming the hub id and revision, so
      `AutoPeftModelForSequenceClassification.from_pretrained(best, num_labels=..., pad_token_id=...)` rebuilds it.
    - Anything else (the built-in SmolLM2, a local directory, a truncated base): no other machine can rebuild that
      base, so best/ is the merged model (`AutoModelForSequenceClassification.from_pretrained(best)`), with the
      adapter kept in best/adapter/ for peft users. This merges `module` in place: evaluate before exporting.
    Both carry the tokenizer (truncating at `data.max_length`, as in training), labels.json and best_config.yaml."""
    out.mkdir(parents=True, exist_ok=True)
    model = module.model
    if on_hub(cfg.model) and cfg.model.num_layers is None:
        model.peft_config["default"].base_model_name_or_path = cfg.model.name
        model.peft_config["default"].revision = cfg.model.revision
        model.save_pretrained(out)
        kind = "adapter"
    else:
        model.save_pretrained(out / "adapter")
        merged = model.merge_and_unload()
        config = copy.deepcopy(merged.config)
        # A GGUF-converted base still names its quantization in its config, and save_pretrained refuses a model loaded
        # with it: a fresh model of the same class from the cleaned config takes the merged weights (strictly).
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.id2label = dict(enumerate(data.label_names))
        config.label2id = {name: i for i, name in enumerate(data.label_names)}
        config.pad_token_id = data.tokenizer.pad_token_id  # Llama pools the last non-pad token
        with torch.device("meta"):
            portable = type(merged)(config)
        portable.load_state_dict(merged.state_dict(), strict=True, assign=True)
        portable.save_pretrained(out)
        kind = "merged"
    tokenizer = copy.deepcopy(data.tokenizer)
    tokenizer.model_max_length = cfg.data.max_length  # `tokenizer(texts, truncation=True)` cuts where training did
    tokenizer.save_pretrained(out)
    (out / "labels.json").write_text(json.dumps({"label_names": data.label_names, "format": kind}, indent=2))
    (out / "best_config.yaml").write_text(config_yaml(cfg))
    return kind


def score_checkpoint(
    cfg: ExperimentConfig, data: TaskData, ckpt: tune.Checkpoint, dest: str, fs: pyarrow.fs.FileSystem, export: bool
) -> dict[str, Any]:
    """A best-val checkpoint scored ONCE on the untouched test split, where a trial runs (same precision, same device,
    same threads): the sweep's best trial (`export`: val scored too, a check that it reproduces the recorded epoch, and
    `dest`/best/ exported) or a final-evaluation run. Library logs go to `dest`/scoring.log on the sweep's storage.
    Returns the scores, the per-example test predictions (split order) and, with `export`, best/'s format."""
    torch.set_num_threads(trial_threads(cfg))
    gpu = use_gpu(cfg)
    scored: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with library_logs(Path(tmp, "scoring.log")):
            with ckpt.as_directory() as d:
                module = load_trained(cfg, data, Path(d) / CKPT_NAME)
            if export:
                scored["val"] = evaluate(module, data.val, cfg, data.tokenizer, gpu)
            test, preds = score_split(module, data.test, cfg, data.tokenizer, gpu) if len(data.test) else ({}, [])
            if export:
                scored["format"] = export_best(module.cpu(), cfg, data, Path(tmp, "best"))
        upload_dir(Path(tmp), dest, fs)
    free_memory()
    return {**scored, "test": test, "test_predictions": preds}


def free_memory() -> None:
    """Give a trial's memory back before the next one (reused workers, fractional GPUs): drop the cycles that still
    hold tensors, then the CUDA cache (empty_cache alone frees nothing a live object still references)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# Ray Tune


def tune_trial(
    params: dict[str, Any], base: ExperimentConfig, data: TaskData, prefix: PrefixCache | None = None
) -> None:
    """Function trainable: a trial is the base config plus the searcher's dotted overrides. `prefix`: the sweep's
    frozen-prefix cache (from the object store)."""
    cfg = apply_overrides(base, params)
    with library_logs(Path(TRIAL_LOG).resolve()):  # Tune runs a trial in its own directory (synced to storage)
        _tune_trial(cfg, base, data, prefix)


def _tune_trial(cfg: ExperimentConfig, base: ExperimentConfig, data: TaskData, prefix: PrefixCache | None) -> None:
    gpu = use_gpu(base)
    if gpu and cfg.model.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        # the driver (e.g. a CPU head node) could not see this node's GPU; fail the trial with the same advice
        raise UserError(f"model.dtype=bfloat16 but {torch.cuda.get_device_name()} has no bf16; set model.dtype=float16")
    report: ReportFn = lambda row, d: tune.report(row, checkpoint=tune.Checkpoint.from_directory(str(d)))  # noqa: E731
    # Where each epoch ran: audit trail for retries and multi-node placement.
    tags = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}
    ckpt = tune.get_checkpoint()
    # a checkpoint: a retry after a failure, or a restored sweep, continues from the last epoch reported
    try:
        with ckpt.as_directory() if ckpt is not None else contextlib.nullcontext() as d:
            resume_from = Path(d) / CKPT_NAME if d is not None else None
            fit(cfg, data, report, resume_from, trial_threads(base), gpu, tags, prefix=prefix)
    finally:
        free_memory()


# ---------------------------------------------------------------------------------------------------------------------
# One trial without Ray


def run_single(cfg: ExperimentConfig, out: Path, data: TaskData | None = None) -> dict[str, Any]:
    """One trial into `out`: manifest.json, split.json, metrics.csv, checkpoints/{last,best}, best/ adapter."""
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty; choose a new --out (earlier results are kept)")
    one = dataclasses.replace(cfg, search={}, sweep=dataclasses.replace(cfg.sweep, points_to_evaluate=()))
    check_model_fit(one, load_model_config(cfg.model))  # one trial: its own values, not the search space's
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
    module = fit(cfg, data, report, num_threads=trial_threads(cfg), gpu=use_gpu(cfg))  # as a trial of a sweep
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
