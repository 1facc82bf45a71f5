"""What every peer shares (bench/peers.py): the problem it is given, the trial as the project's trainable runs it,
and a driver for ask/tell packages in simulated time, with Optuna's adapter on it."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from methods import Run
from tables import Curves, Epoch


@dataclass(frozen=True)
class Problem:
    """What every peer is given: the space, the start points, the trial's rules and the budget."""

    space: dict[str, tuple]
    """Grid key -> its categorical values, in the table's key order."""
    points: list[dict[str, Any]]
    """The config's points_to_evaluate, restricted to the grid's keys."""
    max_epochs: int
    patience: int
    mode: str
    """"max" or "min"."""
    metric: str
    """The tuning metric's name (what a trial reports)."""
    budget: int
    """B, in trial-epochs."""


def trial_length(curve: list[Epoch], p: Problem) -> int:
    """The epochs the trainable runs: until `patience` epochs pass without improvement, or max_epochs."""
    sign = 1.0 if p.mode == "max" else -1.0
    best, best_epoch = None, 0
    for epoch, e in enumerate(curve[: p.max_epochs], 1):
        if best is None or sign * e.value > sign * best:
            best, best_epoch = e.value, epoch
        if epoch - best_epoch >= p.patience:
            return epoch
    return p.max_epochs


def tuning_values(curve: list[Epoch], mode: str) -> list[float]:
    """The trial's reports: its running best after each epoch."""
    pick = max if mode == "max" else min
    out: list[float] = []
    for e in curve:
        out.append(e.value if not out else pick(out[-1], e.value))
    return out


Start = Callable[[], tuple[Any, tuple]]
"""Ask the package for the next trial: (its handle, its grid values)."""
Report = Callable[[Any, int, float, bool], bool]
"""Tell it (handle, epoch, tuning value, the trial's last epoch?); False: the package stopped the trial."""


def asktell(start: Start, report: Report, curves: Curves, p: Problem, slots: int) -> Run:
    """An ask/tell package in simulated time: `slots` trials at once, a new one asked for as soon as a slot frees,
    each epoch reported when its `iter_s` has passed (ties: the lower trial number first), until B reports."""
    now, queue, live, reports, started = 0.0, [], {}, [], []

    def launch() -> None:
        handle, key = start()
        number = len(started)
        started.append(key)
        curve = curves[key]
        live[number] = (handle, key, tuning_values(curve, p.mode), trial_length(curve, p), curve)
        heapq.heappush(queue, (now + curve[0].seconds, number, 1))

    for _ in range(slots):
        launch()
    while len(reports) < p.budget:
        now, number, epoch = heapq.heappop(queue)
        handle, key, values, length, curve = live[number]
        reports.append((number, key, epoch))
        if report(handle, epoch, values[epoch - 1], epoch == length) and epoch < length:
            heapq.heappush(queue, (now + curve[epoch].seconds, number, epoch + 1))
        else:
            del live[number]
            if len(reports) < p.budget:
                launch()
    return reports, started


def optuna_run(spec: dict[str, Any], p: Problem, curves: Curves, seed: int, slots: int) -> Run:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
               "gp": lambda: optuna.samplers.GPSampler(seed=seed)}[spec["sampler"]]()  # fmt: skip
    pruner = {"none": optuna.pruners.NopPruner,
              "sha": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=p.max_epochs)}[
        spec["pruner"]]()  # fmt: skip
    # a fixed name: HyperbandPruner assigns a trial's bracket from a hash of the study name and trial number
    study = optuna.create_study(study_name="replay", direction=f"{p.mode}imize", sampler=sampler, pruner=pruner)
    for point in p.points:
        study.enqueue_trial(point)
    dists = {k: optuna.distributions.CategoricalDistribution(v) for k, v in p.space.items()}

    def start() -> tuple[Any, tuple]:
        trial = study.ask(dists)
        return trial, tuple(trial.params[k] for k in p.space)

    def report(trial: Any, epoch: int, value: float, last: bool) -> bool:
        trial.report(value, epoch)
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return False
        if last:
            study.tell(trial, value)
        return True

    return asktell(start, report, curves, p, slots)
