"""The deterministic sweep's policy as pure functions of the trial records (lorahpo/ordered.py wires them into Ray
Tune): ASHA's rungs and its rule applied in trial-number order, and which trials, at which fidelity, the planner of
each batch is told."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray.tune.schedulers import TrialScheduler

from lorahpo.config import ExperimentConfig

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


@dataclass
class TrialRecord:
    """What the sweep knows of one trial, by trial number."""

    trial_id: str
    params: dict[str, Any]
    values: dict[int, float] = field(default_factory=dict)
    """Tuning metric (the running best) reported after each epoch."""
    ended: bool = False
    failed: bool = False


def rung_epochs(grace_period: int, reduction_factor: int, max_t: int) -> tuple[int, ...]:
    """ASHA's milestones (one bracket), ascending; the same expression as ray.tune's _Bracket so they always agree."""
    count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
    return tuple(grace_period * reduction_factor**k for k in range(count))


def rung_decision(
    records: list[TrialRecord], n: int, epoch: int, reduction_factor: int, sign: float, min_trials: int = 1
) -> str | None:
    """ASHA's decision for trial n at rung `epoch`, as if trials had reported in number order: STOP when its value is
    below the (1 - 1/rf) quantile of the rung values of the trials before it, else CONTINUE. The first `min_trials`
    trials are judged together instead (`sweep.rung_min_trials`, successive halving's synchronous rule): each against
    the rung values of all of them, itself included, so a rung never promotes a trial for lack of company. None while
    a trial it is compared with has neither reported that epoch nor ended: the decision is not known yet. `sign` is +1
    to maximise."""
    together = n < min_trials
    if together and len(records) < min_trials:
        return None  # some of the trials judged together are not even started
    values = []
    for rec in records[:min_trials] if together else records[:n]:
        if epoch in rec.values:
            values.append(sign * rec.values[epoch])
        elif not rec.ended:
            return None
    if not values:
        return CONTINUE
    cutoff = np.nanpercentile(values, (1 - 1 / reduction_factor) * 100)
    return STOP if sign * records[n].values[epoch] < cutoff else CONTINUE


def told_before(k: int, per_batch: int, lag: int) -> int:
    """Batch k is planned from trials 0 .. told_before(k) - 1: the batches <= k - lag (`sweep.planning_lag`)."""
    return max(0, (k - lag + 1) * per_batch)


def told_rung(cfg: ExperimentConfig) -> int | None:
    """The epoch whose value the sampler is told (`sweep.told: first_rung`: the grace period); None: the final one."""
    return cfg.sweep.grace_period if cfg.sweep.told == "first_rung" else None


def told_value(rec: TrialRecord, rung: int | None) -> float | None:
    """What the sampler is told of a trial: its running best at epoch `rung` once reported there, else its final
    value, the running best when it ended (None: failed, or not ended: a record restored from a save made while it
    ran). A failure after the rung does not change what was told (the batch may have been planned before it)."""
    if rung is not None and rung in rec.values:
        return rec.values[rung]
    return rec.values[max(rec.values)] if rec.values and rec.ended and not rec.failed else None


def batch_gate_open(records: list[TrialRecord], k: int, cfg: ExperimentConfig) -> bool:
    """Batch k may be planned once every trial it is told has what it is told: it ended, or (sweep.told=first_rung)
    it reported the first rung."""
    rung, s = told_rung(cfg), cfg.sweep
    told = records[: told_before(k, s.trials_per_batch, s.planning_lag)]
    return all(rec.ended or (rung is not None and rung in rec.values) for rec in told)
