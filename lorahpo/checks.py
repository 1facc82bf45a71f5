"""Everything verified before the first trial (and by --dry-run): the model against the config and search space,
half precision against the hardware, trial resources against the nodes, the experiment directory against --resume
and --overwrite. Storage is checked by storage.py. Errors are `UserError`s: one line naming the problem and the fix."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import optuna
import ray
import torch
import yaml
from ray import tune
from transformers import AutoModelForCausalLM

from lorahpo.config import ExperimentConfig, apply_overrides, config_from_yaml, to_dict
from lorahpo.errors import UserError
from lorahpo.owner import check_free, check_sweep, occupied
from lorahpo.repro import git_state, versions
from lorahpo.schema import flatten, valid_keys
from lorahpo.space import last_n_values, optuna_space, space_ends
from lorahpo.storage import check_storage_shared, display, experiment_dir, read_bytes

log = logging.getLogger(__name__)


def check_model_fit(cfg: ExperimentConfig, model_config: Any) -> None:
    """Config values (and search-space bounds) the model cannot satisfy. The one place `lora.last_n` meets the
    layer count: a trial that gets here builds its model without surprises."""
    layers, last_n = model_config.num_hidden_layers, max(cfg.lora.last_n, *last_n_values(cfg))
    if last_n > layers:
        raise UserError(
            f"lora.last_n={last_n} (config or search space) exceeds the {layers} layers of "
            f"{cfg.model.name}"
            + (f" truncated by model.num_layers={cfg.model.num_layers}" if cfg.model.num_layers else "")
            + f"; use at most {layers}"
        )
    spec = cfg.search.get("lora.target_modules")
    wanted = {m for modules in (cfg.lora.target_modules, *(space_ends(spec) if spec else ())) for m in modules}
    with torch.device("meta"):  # the module names without allocating any weight
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=cfg.model.trust_remote_code)
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if wanted - names:
        raise UserError(
            f"lora.target_modules (config or search space) names {sorted(wanted - names)}, which {cfg.model.name} "
            f"does not have; its linear layers include {sorted(n for n in names if n.endswith('_proj'))}"
        )
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and cfg.data.max_length > context:
        raise UserError(
            f"data.max_length={cfg.data.max_length} exceeds what {cfg.model.name} supports ({context} "
            f"positions); set data.max_length<={context}"
        )


def check_points(cfg: ExperimentConfig) -> None:
    """Every value a trial can draw is a valid value of its key (both ends of every range, every choice: a trial that
    draws `lora.last_n=0` would otherwise fail mid-sweep), and every `sweep.points_to_evaluate` entry is a full point
    of the search space with each value inside its distribution: the searcher would reject anything else only after
    the sweep has started (or, out of range, run it and fail at the end)."""
    for key, spec in cfg.search.items():
        for value in space_ends(spec):
            try:
                apply_overrides(cfg, {key: value})
            except UserError as e:
                raise UserError(f"search.{key} allows {value!r}, which a trial cannot run: {e}") from None
    space = optuna_space(cfg)
    for i, point in enumerate(cfg.sweep.points_to_evaluate):
        where = f"sweep.points_to_evaluate[{i}]"
        missing = [k for k in space if k not in point]
        if missing:
            raise UserError(f"{where} lacks {', '.join(missing)}; give a value for every key of the search space")
        for key, value in point.items():
            dist = space[key]
            if not inside(dist, value):
                allowed = dist.choices if hasattr(dist, "choices") else f"[{dist.low}, {dist.high}]"
                raise UserError(
                    f"{where}: {key}={value!r} is outside search.{key} {allowed}; use a value inside it"
                ) from None


def inside(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    """Is `value` a value the distribution can draw (of its type, in its range or among its choices)?"""
    try:  # Optuna's own check of a param against its distribution (a trial made of it is validated)
        optuna.trial.create_trial(params={"p": value}, distributions={"p": dist}, value=0.0)
    except (ValueError, TypeError):
        return False
    return True


# Where an experiment lives may change between runs (a moved directory, another endpoint); nothing else may, except
# in a deterministic sweep how many trials run at once: its results do not depend on it (an asynchronous sweep's do,
# and Tune would keep the first run's limit anyway); and the final evaluation's keys: it runs after the search and
# never feeds back into it (--final exists to change them).
RELOCATABLE = {"sweep.storage_path", "sweep.s3_endpoint"}
DETERMINISTIC_RELOCATABLE = RELOCATABLE | {"sweep.max_concurrent_trials"}
FINAL_KEYS = {k for k in valid_keys(ExperimentConfig) if k.startswith("final.")}


def check_experiment(cfg: ExperimentConfig, resume: bool, overwrite: bool = False) -> None:
    """Never overwrite an earlier sweep silently, nor delete what is not one, nor one a live driver runs; never
    'resume' nothing; never resume with another config."""
    path, fs = experiment_dir(cfg)
    where = display(cfg, experiment=True)
    if resume:
        check_free(cfg, "--resume")
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise UserError(
                f"--resume: no experiment named {cfg.sweep.name!r} at {where}; check sweep.name and "
                "sweep.storage_path, or drop --resume to start a new sweep"
            )
        check_same_config(cfg, read_bytes(fs, f"{path}/config.yaml"), where)
        return
    if occupied(cfg) and not overwrite:
        raise UserError(
            f"a sweep named {cfg.sweep.name!r} already exists at {where}; pass --resume to continue it, "
            "--overwrite to replace it, or choose a new sweep.name (earlier results are never deleted silently)"
        )
    if occupied(cfg):
        check_sweep(cfg)
        check_free(cfg, "--overwrite")


def check_same_data(
    stored_manifest: str | bytes | None, data_info: dict[str, Any], where: str, flag: str = "--resume"
) -> None:
    """--resume, --final: the data (file contents) and the split must be those the sweep started with, or its trials
    would mix two datasets (or the final runs score another test split). A different code version is allowed but
    said. A manifest.json that is not what lorahpo writes (edited, cut short, planted) is one line."""
    try:
        stored = json.loads(stored_manifest) if stored_manifest else {}
        old = stored.get("data", {})
        for name, given in (old.get("splits") or {}).items():  # given splits: say which one changed
            now = (data_info.get("splits") or {}).get(name, {}).get("sha256")
            if given["sha256"] != now:
                raise UserError(
                    f"{flag}: the given {name} split ({given['source']}) differs from the one the sweep at {where} "
                    f"started with (sha256 {given['sha256'][:12]} -> {str(now)[:12]}); restore it, or start a new "
                    "sweep.name for the new data"
                )
        for key, what in (("sha256", "the data file"), ("split_sha256", "the split")):
            if old.get(key) is not None and old.get(key) != data_info.get(key):
                raise UserError(
                    f"{flag}: {what} differs from the one the sweep at {where} started with ({key} {old[key][:12]} "
                    f"-> {data_info[key][:12]}); restore it, or start a new sweep.name for the new data"
                )
        then, now = stored.get("git", {}), git_state()
        version = stored.get("versions", {}).get("lorahpo"), versions().get("lorahpo")
        if (then.get("sha"), then.get("dirty")) != (now["sha"], now["dirty"]) or version[0] != version[1]:
            log.warning(
                "%s with other code than the sweep started with (git %s%s -> %s%s, lorahpo %s -> %s): its trials "
                "may not be comparable; manifest.json records both",
                flag,
                then.get("sha"),
                " dirty" if then.get("dirty") else "",
                now["sha"],
                " dirty" if now["dirty"] else "",
                *version,
            )
    except (ValueError, TypeError, AttributeError, RecursionError):  # ValueError: also bytes that are not UTF-8
        raise UserError(f"{flag}: {where}/manifest.json is not a manifest lorahpo wrote; restore it") from None


def stored_config(text: str | bytes, where: str, flag: str) -> ExperimentConfig:
    """The config a sweep saved (its config.yaml); one that is not a lorahpo config (edited, cut short, planted) is one
    line naming the file."""
    try:
        return config_from_yaml(text.decode() if isinstance(text, bytes) else text)
    except (UserError, yaml.YAMLError, ValueError, TypeError, AttributeError, RecursionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"{flag}: {where}/config.yaml is not a lorahpo config ({first}); restore it, or start a new sweep.name"
        ) from None


def config_diff(old: ExperimentConfig, new: ExperimentConfig, ignore: set[str] = frozenset()) -> list[str]:
    """`key: old -> new` for every dotted key whose value differs (keys in `ignore` skipped)."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if k not in ignore and a.get(k) != b.get(k)
    ]


def check_same_config(cfg: ExperimentConfig, stored_yaml: str | bytes | None, where: str) -> None:
    """Refuse to resume a sweep under a different config: its trials would not be comparable."""
    if stored_yaml is None:
        raise UserError(
            f"--resume: {where} has no config.yaml; it was not started by tune_lora.py and cannot be resumed"
        )
    stored = stored_config(stored_yaml, where, "--resume")
    diff = config_diff(stored, cfg, ignore=relocatable(cfg) | FINAL_KEYS)
    if diff:
        raise UserError(
            f"--resume with a config that differs from the interrupted sweep's ({'; '.join(diff)}); resume with "
            f"the same config (saved as {where}/config.yaml) or start a new sweep.name"
        )


def check_finished(cfg: ExperimentConfig) -> None:
    """--final: a finished sweep at the address (`sweep.storage_path` + `sweep.name`, as --resume addresses one), whose
    config is this one except for `final.*`, with a best trial to evaluate, and no live driver on it."""
    if cfg.final.seeds < 1:
        raise UserError("--final needs final.seeds >= 1 (fresh seeds per config), e.g. final.seeds=3")
    fix = "change only final.seeds or final.baseline"
    _, summary = finished_sweep(cfg, "--final", RELOCATABLE | FINAL_KEYS, "final.*", fix)
    if summary["best_trial"] is None:
        where = display(cfg, experiment=True)
        raise UserError(f"--final: every trial of the sweep at {where} failed; there is no best config to evaluate")
    # the final runs apply best_params as overrides: only the search space's keys, each a value a trial could draw
    params, space = summary["best_params"], optuna_space(cfg)
    wrong = sorted(set(params) ^ set(space)) or [k for k in space if not inside(space[k], params[k])]
    if wrong:
        raise UserError(
            f"--final: {display(cfg, experiment=True)}/summary.json is not a summary lorahpo wrote: its best_params do "
            f"not fit the search space ({', '.join(wrong)}: missing, foreign or outside it); restore it, or --resume"
        )


def check_extend(cfg: ExperimentConfig) -> int:
    """--extend: a finished sweep at the address with fewer trials than `sweep.num_samples`, whose config is this one
    except for `sweep.num_samples`, the relocatable keys and `final.*`, and no live driver on it. Returns how many
    trials it has run."""
    ignore = relocatable(cfg) | FINAL_KEYS | {"sweep.num_samples"}
    _, summary = finished_sweep(cfg, "--extend", ignore, "sweep.num_samples and final.*", "a larger sweep.num_samples")
    ran = summary["num_trials"]
    if cfg.sweep.num_samples <= ran:
        raise UserError(
            f"--extend: sweep.num_samples={cfg.sweep.num_samples} is not more than the {ran} trials the sweep at "
            f"{display(cfg, experiment=True)} has run; pass sweep.num_samples={ran + 1} or more"
        )
    return ran


def finished_sweep(
    cfg: ExperimentConfig, flag: str, ignore: set[str], allowed: str, fix: str
) -> tuple[ExperimentConfig, dict[str, Any]]:
    """--final, --extend: the stored config and summary of the finished sweep at the address, with no live driver on
    it. A config that differs in a key outside `ignore` (`allowed` names those the user may change, `fix` what to do),
    a sweep that has not finished (or whose extension has not), or files lorahpo did not write are one line."""
    path, fs = experiment_dir(cfg)
    where = display(cfg, experiment=True)
    check_free(cfg, flag)
    text = read_bytes(fs, f"{path}/config.yaml")
    if text is None:
        raise UserError(
            f"{flag}: no sweep named {cfg.sweep.name!r} at {where}; check sweep.name and sweep.storage_path"
        )
    stored = stored_config(text, where, flag)
    diff = config_diff(stored, cfg, ignore=ignore)
    if diff:
        raise UserError(
            f"{flag} with a config that differs from the sweep's in more than {allowed} ({'; '.join(diff)}); pass the "
            f"sweep's config (saved as {where}/config.yaml) and {fix}"
        )
    summary = read_bytes(fs, f"{path}/summary.json")
    if summary is None:
        raise UserError(f"{flag}: the sweep at {where} has not finished (no summary.json); finish it with --resume")
    try:
        summary = json.loads(summary)
    except (ValueError, RecursionError):  # also bytes that are not UTF-8, and nesting deeper than Python's stack
        summary = None
    best = summary.get("best_trial") if isinstance(summary, dict) else None
    if (
        not isinstance(summary, dict)
        or (best is not None and not isinstance(summary.get("best_params"), dict))
        or type(summary.get("num_trials", 0)) is not int
    ):
        raise UserError(f"{flag}: {where}/summary.json is not a summary lorahpo wrote; restore it, or --resume")
    summary.setdefault("num_trials", stored.sweep.num_samples)  # a summary lorahpo wrote has it; tests' may not
    if summary["num_trials"] < stored.sweep.num_samples:  # the results are those of the sweep before an extension
        raise UserError(
            f"{flag}: the sweep at {where} was extended to {stored.sweep.num_samples} trials and has results of "
            f"{summary['num_trials']}; finish the extension first with --resume sweep.num_samples="
            f"{stored.sweep.num_samples}"
        )
    return stored, summary


def relocatable(cfg: ExperimentConfig) -> set[str]:
    """The keys a continued sweep may change without changing its trials."""
    return DETERMINISTIC_RELOCATABLE if cfg.sweep.deterministic else RELOCATABLE


def check_dtype(cfg: ExperimentConfig, cpu_bf16: bool, cuda_bf16: list[bool]) -> None:
    """Half precision the trials' hardware can't do. `cuda_bf16`: bf16 support of the GPUs this process sees (on a
    cluster the driver may have none; the trial checks its own GPU again when it starts)."""
    dtype = cfg.model.dtype
    if dtype == "float32":
        return
    if cfg.sweep.gpus_per_trial == 0:
        if dtype == "float16":
            raise UserError(
                "model.dtype=float16 needs a GPU but sweep.gpus_per_trial=0; use model.dtype=float32 on CPU "
                "(or bfloat16 on a CPU with native bf16)"
            )
        if not cpu_bf16:  # emulated: slow, not wrong
            log.warning(
                "model.dtype=bfloat16 on a CPU without native bf16 (AVX512-BF16/AMX): torch emulates it, correctly but "
                "slowly; model.dtype=float32 is faster here"
            )
    elif dtype == "bfloat16" and cuda_bf16 and not all(cuda_bf16):
        raise UserError(
            "model.dtype=bfloat16 but this GPU has no bf16 support (it needs Ampere or newer); set "
            "model.dtype=float16 or float32"
        )


def local_nodes() -> list[dict[str, float]]:
    """What a local Ray will offer: all CPUs and GPUs of this machine."""
    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


def cluster_nodes() -> list[dict[str, float]]:
    """Resources of every alive node of the connected Ray cluster."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_resources(cfg: ExperimentConfig, nodes: list[dict[str, float]]) -> None:
    """A trial no node can hold would wait forever in Tune's queue: fail fast and show what the cluster has."""
    cpus, gpus = cfg.sweep.cpus_per_trial, cfg.sweep.gpus_per_trial
    if any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        return
    have = "; ".join(f"node {i + 1}: {n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for i, n in enumerate(nodes))
    raise UserError(
        f"no node can run a trial of sweep.cpus_per_trial={cpus:g} and sweep.gpus_per_trial={gpus:g}; the cluster "
        f"has {have}; lower them (or add nodes with --address)"
    )


def check_cluster(cfg: ExperimentConfig) -> None:
    """On a connected Ray: what only the cluster can tell (every trial fits a node; storage is shared by all)."""
    check_resources(cfg, cluster_nodes())  # before any trial: Tune would queue an unplaceable trial forever
    check_storage_shared(cfg)  # every node reads what the driver wrote (a head-local path fails here, not later)
