"""Replay search methods against the intents table (bench/tabulate.py): every method, every seed, in simulated time.

A method is a set of `sweep.*` values on configs/intents.yaml. Each (method, seed) runs bench/simulate.py: the REAL
searcher and scheduler `lorahpo.tuner` builds from that config, called in Tune's order, with 1 or more slots, each
trial's epochs scripted from the table (val metric and `iter_s` of its config at that epoch; the trial's running best
and `train.patience` as the trainable reports them). No training, no sleeping.

The space searched is the table's grid: each `param.<key>` column becomes a categorical choice of its values, so every
config a searcher picks has a row-set in the table. Everything else (metric, max_epochs, patience, points_to_evaluate
restricted to the grid's keys, the seed) is the config's own.

Definitions, per seed s (docs/benchmarks.md, section 8c):
- B = N x max_epochs trial-epochs (N = --trials, default 32): random + FIFO's budget. EVERY method, random + FIFO
  included, runs trials until it has consumed B trial-epochs (epoch reports, in the order they arrive); with early
  stopping (ASHA, patience) that is more than N trials.
- b_s: the best val score (the tuning metric: any epoch of any trial) random + FIFO reaches within B.
- E: the trial-epochs a method has consumed when its running best first reaches >= b_s; the fraction E / B, 2.0 if it
  never does within B (`epochs_to_reach_random_fifo_best`).
- final_regret: the table's best val score minus the val score of the config the method chooses at B (its best trial's
  running best: what the sweep records and exports). Anytime regret: the same after every trial-epoch.

    python bench/replay.py --seeds 0-49 --out docs/benchmarks/replay   # the real table (docs/benchmarks/tabulate/)
    python bench/replay.py --synthetic --seeds 0-49 --out /tmp/r       # a synthetic table of the grid's size (timing)
    python bench/replay.py --smoke --out /tmp/r                        # plumbing: synthetic table, 2 seeds
    python bench/replay.py --check-sweep results/NAME --seeds 0-49     # a real sweep of bench/intents_grid.yaml
                                                                       # vs the replay of its config and seed

Output in --out: results.json ("default", "methods", "budget", per-seed numbers), table.md, anytime_regret.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from common import DOCS_DIR, REPO_ROOT, machine, md_table, write_json
from simulate import simulate

from lorahpo.config import ExperimentConfig, ParamSpec, apply_overrides, config_from_yaml, load_config, tuning_metric
from lorahpo.errors import UserError
from lorahpo.results import history, load_experiment, ordered
from lorahpo.storage import filesystem, read_text

optuna.logging.set_verbosity(optuna.logging.WARNING)  # OptunaSearch's "new study created", once per replay

INTENTS_CONFIG = REPO_ROOT / "configs" / "intents.yaml"
GRID_CONFIG = REPO_ROOT / "bench" / "intents_grid.yaml"
TABLE = DOCS_DIR / "tabulate" / "intents_grid.parquet"
REFERENCE = "random+fifo"
NEVER = 2.0  # the fraction of a method that never reaches b_s within B


def _method(searcher: str, scheduler: str, deterministic: bool = False, **sweep: Any) -> dict[str, Any]:
    """Every setting a method name tells, given (the rest are the config's): names mean the same whatever it holds."""
    sweep = {"n_startup_trials": 4, "reduction_factor": 2, "grace_period": 1, "trials_per_batch": 4, **sweep}
    return {"sweep.searcher": searcher, "sweep.scheduler": scheduler, "sweep.deterministic": deterministic,
            **{f"sweep.{k}": v for k, v in sweep.items()}}  # fmt: skip


# (sweep overrides, slots). Names come from `method_name`, so the config's own settings name themselves ("default").
METHODS: list[tuple[dict[str, Any], int]] = [
    (_method("tpe", "asha"), 1),
    (_method("tpe", "fifo"), 1),
    (_method("random", "fifo"), 1),
    (_method("random", "asha"), 1),
    (_method("tpe", "asha", deterministic=True), 1),  # configs/intents.yaml's sweep settings before section 8d
    (_method("tpe", "asha", deterministic=True), 4),
    # candidates for better defaults, each reachable from sweep.* values; rf=8 with max_epochs 4: one rung, at epoch 1
    (_method("tpe", "asha", n_startup_trials=2), 1),
    (_method("tpe", "asha", reduction_factor=3), 1),
    (_method("tpe", "asha", reduction_factor=4), 1),
    (_method("tpe", "asha", reduction_factor=8), 1),
    (_method("tpe", "asha", deterministic=True, reduction_factor=4), 1),
    (_method("tpe", "asha", deterministic=True, reduction_factor=8), 1),
    # smaller batches: batch k learns from batches <= k-2, so 2 (or 1) per batch learns 4 (or 6) trials sooner than 4
    (_method("tpe", "asha", deterministic=True, trials_per_batch=2, n_startup_trials=2, reduction_factor=4), 1),
    (_method("tpe", "asha", deterministic=True, trials_per_batch=2, n_startup_trials=2, reduction_factor=8), 1),
    (_method("tpe", "asha", deterministic=True, trials_per_batch=1, n_startup_trials=2, reduction_factor=8), 1),
    (_method("tpe", "asha", deterministic=True, trials_per_batch=1, n_startup_trials=2, reduction_factor=8), 4),
]


def method_name(cfg: ExperimentConfig, slots: int) -> str:
    """searcher+scheduler, then what differs from TPE's 4 start-up trials and ASHA's reduction 2, grace 1; `det<k>@<n>`
    for a deterministic sweep planning k trials per batch on n slots (`@<n>` alone: asynchronous on n > 1 slots)."""
    s = cfg.sweep
    extras = []
    if s.searcher == "tpe" and s.n_startup_trials != 4:
        extras.append(f"startup={s.n_startup_trials}")
    if s.scheduler == "asha" and s.reduction_factor != 2:
        extras.append(f"rf={s.reduction_factor}")
    if s.scheduler == "asha" and s.grace_period != 1:
        extras.append(f"grace={s.grace_period}")
    if s.deterministic:
        extras.append(f"det{s.trials_per_batch}@{slots}")
    elif slots != 1:
        extras.append(f"@{slots}")
    return " ".join([f"{s.searcher}+{s.scheduler}", *extras])


# ---------------------------------------------------------------------------------------------------------------------
# The table


def native(v: Any) -> Any:
    """A table value as the config holds it (numpy scalars -> Python; whole floats of an int column stay ints)."""
    return v.item() if isinstance(v, np.generic) else v


def load_table(path: Path, metric: str) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(
            f"no table at {path}: make it with python bench/tabulate.py (~1.8 h alone on 2 cores), pass --table PATH, "
            "or --synthetic for a plumbing check"
        )
    df = pd.read_parquet(path)
    missing = [c for c in ("config_id", "epoch", metric, "iter_s") if c not in df]
    if missing or not any(c.startswith("param.") for c in df):
        raise UserError(f"{path} is not a bench/tabulate.py table: it lacks {missing or 'param.* columns'}")
    return df


def grid_of(df: pd.DataFrame) -> dict[str, tuple[Any, ...]]:
    """Each `param.<key>` column's sorted values: the categorical space the replay searches."""
    return {c[len("param.") :]: tuple(native(v) for v in sorted(df[c].unique())) for c in df if c.startswith("param.")}


def lookup(df: pd.DataFrame, metric: str, max_epochs: int) -> dict[tuple, list[tuple[float, float]]]:
    """params (in grid key order) -> one (val metric, seconds) per epoch, 1..max_epochs."""
    keys = [c for c in df if c.startswith("param.")]
    out = {}
    for _, g in df.sort_values(["config_id", "epoch"]).groupby("config_id"):
        if g["epoch"].tolist()[:max_epochs] != list(range(1, max_epochs + 1)):
            raise UserError(f"config {g['config_id'].iloc[0]} of the table lacks epochs 1..{max_epochs}")
        key = tuple(native(g[k].iloc[0]) for k in keys)
        out[key] = [(float(v), float(t)) for v, t in zip(g[metric][:max_epochs], g["iter_s"][:max_epochs])]
    return out


def replay_config(base: ExperimentConfig, grid: dict[str, tuple], trials: int) -> ExperimentConfig:
    """`base` searching the table's grid: its points_to_evaluate restricted to the grid's keys (the values it leaves
    out are the table's fixed ones), each a grid point; enough samples that any method reaches the budget."""
    points = []
    for p in base.sweep.points_to_evaluate:
        point = {k: v for k, v in p.items() if k in grid}
        if any(v not in grid[k] for k, v in point.items()):
            raise UserError(f"the config's point {point} is not a point of the table's grid {grid}")
        points.append(point)
    budget = trials * base.train.max_epochs
    cfg = apply_overrides(base, {"sweep.points_to_evaluate": points, "sweep.num_samples": budget})
    space = {k: ParamSpec(type="categorical", choices=v) for k, v in grid.items()}
    return dataclasses.replace(cfg, search=space)


def synthetic_table(grid_config: Path = GRID_CONFIG, seed: int = 0) -> pd.DataFrame:
    """A table of the grid's size and columns (every grid config x max_epochs) with invented curves: val macro-F1 that
    rises with the epochs, peaks at a learning rate near 2e-3, shifts a little with the other keys and carries noise;
    seconds per epoch by LoRA layers and batch size. For timing and plumbing only: it says nothing about the task."""
    cfg = load_config(grid_config)
    keys = list(cfg.search)
    rng = np.random.default_rng(seed)
    rows = []
    for i, values in enumerate(itertools.product(*(cfg.search[k].choices for k in keys))):
        p = dict(zip(keys, values))
        peak = 0.85 - 0.12 * abs(np.log10(p["train.lr"] / 2e-3)) ** 1.5 + 0.02 * rng.standard_normal()
        peak += 0.01 * (p.get("lora.last_n", 2) - 2) + 0.005 * np.log2(p.get("lora.alpha", 16) / p.get("lora.r", 8))
        rate = 0.4 + 2.0 * min(1.0, p["train.lr"] / 1e-3)
        for e in range(1, cfg.train.max_epochs + 1):
            val = float(np.clip(peak * (1 - np.exp(-rate * e)) + 0.01 * rng.standard_normal(), 0.0, 1.0))
            secs = 6.0 + 2.5 * p.get("lora.last_n", 2) * (1.1 if p.get("train.batch_size", 16) == 16 else 1.0)
            rows.append({"config_id": i, **{f"param.{k}": v for k, v in p.items()}, "epoch": e, "val_f1": val,
                         "iter_s": secs + (4.0 if e == 1 else 0.0)})  # fmt: skip
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------------
# One replay and the measures


FIRST = 8  # trials whose configs a replay records, in the order they start: a real sweep's first trials match them


def grid_values(params: dict[str, Any], keys: list[str]) -> list[Any]:
    """A trial's values of the grid's keys, in order: its config's key in the table (see `lookup`)."""
    return [native(params[k]) for k in keys]


def running_best(
    cfg: ExperimentConfig, table: dict[tuple, list], slots: int, budget: int
) -> tuple[list[float], list[list[Any]]]:
    """The sweep's running best of its tuning metric after each of its first `budget` trial-epochs (epoch reports in
    the order they arrive), and the grid values (in `cfg.search` order) of its first FIRST trials as they started."""
    keys = list(cfg.search)
    sim = simulate(cfg, lambda p: table[tuple(grid_values(p, keys))], slots=slots, budget=budget)
    by_trial = {t.number: t.tuning for t in sim.trials}
    params = {t.number: grid_values(t.params, keys) for t in sim.trials}
    started = [number for _, number, what, _ in sim.events if what == "start"]
    sign = 1.0 if cfg.train.mode == "max" else -1.0
    best, out = -np.inf, []
    for _, number, what, epoch in sim.events:
        if what == "report":
            best = max(best, sign * by_trial[number][epoch - 1])
            out.append(sign * best)
    if len(out) != budget:
        raise RuntimeError(f"{method_name(cfg, slots)} reported {len(out)} trial-epochs, not {budget}")
    return out, [params[n] for n in started[:FIRST]]


def fraction_to_reach(best: list[float], target: float, sign: float) -> float:
    """E / B: the trial-epochs consumed when the running best first reaches `target`, over the budget; NEVER if not."""
    for e, v in enumerate(best, 1):
        if sign * v >= sign * target:
            return e / len(best)
    return NEVER


def quartiles(x: Any) -> dict[str, float]:
    q25, med, q75 = np.percentile(np.asarray(x, dtype=float), [25, 50, 75])
    return {"median": float(med), "q25": float(q25), "q75": float(q75)}


def measures(curves: dict[str, list[list[float]]], table_best: float, sign: float) -> dict[str, dict[str, Any]]:
    """Per method, from its running-best curves (one per seed, in seed order; REFERENCE's gives b_s)."""
    targets = [c[-1] for c in curves[REFERENCE]]
    out = {}
    for name, runs in curves.items():
        regret = sign * (table_best - np.asarray(runs))  # (seeds, B), >= 0
        fractions = [fraction_to_reach(c, b, sign) for c, b in zip(runs, targets)]
        out[name] = {
            "epochs_to_reach_random_fifo_best": quartiles(fractions),
            "final_regret": {**quartiles(regret[:, -1]), "mean": float(regret[:, -1].mean())},
            "reached": int(sum(f <= 1.0 for f in fractions)),
            "per_seed": {"fraction": fractions, "final_regret": regret[:, -1].tolist()},
            "anytime_regret": {
                q: np.percentile(regret, p, axis=0).tolist() for q, p in (("q25", 25), ("median", 50), ("q75", 75))
            },  # fmt: skip
        }
    return out


def replay(
    base: ExperimentConfig,
    df: pd.DataFrame,
    seeds: list[int],
    trials: int,
    methods: list[str] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Every method (default: all of METHODS, plus the config's own settings) for every seed against the table."""
    metric, max_epochs = base.train.metric, base.train.max_epochs
    table, grid = lookup(df, metric, max_epochs), grid_of(df)
    cfg = replay_config(base, grid, trials)
    default = method_name(cfg, cfg.sweep.max_concurrent_trials)
    variants = {method_name(apply_overrides(cfg, o), n): (apply_overrides(cfg, o), n) for o, n in METHODS}
    variants.setdefault(default, (cfg, cfg.sweep.max_concurrent_trials))
    chosen = list(variants) if methods is None else list(dict.fromkeys([REFERENCE, *methods]))
    unknown = [m for m in chosen if m not in variants]
    if unknown:
        raise UserError(f"unknown method(s) {unknown}; choose from {list(variants)}")
    budget = trials * max_epochs
    work = [(apply_overrides(cfg_m, {"seed": s}), table, n, budget) for cfg_m, n in (variants[m] for m in chosen)
            for s in seeds]  # fmt: skip
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(running_best, *zip(*work), chunksize=max(1, len(work) // (4 * jobs))))
    else:
        results = [running_best(*w) for w in work]
    per_method = {m: results[i * len(seeds) : (i + 1) * len(seeds)] for i, m in enumerate(chosen)}
    curves = {m: [curve for curve, _ in runs] for m, runs in per_method.items()}
    sign = 1.0 if base.train.mode == "max" else -1.0
    table_best = sign * max(sign * v for script in table.values() for v, _ in script)
    return {
        "default": default,
        "reference": REFERENCE,
        "budget": {"trials": trials, "max_epochs": max_epochs, "trial_epochs": budget},
        "seeds": seeds,
        "metric": tuning_metric(cfg),
        "table_best": table_best,
        "grid": {k: list(v) for k, v in grid.items()},
        "configs": len(table),
        "methods": measures(curves, table_best, sign),
        # per method and seed: the grid values (in "grid" order) of the first trials, as they started
        "first_trials": {m: [first for _, first in runs] for m, runs in per_method.items()},
    }


# ---------------------------------------------------------------------------------------------------------------------
# A real sweep against its replay


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
    the replay of its own config and seed: the same trials in the same order, the scores against the table's (equal
    when the sweep's seed is the table's: every trial trains with the root seed), and where its best lands among the
    replays of `seeds` with the same number of trial-epochs."""
    inner, fs = filesystem(path)
    text = read_text(fs, f"{inner}/config.yaml")
    if text is None:
        raise UserError(f"no sweep at {path} (its config.yaml is missing): pass a sweep's experiment directory")
    cfg = config_from_yaml(text)
    grid, keys, metric = grid_of(df), list(cfg.search), cfg.train.metric
    space = {k: tuple(s.choices or ()) for k, s in cfg.search.items()}
    if list(space.items()) != list(grid.items()):  # the order of keys and choices steers the samplers too
        raise UserError(f"the sweep at {path} did not search the table's grid {grid}: sweep bench/intents_grid.yaml")
    table = lookup(df, metric, cfg.train.max_epochs)
    real = [{"params": grid_values(r.config, keys), "values": history(r)[metric].tolist()}
            for r in ordered(load_experiment(path)[0])]  # fmt: skip
    slots = cfg.sweep.max_concurrent_trials
    sim = simulate(cfg, lambda p: table[tuple(grid_values(p, keys))], slots=slots)
    replayed = [{"params": grid_values(t.params, keys), "values": t.values} for t in sim.trials]
    budget, sign = sum(len(t["values"]) for t in real), 1.0 if cfg.train.mode == "max" else -1.0
    real_best = sign * max(sign * v for t in real for v in t["values"])
    rcfg = replay_config(cfg, grid, budget)
    spread = [running_best(apply_overrides(rcfg, {"seed": s}), table, slots, budget)[0][-1] for s in seeds]
    return {
        "sweep": path, "seed": cfg.seed, "method": method_name(cfg, slots), "trial_epochs": budget,
        **compare(real, replayed), "real_best": real_best,
        "replay_best_same_seed": sign * max(sign * v for t in sim.trials for v in t.values),
        "replays": {"seeds": [seeds[0], seeds[-1]], **quartiles(spread), "min": min(spread), "max": max(spread),
                    "at_or_below_real_best": sum(sign * v <= sign * real_best for v in spread)},
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Outputs


def markdown(res: dict[str, Any]) -> str:
    rows = []
    for name, m in res["methods"].items():
        f, r = m["epochs_to_reach_random_fifo_best"], m["final_regret"]
        label = f"**{name}** (default)" if name == res["default"] else name
        rows.append([label, f["median"], f"{f['q25']:.3f}-{f['q75']:.3f}", f"{m['reached']}/{len(res['seeds'])}",
                     r["median"], r["mean"]])  # fmt: skip
    head = ["method", "E/B median", "E/B q25-q75", "reached b_s", "final regret median", "final regret mean"]
    b = res["budget"]
    return (
        f"{len(res['seeds'])} seeds; budget B = {b['trials']} trials x {b['max_epochs']} epochs = {b['trial_epochs']} "
        f"trial-epochs; E/B = {NEVER} when b_s is never reached; table best {res['metric']} {res['table_best']:.4f}\n\n"
        + md_table(head, rows)
    )


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    budget = res["budget"]["trial_epochs"]
    x = np.arange(1, budget + 1) / budget
    for name, m in res["methods"].items():
        a = m["anytime_regret"]
        (line,) = ax.plot(x, a["median"], label=name, lw=2.5 if name == res["default"] else 1.2)
        ax.fill_between(x, a["q25"], a["q75"], color=line.get_color(), alpha=0.12)
    ax.axvline(0.25, color="grey", ls=":", lw=1)
    ax.set_xlabel(f"trial-epochs consumed / B (B = {budget})")
    ax.set_ylabel(f"regret: table best - running best {res['metric']}")
    ax.set_title(f"Anytime regret, median and quartiles over {len(res['seeds'])} seeds")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_seeds(text: str) -> list[int]:
    lo, sep, hi = text.partition("-")
    try:
        seeds = list(range(int(lo), int(hi if sep else lo) + 1))
    except ValueError:
        seeds = []
    if not seeds:
        raise UserError(f"--seeds {text!r} is not a range A-B with A <= B (e.g. --seeds 0-49)")
    return seeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default=None, help="seeds A-B, inclusive (default 0-49; --smoke: 0-1)")
    p.add_argument("--out", type=Path, default=DOCS_DIR / "replay", help="output dir (default docs/benchmarks/replay)")
    p.add_argument("--table", type=Path, default=TABLE, help="bench/tabulate.py's parquet table")
    p.add_argument("--methods", nargs="+", default=None, help="method names (default: all; random+fifo always)")
    p.add_argument("--config", type=Path, default=INTENTS_CONFIG, help="the config replayed (default intents.yaml)")
    p.add_argument("--trials", type=int, default=32, help="N: random + FIFO's trials; B = N x max_epochs")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="processes")
    p.add_argument("--synthetic", action="store_true", help="a synthetic table of the grid's size (timing)")
    p.add_argument("--smoke", action="store_true", help="synthetic table, seeds 0-1: plumbing")
    p.add_argument("--check-sweep", default=None, metavar="DIR", help="a real sweep of the grid vs its replay")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        seeds = parse_seeds(args.seeds or ("0-1" if args.smoke else "0-49"))
        if args.check_sweep:
            check = check_sweep(args.check_sweep, load_table(args.table, load_config(args.config).train.metric), seeds)
            args.out.mkdir(parents=True, exist_ok=True)
            write_json(args.out / f"check_{Path(args.check_sweep).name}.json", check)
            print(json.dumps(check, indent=1))
            return 0
        base = load_config(args.config)
        if args.trials < 1:
            raise UserError(f"--trials {args.trials} must be >= 1")
        synthetic = args.synthetic or args.smoke
        df = synthetic_table() if synthetic else load_table(args.table, base.train.metric)
        res = replay(base, df, seeds, args.trials, args.methods, args.jobs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table_id = "synthetic" if synthetic else hashlib.sha256(args.table.read_bytes()).hexdigest()
    res = {"smoke": args.smoke, "synthetic": synthetic, "table": str(args.table) if not synthetic else None,
           "table_sha256": table_id, "config": str(args.config), **res, "wall_s": time.perf_counter() - start,
           "jobs": args.jobs, "machine": machine()}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", res)
    (args.out / "table.md").write_text(markdown(res))
    plot(res, args.out / "anytime_regret.png")
    print((args.out / "table.md").read_text())
    print(f"[replay] {len(res['methods'])} methods x {len(seeds)} seeds in {res['wall_s']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
