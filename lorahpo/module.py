"""LightningModule: class-weighted cross-entropy, the pinned metrics (config.METRICS: accuracy, macro-F1, F-beta with
beta=3, loss), AdamW + warmup; the Trainer every trial and every evaluation uses; and `score_split` (`evaluate`: its
metrics alone), the ONE routine that scores a split outside training (the test split, a reloaded checkpoint)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryFBetaScore,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassFBetaScore,
)
from transformers import get_linear_schedule_with_warmup

from lorahpo.config import FBETA_BETA, METRICS, ExperimentConfig, TrainConfig
from lorahpo.data import Split, make_loader
from lorahpo.model import upper_logits
from lorahpo.repro import epoch_seed

PRECISION = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}


def make_metrics(num_labels: int) -> torchmetrics.MetricCollection:
    """Binary: accuracy, macro-F1 over both classes, F-beta of the positive class (index 1).
    Multi-class: accuracy, macro-F1, macro F-beta. (The loss, the fourth metric, is tracked by the module.)"""
    if num_labels == 2:
        accuracy, fbeta = BinaryAccuracy(), BinaryFBetaScore(beta=FBETA_BETA)
    else:
        accuracy = MulticlassAccuracy(num_labels, average="micro")
        fbeta = MulticlassFBetaScore(beta=FBETA_BETA, num_classes=num_labels, average="macro")
    metrics = {"accuracy": accuracy, "f1": MulticlassF1Score(num_labels, average="macro"), "fbeta": fbeta}
    assert set(metrics) | {"loss"} == set(METRICS), "config.METRICS and the metrics computed here must agree"
    return torchmetrics.MetricCollection(metrics)


def class_weights(labels: list[int], num_labels: int, positive_weight: float) -> torch.Tensor:
    """Binary: [1, positive_weight]. Multi-class: inverse class frequency, scaled to mean 1 (`class_weight` unused)."""
    if num_labels == 2:
        return torch.tensor([1.0, positive_weight])
    counts = torch.bincount(torch.tensor(labels), minlength=num_labels).float().clamp(min=1)
    w = counts.sum() / counts
    return w / w.mean()


class LoraClassifier(L.LightningModule):
    """Trains the LoRA + head parameters of a sequence classifier; checkpoints hold only those (MBs, not GBs)."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        num_labels: int,
        weights: torch.Tensor,
        seed: int,
        cut: int | None = None,
    ):
        super().__init__()
        self.model, self.cfg, self.seed = model, cfg, seed
        self.cut = cut  # batches with cached "states" enter the model at this layer (lorahpo.prefix)
        self.register_buffer("weights", weights.float(), persistent=False)
        self.eval_metrics = make_metrics(num_labels)
        self.eval_loss = torchmetrics.MeanMetric()
        self.train_loss = torchmetrics.MeanMetric()
        # Checkpoints hold only trainable tensors; the frozen base comes from the model source on load.
        self.strict_loading = False

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "states" in batch:  # the frozen layers below `cut` were run once per sweep: run only the rest
            ids, mask = batch["input_ids"], batch["attention_mask"]
            return upper_logits(self.model, batch["states"], mask, ids, self.cut).float()
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    def train_loss_epoch(self) -> float:
        return self.train_loss.compute().item()

    def on_train_epoch_start(self) -> None:
        self.train_loss.reset()
        # Per-epoch randomness, seeded by (seed, epoch) so a resumed trial replays the epoch exactly: the batch order
        # (Lightning never tells a batch sampler the epoch) and dropout (it draws from the global RNG).
        batches = getattr(self.trainer.train_dataloader, "batch_sampler", None)
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(self.current_epoch)
        torch.manual_seed(epoch_seed(self.seed, self.current_epoch))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["labels"], weight=self.weights)
        self.train_loss.update(loss.detach(), len(logits))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        # Unweighted: comparable across trials that tune class_weight.
        self.eval_loss.update(F.cross_entropy(logits, batch["labels"], reduction="sum") / len(logits), len(logits))
        preds = logits.argmax(-1)
        self.eval_metrics.update(preds, batch["labels"])
        return preds  # per-example predictions for `score_split` (Lightning keeps no step outputs itself)

    def on_validation_epoch_end(self) -> None:
        out = {k: v.item() for k, v in self.eval_metrics.compute().items()}
        out["loss"] = self.eval_loss.compute().item()
        self.eval_metrics.reset()
        self.eval_loss.reset()
        self.log_dict({f"val_{k}": out[k] for k in METRICS})

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        total = self.trainer.estimated_stepping_batches
        sched = get_linear_schedule_with_warmup(opt, int(self.cfg.warmup_ratio * total), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def make_trainer(cfg: ExperimentConfig, callbacks: Sequence[L.Callback] = (), gpu: bool = False) -> L.Trainer:
    """The Trainer of every trial and every evaluation: the config's precision (bf16/fp16 = mixed, autocast over a
    half-precision base with fp32 adapters and head), one device, no Lightning logging or checkpointing of its own."""
    return L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        max_epochs=cfg.train.max_epochs,
        callbacks=list(callbacks),
        precision=PRECISION[cfg.model.dtype],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic="warn",
        use_distributed_sampler=False,
    )


class _Predictions(L.Callback):
    """Collects each validation batch's predictions (what `validation_step` returns), in batch order."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_validation_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.batches.append(outputs.detach().cpu())


def score_split(
    module: LoraClassifier, split: Split, cfg: ExperimentConfig, tokenizer: Any, gpu: bool = False
) -> tuple[dict[str, float], list[int]]:
    """Every metric of config.METRICS on a split, computed exactly as validation does during training (same batches,
    same precision and autocast, same device): ({"accuracy": ..., "f1": ..., "fbeta": ..., "loss": ...}, the
    predicted label index of each example in split order, for intervals over examples)."""
    loader = make_loader(split, tokenizer, cfg.train.eval_batch_size, cfg.seed, shuffle=False)
    collected = _Predictions()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers).*")
        out = make_trainer(cfg, [collected], gpu=gpu).validate(module, loader, verbose=False)[0]
    # Batches are grouped by length, so they come in another order than the split's: put each prediction back.
    order = [i for batch in loader.batch_sampler.batches(0) for i in batch]
    flat = torch.cat(collected.batches).tolist() if collected.batches else []
    assert sorted(order) == list(range(len(split))) and len(flat) == len(order), "every example predicted once"
    preds = [0] * len(split)
    for i, p in zip(order, flat):
        preds[i] = int(p)
    return {k.removeprefix("val_"): float(v) for k, v in out.items()}, preds


def evaluate(module: LoraClassifier, split: Split, cfg: ExperimentConfig, tokenizer: Any, gpu: bool = False) -> dict:
    """The metrics of `score_split` alone: {"accuracy": ..., "f1": ..., "fbeta": ..., "loss": ...}."""
    return score_split(module, split, cfg, tokenizer, gpu)[0]
