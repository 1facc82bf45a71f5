"""Deterministic sweeps: trials are numbered in the order the searcher suggests them, and every choice is a function of
earlier trials' results taken in that order, never of which trial reported first.

- `BatchSearcher` plans trials in batches of `sweep.trials_per_batch`: batch k comes from a FRESH Optuna study whose
  sampler is seeded from (seed, k), told every trial of batches <= k - L (L = `sweep.planning_lag`, 2 by default;
  value = the running best, as OptunaSearch tells it: at the end of the trial, or with `sweep.told: first_rung` at
  the first rung, the grace period) and shown the params of batches k - L + 1 .. k - 1 as running trials (TPE's
  constant liar steers away from them). No sampler state is carried from batch to batch, so a resumed sweep plans
  exactly what an uninterrupted one would. Batch k waits only for what batch k - L must tell, so the batches between
  keep the slots busy meanwhile.
- `OrderedScheduler` is successive halving with ASHA's rule (rungs, cutoff, reduction factor, max_t) applied as if
  trials had reported in trial-number order: trial i at a rung is compared with the rung values of all trials j < i that
  reached it. If some j < i has not yet reached or passed that rung, trial i PAUSEs (at the checkpoint it just
  reported) until it has. The first `sweep.rung_min_trials` trials at a rung are judged together (synchronous
  successive halving), so the first rung promotes only the best of a cohort, not whichever came first. It also
  decides which trial runs next: the lowest-numbered runnable one, at most `sweep.max_concurrent_trials` at once.
  Tune hands that limit to the searcher (`set_max_concurrency`: the searcher handles it, so Tune's
  ConcurrencyLimiter, which would count paused trials as running, stands aside) and still sizes its queue of starting
  trials by it.

What both share (each trial's params and per-epoch tuning metric, whether it ended) lives in the searcher, because Tune
checkpoints the searcher with every experiment snapshot and restores it on --resume; the scheduler keeps nothing that
cannot be rebuilt from it. Tune saves the searcher and its trial list in separate files, uploaded in the background, so
a driver killed during an upload can leave them out of step; Tune's trial list wins (see `BatchSearcher.confirm`).

The pure functions (`rung_epochs`, `rung_decision`, `plan_batch`, `batch_gate_open`) are the whole policy; the two
classes adapt them to Tune's calls (and bench/simulate.py drives the same classes).
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

import optuna
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from lorahpo.compat import park_trial
from lorahpo.config import ExperimentConfig, direction, tuning_metric
from lorahpo.policy import (
    CONTINUE,
    STOP,
    TrialRecord,
    batch_gate_open,
    rung_decision,
    rung_epochs,
    told_before,
    told_rung,
    told_value,
)
from lorahpo.space import ask_new, child_seed, make_sampler, optuna_space
from lorahpo.storage import tag_number

log = logging.getLogger(__name__)
PAUSE = TrialScheduler.PAUSE
EPOCH = "epoch"  # the trainable's 1-based count of completed epochs: the rung axis (ASHA's time_attr)
EARLY_STOPPED = "early_stopped"  # set on the report that ends a trial by patience (trainable.EpochReporter)


# ---------------------------------------------------------------------------------------------------------------------
# The planner


def plan_batch(
    cfg: ExperimentConfig, k: int, finished: list[TrialRecord], running: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The `trials_per_batch` params of batch k: a fresh study, seeded from (seed, k), told the finished trials in
    number order and the running ones; `points_to_evaluate` that fall in this batch come first. No config of an
    earlier trial or of this batch is planned again (`space.ask_new`)."""
    seed = child_seed(cfg.seed, k)  # the sampler seed of batch k: a fixed function of the root seed and k
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a study per batch: no "new study created" line for each
    try:
        study = optuna.create_study(direction=direction(cfg), sampler=make_sampler(cfg, seed))
    finally:
        optuna.logging.set_verbosity(verbosity)
    space = optuna_space(cfg)
    done, failed = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
    rung = told_rung(cfg)
    for rec in finished:
        value = told_value(rec, rung)
        trial = optuna.trial.create_trial(
            params=rec.params, distributions=space, value=value, state=done if value is not None else failed
        )
        study.add_trial(trial)
    for params in running:
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=space, state=optuna.trial.TrialState.RUNNING)
        )
    per_batch = cfg.sweep.trials_per_batch
    for point in cfg.sweep.points_to_evaluate[k * per_batch : (k + 1) * per_batch]:
        study.enqueue_trial(dict(point))  # a partial point: the sampler fills in the rest
    return [ask_new(study, space, seed).params for _ in range(per_batch)]


# ---------------------------------------------------------------------------------------------------------------------
# The searcher


class BatchSearcher(Searcher):
    """Suggests trial n from batch n // trials_per_batch, planned once its gate is open (None until then: Tune asks
    again at its next step). Holds the records the scheduler decides from; Tune saves and restores them."""

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(metric=tuning_metric(cfg), mode=cfg.train.mode)
        self.cfg = cfg
        self.records: list[TrialRecord] = []
        self.index: dict[str, int] = {}
        self.batches: dict[int, list[dict[str, Any]]] = {}
        self.max_concurrent = cfg.sweep.max_concurrent_trials
        # How many new trials the scheduler can start now (set by OrderedScheduler.choose_trial_to_run). Suggesting
        # only those, rather than every planned trial at once, keeps Tune's search unfinished until the last trial
        # is due: Tune hands a finished trial's worker process to the next trial (`sweep.reuse_actors`) only then.
        self.wanted = self.max_concurrent
        self.confirmed: set[str] = set()  # trials Tune has added (not saved: Tune adds them again on --resume)
        self.unsaved: dict[int, tuple[str, dict[str, Any]]] = {}  # restored trials waiting for a lower number
        self.restored = False

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Tune's `max_concurrent_trials`: the scheduler admits at most this many running trials (True: Tune's
        ConcurrencyLimiter leaves the limiting to us). Not part of the saved state: --resume may change it."""
        self.max_concurrent = self.wanted = max_concurrent
        return True

    def confirm(self, trial_id: str, params: dict[str, Any], tag_number: int, live: bool) -> None:
        """Tune added a trial (new, retried or restored). On --resume this reconciles the records with Tune's trials:
        a trial Tune restored but the saved records lack (saved earlier) is recorded under its number, whatever order
        Tune adds them in (Ray 2.60 re-adds restored trials newest result first): one whose predecessors are not
        recorded yet waits in `unsaved` until they are. A trial Tune will run again is not ended."""
        if trial_id not in self.index and tag_number >= len(self.records):
            self.unsaved[tag_number] = (trial_id, {k: params[k] for k in self.cfg.search if k in params})
            self.adopt_unsaved()
        self.confirmed.add(trial_id)
        if live and trial_id in self.index:
            rec = self.records[self.index[trial_id]]
            rec.ended = rec.failed = False

    def check_restored(self, trial_id: str, last_epoch: int | None) -> None:
        """A trial Tune restored as ended whose saved record stops at an earlier epoch: the searcher was saved while it
        ran and the driver stopped before the next save. Its later epochs are lost to the planner and the rungs (Tune
        will not run it again), so the trials after it may differ from an uninterrupted run: say so."""
        rec = self.records[self.index[trial_id]] if trial_id in self.index else None
        if rec is not None and last_epoch is not None and last_epoch > max(rec.values, default=0):
            log.warning(
                "the searcher's saved state has %s up to epoch %d, Tune's up to epoch %d (the driver stopped "
                "mid-save): later trials may differ from an uninterrupted sweep",
                trial_id, max(rec.values, default=0), last_epoch,
            )  # fmt: skip

    def adopt_unsaved(self) -> None:
        """Record the restored trials the saved records lack, in number order, as far as no number is missing."""
        per_batch = self.cfg.sweep.trials_per_batch
        while len(self.records) in self.unsaved:
            n = len(self.records)
            trial_id, own = self.unsaved.pop(n)
            log.warning("the searcher's saved state lacks %s (the driver stopped mid-save); taken from Tune", trial_id)
            # its batch may be missing too (planned after the save): plan it again, and keep what Tune ran
            self.planned(n // per_batch)[n % per_batch] = own
            self.index[trial_id] = n
            self.records.append(TrialRecord(trial_id, own))

    def forget_unconfirmed(self) -> None:
        """Once after --resume: drop trials Tune did not restore (the newest trials of a searcher state saved after
        Tune's trial list). They are suggested again, with the same params (each batch is a pure function)."""
        while self.restored and self.records and self.records[-1].trial_id not in self.confirmed:
            lost = self.records.pop().trial_id
            del self.index[lost]
            log.warning("Tune's saved trials lack %s (the driver stopped mid-save); it is suggested again", lost)
        self.restored = False

    def end(self, trial_id: str, failed: bool) -> None:
        if trial_id in self.index and not self.records[self.index[trial_id]].ended:
            rec = self.records[self.index[trial_id]]
            rec.ended, rec.failed = True, failed

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        self.forget_unconfirmed()
        n, per_batch = len(self.records), self.cfg.sweep.trials_per_batch
        if n >= self.cfg.sweep.num_samples:
            return Searcher.FINISHED
        if self.wanted <= 0:
            return None  # no slot would take it yet; the params of trial n do not depend on when it is asked for
        k = n // per_batch
        if k not in self.batches and not batch_gate_open(self.records, k, self.cfg):
            return None
        params = dict(self.planned(k)[n % per_batch])
        self.index[trial_id] = n
        self.records.append(TrialRecord(trial_id, params))
        self.wanted -= 1
        self.adopt_unsaved()  # a restored trial waiting for this number (if Tune's list lacked it)
        return params

    def planned(self, k: int) -> list[dict[str, Any]]:
        """The params of batch k, planned now unless they are known (a pure function of the seed and the trials of
        batches <= k - planning_lag, told what they had when its gate opened; after --resume, as the restored records
        hold them)."""
        if k not in self.batches:
            s = self.cfg.sweep
            finished = self.records[: told_before(k, s.trials_per_batch, s.planning_lag)]
            running = [dict(p) for j in range(max(0, k - s.planning_lag + 1), k) for p in self.planned(j)]
            self.batches[k] = plan_batch(self.cfg, k, finished, running)
        return self.batches[k]

    def number(self, trial_id: str) -> int:
        """A trial's number (suggestion order); trials this searcher did not suggest sort last."""
        return self.index.get(trial_id, len(self.records))

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Note a trial's per-epoch tuning metric (a report seen twice, e.g. replayed after a resume, is the same)."""
        if trial_id in self.index and EPOCH in result and self.metric in result:
            self.records[self.index[trial_id]].values[int(result[EPOCH])] = float(result[self.metric])

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id not in self.index:
            return
        if result:
            self.on_trial_result(trial_id, result)
        rec = self.records[self.index[trial_id]]
        rec.ended, rec.failed = True, error

    def get_state(self) -> dict[str, Any]:
        return {"records": self.records, "index": self.index, "batches": self.batches}

    def set_state(self, state: dict[str, Any]) -> None:
        # in place: the scheduler holds this object, not its attributes
        self.records, self.index, self.batches = state["records"], state["index"], state["batches"]
        self.confirmed, self.unsaved, self.restored = set(), {}, True

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))


# ---------------------------------------------------------------------------------------------------------------------
# The scheduler


class OrderedScheduler(TrialScheduler):
    """Early stopping in trial-number order (ASHA's rule; with `sweep.scheduler=fifo`, none) and admission of trials:
    Tune starts every PENDING trial that fits the cluster, so trials the scheduler has not chosen are parked as
    PAUSED, and `choose_trial_to_run` starts the lowest-numbered runnable one while fewer than `slots` run."""

    def __init__(self, cfg: ExperimentConfig, searcher: BatchSearcher):
        super().__init__()
        self.searcher = searcher
        self.halving = cfg.sweep.scheduler == "asha"
        self.max_t = cfg.train.max_epochs
        self.rungs = rung_epochs(cfg.sweep.grace_period, cfg.sweep.reduction_factor, self.max_t) if self.halving else ()
        self.reduction_factor = cfg.sweep.reduction_factor
        self.min_trials = cfg.sweep.rung_min_trials
        self.sign = 1.0 if cfg.train.mode == "max" else -1.0
        self.admitted: set[str] = set()  # chosen to run, not paused or ended since

    @property
    def slots(self) -> int:
        return self.searcher.max_concurrent

    def decide(self, trial: Trial, epoch: int) -> str | None:
        """CONTINUE, STOP, or None (not known yet) for a trial that has completed `epoch` epochs."""
        if self.halving and epoch >= self.max_t:
            return STOP  # as ASHA: a trial that reached max_t is done
        s = self.searcher
        if epoch not in self.rungs or trial.trial_id not in s.index:
            return CONTINUE
        n = s.index[trial.trial_id]
        if epoch not in s.records[n].values:
            return CONTINUE  # only if storage lost the searcher's newest state: train on rather than wait forever
        return rung_decision(s.records, n, epoch, self.reduction_factor, self.sign, self.min_trials)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        live = trial.status not in (Trial.TERMINATED, Trial.ERROR)
        self.searcher.confirm(trial.trial_id, dict(trial.config), tag_number(trial) - 1, live)
        if not live:
            self.searcher.check_restored(trial.trial_id, (trial.last_result or {}).get(EPOCH))
        # Tune names a trial's directory when it first starts it, and its closing status table (printed after
        # Ctrl-C too) fails on a queued trial without one (Trial.local_path raises): name it now.
        trial.init_local_path()

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        self.searcher.on_trial_result(trial.trial_id, result)
        if EPOCH not in result:
            return CONTINUE
        if result.get(EARLY_STOPPED):
            return CONTINUE  # this report ends the trial anyway; pausing it would resume a finished run
        decision = self.decide(trial, int(result[EPOCH]))
        if decision is None:
            self.leave_slot(trial)
            return PAUSE
        return decision

    def leave_slot(self, trial: Trial) -> None:
        """A trial stops running: its slot may take a new trial before the next `choose_trial_to_run` (Tune asks the
        searcher first, and with nothing queued it would wait for a suggestion)."""
        self.admitted.discard(trial.trial_id)
        self.searcher.wanted += 1

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        self.leave_slot(trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self.leave_slot(trial)  # a retried trial queues again like any other

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self.admitted.discard(trial.trial_id)

    def resume_decision(self, trial: Trial) -> str | None:
        """May a paused (or never started) trial run? Judged at the checkpoint it would resume from, which after a
        driver crash can be older than its last report (the report is replayed, with the same value)."""
        result = trial.latest_checkpoint_result  # the report of its latest checkpoint (None before its first)
        at = dict(result.metrics or {}) if result is not None else {}
        if at.get(EARLY_STOPPED):
            return STOP  # it had ended by patience; training on would add an epoch no uninterrupted run has
        epoch = int(at.get(EPOCH, 0))
        return CONTINUE if epoch == 0 else self.decide(trial, epoch)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        trials = sorted(tune_controller.get_trials(), key=lambda t: self.searcher.number(t.trial_id))
        for t in trials:
            if t.status == Trial.PENDING and t.trial_id not in self.admitted:
                park_trial(tune_controller, t, Trial.PAUSED)
            elif t.status in (Trial.TERMINATED, Trial.ERROR):  # ended, whether or not the searcher was told
                self.searcher.end(t.trial_id, failed=t.status == Trial.ERROR)
        runnable = []
        for t in trials:
            if t.status != Trial.PAUSED:
                continue
            decision = self.resume_decision(t)
            if decision == STOP:
                tune_controller.stop_trial(t)  # stopped where it paused, never resumed
            elif decision == CONTINUE:
                runnable.append(t)
        busy = sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in trials)
        chosen = runnable[0] if runnable and busy < self.slots else None
        # new trials wanted: the slots that neither a running nor a runnable queued trial will fill
        self.searcher.wanted = max(0, self.slots - busy - len(runnable))
        if chosen is None:
            return None
        self.admitted.add(chosen.trial_id)
        return chosen

    def debug_string(self) -> str:
        mode = f"rungs at epochs {list(self.rungs)}" if self.halving else "no early stopping"
        return f"Deterministic scheduling in trial-number order ({mode}), at most {self.slots} trials at once."
