"""What a deterministic sweep costs against the asynchronous one (`sweep.deterministic: false`, Ray Tune's
OptunaSearch + ASHA deciding in arrival order) on the same config, trial budget and slots: wall time, slot
utilisation (busy slot-seconds / wall x slots), best val F-beta reached, trial-epochs run, pauses.

Simulated (bench/simulate.py): the real searchers and schedulers, driven in Tune's order of calls, over scripted
trials from a synthetic task shaped like the default sweep (see `landscape`). Simulated seconds, not measured ones:
the numbers are exact and the same on any machine, so this runs anywhere in about a minute.

    python bench/determinism_cost.py                         # the recorded run (50 seeds; 8 and 32 trials)
    python bench/determinism_cost.py --smoke --out /tmp/d    # 2 seeds, 8 trials, 1-2 slots
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from common import DOCS_DIR, machine, md_table, write_json
from simulate import Outcomes, Simulation, simulate

from lorahpo.config import ExperimentConfig, apply_overrides, load_config

SLOTS = (1, 2, 4, 8)
TRIALS = (8, 32)
START_OVERHEAD_S = 3.0  # a trial (re)start: Tune's bookkeeping, the model built anew, a checkpoint loaded


def landscape(cfg: ExperimentConfig, seed: int) -> Outcomes:
    """A synthetic task on the default search space, shaped like the default sweep's measurements (docs/benchmarks.md
    section 1, DESIGN.md): val F-beta peaks near lr 1e-3 (learning rates below 1e-4 barely learn in 3 epochs),
    favours a positive-class weight of 6-9 and deeper LoRA a little; noise of +-0.01 per epoch. An epoch takes
    5 s of validation plus training that grows with `lora.last_n` (about 18 s at last_n=2, as the default task on 2
    cores), +-10 % per epoch. Each (params, seed) has its own noise, fixed by a hash."""

    def outcomes(params: dict[str, Any]) -> list[tuple[float, float]]:
        p = {**base_values(cfg), **params}
        key = repr(sorted(p.items())) + f"|{seed}"
        rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
        q_lr = math.exp(-(((math.log10(p["train.lr"]) + 3.0) / 0.6) ** 2))
        q_cw = math.exp(-(((p["train.class_weight"] - 7.5) / 5.0) ** 2))
        ceiling = 0.45 + 0.45 * q_lr * (0.8 + 0.2 * q_cw) + 0.015 * (p["lora.last_n"] - 2) - 0.1 * p["lora.dropout"]
        speed = 0.4 + 1.6 * q_lr
        train_s = 11.0 * (0.75 + 0.25 * p["lora.last_n"]) * (1 + 0.05 * (p["lora.r"] / 8 - 1))
        epochs = []
        for e in range(1, cfg.train.max_epochs + 1):
            value = min(1.0, max(0.0, ceiling * (1 - math.exp(-speed * e)) + rng.gauss(0, 0.01)))
            epochs.append((value, (5.0 + train_s) * rng.uniform(0.9, 1.1)))
        return epochs

    return outcomes


def base_values(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config's values of the keys the landscape reads (a trial overrides those it searches)."""
    return {
        "train.lr": cfg.train.lr,
        "train.class_weight": cfg.train.class_weight,
        "train.weight_decay": cfg.train.weight_decay,
        "lora.last_n": cfg.lora.last_n,
        "lora.dropout": cfg.lora.dropout,
        "lora.r": cfg.lora.r,
    }


def run(cfg: ExperimentConfig, seed: int, slots: int, deterministic: bool) -> Simulation:
    cfg = apply_overrides(cfg, {"seed": seed, "sweep.deterministic": deterministic})
    return simulate(cfg, landscape(cfg, seed), slots, START_OVERHEAD_S)


def row(sim: Simulation) -> dict[str, Any]:
    return {
        "wall_s": sim.wall_s,
        "utilisation": sim.utilisation,
        "best": sim.best,
        "trial_epochs": sim.trial_epochs,
        "pauses": sum(1 for e in sim.events if e[2] == "pause"),
    }


def compare(base: ExperimentConfig, trials: int, per_batch: int, slots: int, seeds: list[int]) -> dict[str, Any]:
    """Both modes on the same config, budget and slots, for each seed (root seed = searcher seed = task noise)."""
    cfg = apply_overrides(base, {"sweep.num_samples": trials, "sweep.trials_per_batch": per_batch})
    runs = [{"seed": s, "det": row(run(cfg, s, slots, True)), "async": row(run(cfg, s, slots, False))} for s in seeds]

    def mean(mode: str, key: str) -> float:
        return statistics.mean(r[mode][key] for r in runs)

    ratios = [r["det"]["wall_s"] / r["async"]["wall_s"] for r in runs]
    gains = [r["det"]["best"] - r["async"]["best"] for r in runs]
    return {
        "trials": trials,
        "trials_per_batch": per_batch,
        "slots": slots,
        "wall_ratio_mean": statistics.mean(ratios),
        "wall_ratio_se": sem(ratios),
        # the wall time the same work takes at each mode's utilisation: the cost of scheduling alone
        "scheduling_ratio": mean("async", "utilisation") / mean("det", "utilisation"),
        "best_diff_mean": statistics.mean(gains),
        "best_diff_se": sem(gains),
        **{f"{mode}_{key}": mean(mode, key) for mode in ("det", "async") for key in runs[0]["det"]},
        "runs": runs,
    }


def sem(values: list[float]) -> float:
    """Standard error of the mean."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "trials",
        "slots",
        "trials_per_batch",
        "wall time det / async (mean ± se)",
        "utilisation det / async",
        "utilisation async / det",
        "best val F-beta det − async (mean ± se)",
        "trial-epochs det / async",
        "pauses per sweep (det)",
    ]
    body = [
        [
            r["trials"],
            r["slots"],
            r["trials_per_batch"],
            f"{r['wall_ratio_mean']:.3f} ± {r['wall_ratio_se']:.3f}",
            f"{r['det_utilisation']:.3f} / {r['async_utilisation']:.3f}",
            f"{r['scheduling_ratio']:.3f}",
            f"{r['best_diff_mean']:+.4f} ± {r['best_diff_se']:.4f}",
            f"{r['det_trial_epochs']:.1f} / {r['async_trial_epochs']:.1f}",
            f"{r['det_pauses']:.1f}",
        ]
        for r in rows
    ]
    return md_table(headers, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="2 seeds, 8 trials, 1-2 slots (seconds)")
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--out", type=Path, default=DOCS_DIR / "determinism_cost")
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # OptunaSearch announces its study in every run
    base = load_config()  # configs/default.yaml: its space, max_epochs, ASHA settings, points_to_evaluate
    seeds = list(range(2 if args.smoke else args.seeds))
    slots_list, trials_list = ((1, 2), (8,)) if args.smoke else (SLOTS, TRIALS)
    start = time.perf_counter()
    rows = []
    for trials in trials_list:
        for slots in slots_list:
            for per_batch in sorted({base.sweep.trials_per_batch, slots}):
                rows.append(compare(base, trials, per_batch, slots, seeds))
                r = rows[-1]
                print(
                    f"{trials} trials, {slots} slots, batch {per_batch}: wall det/async {r['wall_ratio_mean']:.3f}, "
                    f"utilisation {r['det_utilisation']:.3f} / {r['async_utilisation']:.3f}",
                    flush=True,
                )
    md = table(rows)
    res = {
        "smoke": args.smoke,
        "machine": machine(),
        "simulated": True,
        "seeds": seeds,
        "start_overhead_s": START_OVERHEAD_S,
        "base_config": "configs/default.yaml",
        "landscape": " ".join(landscape.__doc__.split()),
        "rows": rows,
        "elapsed_s": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", res)
    (args.out / "table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
