"""Peer methods, run in their own packages against the same table, budget, seeds, space and noise draw as lorahpo's
(`pip install -e '.[bench]'`; never a dependency of lorahpo itself).

Every peer searches the grid's categorical values, starts from the config's `points_to_evaluate` (the untuned
baseline: every lorahpo method's trial 0 too), seeds its own random generator(s) with the replay seed s, sees the
curves of seed s's noise draw, runs on the replay's slots, and stops once it has B epoch reports. A trial is the
project's trainable: it reports, after each epoch, its running best of the metric (the tuning metric, e.g.
`best_val_f1`), and ends after `train.patience` epochs without improvement or at `train.max_epochs`. Package defaults
everywhere else, as a user of the package would run it, except the fidelity range (epochs 1..max_epochs).

- Optuna (ask/tell, driven here in simulated time: `asktell`): TPESampler with SuccessiveHalvingPruner or
  HyperbandPruner, and GPSampler (no pruner: a GP models final values). The objective is Optuna's documented pattern:
  `trial.report(value, epoch)` after every epoch, then `trial.should_prune()`; a pruned trial is told PRUNED, a
  finished one COMPLETE with its running best. Trials with the same config are trained again (Optuna proposes them;
  they cost epochs as in a real study).
- Syne Tune (bench/peers_syne.py): its own simulator backend over the table.

Left out, and why: `LEFT_OUT`.
"""

from __future__ import annotations

import heapq
import importlib.metadata
import importlib.util
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


def syne_run(spec: dict[str, Any], p: Problem, curves: Curves, seed: int, slots: int) -> Run:
    from peers_syne import run

    return run(spec, p, curves, seed, slots)


# name -> (package, runner, its settings). A peer's name starts with its package's.
PEERS: dict[str, tuple[str, Callable[..., Run], dict[str, Any]]] = {
    "optuna tpe+sha": ("optuna", optuna_run, {"sampler": "tpe", "pruner": "sha"}),
    "optuna tpe+hyperband": ("optuna", optuna_run, {"sampler": "tpe", "pruner": "hyperband"}),
    "optuna gp": ("optuna", optuna_run, {"sampler": "gp", "pruner": "none"}),
    "syne-tune asha": ("syne-tune", syne_run, {"scheduler": "ASHA"}),
    "syne-tune bohb": ("syne-tune", syne_run, {"scheduler": "BOHB"}),
    "syne-tune bohb per rung": ("syne-tune", syne_run, {"scheduler": "kde per rung"}),
    "syne-tune asha+cqr": ("syne-tune", syne_run, {"scheduler": "ASHACQR"}),
}
MODULE = {"optuna": "optuna", "syne-tune": "syne_tune"}
LEFT_OUT = {
    "dehb": "dehb 0.1.2 (the only version on PyPI here) requires numpy<2.0; the project pins numpy 2.4.6",
    "syne-tune hypertune, mobster, dehb": "not in syne-tune 0.16.0 (the only version on PyPI here): its schedulers "
    "are ASHA and BOHB-style ASHA with a searcher (KDE, BORE, CQR, BoTorch); the GP-based multi-fidelity methods of "
    "earlier versions were removed",
}


def source(name: str) -> str | None:
    """`<package>==<version>` of an installed peer; None when its package is not installed."""
    package = PEERS[name][0]
    if importlib.util.find_spec(MODULE[package]) is None:
        return None
    return f"{package}=={importlib.metadata.version(package)}"


def run_peer(name: str, p: Problem, curves: Curves, seed: int, slots: int) -> Run:
    _, runner, spec = PEERS[name]
    return runner(spec, p, curves, seed, slots)
