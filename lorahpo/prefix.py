"""The frozen-prefix cache: the layers below a trial's lowest LoRA layer, computed once per sweep.

A trial with `lora.last_n = k` of L layers trains layers L-k..L-1; layers 0..L-k-1 are frozen and give the same hidden
states for an input in every trial and every epoch. Before the first trial, one Ray task (with a trial's resources, so
on a GPU when trials get one) runs them once over train and val and keeps, per example and for real tokens only, the
hidden states entering layer c ("cut c") for every cut the search space can ask for (c = L-k for the space's
`lora.last_n` values, c > 0), in the model's dtype. If they fit nowhere, only the lowest cut is kept: a trial with a
higher cut runs the frozen layers in between from it, without gradients. A trial batches the cached states as it
batches ids and runs only the layers above its cut (model.upper_logits): the full model's logits up to float noise
(`noise_rtol`; tests/test_prefix.py). Not the test split: it is scored once, at the end, through the full model.

Where it lives (`place`): in Ray's object store when it fits (half of the smallest trial node's store; every trial on a
node maps the same arrays, zero-copy, as it gets the tokenized data), else as memory-mapped .npy files on each node's
local disk (`<LORAHPO_CACHE>/prefix/<key>/`, built once per node by one task per node, or by the first trial on a node
that joined later, reused by every later trial and sweep on that node with the same weights, data and hardware; the
key names the weights by content: sources.weights_id). Never in the results storage. The build is deterministic (fixed
batches, thread count and device), so every node of the same hardware holds the same bits and a resumed or repeated
sweep trains on the same inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
import torch
import transformers
from filelock import FileLock, Timeout
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lorahpo.config import ExperimentConfig
from lorahpo.data import LengthGroupedBatches, Split, TaskData
from lorahpo.errors import UserError
from lorahpo.model import build_base, frozen_states
from lorahpo.repro import seed_everything_everywhere, trial_task_options, trial_threads, use_gpu
from lorahpo.sources import DTYPES, cache_dir, weights_id
from lorahpo.space import last_n_values

log = logging.getLogger(__name__)
FORMAT = 2  # bump when the layout or the build changes: old disk caches are then ignored, not misread
SPLITS = ("train", "val")  # not test: the test split is scored once, through the full model
# numpy has no bfloat16: its raw bits are stored as uint16 (data.pad_states views them back)
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
MEMORY_SHARE = 0.5  # of a node's object store: the tokenized data, checkpoints and Ray's own objects need the rest
GB = 1e9
# A trial whose cut is missing recomputes the frozen layers above the lowest cut in every epoch; reading its states
# from local disk costs less. So more cuts come first, and at equal cuts memory (zero-copy, no disk reads).
ORDER = "every wanted cut in Ray's object store, every wanted cut on local disk, the lowest cut in the store, on disk"


@dataclass(frozen=True)
class PrefixPlan:
    """What the cache holds: the layer count, the cuts kept (ascending), the cuts the space asks for, the real tokens
    per split, the hidden size and dtype; and where it lives (decided by `place` against the nodes' capacity)."""

    layers: int
    cuts: tuple[int, ...]
    wanted: tuple[int, ...]
    tokens: dict[str, int]
    hidden: int
    dtype: str
    where: Literal["memory", "disk"] = "memory"
    why: str = ""  # what `place` chose and why (the log, the manifest, the summary)

    def nbytes(self, cuts: tuple[int, ...] | None = None) -> int:
        itemsize = np.dtype(NUMPY_DTYPES[self.dtype]).itemsize
        return len(self.cuts if cuts is None else cuts) * sum(self.tokens.values()) * self.hidden * itemsize


@dataclass
class PrefixCache:
    """The built cache: `arrays[f"{cut}/{split}"]` holds the split's examples' states back to back, [tokens, hidden]
    (example i's rows follow from the token counts). Disk caches travel without arrays; `open_prefix` maps them."""

    plan: PrefixPlan
    arrays: dict[str, np.ndarray]
    directory: str | None = None
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
        "where": plan.where,
        "why": plan.why,
        "tokens": sum(plan.tokens.values()),
        "hidden": plan.hidden,
        "dtype": plan.dtype,
        "gb": round(plan.nbytes() / GB, 4),
    }


def place(plan: PrefixPlan, memory: float, disk: float, cap: float | None, disk_dir: Path) -> PrefixPlan:
    """The first of ORDER that fits, with the reason in `why`; else a UserError that says what it needs. `memory`,
    `disk`: bytes usable on the smallest node; `cap`: sweep.prefix_cache_max_gb."""
    limit = float("inf") if cap is None else cap * GB
    room = f"{memory / GB:.3g} GB usable in Ray's object store, {disk / GB:.3g} GB free at {disk_dir}"
    for cuts in (plan.wanted, plan.wanted[:1]):
        for where, space, at in (("memory", memory, "in Ray's object store"), ("disk", disk, "on local disk")):
            if plan.nbytes(cuts) <= min(space, limit):
                why = (
                    f"{'every wanted cut' if cuts == plan.wanted else 'the lowest cut'} {at} "
                    f"({plan.nbytes(cuts) / GB:.3g} GB of {plan.nbytes(plan.wanted) / GB:.3g}): the first that fits "
                    f"of {ORDER} ({room}; sweep.prefix_cache_max_gb={cap})"
                )
                return dataclasses.replace(plan, cuts=cuts, where=where, why=why)
    need = plan.nbytes(plan.wanted[:1])
    what = f"{sum(plan.tokens.values()):,} tokens x {plan.hidden} x {plan.dtype}, the inputs of layer {plan.wanted[0]}"
    if cap is not None and need <= max(memory, disk):
        why, fix = f"more than sweep.prefix_cache_max_gb={cap:g}", "raise it"
    else:
        why, fix = f"more than a node has ({room})", "free disk"
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


def build_states(
    cfg: ExperimentConfig, data: TaskData, plan: PrefixPlan, alloc: Callable[[str, tuple[int, int]], np.ndarray]
) -> dict[str, np.ndarray]:
    """Run the frozen layers over every split and write each example's real-token states into `alloc(name, shape)`
    arrays (np.empty, or memory-mapped files). Fixed batches (length-grouped, unshuffled) and thread count; the
    precision is the trials' (autocast over a half-precision base)."""
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
        out = {c: alloc(f"{c}/{name}", (int(offsets[-1]), plan.hidden)) for c in plan.cuts}
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
    return arrays


def build_in_memory(cfg: ExperimentConfig, data: TaskData, plan: PrefixPlan) -> PrefixCache:
    """The cache as in-memory arrays (what the sweep's build task returns into the object store)."""
    start = time.perf_counter()
    dtype = NUMPY_DTYPES[plan.dtype]
    arrays = build_states(cfg, data, plan, lambda name, shape: np.empty(shape, dtype))
    return PrefixCache(plan, arrays, build_s=time.perf_counter() - start)


def cache_key(cfg: ExperimentConfig, data: TaskData, plan: PrefixPlan) -> str:
    """Everything the cached bits depend on: the inputs (token ids), the model (its weights by content, not by name:
    a local directory updated in place or a hub branch that moved gets a new key), the cuts, the build's batches,
    threads and device, and the library versions."""
    h = hashlib.sha256()
    for name in SPLITS:
        h.update(json.dumps(getattr(data, name).input_ids).encode())
    device = torch.device("cuda" if use_gpu(cfg) else "cpu")
    h.update(
        json.dumps(
            {
                "format": FORMAT,
                "model": dataclasses.asdict(cfg.model),
                "weights": weights_id(cfg.model),
                "cuts": plan.cuts,
                "batch": cfg.train.eval_batch_size,
                "seed": cfg.seed,
                "threads": trial_threads(cfg),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()[:20]


def prefix_root() -> Path:
    """Local directory of the disk caches (under LORAHPO_CACHE, else ~/.cache/lorahpo)."""
    return cache_dir() / "prefix"


def _file(directory: Path, name: str) -> Path:
    return directory / (name.replace("/", "_") + ".npy")


def clear_staging(root: Path) -> None:
    """Remove the staging folders (`<key>.tmp<pid>`) of builds that died: a live builder holds its key's lock until it
    has renamed its folder into place, so a staging folder whose lock is free is a dead build's."""
    for staging in root.glob("*.tmp*"):
        try:
            with FileLock(str(root / staging.name.split(".tmp")[0]) + ".lock", timeout=0):
                shutil.rmtree(staging, ignore_errors=True)
        except Timeout:
            continue


def ensure_on_disk(cfg: ExperimentConfig, data: TaskData, plan: PrefixPlan) -> PrefixCache:
    """This node's disk cache, memory-mapped read-only; built first if the node has none (one builder per node: the
    others wait on the lock, then map what it wrote)."""
    directory = prefix_root() / cache_key(cfg, data, plan)
    directory.parent.mkdir(parents=True, exist_ok=True)
    clear_staging(directory.parent)
    build_s = 0.0
    with FileLock(str(directory) + ".lock"):
        if not (directory / "plan.json").is_file():
            free = shutil.disk_usage(directory.parent).free
            if plan.nbytes() > free:
                raise UserError(
                    f"the prefix cache needs {plan.nbytes() / GB:.3g} GB of local disk on node "
                    f"{os.uname().nodename} but {directory.parent} has {free / GB:.3g} GB free; free disk or set "
                    "sweep.prefix_cache=false"
                )
            start = time.perf_counter()
            staging = directory.with_name(directory.name + f".tmp{os.getpid()}")
            staging.mkdir(exist_ok=True)
            dtype = NUMPY_DTYPES[plan.dtype]
            arrays = build_states(
                cfg, data, plan, lambda name, shape: np.lib.format.open_memmap(_file(staging, name), "w+", dtype, shape)
            )
            for a in arrays.values():
                a.flush()
            (staging / "plan.json").write_text(json.dumps(describe_plan(plan)))  # written last: marks it complete
            os.rename(staging, directory)
            build_s = time.perf_counter() - start
            log.info("prefix cache built on disk at %s in %.1f s", directory, build_s)
    arrays = {f"{c}/{s}": np.load(_file(directory, f"{c}/{s}"), mmap_mode="r") for c in plan.cuts for s in SPLITS}
    return PrefixCache(plan, arrays, str(directory), build_s)


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


def _remote(cfg: ExperimentConfig, **options: Any) -> Any:
    # max_calls=1: the builder's process exits afterwards, so its model memory (and GPU memory) is the trials' again.
    # Two returns: a small one the driver waits on (and that carries a failure), the cache itself for the trials.
    return ray.remote(max_calls=1, num_returns=2)(_build_task).options(**trial_task_options(cfg), **options)


def _build_task(
    cfg: ExperimentConfig, data: TaskData, plan: PrefixPlan, env: dict[str, str]
) -> tuple[float, PrefixCache]:
    os.environ.update(env)  # e.g. HF_TOKEN for a gated base (forwarded like the trials')
    if plan.where == "memory":
        cache = build_in_memory(cfg, data, plan)
        return cache.build_s, cache
    cache = ensure_on_disk(cfg, data, plan)
    return cache.build_s, dataclasses.replace(cache, arrays={})  # the node keeps the files; only the plan travels


def prepare_prefix(
    cfg: ExperimentConfig, data: TaskData, plan: PrefixPlan, env: dict[str, str]
) -> tuple[Any, dict[str, Any]]:
    """Place the cache (a UserError if it fits nowhere), build it before the first trial, and return what trials get
    (an object-store reference to the cache, or the plan of the per-node disk caches) and its description."""
    nodes = trial_nodes(cfg)
    memory = MEMORY_SHARE * min(n["Resources"].get("object_store_memory", 0) for n in nodes)
    prefix_root().mkdir(parents=True, exist_ok=True)
    plan = place(plan, memory, shutil.disk_usage(prefix_root()).free, cfg.sweep.prefix_cache_max_gb, prefix_root())
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
    if plan.where == "memory":  # one build; trials on other nodes fetch the object (the driver never copies it)
        placements = [{}]
    else:  # one build per node, on that node's disk
        placements = [{"scheduling_strategy": NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)} for n in nodes]
    refs = [_remote(cfg, **p).remote(cfg, data, plan, env) for p in placements]
    try:
        info["build_s"] = max(ray.get([small for small, _ in refs]))
    except ray.exceptions.RayTaskError as e:  # a UserError in the task (a node's disk) stays one line
        raise (e.cause if isinstance(e.cause, UserError) else e) from None
    info["ready_s"] = time.perf_counter() - start  # the build plus the builder's process start (once per sweep)
    log.info("prefix cache ready after %.1f s (build %.1f s)", info["ready_s"], info["build_s"])
    handed = refs[0][1] if plan.where == "memory" else ray.get(refs[0][1])
    return handed, info


def open_prefix(cache: PrefixCache, cfg: ExperimentConfig, data: TaskData) -> PrefixCache:
    """In a trial: the cache as arrays (memory: already mapped from the object store; disk: this node's files,
    built here if this node has none yet)."""
    return cache if cache.directory is None else ensure_on_disk(cfg, data, cache.plan)


def cut_for(cache: PrefixCache, last_n: int) -> int | None:
    """The highest cached cut at or below the trial's lowest LoRA layer; None: no frozen layer, the full model runs."""
    usable = [c for c in cache.plan.cuts if c <= cache.plan.layers - last_n]
    return max(usable) if usable else None


def split_states(cache: PrefixCache, cut: int, name: str, split: Split) -> list[np.ndarray]:
    """Example i's cached states ([its tokens, hidden], views into the shared arrays: nothing copied)."""
    values = cache.arrays[f"{cut}/{name}"]
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in split.input_ids])])
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(split))]
