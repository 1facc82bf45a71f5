"""The measures of a replay, per method, from its runs (one per seed: the metric and training seconds of each of its
B trial-epochs, in the order they arrive). Definitions: bench/replay.py's docstring and docs/benchmarks.md, 8c/8e.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

REFERENCE = "random+fifo"
NEVER = 2.0  # a fraction of a method that never reaches b_s within B (and the cap of the seconds fraction)
POINTS = {"B/8": 8, "B/4": 4, "B/2": 2, "B": 1}  # anytime regret after ceil(B / d) trial-epochs
RESAMPLES = 10_000  # bootstrap resamples of the seeds (fixed generator: the interval is reproducible)


def running_best(values: list[float], sign: float) -> list[float]:
    """The best value so far after each trial-epoch (sign 1: higher is better; -1: lower)."""
    return (sign * np.maximum.accumulate(sign * np.asarray(values, dtype=float))).tolist()


def reach_index(best: list[float], target: float, sign: float) -> int | None:
    """The 0-based trial-epoch at which the running best first reaches `target`; None if it never does."""
    return next((i for i, v in enumerate(best) if sign * v >= sign * target), None)


def fraction_to_reach(best: list[float], target: float, sign: float) -> float:
    """E / B: the trial-epochs consumed when the running best first reaches `target`, over the budget; NEVER if not."""
    i = reach_index(best, target, sign)
    return NEVER if i is None else (i + 1) / len(best)


def seconds_to_reach(best: list[float], costs: list[float], target: float, sign: float, reference_s: float) -> float:
    """The training seconds consumed (the trial-epochs' costs, in order) when the running best first reaches
    `target`, over `reference_s` (random + FIFO's seconds for its B trial-epochs at the same seed); NEVER if it never
    does within the run, and capped at NEVER."""
    i = reach_index(best, target, sign)
    return NEVER if i is None else min(NEVER, float(np.sum(costs[: i + 1])) / reference_s)


def quartiles(x: Any) -> dict[str, float]:
    q25, med, q75 = np.percentile(np.asarray(x, dtype=float), [25, 50, 75])
    return {"median": float(med), "q25": float(q25), "q75": float(q75)}


def median_ci95(x: Any, resamples: int = RESAMPLES) -> list[float]:
    """Percentile bootstrap of the median over seeds: `resamples` resamples of the seeds with replacement (generator
    seeded 0), the median of each (numpy's: the mean of the middle two for an even count), and the 2.5th and 97.5th
    percentiles of those medians (numpy's linear rule)."""
    x = np.asarray(x, dtype=float)
    idx = np.random.default_rng(0).integers(len(x), size=(resamples, len(x)))
    lo, hi = np.percentile(np.median(x[idx], axis=1), [2.5, 97.5])
    return [float(lo), float(hi)]


def point_index(budget: int, divisor: int) -> int:
    """The 0-based trial-epoch after which anytime regret at B / divisor is read: after ceil(B / divisor)."""
    return max(1, math.ceil(budget / divisor)) - 1


def measures(
    curves: dict[str, list[list[float]]],
    table_best: float | list[float],
    sign: float,
    costs: dict[str, list[list[float]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per method, from its running-best curves (one per seed, in seed order; REFERENCE's gives b_s), the per-epoch
    training seconds of the same trial-epochs (None: 1 each), and the best value each seed could reach (one for all,
    or one per seed: with training noise, the best of the curves that seed sees)."""
    targets = [c[-1] for c in curves[REFERENCE]]
    n = len(targets)
    best = np.broadcast_to(np.asarray(table_best, dtype=float), (n,))
    cost = costs or {m: [[1.0] * len(c) for c in runs] for m, runs in curves.items()}
    reference_s = [float(np.sum(c)) for c in cost[REFERENCE]]
    regret = {m: sign * (best[:, None] - np.asarray(runs)) for m, runs in curves.items()}  # (seeds, B), >= 0
    budget = regret[REFERENCE].shape[1]
    at = {p: point_index(budget, d) for p, d in POINTS.items()}
    out = {}
    for name, runs in curves.items():
        r = regret[name]
        fractions = [fraction_to_reach(c, b, sign) for c, b in zip(runs, targets)]
        seconds = [seconds_to_reach(c, k, b, sign, s) for c, k, b, s in zip(runs, cost[name], targets, reference_s)]
        diff = {p: r[:, i] - regret[REFERENCE][:, i] for p, i in at.items()}
        out[name] = {
            "epochs_to_reach_random_fifo_best": quartiles(fractions),
            "seconds_to_reach_random_fifo_best": quartiles(seconds),
            "median_ci95": {
                "epochs_to_reach_random_fifo_best": median_ci95(fractions),
                "seconds_to_reach_random_fifo_best": median_ci95(seconds),
            },  # fmt: skip
            "final_regret": {**quartiles(r[:, -1]), "mean": float(r[:, -1].mean())},
            "anytime_regret_at": {p: {**quartiles(r[:, i]), "mean": float(r[:, i].mean())} for p, i in at.items()},
            "vs_random_fifo": {
                p: {"median_diff": float(np.median(d)), "lower": int((d < 0).sum()), "higher": int((d > 0).sum())}
                for p, d in diff.items()
            },
            "reached": int(sum(f <= 1.0 for f in fractions)),
            "per_seed": {
                "fraction": fractions,
                "seconds_fraction": seconds,
                "final_regret": r[:, -1].tolist(),
                "regret_at": {p: r[:, i].tolist() for p, i in at.items()},
            },  # fmt: skip
            "anytime_regret": {
                q: np.percentile(r, p, axis=0).tolist() for q, p in (("q25", 25), ("median", 50), ("q75", 75))
            },  # fmt: skip
        }
    return out
