"""A real sweep of a table's grid against its replay (`python bench/replay.py --check-sweep DIR`): the same trials in
the same order, the scores against the table's, and where its best lands among the replays of other seeds."""

from __future__ import annotations

from typing import Any

import pandas as pd
from measures import quartiles
from methods import grid_values, method_name, replay_config, sweep_run
from simulate import simulate
from tables import grid_of, table_of

from lorahpo.config import apply_overrides, config_from_yaml
from lorahpo.errors import UserError
from lorahpo.results import history, load_experiment, ordered
from lorahpo.storage import filesystem, read_text


def compare(real: list[dict[str, Any]], replayed: list[dict[str, Any]]) -> dict[str, Any]:
    """Trial by trial (creation order; each {"params": [...], "values": [per-epoch metric]}): how many of the first
    trials have the same params, and for those with the same params and epochs, how far the scores are apart."""
    same = 0
    for a, b in zip(real, replayed):
        if a["params"] != b["params"]:
            break
        same += 1
    pairs = [(a, b) for a, b in zip(real[:same], replayed[:same]) if len(a["values"]) == len(b["values"])]
    diffs = [abs(x - y) for a, b in pairs for x, y in zip(a["values"], b["values"])]
    return {"trials": [len(real), len(replayed)], "same_first_trials": same,
            "same_epochs": len(pairs), "max_abs_score_diff": max(diffs, default=None)}  # fmt: skip


def check_sweep(path: str, df: pd.DataFrame, seeds: list[int]) -> dict[str, Any]:
    """A real sweep that searched the table's grid (python tune_lora.py --config bench/intents_grid.yaml ...) against
    the replay of its own config and seed: the same trials in the same order, the scores against the table's root
    training seed (equal when the sweep's seed is the table's: every trial trains with the root seed), and where its
    best lands among the replays of `seeds` with the same number of trial-epochs (each with its noise draw)."""
    inner, fs = filesystem(path)
    text = read_text(fs, f"{inner}/config.yaml")
    if text is None:
        raise UserError(f"no sweep at {path} (its config.yaml is missing): pass a sweep's experiment directory")
    cfg = config_from_yaml(text)
    grid, keys, metric = grid_of(df), list(cfg.search), cfg.train.metric
    space = {k: tuple(s.choices or ()) for k, s in cfg.search.items()}
    if list(space.items()) != list(grid.items()):  # the order of keys and choices steers the samplers too
        raise UserError(f"the sweep at {path} did not search the table's grid {grid}: sweep its grid config")
    table = table_of(df, metric, cfg.train.max_epochs)
    root = table.curves(None)
    real = [{"params": list(grid_values(r.config, keys)), "values": history(r)[metric].tolist()}
            for r in ordered(load_experiment(path)[0])]  # fmt: skip
    slots = cfg.sweep.max_concurrent_trials
    sim = simulate(cfg, lambda p: [e[:2] for e in root[grid_values(p, keys)]], slots=slots)
    replayed = [{"params": list(grid_values(t.params, keys)), "values": t.values} for t in sim.trials]
    budget, sign = sum(len(t["values"]) for t in real), 1.0 if cfg.train.mode == "max" else -1.0
    real_best = sign * max(sign * v for t in real for v in t["values"])
    rcfg = replay_config(cfg, grid, budget)
    spread = []
    for s in seeds:
        curves = table.curves(s)
        reports, _ = sweep_run(apply_overrides(rcfg, {"seed": s}), curves, slots, budget)
        spread.append(sign * max(sign * curves[key][epoch - 1].value for _, key, epoch in reports))
    return {
        "sweep": path, "seed": cfg.seed, "method": method_name(cfg, slots), "trial_epochs": budget,
        **compare(real, replayed), "real_best": real_best,
        "replay_best_same_seed": sign * max(sign * v for t in sim.trials for v in t.values),
        "replays": {"seeds": [seeds[0], seeds[-1]], **quartiles(spread), "min": min(spread), "max": max(spread),
                    "at_or_below_real_best": sum(sign * v <= sign * real_best for v in spread)},
    }  # fmt: skip
