"""A sweep in simulated time: the REAL searcher and scheduler a sweep builds from its config (`lorahpo.tuner.
make_searcher` / `make_scheduler`, wrapped as `tune.run` wraps them), driven in the order of calls Ray Tune's
TuneController makes, with scripted trials instead of training: each trial's per-epoch (metric value, duration) is
looked up by its params. No Ray, no sleeping; a 32-trial sweep simulates in well under a second.

    sim = simulate(cfg, outcomes, slots=4, start_overhead_s=3.0)   # budget=B: stop after B epoch reports
    sim.wall_s, sim.utilisation, sim.best, sim.trial_epochs, sim.trials[0].stop_reason, sim.events[:5]

What is modelled (ray/tune/execution/tune_controller.py, Ray 2.60), one `step()` at a time:
  1. ask the search algorithm for new trials while it gives them (SearchGenerator: at most `num_samples`; the
     ConcurrencyLimiter that `max_concurrent_trials` puts around the searcher);
  2. `scheduler.choose_trial_to_run` (a PAUSED choice becomes PENDING), then start PENDING trials in creation order,
     the chosen one first, while slots are free; a start costs `start_overhead_s` (worker, model, checkpoint load);
  3. when nothing more starts, jump to the next epoch end (ties: lower trial number first) and process its report:
     `scheduler.on_trial_result` -> CONTINUE / PAUSE / STOP, `searcher.on_trial_result` unless STOP; a trial whose
     function has returned (patience or max_epochs) ends with `on_trial_complete`, as Tune's `done` result does;
     `stop_trial` of a PAUSED trial calls `on_trial_remove` and completes it in the searcher without a result.
The trial itself is modelled as trainable.EpochReporter reports: the running best of the metric (the tuning metric)
and early stopping by `train.patience`. Not modelled: failures, Tune's 0.1 s polling, result buffering.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import common  # noqa: F401  (puts this checkout's lorahpo on sys.path)
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from lorahpo.config import ExperimentConfig, apply_overrides, tuning_metric
from lorahpo.tuner import make_scheduler, make_searcher

Outcomes = Callable[[dict[str, Any]], Sequence[tuple[float, float]]]
"""params -> one (metric value, seconds) per epoch, at least `train.max_epochs` of them."""


@dataclass
class SimTrial:
    """What schedulers read of a Tune Trial (id, status, last result, latest checkpoint), plus the script."""

    trial_id: str
    number: int
    params: dict[str, Any]
    script: Sequence[tuple[float, float]]
    status: str = Trial.PENDING
    rows: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: dict[str, Any] | None = None
    busy_s: float = 0.0
    decisions: list[tuple[int, str]] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        return self.params

    @property
    def experiment_tag(self) -> str:
        return str(self.number + 1)  # SearchGenerator's counter

    def init_local_path(self) -> None:
        """No trial directories in simulated time."""

    @property
    def last_result(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    @property
    def latest_checkpoint_result(self) -> Any:
        return SimpleNamespace(metrics=self.checkpoint) if self.checkpoint is not None else None

    def __repr__(self) -> str:
        return f"SimTrial({self.number}, {self.status})"


@dataclass
class TrialOutcome:
    number: int
    params: dict[str, Any]
    values: list[float]
    """The per-epoch metric, as reported."""
    tuning: list[float]
    """The per-epoch tuning metric (running best)."""
    stop_reason: str
    busy_s: float
    decisions: list[tuple[int, str]]
    """(epoch, scheduler decision) for every report."""

    @property
    def epochs(self) -> int:
        return len(self.values)


@dataclass
class Simulation:
    slots: int
    wall_s: float
    busy_s: float
    trials: list[TrialOutcome]
    events: list[tuple[float, int, str, int]]
    """(time, trial number, what, epoch): start, resume, report, pause, stop, end."""
    mode: str

    @property
    def utilisation(self) -> float:
        """Busy slot-seconds / (wall x slots)."""
        return self.busy_s / (self.wall_s * self.slots) if self.wall_s else 0.0

    @property
    def trial_epochs(self) -> int:
        return sum(t.epochs for t in self.trials)

    @property
    def best(self) -> float:
        """The best tuning-metric value any trial reached (what the sweep would choose)."""
        return max((t.tuning[-1] for t in self.trials if t.tuning), default=float("nan"))

    def decisions(self) -> dict[int, list[tuple[int, str]]]:
        return {t.number: t.decisions for t in self.trials}


def report_row(cfg: ExperimentConfig, values: list[float]) -> dict[str, Any]:
    """The report after epoch len(values), as trainable.EpochReporter makes it."""
    better = (lambda a, b: a > b) if cfg.train.mode == "max" else (lambda a, b: a < b)
    best, best_epoch = None, 0
    for epoch, v in enumerate(values, 1):
        if best is None or better(v, best):
            best, best_epoch = v, epoch
    epoch = len(values)
    early = epoch - best_epoch >= cfg.train.patience and epoch < cfg.train.max_epochs
    return {
        "epoch": epoch,
        cfg.train.metric: values[-1],
        tuning_metric(cfg): best,
        "best_epoch": best_epoch,
        "early_stopped": early,
        "training_iteration": epoch,
    }


def stop_reason(cfg: ExperimentConfig, row: dict[str, Any]) -> str:
    """As lorahpo.results.stop_reason."""
    if row.get("early_stopped"):
        return "early_stop"
    if row.get("epoch", 0) >= cfg.train.max_epochs:
        return "max_epochs"
    return "asha_stop" if cfg.sweep.scheduler == "asha" else "incomplete"


class Controller:
    """The slice of TuneController a scheduler may call (`get_trials`, `_set_trial_status`, `stop_trial`,
    `search_alg`), over simulated time."""

    def __init__(
        self, cfg: ExperimentConfig, outcomes: Outcomes, slots: int, start_overhead_s: float, budget: int | None = None
    ):
        self.cfg, self.outcomes, self.slots, self.overhead = cfg, outcomes, slots, start_overhead_s
        self.budget, self.reports = budget, 0
        searcher = make_searcher(cfg)
        self.scheduler: TrialScheduler = make_scheduler(cfg, searcher)
        # as tune.run with max_concurrent_trials (a deterministic sweep's searcher takes the limit over)
        self.search_alg: Searcher = ConcurrencyLimiter(searcher, cfg.sweep.max_concurrent_trials)
        metric, mode = tuning_metric(cfg), cfg.train.mode
        self.search_alg.set_search_properties(metric, mode, {})
        self.scheduler.set_search_properties(metric, mode)
        self.trials: list[SimTrial] = []
        self.finished_search = False
        self.now = 0.0
        self.running_since: dict[str, float] = {}
        self.queue: list[tuple[float, int, str]] = []  # (time the next epoch ends, trial number, trial id)
        self.events: list[tuple[float, int, str, int]] = []
        self.ids = (f"t{i:05d}" for i in itertools.count())

    # --- the scheduler-facing API -----------------------------------------------------------------------------
    def get_trials(self) -> list[SimTrial]:
        return self.trials

    def get_live_trials(self) -> set[SimTrial]:
        return {t for t in self.trials if t.status not in (Trial.TERMINATED, Trial.ERROR)}

    def _set_trial_status(self, trial: SimTrial, status: str) -> None:
        trial.status = status

    def stop_trial(self, trial: SimTrial) -> None:
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            return
        if trial.status in (Trial.PENDING, Trial.PAUSED):
            self.scheduler.on_trial_remove(self, trial)
            self.search_alg.on_trial_complete(trial.trial_id)
        else:
            self.scheduler.on_trial_complete(self, trial, trial.last_result)
            self.search_alg.on_trial_complete(trial.trial_id, result=trial.last_result)
            self._release(trial)
        trial.status = Trial.TERMINATED
        self.events.append((self.now, trial.number, "stop", len(trial.rows)))

    # --- the loop -------------------------------------------------------------------------------------------
    def _release(self, trial: SimTrial) -> None:
        trial.busy_s += self.now - self.running_since.pop(trial.trial_id)
        self.queue = [q for q in self.queue if q[2] != trial.trial_id]
        heapq.heapify(self.queue)

    def _ask(self) -> bool:
        added = False
        while not self.finished_search and len(self.trials) < self.cfg.sweep.num_samples:
            trial_id = next(self.ids)
            params = self.search_alg.suggest(trial_id)
            if params == Searcher.FINISHED:
                self.finished_search = True
            if params is None or params == Searcher.FINISHED:
                break
            trial = SimTrial(trial_id, len(self.trials), dict(params), self.outcomes(dict(params)))
            self.trials.append(trial)
            self.scheduler.on_trial_add(self, trial)
            added = True
        return added

    def _start(self, trial: SimTrial) -> None:
        trial.status = Trial.RUNNING
        self.running_since[trial.trial_id] = self.now
        self.events.append((self.now, trial.number, "resume" if trial.rows else "start", len(trial.rows)))
        seconds = self.overhead + trial.script[len(trial.rows)][1]
        heapq.heappush(self.queue, (self.now + seconds, trial.number, trial.trial_id))

    def _start_trials(self) -> bool:
        chosen = self.scheduler.choose_trial_to_run(self)
        if chosen is not None and chosen.status == Trial.PAUSED:
            chosen.status = Trial.PENDING
        pending = [t for t in self.trials if t.status == Trial.PENDING]
        if chosen in pending:
            pending.remove(chosen)
            pending.insert(0, chosen)
        started = False
        for trial in pending:
            if len(self.running_since) >= self.slots:
                break
            self._start(trial)
            started = True
        return started

    def _report(self, trial: SimTrial) -> None:
        values = [v for v, _ in trial.script[: len(trial.rows) + 1]]
        row = report_row(self.cfg, values)
        trial.rows.append(row)
        self.reports += 1
        trial.checkpoint = row  # every report carries a checkpoint
        self.events.append((self.now, trial.number, "report", row["epoch"]))
        decision = self.scheduler.on_trial_result(self, trial, row)
        trial.decisions.append((row["epoch"], decision))
        if decision != TrialScheduler.STOP:
            self.search_alg.on_trial_result(trial.trial_id, row)
        ended = row["early_stopped"] or row["epoch"] >= self.cfg.train.max_epochs
        if decision == TrialScheduler.STOP or (decision == TrialScheduler.CONTINUE and ended):
            self.stop_trial(trial)  # STOP, or the function returned: Tune's `done` result stops it
            if ended:
                self.events[-1] = (self.now, trial.number, "end", row["epoch"])
        elif decision == TrialScheduler.PAUSE:
            self._release(trial)
            trial.status = Trial.PAUSED
            self.events.append((self.now, trial.number, "pause", row["epoch"]))
        else:
            heapq.heappush(self.queue, (self.now + trial.script[row["epoch"]][1], trial.number, trial.trial_id))

    def run(self) -> None:
        while True:
            changed = self._ask()
            changed = self._start_trials() or changed
            if changed:
                continue
            if not self.queue:
                if self._ask():  # the scheduler stopped a paused trial while choosing: the searcher may now plan more
                    continue  # (Tune asks the searcher at every step)
                live = [t for t in self.trials if t.status not in (Trial.TERMINATED, Trial.ERROR)]
                if live:
                    raise RuntimeError(f"deadlock at t={self.now:.1f}: {live} wait, nothing runs")
                return
            self.now, _, trial_id = heapq.heappop(self.queue)
            self._report(next(t for t in self.trials if t.trial_id == trial_id))
            if self.budget is not None and self.reports >= self.budget:
                return  # a fixed budget of trial-epochs (bench/replay.py): what runs past it is never reported


def simulate(
    cfg: ExperimentConfig, outcomes: Outcomes, slots: int, start_overhead_s: float = 0.0, budget: int | None = None
) -> Simulation:
    """Run `cfg`'s sweep with `slots` trials at once (the cluster's capacity and `sweep.max_concurrent_trials`).
    `budget`: stop once this many epoch reports (trial-epochs) have been processed; trials still running then keep
    only what they reported (`sweep.num_samples` must be large enough to reach it)."""
    cfg = apply_overrides(cfg, {"sweep.max_concurrent_trials": slots})
    ctl = Controller(cfg, outcomes, slots, start_overhead_s, budget)
    ctl.run()
    trials = [
        TrialOutcome(
            number=t.number,
            params=t.params,
            values=[r[cfg.train.metric] for r in t.rows],
            tuning=[r[tuning_metric(cfg)] for r in t.rows],
            stop_reason=stop_reason(cfg, t.last_result),
            busy_s=t.busy_s,
            decisions=t.decisions,
        )
        for t in ctl.trials
    ]
    mode = "deterministic" if cfg.sweep.deterministic else "asynchronous"
    return Simulation(slots, ctl.now, sum(t.busy_s for t in trials), trials, ctl.events, mode)
