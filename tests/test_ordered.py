"""The deterministic searcher and scheduler (lorahpo.ordered), fast: their pure policy, and whole sweeps driven in
simulated time by bench/simulate.py (the same objects make_tuner builds, called in Tune's order) with scripted
trials whose durations reorder when they report."""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher

from lorahpo.config import ExperimentConfig, ParamSpec
from lorahpo.errors import UserError
from lorahpo.ordered import (
    CONTINUE,
    STOP,
    BatchSearcher,
    OrderedScheduler,
    TrialRecord,
    batch_gate_open,
    plan_batch,
    rung_decision,
    rung_epochs,
    told_value,
)

from .conftest import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from simulate import Simulation, simulate  # noqa: E402


def scripted(seed: int, speed: str) -> Any:
    """A fixed metric curve per params; durations that make `speed` trials report first: 'lr' (the higher the
    learning rate, the slower), 'inverse' (the opposite), or 'random' (a per-params hash, seeded)."""

    def outcomes(params: dict[str, Any]) -> list[tuple[float, float]]:
        key = repr(sorted(params.items()))
        rng = random.Random(key)
        q = math.exp(-(((math.log10(params["train.lr"]) + 3.0) / 0.5) ** 2))
        values = [min(1.0, 0.4 + 0.5 * q * (1 - 0.5**e) + rng.uniform(-0.03, 0.03)) for e in range(1, 9)]
        if speed == "random":
            durations = [random.Random(f"{key}|{seed}|{e}").uniform(1, 30) for e in range(8)]
        else:
            base = 10 * params["train.lr"] / 1e-3
            durations = [base if speed == "lr" else 100 / base for _ in range(8)]
        return list(zip(values, durations))

    return outcomes


def cfg_for(**overrides: Any) -> ExperimentConfig:
    base = {"sweep.num_samples": 12, "sweep.trials_per_batch": 3, "train.max_epochs": 4, "train.patience": 1}
    return tiny_config(**{**base, **overrides})


def summary(sim: Simulation) -> list[tuple]:
    """Everything a sweep's results consist of, per trial in number order."""
    return [(t.number, sorted(t.params.items()), t.values, t.tuning, t.stop_reason) for t in sim.trials]


def test_deterministic_sweep_is_the_same_at_any_concurrency_and_timing() -> None:
    cfg = cfg_for()
    reference = simulate(cfg, scripted(0, "lr"), slots=1)
    assert {t.stop_reason for t in reference.trials} >= {"asha_stop", "max_epochs"}  # ASHA stops some, not all
    pauses = 0
    for slots in (2, 3, 5, 12):
        for speed in ("lr", "inverse", "random"):
            sim = simulate(cfg, scripted(slots, speed), slots=slots, start_overhead_s=1.0)
            assert summary(sim) == summary(reference), (slots, speed)
            pauses += sum(e[2] == "pause" for e in sim.events)
            assert max(running_at_once(sim)) <= slots
    assert pauses > 0  # trials did report out of order and waited
    # the asynchronous sweep, for contrast, depends on concurrency and timing
    asynchronous = cfg_for(**{"sweep.deterministic": False})
    runs = [summary(simulate(asynchronous, scripted(3, s), slots=3)) for s in ("lr", "inverse")]
    assert runs[0] != runs[1]


def running_at_once(sim: Simulation) -> list[int]:
    running, counts = set(), [0]
    for _, n, what, _ in sorted(sim.events, key=lambda e: (e[0], e[2] in ("start", "resume"))):
        if what in ("start", "resume"):
            running.add(n)
        elif what in ("pause", "stop", "end"):
            running.discard(n)
        counts.append(len(running))
    return counts


def test_a_paused_trial_can_be_stopped_without_resuming() -> None:
    """Trial 1 reports epoch 1 before trial 0 and waits, paused; trial 0's better value then stops it where it
    stands, as if trial 0 had reported first."""
    points = "[{train.lr: 0.002}, {train.lr: 0.001}]"
    cfg = cfg_for(**{"sweep.num_samples": 2, "sweep.trials_per_batch": 2, "sweep.points_to_evaluate": points})
    script = {0.002: (0.8, 5.0), 0.001: (0.3, 1.0)}  # lr -> (val F-beta every epoch, seconds per epoch)
    sim = simulate(cfg, lambda p: [script[p["train.lr"]]] * 4, slots=2)
    assert [(t.stop_reason, t.epochs) for t in sim.trials] == [("early_stop", 2), ("asha_stop", 1)]
    events = [(n, what, epoch) for _, n, what, epoch in sim.events if n == 1]
    assert events == [(1, "start", 0), (1, "report", 1), (1, "pause", 1), (1, "stop", 1)]
    assert summary(simulate(cfg, lambda p: [script[p["train.lr"]]] * 4, slots=1)) == summary(sim)


def test_ordered_decisions_equal_asha_in_trial_number_order() -> None:
    """With trials reporting one after another in number order, the rule is ASHA's, decision for decision."""
    rng = np.random.default_rng(0)
    for reduction_factor, max_t, grace in ((2, 8, 1), (3, 9, 1), (2, 6, 2)):
        asha = ASHAScheduler(
            time_attr="epoch",
            metric="m",
            mode="max",
            max_t=max_t,
            grace_period=grace,
            reduction_factor=reduction_factor,
        )
        rungs = rung_epochs(grace, reduction_factor, max_t)
        assert sorted(m for m, _ in asha._brackets[0]._rungs) == list(rungs)
        records: list[TrialRecord] = []
        for n in range(25):
            trial = type("T", (), {"trial_id": f"t{n}"})()
            asha.on_trial_add(None, trial)
            records.append(TrialRecord(f"t{n}", {}))
            for epoch in range(1, max_t):
                value = float(rng.uniform(0, 1))
                records[n].values[epoch] = value
                ours = rung_decision(records, n, epoch, reduction_factor, 1.0) if epoch in rungs else CONTINUE
                assert asha.on_trial_result(None, trial, {"epoch": epoch, "m": value}) == ours
                if ours == STOP:
                    break
            records[n].ended = True


def test_rung_decision_waits_for_every_earlier_trial() -> None:
    recs = [TrialRecord("a", {}, {1: 0.5}), TrialRecord("b", {}, {}), TrialRecord("c", {}, {1: 0.1})]
    assert rung_decision(recs, 2, 1, 2, 1.0) is None  # b has neither reported epoch 1 nor ended
    recs[1].ended = True  # b ended before epoch 1 (e.g. failed): no longer awaited, not compared
    assert rung_decision(recs, 2, 1, 2, 1.0) == STOP
    assert rung_decision(recs, 2, 1, 2, -1.0) == CONTINUE  # minimising: 0.1 beats 0.5


def test_the_first_trials_at_a_rung_are_judged_together() -> None:
    """sweep.rung_min_trials=4, rf 2: trials 0-3 are each judged against all four rung values (median 0.6), so trial 0
    (0.5) stops, where plain ASHA, comparing it with no one, lets it go on; later trials keep ASHA's rule."""
    values = [0.5, 0.9, 0.2, 0.7, 0.6]
    recs = [TrialRecord(f"t{i}", {}, {1: v}) for i, v in enumerate(values)]
    assert rung_decision(recs[:3], 0, 1, 2, 1.0, min_trials=4) is None  # trial 3 not even started
    waiting = [*recs[:3], TrialRecord("t3", {}, {})]
    assert rung_decision(waiting, 0, 1, 2, 1.0, min_trials=4) is None  # started, not at the rung yet
    together = [rung_decision(recs, n, 1, 2, 1.0, min_trials=4) for n in range(5)]
    assert together == [STOP, CONTINUE, STOP, CONTINUE, CONTINUE]  # trial 4: 0.6 vs median(0.5, 0.9, 0.2, 0.7)
    assert [rung_decision(recs, n, 1, 2, 1.0) for n in range(5)] == [CONTINUE, CONTINUE, STOP, CONTINUE, CONTINUE]
    assert [rung_decision(recs, n, 1, 2, -1.0, min_trials=4) for n in range(4)] == [CONTINUE, STOP, CONTINUE, STOP]
    waiting[3].ended = True  # trial 3 ended before the rung (failed): not awaited, not compared (median 0.5)
    assert [rung_decision(waiting, n, 1, 2, 1.0, min_trials=4) for n in range(3)] == [CONTINUE, CONTINUE, STOP]


def test_what_the_sampler_is_told_of_a_trial() -> None:
    ended = TrialRecord("a", {}, {1: 0.6, 2: 0.8}, ended=True)
    assert told_value(ended, None) == 0.8 and told_value(ended, 1) == 0.6
    running = TrialRecord("b", {}, {1: 0.6})
    assert told_value(running, None) is None and told_value(running, 1) == 0.6
    failed = TrialRecord("c", {}, {1: 0.6}, ended=True, failed=True)  # failed after its first rung
    assert told_value(failed, None) is None and told_value(failed, 1) == 0.6
    stopped_early = TrialRecord("d", {}, {1: 0.3}, ended=True)  # ended before the rung at epoch 2
    assert told_value(stopped_early, 2) == 0.3


def test_the_gate_opens_at_the_first_rung_with_told_first_rung() -> None:
    base = {"sweep.points_to_evaluate": "[]", "sweep.trials_per_batch": 1, "sweep.planning_lag": 1}
    for told, gate_after in (("first_rung", "report"), ("final", "complete")):
        cfg = cfg_for(**base, **{"sweep.told": told})
        searcher = eager_searcher(cfg)
        assert searcher.suggest("t0") is not None and searcher.suggest("t1") is None
        searcher.on_trial_result("t0", {"epoch": 1, "best_val_fbeta": 0.5})
        assert (searcher.suggest("t1") is not None) == (gate_after == "report"), told
        assert batch_gate_open(searcher.records, 1, cfg) == (told == "first_rung")
        searcher.on_trial_complete("t0", {"epoch": 2, "best_val_fbeta": 0.7})
        assert batch_gate_open(searcher.records[:1], 1, cfg)
    lag2 = cfg_for(**{**base, "sweep.planning_lag": 2, "sweep.told": "first_rung"})
    searcher = eager_searcher(lag2)
    assert searcher.suggest("t0") is not None and searcher.suggest("t1") is not None  # batch 1: told nothing
    assert searcher.suggest("t2") is None  # batch 2 waits for trial 0's first rung
    searcher.on_trial_result("t0", {"epoch": 1, "best_val_fbeta": 0.5})
    assert searcher.suggest("t2") is not None


V2 = {"sweep.trials_per_batch": 1, "sweep.planning_lag": 1, "sweep.told": "first_rung", "sweep.rung_min_trials": 4,
      "sweep.reduction_factor": 4, "sweep.n_startup_trials": 2}  # fmt: skip


def test_a_cohort_sweep_is_the_same_at_any_concurrency_and_timing() -> None:
    cfg = cfg_for(**V2)
    reference = simulate(cfg, scripted(0, "lr"), slots=1)
    beyond_rung = [t.number for t in reference.trials if t.epochs > 1]
    assert len([n for n in beyond_rung if n < 4]) == 1  # the cohort of 4 at rf 4: one goes on
    assert {t.stop_reason for t in reference.trials} >= {"asha_stop", "max_epochs"}
    for slots in (2, 3, 5):
        for speed in ("lr", "inverse", "random"):
            sim = simulate(cfg, scripted(slots, speed), slots=slots, start_overhead_s=1.0)
            assert summary(sim) == summary(reference), (slots, speed)
    plain = simulate(cfg_for(**{**V2, "sweep.rung_min_trials": 1}), scripted(0, "lr"), slots=1)
    assert summary(plain) != summary(reference)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sweep.deterministic": False, "sweep.planning_lag": 1}, "for deterministic sweeps; set sweep.planning_lag=2"),
        ({"sweep.rung_min_trials": 13}, "sweep.rung_min_trials=13 judges the first 13 trials together, but "
         "sweep.num_samples=12 runs fewer"),
        ({"sweep.rung_min_trials": 7}, "sweep.rung_min_trials=7 with sweep.told=final would wait forever"),
        ({"sweep.planning_lag": 0}, "sweep.planning_lag"),
    ],
)  # fmt: skip
def test_settings_that_could_never_run_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        cfg_for(**overrides)
    if "sweep.rung_min_trials" in overrides and overrides["sweep.rung_min_trials"] == 7:
        cfg_for(**overrides, **{"sweep.told": "first_rung"})  # the cohort forms: trials wait at the rung only
        cfg_for(**overrides, **{"sweep.trials_per_batch": 4})  # 7 <= 4 x 2: the first 8 trials are planned at once
    if overrides.get("sweep.rung_min_trials") == 13:
        cfg_for(**overrides, **{"sweep.scheduler": "fifo"})  # FIFO stops nothing: no cohort waits (a tabulation)


def eager_searcher(cfg: ExperimentConfig) -> BatchSearcher:
    """A searcher driven without a scheduler: as if a slot were free for every trial (see the test after next)."""
    searcher = BatchSearcher(cfg)
    searcher.wanted = cfg.sweep.num_samples
    return searcher


def test_batches_are_planned_from_seed_and_earlier_results_only() -> None:
    cfg = cfg_for(**{"sweep.points_to_evaluate": "[]", "sweep.n_startup_trials": 2})
    done = [TrialRecord(f"t{i}", {"train.lr": 1e-3 * (i + 1)}, {1: 0.1 * i}, ended=True) for i in range(3)]
    for rec, params in zip(done, plan_batch(cfg, 0, [], [])):
        rec.params = params
    batch = plan_batch(cfg, 2, done, [])
    assert batch == plan_batch(cfg, 2, done, []) and len(batch) == 3
    assert batch != plan_batch(tiny_config(**{**cfg_for_keys(cfg), "seed": 7}), 2, done, [])
    done[0].values = {1: 0.99}
    assert batch != plan_batch(cfg, 2, done, [])  # the results told change the plan

    # the gate: batch 2 waits until every trial of batch 0 has ended
    searcher = eager_searcher(cfg)
    ids = [f"t{i}" for i in range(7)]
    suggested = [searcher.suggest(i) for i in ids[:6]]
    assert all(s is not None for s in suggested) and searcher.suggest(ids[6]) is None
    for i in ids[:3]:
        searcher.on_trial_complete(i, {"epoch": 1, "best_val_fbeta": 0.5})
    assert searcher.suggest(ids[6]) is not None


def test_searcher_suggests_only_the_trials_a_slot_wants() -> None:
    """Trials are suggested as slots free up, not all at once, so that Tune's search stays unfinished (and a finished
    trial's worker process is handed to the next trial) until the last trial is due."""
    cfg = cfg_for(**{"sweep.points_to_evaluate": "[]", "sweep.num_samples": 3, "sweep.trials_per_batch": 3})
    searcher = BatchSearcher(cfg)
    searcher.set_max_concurrency(1)
    assert searcher.suggest("t0") is not None and searcher.suggest("t1") is None  # one slot: one trial
    scheduler = OrderedScheduler(cfg, searcher)
    scheduler.on_trial_complete(None, SimpleNamespace(trial_id="t0"), {})
    assert searcher.suggest("t1") is not None and searcher.suggest("t2") is None
    scheduler.on_trial_complete(None, SimpleNamespace(trial_id="t1"), {})
    assert searcher.suggest("t2") is not None and searcher.suggest("t3") == Searcher.FINISHED
    # the params do not depend on when they were asked for
    eager = eager_searcher(cfg)
    assert [eager.suggest(f"t{i}") for i in range(3)] == [r.params for r in searcher.records]


def cfg_for_keys(cfg: ExperimentConfig) -> dict[str, Any]:
    return {
        "sweep.num_samples": cfg.sweep.num_samples,
        "sweep.trials_per_batch": cfg.sweep.trials_per_batch,
        "sweep.points_to_evaluate": "[]",
        "sweep.n_startup_trials": cfg.sweep.n_startup_trials,
    }


def test_searcher_state_round_trips(tmp_path: Path) -> None:
    """What Tune saves with each experiment snapshot restores a searcher that continues exactly."""
    cfg = cfg_for()
    a = eager_searcher(cfg)
    for i in range(6):
        a.confirm(f"t{i}", a.suggest(f"t{i}"), i, live=True)  # as Tune adds each suggested trial
    for i in range(3):
        a.on_trial_complete(f"t{i}", {"epoch": 2, "best_val_fbeta": 0.3 + 0.1 * i})
    a.save(str(tmp_path / "s.pkl"))
    b = eager_searcher(cfg)
    b.restore(str(tmp_path / "s.pkl"))
    for i in range(6):  # Tune adds its restored trials
        b.confirm(f"t{i}", {}, i, live=i >= 3)
    assert [a.suggest(f"t{i}") for i in range(6, 9)] == [b.suggest(f"t{i}") for i in range(6, 9)]


def test_resume_reconciles_the_searcher_with_tunes_trials(tmp_path: Path) -> None:
    """A driver killed while Tune uploads its state can leave the saved searcher ahead of or behind Tune's trial
    list. Tune's list wins: trials Tune never added are suggested again (same params), trials only Tune knows are
    recorded, and a trial Tune ended is ended."""
    cfg = cfg_for()
    a = eager_searcher(cfg)
    params = [a.suggest(f"t{i}") for i in range(6)]
    a.save(str(tmp_path / "ahead.pkl"))
    ahead = eager_searcher(cfg)
    ahead.restore(str(tmp_path / "ahead.pkl"))
    for i in range(4):  # Tune's trial list was saved before trials 4 and 5 were created
        ahead.confirm(f"t{i}", params[i], i, live=True)
    assert ahead.suggest("new4") == params[4] and ahead.number("new4") == 4 and "t5" not in ahead.index

    behind = eager_searcher(cfg)
    for i in range(3):
        behind.suggest(f"t{i}")
    behind.confirm("t3", {**params[3], "extra": 1}, 3, live=True)  # restored by Tune, unknown to the searcher
    assert behind.number("t3") == 3 and behind.records[3].params == params[3]
    assert behind.suggest("t4") == params[4]

    scheduler = OrderedScheduler(cfg, behind)
    gone = type("T", (), {"trial_id": "t1", "status": "TERMINATED"})()
    controller = type("C", (), {"get_trials": lambda self: [gone]})()
    assert not behind.records[1].ended
    scheduler.choose_trial_to_run(controller)  # ended without the searcher being told (e.g. a failed actor reuse)
    assert behind.records[1].ended and not behind.records[1].failed


def test_a_restored_trial_that_ended_after_the_searchers_save_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The searcher saved while trial 0 had reported epoch 1; Tune's trial list has it ended at epoch 2 (the driver
    stopped between the two uploads). Its epoch 2 is lost to the planner: --resume says so in one warning; a trial
    whose record is complete gets none."""
    cfg = cfg_for()
    a = eager_searcher(cfg)
    for i in range(2):
        a.suggest(f"t{i}")
    a.on_trial_result("t0", {"epoch": 1, a.metric: 0.5})
    a.on_trial_result("t1", {"epoch": 1, a.metric: 0.4})
    a.save(str(tmp_path / "behind.pkl"))
    b = eager_searcher(cfg)
    b.restore(str(tmp_path / "behind.pkl"))
    scheduler = OrderedScheduler(cfg, b)

    def restored(i: int, epoch: int) -> SimpleNamespace:
        return SimpleNamespace(trial_id=f"t{i}", status="TERMINATED", config={}, experiment_tag=f"{i + 1}_x",
                               last_result={"epoch": epoch}, init_local_path=lambda: None)  # fmt: skip

    with caplog.at_level("WARNING", logger="lorahpo.ordered"):
        scheduler.on_trial_add(None, restored(0, 2))
        scheduler.on_trial_add(None, restored(1, 1))
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        "the searcher's saved state has t0 up to epoch 1, Tune's up to epoch 2 (the driver stopped mid-save): later "
        "trials may differ from an uninterrupted sweep"
    ]


@pytest.mark.parametrize("order", ["number", "newest first"])
@pytest.mark.parametrize("per_batch", [1, 2, 4])
def test_resume_after_a_mid_save_gap_at_every_position_of_a_batch(per_batch: int, order: str) -> None:
    """The searcher's state was saved after trial m; trials m+1..j were suggested (and added to Tune's trial list)
    after that save, so the restored searcher lacks them, and their batch too when m+1 opened a new one. The resumed
    sweep records them from Tune, plans what it lacks again, and goes on exactly as the uninterrupted sweep: for every
    m and every lost count up to a batch, so that the first lost trial sits at every position of its batch."""
    cfg = cfg_for(**{"sweep.num_samples": 6 * per_batch, "sweep.trials_per_batch": per_batch,
                     "sweep.n_startup_trials": 2, "sweep.points_to_evaluate": "[]"})  # fmt: skip

    def value(params: dict[str, Any]) -> dict[str, Any]:  # a trial's last report, a function of its params
        return {"epoch": 1, "best_val_fbeta": 1 - abs(math.log10(params["train.lr"]) + 3)}

    def complete(searcher: BatchSearcher, i: int) -> None:
        searcher.on_trial_complete(f"t{i}", value(searcher.records[i].params))

    total = cfg.sweep.num_samples
    reference = eager_searcher(cfg)
    expected = []
    for i in range(total):
        expected.append(reference.suggest(f"t{i}"))
        complete(reference, i)
    for m in range(per_batch, 3 * per_batch):  # with per_batch 1: saved after trial 2, trial 3 lost (the report)
        for lost in range(1, per_batch + 1):
            a = eager_searcher(cfg)
            for i in range(m + 1):
                a.confirm(f"t{i}", a.suggest(f"t{i}"), i, live=True)
                complete(a, i)
            saved = pickle.dumps(a.get_state())
            tune_params = [a.suggest(f"t{i}") for i in range(m + 1, m + 1 + lost)]  # Tune has these, the save not
            b = eager_searcher(cfg)
            b.set_state(pickle.loads(saved))
            added = range(m + 1 + lost)  # Tune re-adds restored trials newest result first (the lost ones last ran)
            for i in added if order == "number" else reversed(added):
                b.confirm(f"t{i}", expected[i] if i <= m else tune_params[i - m - 1], i, live=i > m)
            for i in range(m + 1, m + 1 + lost):  # the resumed trials run and report
                complete(b, i)
            got = [r.params for r in b.records]
            for i in range(m + 1 + lost, total):
                got.append(b.suggest(f"t{i}"))
                complete(b, i)
            assert got == expected, (m, lost)


def test_resume_records_tunes_trials_in_whatever_order_tune_adds_them() -> None:
    """Ray Tune 2.60 re-adds restored trials newest result first (TuneController._requeue_restored_trials), not in
    number order. The saved searcher knew trials 0-1; Tune's list also has 2 and 3. In every order Tune may add the
    four, the searcher records all four under their numbers and its next suggestion is the uninterrupted sweep's
    trial 4 (a trial left unrecorded had its slot suggested again: num_samples + 1 trials, one a duplicate)."""
    cfg = cfg_for(**{"sweep.num_samples": 8, "sweep.trials_per_batch": 2, "sweep.points_to_evaluate": "[]"})
    a = eager_searcher(cfg)
    params = []
    for n in range(5):
        params.append(a.suggest(f"t{n}"))
        a.confirm(f"t{n}", params[n], n, live=True)
        if n < 2:  # batch 0 ends, so batch 2 (trial 4) can be planned
            a.on_trial_complete(f"t{n}", {"epoch": 1, "best_val_fbeta": 0.5 + n / 10})
        if n == 1:
            saved = pickle.dumps(a.get_state())  # the searcher file that reached storage: trials 0-1
    for order in itertools.permutations(range(4)):
        b = eager_searcher(cfg)
        b.set_state(pickle.loads(saved))
        scheduler = OrderedScheduler(cfg, b)
        for n in order:  # what on_trial_add reads of a restored trial
            status = "TERMINATED" if n < 2 else "RUNNING"
            trial = SimpleNamespace(
                trial_id=f"t{n}", experiment_tag=f"{n + 1}_x", config=params[n], status=status, last_result={}
            )
            trial.init_local_path = lambda: None
            scheduler.on_trial_add(None, trial)
        assert b.index == {f"t{n}": n for n in range(4)}, order
        assert [r.params for r in b.records] == params[:4], order
        assert b.suggest("t_new") == params[4] and b.number("t_new") == 4, order


@pytest.mark.parametrize("searcher", ["tpe", "random"])
def test_no_deadlock_and_same_result_under_random_timings(searcher: str) -> None:
    cfg = cfg_for(**{"sweep.searcher": searcher, "sweep.num_samples": 16, "sweep.trials_per_batch": 4})
    reference = summary(simulate(cfg, scripted(0, "lr"), slots=1))
    for seed in range(6):
        slots = 2 + seed % 4
        assert summary(simulate(cfg, scripted(seed, "random"), slots=slots, start_overhead_s=2.0)) == reference
    fifo = cfg_for(**{"sweep.searcher": searcher, "sweep.scheduler": "fifo"})
    one = summary(simulate(fifo, scripted(0, "lr"), slots=1))
    assert all(t[4] in ("max_epochs", "early_stop") for t in one)
    assert summary(simulate(fifo, scripted(1, "random"), slots=4)) == one


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("searcher", ["tpe", "random"])
def test_no_config_is_trained_twice_until_the_space_is_tried_out(searcher: str, deterministic: bool) -> None:
    # 3 x 2 = 6 configs and 8 trials: the first 6 trials are the 6 configs, each once (a repeat would reproduce an
    # earlier trial's numbers, seed and all); then the space is tried out, and space.ask_new gives up and repeats
    sweep = {"searcher": searcher, "deterministic": deterministic, "num_samples": 8, "trials_per_batch": 2,
             "n_startup_trials": 2, "points_to_evaluate": "[]"}  # fmt: skip
    cfg = cfg_for(**{f"sweep.{k}": v for k, v in sweep.items()})
    space = {"train.lr": ParamSpec(type="categorical", choices=(1e-3, 2e-3, 3e-3)),
             "lora.r": ParamSpec(type="categorical", choices=(4, 8))}  # fmt: skip
    cfg = dataclasses.replace(cfg, search=space)
    trials = simulate(cfg, scripted(0, "lr"), slots=2).trials
    configs = [(t.params["train.lr"], t.params["lora.r"]) for t in trials]
    assert len(configs) == 8, configs
    assert sorted(configs[:6]) == sorted(itertools.product((1e-3, 2e-3, 3e-3), (4, 8)))
    assert set(configs[6:]) <= set(configs[:6])
