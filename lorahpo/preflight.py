"""Everything that can be checked before the first trial starts (and by --dry-run): model, data, search space
against the model, existing experiments. Errors are `UserError`s: one line naming the problem and the fix."""

from __future__ import annotations

import logging
from typing import Any

from lorahpo.config import ExperimentConfig, UserError, to_dict
from lorahpo.data import TaskData, load_task
from lorahpo.model import load_model_config, load_tokenizer
from lorahpo.search import can_restore, describe, display_path

log = logging.getLogger(__name__)


def check_model_fit(cfg: ExperimentConfig, model_config: Any) -> None:
    """Config values (and search-space bounds) the model cannot satisfy."""
    layers = model_config.num_hidden_layers
    last_n = [cfg.lora.last_n]
    spec = cfg.search.get("lora.last_n")
    if spec is not None:
        last_n += [int(v) for v in (*(spec.choices or ()), spec.high) if v is not None]
    if max(last_n) > layers:
        raise UserError(
            f"lora.last_n={max(last_n)} (config or search space) exceeds the {layers} layers of "
            f"{cfg.model.name}"
            + (f" truncated by model.num_layers={cfg.model.num_layers}" if cfg.model.num_layers else "")
            + f"; use at most {layers}"
        )
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and cfg.data.max_length > context:
        raise UserError(
            f"data.max_length={cfg.data.max_length} exceeds what {cfg.model.name} supports ({context} "
            f"positions); set data.max_length<={context}"
        )


def check_experiment(cfg: ExperimentConfig, resume: bool) -> None:
    """Never overwrite an earlier sweep silently; never 'resume' nothing."""
    exists = can_restore(cfg)
    if resume and not exists:
        raise UserError(
            f"--resume: no experiment named {cfg.sweep.name!r} at {display_path(cfg)}; check "
            "sweep.name and sweep.storage_path, or drop --resume to start a new sweep"
        )
    if not resume and exists:
        raise UserError(
            f"a sweep named {cfg.sweep.name!r} already exists at {display_path(cfg)}; pass --resume to "
            "continue it, or choose a new sweep.name (earlier results are never overwritten)"
        )


def prepare(cfg: ExperimentConfig, resume: bool = False) -> tuple[TaskData, dict[str, Any]]:
    """Validate everything and tokenize the data once; return the data and the plan --dry-run prints."""
    check_experiment(cfg, resume)
    check_model_fit(cfg, load_model_config(cfg.model))
    data = load_task(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    plan = {"config": to_dict(cfg), **describe(cfg), "data": data.info, "resume": resume}
    return data, plan
