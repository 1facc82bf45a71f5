"""What a replayed trial is, shared by lorahpo's methods and every peer: an epoch of the table, a seed's curves, the
problem a peer is given, the trial as the project's trainable runs it, and a driver for ask/tell packages in simulated
time.

Standard library and numpy only: the peers' own environment (.venv-peers, bench/peers_venv.py) imports this module
too, with other versions of everything, so nothing here may need lorahpo or pandas.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np


class Epoch(NamedTuple):
    """One epoch of one config, as a replay uses it."""

    value: float
    """The tuning metric's base value (e.g. val_f1) after the epoch."""
    seconds: float
    """`iter_s`: the epoch's simulated duration (model build in epoch 1, checkpoint and report in every epoch)."""
    cost: float
    """`epoch_time_s` (training + validation; `iter_s` where a table lacks it): what the epoch costs in training
    seconds."""


Curves = dict[tuple, list[Epoch]]
"""Grid values (in the table's `param.*` column order) -> epochs 1..max_epochs: what one replay seed sees."""

Run = tuple[list[tuple[int, tuple, int]], list[tuple]]
"""One method at one seed: its first B epoch reports in arrival order, each (trial number, grid values, epoch), and
the grid values of its trials in the order they started (trial numbers are the method's own)."""


def native(v: Any) -> Any:
    """A table value as the config holds it (numpy scalars -> Python; whole floats of an int column stay ints)."""
    return v.item() if isinstance(v, np.generic) else v


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
