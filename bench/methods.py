"""lorahpo's own methods in a replay: each a set of `sweep.*` values on the task config, run by bench/simulate.py (the
REAL searcher and scheduler `lorahpo.tuner` builds, called in Ray Tune's order, in simulated time).

Adding a method is one line in METHODS: `_method(searcher, scheduler, **sweep)` takes any `sweep.*` key; its name
says every setting that differs from the naming baseline (`method_name`), so two methods never share a name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from simulate import simulate
from trials import Curves, Run, native

from lorahpo.config import ExperimentConfig, ParamSpec, SweepConfig, apply_overrides
from lorahpo.errors import UserError

FIRST = 8  # trials whose configs a replay records, in the order they start: a real sweep's first trials match them
NAMING = {"n_startup_trials": 4, "reduction_factor": 2, "grace_period": 1, "trials_per_batch": 4}
# keys added after the names were fixed, at their defaults unless a method sets them (a method never inherits the
# config's); its name shows those it sets (`key=value`)
LATER = {"planning_lag": 2, "told": "final", "rung_min_trials": 1}
# sweep fields that say where and how a sweep runs, not how it searches: never part of a method's name
NOT_SEARCH = {"name", "num_samples", "max_concurrent_trials", "cpus_per_trial", "gpus_per_trial", "storage_path",
              "s3_endpoint", "points_to_evaluate", "max_failures", "num_to_keep", "reuse_actors", "loggers",
              "prefix_cache", "prefix_cache_max_gb"}  # fmt: skip


def _method(searcher: str, scheduler: str, deterministic: bool = False, **sweep: Any) -> dict[str, Any]:
    """Every setting a method name tells, given (the rest are the config's): names mean the same whatever it holds."""
    sweep = {**NAMING, **LATER, **sweep}
    return {"sweep.searcher": searcher, "sweep.scheduler": scheduler, "sweep.deterministic": deterministic,
            **{f"sweep.{k}": v for k, v in sweep.items()}}  # fmt: skip


V2 = {"trials_per_batch": 1, "planning_lag": 1, "told": "first_rung", "rung_min_trials": 16, "n_startup_trials": 8,
      "reduction_factor": 16}  # fmt: skip
# (sweep overrides, slots). Names come from `method_name`, so the config's own settings name themselves ("default").
# With --slots N every method runs on N slots instead (and methods equal there are replayed once).
METHODS: list[tuple[dict[str, Any], int]] = [
    (_method("tpe", "asha"), 1),
    (_method("tpe", "fifo"), 1),
    (_method("random", "fifo"), 1),
    (_method("random", "asha"), 1),
    (_method("random", "asha", reduction_factor=3), 1),  # Syne Tune's ASHA defaults: the cross-check of the simulator
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
    # search v2 (section 8h): TPE told every trial's first rung, batch k from every batch before it, and the first 16
    # trials judged together at rf 16 (one goes on); on 8 slots with 8 per batch
    (_method("tpe", "asha", deterministic=True, **V2), 1),
    (_method("tpe", "asha", deterministic=True, **{**V2, "trials_per_batch": 8}), 8),
]


def method_name(cfg: ExperimentConfig, slots: int | None) -> str:
    """searcher+scheduler, then what differs from TPE's 4 start-up trials and ASHA's reduction 2, grace 1; `det<k>@<n>`
    for a deterministic sweep planning k trials per batch on n slots (`@<n>` alone: asynchronous on n > 1 slots; no
    `@` part when `slots` is None: a replay whose every method runs on the same slots); then `key=value` for any other
    searching `sweep.*` field that differs from its default (keys added after these names were fixed)."""
    s = cfg.sweep
    extras = []
    if s.searcher == "tpe" and s.n_startup_trials != NAMING["n_startup_trials"]:
        extras.append(f"startup={s.n_startup_trials}")
    if s.scheduler == "asha" and s.reduction_factor != NAMING["reduction_factor"]:
        extras.append(f"rf={s.reduction_factor}")
    if s.scheduler == "asha" and s.grace_period != NAMING["grace_period"]:
        extras.append(f"grace={s.grace_period}")
    named = {"searcher", "scheduler", "deterministic", *NAMING}
    for f in dataclasses.fields(SweepConfig):
        if f.name not in named | NOT_SEARCH and getattr(s, f.name) != f.default:
            extras.append(f"{f.name}={getattr(s, f.name)}")
    if s.deterministic:
        extras.append(f"det{s.trials_per_batch}" + (f"@{slots}" if slots is not None else ""))
    elif slots is not None and slots != 1:
        extras.append(f"@{slots}")
    return " ".join([f"{s.searcher}+{s.scheduler}", *extras])


def variants(cfg: ExperimentConfig, slots: int | None) -> dict[str, tuple[ExperimentConfig, int]]:
    """Every method of METHODS plus the config's own settings (its name is the replay's `default`), by name: each on
    its listed slots (slots None), or all on `slots`."""
    out = {}
    for overrides, n in METHODS:
        cohort = overrides.get("sweep.rung_min_trials", 1)  # a method's cohort needs that many samples to be valid
        m = apply_overrides(cfg, {**overrides, "sweep.num_samples": max(cfg.sweep.num_samples, cohort)})
        out.setdefault(method_name(m, None if slots else n), (m, slots or n))
    own = slots or cfg.sweep.max_concurrent_trials
    out.setdefault(method_name(cfg, None if slots else own), (cfg, own))
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
    budget = trials * base.train.max_epochs  # (and at least the cohort a rung judges together, else refused)
    samples = max(budget, base.sweep.rung_min_trials)
    cfg = apply_overrides(base, {"sweep.points_to_evaluate": points, "sweep.num_samples": samples})
    space = {k: ParamSpec(type="categorical", choices=v) for k, v in grid.items()}
    return dataclasses.replace(cfg, search=space)


def grid_values(params: dict[str, Any], keys: list[str]) -> tuple:
    """A trial's values of the grid's keys, in order: its config's key in the table."""
    return tuple(native(params[k]) for k in keys)


def sweep_run(cfg: ExperimentConfig, curves: Curves, slots: int, budget: int) -> Run:
    """`cfg`'s sweep in simulated time on `slots` slots against `curves` (each epoch's value and `iter_s`), until it
    has reported `budget` trial-epochs."""
    keys = list(cfg.search)
    sim = simulate(cfg, lambda p: [e[:2] for e in curves[grid_values(p, keys)]], slots=slots, budget=budget)
    params = {t.number: grid_values(t.params, keys) for t in sim.trials}
    reports = [(n, params[n], epoch) for _, n, what, epoch in sim.events if what == "report"]
    if len(reports) != budget:
        raise RuntimeError(f"{method_name(cfg, slots)} reported {len(reports)} trial-epochs, not {budget}")
    return reports, [params[n] for _, n, what, _ in sim.events if what == "start"]
