"""Experiment configuration: one frozen dataclass per section, loaded from YAML, overridden by dotted KEY=VALUE.

Everything downstream reads only an `ExperimentConfig`. A trial of the sweep is the base config plus a dict of dotted
overrides (`{"train.lr": 3e-4, "lora.r": 8}`), so the CLI, Tune trials and re-running `best_config.yaml` share
`apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lorahpo.errors import UserError
from lorahpo.schema import ParamSpec, at_least, build, load_yaml, parse_overrides, plain, unknown_key, valid_keys

# The ONE list of evaluation metrics and their direction: the LightningModule computes them, each split's columns
# (`val_*`, `test_*`) and every table derive from it. The tuning metric is the running best of `train.metric`
# ("best_" + name): Optuna is told a trial's LAST reported value, so a running best lets TPE learn from each trial's
# best epoch and lets ASHA compare like with like.
METRICS: dict[str, Literal["min", "max"]] = {
    "accuracy": "max",
    "f1": "max",
    "fbeta": "max",
    "loss": "min",
}
VAL_METRICS: dict[str, Literal["min", "max"]] = {f"val_{k}": mode for k, mode in METRICS.items()}
FBETA_BETA = 3.0  # recall weighs 3x precision: a missed positive (spam, fraud, ...) costs more than a false alarm

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None
    """CSV, TSV, JSONL or Parquet file; a `datasets` DatasetDict (a save_to_disk directory, or `hf:ID` on the hub); or
    a bundled data set: `bundled:sms_spam_collection` (what None means), `bundled:banking77_payments` (intents)."""
    text_column: str = "text"
    """Column of the texts in a user's file (a bundled set has its own)."""
    label_column: str = "label"
    positive_label: str | None = None
    """Binary tasks: the class F-beta is computed for (and `train.class_weight` applies to). None: the second label
    in sorted order (1 for 0/1 labels)."""
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    """train/val/test fractions. The test split is scored once, for the best trial, at the end of a sweep. With given
    splits, val takes split[1] / (split[0] + split[1]) of train when no val split is given."""
    split_column: str | None = None
    """Column of data.path that gives each row's split (train, validation|val|dev, test): the splits are then kept."""
    files: dict[str, str] = field(default_factory=dict)
    """One file per given split instead of data.path: {train: PATH, val: PATH, test: PATH} (val optional)."""
    hf_config: str | None = None
    """`data.path: hf:ID` (a Hugging Face hub dataset): its config name."""
    revision: str | None = None
    """`data.path: hf:ID`: the branch, tag or commit to pin the data a paper reports."""
    hf_splits: dict[str, str] = field(default_factory=dict)
    """A `datasets` source: which of its splits are train, val and test (default: train, validation|val|dev, test)."""
    max_examples: int | None = None
    """Stratified, seeded subsample before splitting (given splits: of train only; CPU budgets); None keeps all."""
    max_length: int = 64
    """Token budget per text; longer texts are truncated and counted in the data report."""

    def __post_init__(self) -> None:
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise UserError(
                f"data.split={list(self.split)} must be three non-negative train/val/test fractions that add up to 1 "
                "(e.g. data.split=[0.7,0.15,0.15])"
            )
        if self.split[0] <= 0 or self.split[1] <= 0:
            raise UserError(f"data.split={list(self.split)}: train and val fractions must be > 0")
        at_least("data.max_length", self.max_length, 2)
        at_least("data.max_examples", self.max_examples, 10, hint=" (or null for all)")
        for key, given in (("files", self.files), ("hf_splits", self.hf_splits)):
            if set(given) - {"train", "val", "test"} or (given and not {"train", "test"} <= set(given)):
                raise UserError(f"data.{key}={given} must name train and test (and val if given), nothing else")
        if self.files and self.path is not None:
            raise UserError(f"data.files and data.path={self.path} both name the data; give one of them")
        if (self.hf_config or self.revision) and not str(self.path).startswith("hf:"):
            raise UserError("data.hf_config and data.revision belong to a hub dataset (data.path=hf:ID); drop them")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m"
    """Hugging Face hub id, local directory, or a built-in: `smollm2-135m` (embedded default), `tiny-random-llama`."""
    num_layers: int | None = None
    """Keep only the first K decoder layers (CPU budgets); None keeps all."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    """Runs code from the model repository; only for repositories you trust."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin the weights a paper reports."""

    def __post_init__(self) -> None:
        at_least("model.num_layers", self.num_layers, 1, hint=" (or null for all layers)")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    """Scaling is alpha / r; kept explicit (the predecessor silently hard-coded it)."""
    dropout: float = 0.05
    last_n: int = 2
    """LoRA goes on the last N decoder layers only; the layers below stay frozen and identical across trials."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        at_least("lora.r", self.r, 1)
        at_least("lora.last_n", self.last_n, 1)
        if not 0 <= self.dropout < 1:
            raise UserError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise UserError("lora.target_modules is empty; name at least one module, e.g. [q_proj,v_proj]")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    batch_size: int = 16
    max_epochs: int = 3
    warmup_ratio: float = 0.1
    """Linear warmup over this fraction of all steps, then linear decay to 0."""
    class_weight: float = 1.0
    """Binary: cross-entropy weight of the positive class (negatives weigh 1). Multi-class: ignored; classes are
    weighted by inverse frequency (mean weight 1)."""
    patience: int = 2
    """Early stopping: epochs without improvement of `train.metric` before a trial stops."""
    metric: str = "val_fbeta"
    """Per-epoch metric for early stopping and the best checkpoint; the sweep tunes its running best."""
    mode: Literal["min", "max"] = "max"
    num_threads: int | None = None
    """torch CPU threads; None: the trial's CPU share (`sweep.cpus_per_trial`)."""

    def __post_init__(self) -> None:
        at_least("train.lr", self.lr, 0, above=True)
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise UserError("train.batch_size, train.max_epochs and train.patience must each be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        at_least("train.class_weight", self.class_weight, 0, above=True)
        at_least("train.weight_decay", self.weight_decay, 0)
        at_least("train.num_threads", self.num_threads, 1, hint=" (or null: the trial's CPU share)")
        if self.metric not in VAL_METRICS:
            raise UserError(f"train.metric={self.metric!r} is not a metric; choose one of {sorted(VAL_METRICS)}")
        if self.mode != VAL_METRICS[self.metric]:
            raise UserError(
                f"train.mode={self.mode!r} contradicts {self.metric} (set train.mode={VAL_METRICS[self.metric]})"
            )

    @property
    def eval_batch_size(self) -> int:
        """Evaluation keeps no activations for a backward pass: twice the training batch fits the same memory."""
        return self.batch_size * 2


@dataclass(frozen=True)
class SweepConfig:
    name: str = "lora_sweep"
    num_samples: int = 8
    max_concurrent_trials: int = 1
    """How many trials run at once. A deterministic sweep's results do not depend on it (--resume accepts another
    value); an asynchronous sweep's do."""
    deterministic: bool = True
    """The trials (params, per-epoch metrics, stop decisions) and the best trial are a function of the config and seed
    alone, at any concurrency, timing or node count: the searcher plans `trials_per_batch` trials at a time from
    finished results in trial-number order, and early stopping decides in trial-number order (a trial that reaches a
    rung before the trials it is compared with waits, paused). False: asynchronous TPE + ASHA, which decide in
    arrival order (fastest use of slots, reproducible in distribution only)."""
    trials_per_batch: int = 4
    """Deterministic sweeps: trials the searcher plans together. Batch k is planned from the trials of batches up to
    k - planning_lag. Results depend on it; keep it fixed (e.g. the cluster's slot count), never derived from
    max_concurrent_trials."""
    planning_lag: int = 2
    """Deterministic sweeps: batch k learns from batches <= k - planning_lag. 2: batch k-1 keeps the slots busy while
    batch k-2 finishes; 1: every batch learns from all before it (with `told: first_rung` it waits only for their
    first rung). Results depend on it, as on trials_per_batch."""
    told: Literal["final", "first_rung"] = "final"
    """Deterministic sweeps: what TPE learns of each trial, its running best at its end (final) or at epoch
    grace_period (first_rung: known for every trial, promoted or stopped, as soon as it reaches the first rung)."""
    rung_min_trials: int = 1
    """Deterministic ASHA: the first n trials at a rung are judged together (successive halving's synchronous rule:
    the best 1/reduction_factor of them go on), later ones against all trials before them; 1 is plain ASHA."""
    cpus_per_trial: float = 2.0
    gpus_per_trial: float = 0.0
    """Fractions share one GPU (0.5: two trials per GPU). Ray only does the accounting: the trials must fit."""
    storage_path: str = "results"
    """Local directory, NFS path shared by all nodes, or s3://bucket/prefix. Relative paths are made absolute."""
    s3_endpoint: str | None = None
    """S3-compatible endpoint (MinIO, moto, ...), e.g. http://127.0.0.1:9000; None uses AWS."""
    searcher: Literal["tpe", "random"] = "tpe"
    n_startup_trials: int = 4
    """TPE samples at random until it has this many finished trials to model the space from (deterministic sweeps:
    the finished trials a batch is planned from, so with 4 per batch TPE models from batch 2 on when this is 4)."""
    points_to_evaluate: tuple[dict[str, Any], ...] = ()
    """Configs tried first (e.g. a sensible untuned default as trial 0), as dotted-key dicts."""
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    max_failures: int = 1
    """Retries of a failed trial, each from its last checkpoint."""
    num_to_keep: int = 2
    """Checkpoints kept per trial (its best and its latest, for resume)."""
    reuse_actors: bool = True
    """One worker process runs trial after trial (each trial still seeds and builds everything anew). False starts a
    fresh process per trial: ~7 s more per trial, but trials spread over a cluster's nodes even when they are short."""
    loggers: tuple[Literal["tensorboard", "mlflow", "wandb"], ...] = ("tensorboard",)
    """Trackers fed live by the driver (the Optuna journal optuna_journal.log is always written): tensorboard (event
    files and HParams in each trial's directory), mlflow (MLFLOW_TRACKING_URI; experiment = sweep.name, trial runs
    nested under a sweep run; `pip install 'lorahpo[mlflow]'`), wandb (WANDB_PROJECT, WANDB_MODE=offline; trial runs
    grouped by sweep.name; `pip install 'lorahpo[wandb]'`)."""
    prefix_cache: bool = True
    """Run the frozen layers below the trials' lowest LoRA layer once per sweep (over train and val) and train
    every trial from their cached hidden states: each trial then pays only for the layers it trains. Equal to the full
    model up to float noise; exported models and the test score always use the full model."""
    prefix_cache_max_gb: float | None = None
    """Most the prefix cache may take in a node's Ray object store. null: half the smallest trial node's store. The size
    is known before anything is built; too large even for the lowest cut is an error."""

    def __post_init__(self) -> None:
        at_least("sweep.num_samples", self.num_samples, 1)
        at_least("sweep.max_concurrent_trials", self.max_concurrent_trials, 1)
        at_least("sweep.trials_per_batch", self.trials_per_batch, 1, hint=" (e.g. 4)")
        at_least("sweep.cpus_per_trial", self.cpus_per_trial, 0, above=True)
        at_least("sweep.gpus_per_trial", self.gpus_per_trial, 0)
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise UserError(f"sweep.gpus_per_trial={self.gpus_per_trial}: above 1, use a whole number of GPUs")
        at_least("sweep.grace_period", self.grace_period, 1)
        at_least("sweep.planning_lag", self.planning_lag, 1)
        at_least("sweep.rung_min_trials", self.rung_min_trials, 1)
        self.check_batches()
        at_least("sweep.reduction_factor", self.reduction_factor, 2)
        at_least("sweep.max_failures", self.max_failures, 0)
        at_least("sweep.num_to_keep", self.num_to_keep, 1)
        at_least("sweep.prefix_cache_max_gb", self.prefix_cache_max_gb, 0, above=True, hint=" (or null: no cap)")
        if len(set(self.loggers)) != len(self.loggers):
            raise UserError(f"sweep.loggers={list(self.loggers)} names a logger twice; list each once")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name) or self.name in (".", ".."):
            raise UserError(
                f"sweep.name={self.name!r} must be a plain name: letters, digits, '.', '_' or '-' (not '.' or '..'), "
                "e.g. sweep.name=lora_sweep"
            )

    def check_batches(self) -> None:
        """The deterministic planner's keys: refused where they would never run (an asynchronous sweep) or where the
        first rung's cohort could never form."""
        own = {
            f.name: f.default for f in dataclasses.fields(self) if f.name in ("planning_lag", "told", "rung_min_trials")
        }
        if not self.deterministic and any(getattr(self, k) != v for k, v in own.items()):
            keys = ", ".join(f"sweep.{k}={v}" for k, v in own.items())
            raise UserError(f"sweep.planning_lag, told and rung_min_trials are for deterministic sweeps; set {keys}")
        n = self.rung_min_trials
        if self.scheduler == "asha" and n > self.num_samples:  # FIFO stops nothing: no cohort to wait for
            raise UserError(
                f"sweep.rung_min_trials={n} judges the first {n} trials together, but sweep.num_samples="
                f"{self.num_samples} runs fewer: lower sweep.rung_min_trials or raise sweep.num_samples"
            )
        if self.scheduler == "asha" and self.told == "final" and n > self.trials_per_batch * self.planning_lag:
            raise UserError(
                f"sweep.rung_min_trials={n} with sweep.told=final would wait forever: the first {n} trials pause at "
                f"the first rung, and batches after the first {self.trials_per_batch * self.planning_lag} trials "
                "wait for them to end; set sweep.told=first_rung or rung_min_trials <= trials_per_batch x planning_lag"
            )


@dataclass(frozen=True)
class FinalConfig:
    """The final evaluation after the search: the best config re-trained with fresh seeds next to the baseline, each
    run's best-val checkpoint scored once on the test split (lorahpo/final.py). It never feeds back into the search."""

    seeds: int = 0
    """Fresh seeds per config (paired: the tuned and the baseline run i share seed i). 0 = off; the gain's interval
    holds the seeds' noise from k >= 2 on, the test set's from k = 1 (stats.GAIN_METHOD). A run costs about a trial."""
    baseline: bool = True
    """Also re-train the baseline: the first `sweep.points_to_evaluate` entry, else the config's own values for the
    search space's keys. Without it there is no tuning gain, only the tuned config's spread over seeds."""

    def __post_init__(self) -> None:
        if not 0 <= self.seeds <= 1000:  # each seed re-trains the best config (and the baseline): about a trial each
            raise UserError(f"final.seeds={self.seeds} must be >= 0 (0 turns the final evaluation off) and <= 1000")


@dataclass(frozen=True)
class ExperimentConfig:
    seed: int = 42
    """Root seed: the searcher's sampler and every trial (seeded before its model is built) derive from it."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    search: dict[str, ParamSpec] = field(default_factory=dict)
    """Search space keyed by dotted config path."""

    def __post_init__(self) -> None:
        if self.seed is None or not 0 <= self.seed < 2**32:  # numpy's and scikit-learn's seed range
            raise UserError(f"seed={self.seed} must be an integer from 0 to 2**32 - 1 (e.g. seed=42)")
        for key, spec in self.search.items():
            _validate_spec(key, spec)
        if self.final.seeds > 0 and self.data.split[2] == 0:
            raise UserError(
                f"final.seeds={self.final.seeds} scores runs on the test split, but data.split={list(self.data.split)} "
                "has none; give it one (e.g. data.split=[0.7,0.15,0.15]) or set final.seeds=0"
            )
        for point in self.sweep.points_to_evaluate:  # complete, in range: checks.check_points
            extra = sorted(set(point) - set(self.search))
            if extra:
                raise UserError(
                    f"sweep.points_to_evaluate names {extra}, which are not in the search space "
                    f"{sorted(self.search)}; add them to search or drop them from the point"
                )


def tuning_metric(cfg: ExperimentConfig) -> str:
    """The metric the sweep optimises: the per-trial running best of `train.metric`."""
    return f"best_{cfg.train.metric}"


def direction(cfg: ExperimentConfig) -> str:
    """Optuna's name for `train.mode`: the direction of every study of the sweep."""
    return "maximize" if cfg.train.mode == "max" else "minimize"


# ---------------------------------------------------------------------------------------------------------------------
# Loading, overrides, dumping


# What a trial can change: its LoRA adapter and its training. The data are tokenized once per sweep, the base model is
# shared, and the metric, its direction and max_epochs (ASHA's max_t) define the sweep itself.
TUNABLE = ("lora.r", "lora.alpha", "lora.dropout", "lora.last_n", "lora.target_modules",
           "train.lr", "train.weight_decay", "train.batch_size", "train.warmup_ratio", "train.class_weight",
           "train.patience")  # fmt: skip


def _validate_spec(key: str, spec: ParamSpec) -> None:
    if key not in TUNABLE:
        if key in valid_keys(ExperimentConfig):
            raise UserError(
                f"search.{key}: a trial cannot change {key} (it is fixed for the whole sweep); the search space may "
                f"name {', '.join(TUNABLE)}"
            )
        raise unknown_key(f"search.{key}", list(TUNABLE))
    spec.validate(f"search.{key}")


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain nested dict (lists, no tuples), the same shape as the YAML files."""
    d = dataclasses.asdict(cfg)
    d["search"] = {k: {a: b for a, b in dataclasses.asdict(s).items() if b is not None} for k, s in cfg.search.items()}
    return plain(d)


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> ExperimentConfig:
    """Read a YAML config (default: configs/default.yaml) and apply dotted overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise UserError(f"config file {path} does not exist (pass --config PATH to an existing YAML file)")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), f"config file {path}") or {}
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return apply_overrides(build(ExperimentConfig, raw), overrides or {})


def config_from_yaml(text: str) -> ExperimentConfig:
    """A config from YAML text (e.g. an experiment's config.yaml read from S3)."""
    return build(ExperimentConfig, load_yaml(text, "it") or {})  # "it": the caller names the file


def apply_overrides(cfg: ExperimentConfig, overrides: list[str] | dict[str, Any]) -> ExperimentConfig:
    """Return a copy of `cfg` with dotted overrides applied (validated like the YAML)."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    raw = to_dict(cfg)
    keys = valid_keys(ExperimentConfig)
    for key, value in overrides.items():
        if key == "search" or key.startswith("search."):
            raise UserError(f"{key}: the search space is set in the config file, not on the command line")
        if key not in keys:
            raise unknown_key(key, keys)
        *sections, leaf = key.split(".")
        node = raw
        for s in sections:
            node = node[s]
        node[leaf] = value
    return build(ExperimentConfig, raw)


def config_yaml(cfg: ExperimentConfig) -> str:
    """YAML text that `config_from_yaml` (and, written to a file, `load_config`) reads back to an equal object."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
