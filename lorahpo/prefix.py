"""The frozen-prefix cache: the layers below a trial's lowest LoRA layer, computed once per sweep.

A trial with `lora.last_n = k` of L layers trains layers L-k..L-1; layers 0..L-k-1 are frozen and give the same hidden
states for an input in every trial and every epoch. Before the first trial, one Ray task (with a trial's resources, so
on a GPU when trials get one) runs them once over train and val and keeps, per example and for real tokens only, the
hidden states entering layer c ("cut c") for every cut the search space can ask for (c = L-k for the space's
`lora.last_n` values, c > 0), in the model's dtype. If they fit nowhere, only the lowest cut is kept: a trial with a
higher cut runs the frozen layers in between from it, without gradients. A trial batches the cached states as it
batches ids and runs only the layers above its cut (model.upper_logits): the full model's logits up to float noise
(`noise_rtol`; tests/test_prefix.py). Not the test split: it is scored once, at the end, through the full model.

Where it lives (`place`): in Ray's object store, where every trial on a node maps the same arrays, zero-copy, as it gets
the tokenized data, and trials on other nodes fetch it: every wanted cut when they fit in half of the smallest trial
node's store, else the lowest cut alone, else the sweep is refused before anything is built (one line with the fixes).
Never in the results storage. The build is deterministic (fixed batches, thread count and device), so a resumed or
repeated sweep trains on the same inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from lorahpo.config import ExperimentConfig
from lorahpo.data import LengthGroupedBatches, Split, TaskData
from lorahpo.errors import UserError
from lorahpo.model import build_base, frozen_states
from lorahpo.repro import seed_everything_everywhere, trial_task_options, trial_threads, use_gpu
from lorahpo.sources import DTYPES
from lorahpo.space import last_n_values

log = logging.getLogger(__name__)
SPLITS = ("train", "val")  # not test: the test split is scored once, through the full model
# numpy has no bfloat16: its raw bits are stored as uint16 (data.pad_states views them back)
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
MEMORY_SHARE = 0.5  # of a node's object store: the tokenized data, checkpoints and Ray's own objects need the rest
GB = 1e9
# A trial whose cut is missing recomputes the frozen layers above the lowest cut in every epoch: every cut comes first.
ORDER = "every wanted cut, else the lowest cut alone, in Ray's object store"


@dataclass(frozen=True)
class PrefixPlan:
    """What the cache holds: the layer count, the cuts kept (ascending), the cuts the space asks for, the real tokens
    per split, the hidden size and dtype; and why those cuts (decided by `place` against the nodes' capacity)."""

    layers: int
    cuts: tuple[int, ...]
    wanted: tuple[int, ...]
    tokens: dict[str, int]
    hidden: int
    dtype: str
    why: str = ""  # what `place` chose and why (the log, the manifest, the summary)

    def nbytes(self, cuts: tuple[int, ...] | None = None) -> int:
        itemsize = np.dtype(NUMPY_DTYPES[self.dtype]).itemsize
        return len(self.cuts if cuts is None else cuts) * sum(self.tokens.values()) * self.hidden * itemsize


@dataclass
class PrefixCache:
    """The built cache: `arrays[f"{cut}/{split}"]` holds the split's examples' states back to back, [tokens, hidden]
    (example i's rows follow from the token counts)."""

    plan: PrefixPlan
    arrays: dict[str, np.ndarray]
    build_s: float = 0.0


def plan_prefix(cfg: ExperimentConfig, model_config: Any, data: TaskData) -> PrefixPlan | None:
    """The cuts this sweep's trials can use and their size; None when the cache is off or no trial has a frozen
    layer (`lora.last_n` = all layers). A base with attention dropout is refused: the cache is built in eval mode, so
    its frozen layers would not drop what the full model's training drops."""
    if not cfg.sweep.prefix_cache:
        return None
    if getattr(model_config, "attention_dropout", 0):
        raise UserError(
            f"model {cfg.model.name} has attention_dropout={model_config.attention_dropout}: the prefix cache runs the "
            "frozen layers once without dropout, which training with dropout does not; set sweep.prefix_cache=false"
        )
    layers = model_config.num_hidden_layers
    wanted = tuple(sorted({layers - k for k in last_n_values(cfg) if layers - k > 0}))
    if not wanted:
        return None
    tokens = {name: sum(len(t) for t in getattr(data, name).input_ids) for name in SPLITS}
    return PrefixPlan(layers, wanted, wanted, tokens, model_config.hidden_size, cfg.model.dtype)


def describe_plan(plan: PrefixPlan) -> dict[str, Any]:
    """The plan in plain values (--dry-run, manifest)."""
    return {
        "cuts": list(plan.cuts),
        "wanted_cuts": list(plan.wanted),
        "layers": plan.layers,
        "why": plan.why,
        "tokens": sum(plan.tokens.values()),
        "hidden": plan.hidden,
        "dtype": plan.dtype,
        "gb": round(plan.nbytes() / GB, 4),
    }


def place(plan: PrefixPlan, memory: float, cap: float | None) -> PrefixPlan:
    """The first of ORDER that fits, with the reason in `why`; else a UserError that says what it needs. `memory`:
    bytes usable in the smallest trial node's object store; `cap`: sweep.prefix_cache_max_gb."""
    limit = float("inf") if cap is None else cap * GB
    room = f"{memory / GB:.3g} GB usable in Ray's object store; sweep.prefix_cache_max_gb={cap}"
    for cuts in (plan.wanted, plan.wanted[:1]):
        if plan.nbytes(cuts) <= min(memory, limit):
            why = (
                f"{'every wanted cut' if cuts == plan.wanted else 'the lowest cut'} "
                f"({plan.nbytes(cuts) / GB:.3g} GB of {plan.nbytes(plan.wanted) / GB:.3g}): the first that fits of "
                f"{ORDER} ({room})"
            )
            return dataclasses.replace(plan, cuts=cuts, why=why)
    need = plan.nbytes(plan.wanted[:1])
    what = f"{sum(plan.tokens.values()):,} tokens x {plan.hidden} x {plan.dtype}, the inputs of layer {plan.wanted[0]}"
    if cap is not None and need <= memory:
        why, fix = f"more than sweep.prefix_cache_max_gb={cap:g}", "raise it"
    else:
        why, fix = f"more than a node has ({room})", "give Ray a larger object store (ray start --object-store-memory)"
    raise UserError(
        f"the prefix cache needs {need / GB:.3g} GB ({what}), {why}; {fix}, set sweep.prefix_cache=false, or lower "
        "data.max_examples or data.max_length"
    )


def noise_rtol(dtype: str, layers: int) -> float:
    """How far float noise alone moves the cached path's output from the full model's, relative to its scale (the
    largest logit; the val loss, or 1 if it is smaller). Per layer, the two paths round its output to the model's dtype
    (one unit each at most) and sum in fp32 in another order (other kernels, CPUs, batch shapes: 256 units, ten times
    the most measured); the residual stream carries each layer's error up, so they add over the layers. Measured at 4
    layers: float32 1.2e-5 of the largest logit (Intel Xeon; 1.4e-6 on AMD EPYC), bfloat16 1.5e-2; the rule gives
    1.2e-4 and 6.3e-2. Wrong states (another cut's) move the logits by ~1 (tests/test_prefix.py)."""
    return layers * (2 * torch.finfo(DTYPES[dtype]).eps + 256 * torch.finfo(torch.float32).eps)


# ---------------------------------------------------------------------------------------------------------------------
# Building


def _to_numpy(hidden: torch.Tensor, dtype: str) -> np.ndarray:
    hidden = hidden.to(DTYPES[dtype]).cpu()
    return hidden.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else hidden.numpy()


def build_in_memory(cfg: ExperimentConfig, data: TaskData, plan: PrefixPlan) -> PrefixCache:
    """Run the frozen layers over every split and keep each example's real-token states at every cut of the plan.
    Fixed batches (length-grouped, unshuffled) and thread count; the precision is the trials' (autocast over a
    half-precision base)."""
    start = time.perf_counter()
    torch.set_num_threads(trial_threads(cfg))  # a trial's, fixed: so the bits are too
    seed_everything_everywhere(cfg.seed)  # deterministic kernels (the unused head's init draws from it too)
    device = torch.device("cuda" if use_gpu(cfg) else "cpu")  # where trials run: the same kernels as training
    model = build_base(cfg.model, data.num_labels, data.tokenizer.pad_token_id).to(device).eval()
    autocast = torch.autocast(device.type, dtype=DTYPES[cfg.model.dtype], enabled=cfg.model.dtype != "float32")
    arrays = {}
    for name in SPLITS:
        split: Split = getattr(data, name)
        lengths = [len(t) for t in split.input_ids]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        out = {c: np.empty((int(offsets[-1]), plan.hidden), NUMPY_DTYPES[plan.dtype]) for c in plan.cuts}
        for idx in LengthGroupedBatches(lengths, cfg.train.eval_batch_size, cfg.seed, shuffle=False):
            batch = data.tokenizer.pad({"input_ids": [split.input_ids[i] for i in idx]}, return_tensors="pt")
            with autocast:
                states = frozen_states(
                    model, batch["input_ids"].to(device), batch["attention_mask"].to(device), list(plan.cuts)
                )
            for c, hidden in states.items():
                rows = _to_numpy(hidden, plan.dtype)
                for j, i in enumerate(idx):
                    out[c][offsets[i] : offsets[i + 1]] = rows[j, : lengths[i]]
        arrays.update({f"{c}/{name}": a for c, a in out.items()})
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return PrefixCache(plan, arrays, build_s=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------------------
# The sweep's side (driver, on a running Ray) and the trial's side


def trial_nodes(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Alive Ray nodes that can hold a trial (the others never see one)."""
    cpus, gpus = cfg.sweep.cpus_per_trial, cfg.sweep.gpus_per_trial
    return [
        n
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("GPU", 0) >= gpus
    ]


def _build_task(
    cfg: ExperimentConfig, data: TaskData, plan: PrefixPlan, env: dict[str, str]
) -> tuple[float, PrefixCache]:
    os.environ.update(env)  # e.g. HF_TOKEN for a gated base (forwarded like the trials')
    cache = build_in_memory(cfg, data, plan)
    return cache.build_s, cache


def prepare_prefix(
    cfg: ExperimentConfig, data: TaskData, plan: PrefixPlan, env: dict[str, str]
) -> tuple[Any, dict[str, Any]]:
    """Place the cache (a UserError if it fits nowhere), build it before the first trial, and return what trials get
    (an object-store reference to the cache) and its description."""
    nodes = trial_nodes(cfg)
    memory = MEMORY_SHARE * min(n["Resources"].get("object_store_memory", 0) for n in nodes)
    plan = place(plan, memory, cfg.sweep.prefix_cache_max_gb)
    info = describe_plan(plan)
    log.info(
        "prefix cache of %s real tokens x %d (%s), %d node(s): %s; building it",
        f"{info['tokens']:,}",
        plan.hidden,
        plan.dtype,
        len(nodes),
        plan.why,
    )
    start = time.perf_counter()
    # One build, in a task with a trial's resources. max_calls=1: the builder's process exits afterwards, so its model
    # memory (and GPU memory) is the trials' again. Two returns: a small one the driver waits on (and that carries a
    # failure), the cache itself for the trials (the driver never copies it; trials on other nodes fetch it).
    task = ray.remote(max_calls=1, num_returns=2)(_build_task).options(**trial_task_options(cfg))
    small, cache = task.remote(cfg, data, plan, env)
    info["build_s"] = ray.get(small)
    info["ready_s"] = time.perf_counter() - start  # the build plus the builder's process start (once per sweep)
    log.info("prefix cache ready after %.1f s (build %.1f s)", info["ready_s"], info["build_s"])
    return cache, info


def cut_for(cache: PrefixCache, last_n: int) -> int | None:
    """The highest cached cut at or below the trial's lowest LoRA layer; None: no frozen layer, the full model runs."""
    usable = [c for c in cache.plan.cuts if c <= cache.plan.layers - last_n]
    return max(usable) if usable else None


def split_states(cache: PrefixCache, cut: int, name: str, split: Split) -> list[np.ndarray]:
    """Example i's cached states ([its tokens, hidden], views into the shared arrays: nothing copied)."""
    values = cache.arrays[f"{cut}/{name}"]
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in split.input_ids])])
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(split))]
