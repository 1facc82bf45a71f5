"""Replay search methods against a tabulated task (bench/tabulate.py): every method, every seed, in simulated time.

    python bench/replay.py --list-tables                               # the bundled tables present, one per line
    python bench/replay.py --table intents --seeds 0-49 --slots 1 --out DIR   # every method on 1 slot
    python bench/replay.py --table PATH.parquet --config configs/intents.yaml ...   # a table by path
    python bench/replay.py --synthetic --seeds 0-49 --out /tmp/r       # a synthetic table of the grid's size (timing)
    python bench/replay.py --smoke --out /tmp/r                        # plumbing: synthetic table, 2 seeds
    python bench/replay.py --check-sweep results/NAME --seeds 0-49     # a real sweep of the table's grid config
                                                                       # vs the replay of its config and seed

Methods. lorahpo's (bench/methods.py): a set of `sweep.*` values on the table's task config, run by
bench/simulate.py, the REAL searcher and scheduler `lorahpo.tuner` builds, called in Ray Tune's order; `default` is
the task config's own settings. Peers (bench/peers.py, `pip install -e '.[bench]'`): Optuna and Syne Tune in their own
packages on the same table, budget, seeds, space, noise draw and slots. Every trial's epochs are its config's rows of
the table (the metric, `train.patience` as the trainable applies it, `iter_s` as the epoch's duration); the space is
the table's grid, each `param.<key>` column a categorical choice; points_to_evaluate (the untuned baseline) is trial 0
of every method. `--slots N` runs every method on N slots (names then carry no `@N`); without it each lorahpo method
runs on the slots METHODS lists (peers on 1). Training noise: a table with several training seeds gives each replay
seed s one drawn curve per config, the same for every method (bench/tables.py).

Definitions, per seed s (docs/benchmarks.md, 8c and 8e):
- B = N x max_epochs trial-epochs (N = --trials, default 32): random + FIFO's budget. EVERY method runs until it has
  consumed B trial-epochs, counted as it really trains (epoch reports, in the order they arrive in simulated time; a
  config trained again, or restarted from scratch, pays its epochs again).
- best_s: the best val score any config reaches at any epoch in the curves seed s sees (the table's best when it
  holds one training seed).
- b_s: the best val score (the tuning metric: any epoch of any trial) random + FIFO reaches within B, on the same
  slots.
- E: the trial-epochs a method has consumed when its running best first reaches >= b_s; E / B
  (`epochs_to_reach_random_fifo_best`), 2.0 if it never does within B.
- Seconds fraction (`seconds_to_reach_random_fifo_best`): the training seconds (`epoch_time_s` of each consumed
  trial-epoch, summed in arrival order) a method has consumed when its running best first reaches b_s, over random +
  FIFO's training seconds for its B trial-epochs at seed s; 2.0 if it never reaches b_s within B, and capped at 2.0.
- Regret after k trial-epochs: best_s minus the running best after k. `final_regret`: after B (the config the method
  chooses: its best trial's running best). `anytime_regret_at`: after ceil(B/8), ceil(B/4), ceil(B/2) and B.
  `vs_random_fifo`: per point, the median over seeds of (method's regret - random + FIFO's) and the seeds where it
  is lower / higher.
- Over seeds: median and quartiles (numpy's linear rule); `median_ci95`: a 95% percentile-bootstrap interval for the
  median fraction (10,000 resamples of the seeds, generator seeded 0).

Output in --out: results.json ("default", "methods" with "source" each, "slots", "budget", per-seed numbers),
table.md, anytime_regret.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from check import check_sweep, compare  # noqa: F401  (compare: tests)
from common import DOCS_DIR, REPO_ROOT, machine, write_json
from measures import NEVER, REFERENCE, fraction_to_reach, measures, quartiles  # noqa: F401
from measures import running_best as best_so_far
from methods import FIRST, METHODS, grid_values, method_name, replay_config, sweep_run, variants  # noqa: F401
from peers import LEFT_OUT, PEERS, in_venv, left_out_note, run_peer, run_seeds, source
from peers_venv import PeerCrashed
from report import markdown, plot
from tables import (  # noqa: F401  (lookup: tests)
    TABLES,
    Curves,
    Table,
    available,
    grid_of,
    load_table,
    lookup,
    resolve,
    synthetic_table,
    table_files,
    table_of,
)
from trials import Problem, Run

from lorahpo.config import ExperimentConfig, apply_overrides, load_config, tuning_metric
from lorahpo.errors import UserError

optuna.logging.set_verbosity(optuna.logging.WARNING)  # OptunaSearch's "new study created", once per replay

TABLE = TABLES["intents"].table
INTENTS_CONFIG = REPO_ROOT / "configs" / "intents.yaml"


def running_best(cfg: ExperimentConfig, table: Curves, slots: int, budget: int) -> tuple[list[float], list[list]]:
    """The sweep's running best of its tuning metric after each of its first `budget` trial-epochs, and the grid
    values of its first FIRST trials as they started."""
    reports, started = sweep_run(cfg, table, slots, budget)
    sign = 1.0 if cfg.train.mode == "max" else -1.0
    values = [table[key][epoch - 1][0] for _, key, epoch in reports]
    return best_so_far(values, sign), [list(k) for k in started[:FIRST]]


_CONTEXT: dict[str, Any] = {}  # per worker process: the table and the peers' problem


def _init(table: Table, problem: Problem) -> None:
    _CONTEXT.update(table=table, problem=problem)


def _result(curves: Curves, run: Run, wall: float, cpu: float) -> tuple:
    """One method at one seed: its trial-epochs' values and costs in arrival order, its first trials, and the wall
    and CPU seconds the replay took."""
    reports, started = run
    epochs = [curves[key][epoch - 1] for _, key, epoch in reports]
    return [e.value for e in epochs], [e.cost for e in epochs], [list(k) for k in started[:FIRST]], (wall, cpu)


def _run(item: tuple[str, Any, int, int]) -> tuple:
    name, cfg, slots, seed = item
    start, cpu = time.perf_counter(), time.process_time()
    curves = _CONTEXT["table"].curves(seed)
    if cfg is None:
        run = run_peer(name, _CONTEXT["problem"], curves, seed, slots)
    else:
        run = sweep_run(apply_overrides(cfg, {"seed": seed}), curves, slots, _CONTEXT["problem"].budget)
    return _result(curves, run, time.perf_counter() - start, time.process_time() - cpu)


def replay(
    base: ExperimentConfig,
    df: pd.DataFrame,
    seeds: list[int],
    trials: int,
    methods: list[str] | None = None,
    jobs: int = 1,
    slots: int | None = None,
    peers: bool = False,
) -> dict[str, Any]:
    """Every method (default: all of METHODS and the config's own settings, plus the installed peers if `peers`) for
    every seed against the table `df`, on `slots` slots (None: each lorahpo method on its listed slots, peers on 1)."""
    metric, max_epochs = base.train.metric, base.train.max_epochs
    table, grid = table_of(df, metric, max_epochs), grid_of(df)
    cfg = replay_config(base, grid, trials)
    own = variants(cfg, slots)
    default = method_name(cfg, None if slots else cfg.sweep.max_concurrent_trials)
    sources = {m: "lorahpo" for m in own}
    left_out = dict(LEFT_OUT)
    for name in PEERS:
        sources[name] = source(name)
        if sources[name] is None:
            left_out[name] = left_out_note(name)
    chosen = [*own, *(p for p in PEERS if peers and sources[p])] if methods is None else [REFERENCE, *methods]
    chosen = list(dict.fromkeys(chosen))
    unknown = [m for m in chosen if m not in sources]
    if unknown:
        raise UserError(f"unknown method(s) {unknown}; choose from {list(sources)}")
    missing = [m for m in chosen if sources[m] is None]
    if missing:
        raise UserError(f"{missing}: {left_out[missing[0]]}")
    budget = trials * max_epochs
    problem = Problem(grid, list(cfg.sweep.points_to_evaluate), max_epochs, base.train.patience, base.train.mode,
                      tuning_metric(cfg), budget)  # fmt: skip
    here = [m for m in chosen if m not in PEERS or not in_venv(m)]
    work = [(m, *(own[m] if m in own else (None, slots or 1)), s) for m in here for s in seeds]
    if jobs > 1:
        with ProcessPoolExecutor(jobs, initializer=_init, initargs=(table, problem)) as pool:
            results = list(pool.map(_run, work, chunksize=max(1, len(work) // (4 * jobs))))
    else:
        _init(table, problem)
        results = [_run(w) for w in work]
    per = {m: results[i * len(seeds) : (i + 1) * len(seeds)] for i, m in enumerate(here)}
    seed_curves = {s: table.curves(s) for s in seeds}
    for m in chosen:  # the peers in .venv-peers: one process per chunk of seeds, `jobs` at once
        if m not in per:
            try:
                runs = run_seeds(m, problem, seed_curves, slots or 1, jobs)
            except PeerCrashed as crash:
                left_out[m] = str(crash)
                continue
            per[m] = [_result(seed_curves[s], *runs[s]) for s in seeds]
    chosen = [m for m in chosen if m in per]
    per = {m: per[m] for m in chosen}
    sign = 1.0 if base.train.mode == "max" else -1.0
    curves = {m: [best_so_far(values, sign) for values, *_ in runs] for m, runs in per.items()}
    seed_best = [sign * max(sign * e.value for c in table.curves(s).values() for e in c) for s in seeds]
    out = measures(curves, seed_best, sign, {m: [r[1] for r in runs] for m, runs in per.items()})
    for m in chosen:
        wall, cpu = (sum(r[3][i] for r in per[m]) for i in (0, 1))
        out[m] = {"source": sources[m], **out[m], "replay_s": wall, "replay_cpu_s": cpu}
    all_best = sign * max(sign * e.value for runs in table.by_seed.values() for c in runs.values() for e in c)
    return {
        "default": default,
        "reference": REFERENCE,
        "slots": slots,
        "budget": {"trials": trials, "max_epochs": max_epochs, "trial_epochs": budget},
        "seeds": seeds,
        "metric": tuning_metric(cfg),
        "table_best": all_best,
        "seed_best": seed_best,
        "train_seeds": sorted({s for runs in table.by_seed.values() for s in runs}),
        "grid": {k: list(v) for k, v in grid.items()},
        "configs": len(table.by_seed),
        "methods": out,
        "left_out": left_out,
        # per method and seed: the grid values (in "grid" order) of the first trials, as they started
        "first_trials": {m: [r[2] for r in runs] for m, runs in per.items()},
    }


def parse_seeds(text: str) -> list[int]:
    lo, sep, hi = text.partition("-")
    try:
        seeds = list(range(int(lo), int(hi if sep else lo) + 1))
    except ValueError:
        seeds = []
    if not seeds:
        raise UserError(f"--seeds {text!r} is not a range A-B with A <= B (e.g. --seeds 0-49)")
    return seeds


def arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list-tables", action="store_true", help="print the bundled tables present, one per line")
    p.add_argument("--table", default="intents", help=f"a table name ({', '.join(TABLES)}) or a parquet path")
    p.add_argument("--config", type=Path, default=None, help="the task config replayed (default: the table's)")
    p.add_argument("--seeds", default=None, help="seeds A-B, inclusive (default 0-49; --smoke: 0-1)")
    p.add_argument("--slots", type=int, default=None, help="run every method on N slots (default: as listed)")
    p.add_argument("--out", type=Path, default=DOCS_DIR / "replay", help="output dir (default docs/benchmarks/replay)")
    p.add_argument("--methods", nargs="+", default=None, help="method names (default: all; random+fifo always)")
    p.add_argument("--no-peers", action="store_true", help="lorahpo's methods only")
    p.add_argument("--trials", type=int, default=32, help="N: random + FIFO's trials; B = N x max_epochs")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="processes")
    p.add_argument("--synthetic", action="store_true", help="a synthetic table of the grid's size (timing)")
    p.add_argument("--smoke", action="store_true", help="synthetic table, seeds 0-1: plumbing")
    p.add_argument("--check-sweep", default=None, metavar="DIR", help="a real sweep of the grid vs its replay")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    if args.list_tables:
        print("\n".join(available()))
        for name in sorted(set(TABLES) - set(available())):
            print(f"(not listed: {name}, no file at {TABLES[name].table})", file=sys.stderr)
        return 0
    start = time.perf_counter()
    try:
        seeds = parse_seeds(args.seeds or ("0-1" if args.smoke else "0-49"))
        path, bundled = resolve(args.table)
        config = args.config or (bundled.config if bundled else INTENTS_CONFIG)
        base = load_config(config)
        if args.check_sweep:
            check = check_sweep(args.check_sweep, load_table(path, base.train.metric, base.seed), seeds)
            args.out.mkdir(parents=True, exist_ok=True)
            write_json(args.out / f"check_{Path(args.check_sweep).name}.json", check)
            print(json.dumps(check, indent=1))
            return 0
        if args.trials < 1 or (args.slots is not None and args.slots < 1):
            raise UserError(f"--trials {args.trials} and --slots {args.slots} must be >= 1")
        synthetic = args.synthetic or args.smoke
        grid = bundled.grid if bundled else TABLES["intents"].grid
        df = synthetic_table(grid) if synthetic else load_table(path, base.train.metric, base.seed)
        res = replay(base, df, seeds, args.trials, args.methods, args.jobs, args.slots, peers=not args.no_peers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = [] if synthetic else [str(f) for f in table_files(path)]
    table_id = "synthetic" if synthetic else hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest()
    res = {"smoke": args.smoke, "synthetic": synthetic, "table": None if synthetic else args.table,
           "table_files": files, "table_sha256": table_id, "config": str(config), **res,
           "wall_s": time.perf_counter() - start, "jobs": args.jobs, "machine": machine()}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", res)
    (args.out / "table.md").write_text(markdown(res))
    plot(res, args.out / "anytime_regret.png")
    print((args.out / "table.md").read_text())
    print(f"[replay] {len(res['methods'])} methods x {len(seeds)} seeds in {res['wall_s']:.0f} s -> {args.out}")
    for name, note in res["left_out"].items():
        print(f"[replay] left out {name}: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
