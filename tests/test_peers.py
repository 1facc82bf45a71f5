"""The peer adapters (bench/peers.py, bench/peers_syne.py) replay hand-computed cases: four configs forced as the start
points, so the first decisions are known, on 1 and 2 slots; the budget counted as each method really trains (a config
trained twice pays twice); a trial ended by patience; and Syne Tune's simulator made a function of its seed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import peers  # noqa: E402
from asktell import Problem, trial_length  # noqa: E402
from tables import Epoch  # noqa: E402

LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3)
# config (lr,): val after epochs 1 and 2, and the seconds of each epoch (training seconds: 1 s less)
CURVES = {
    (LRS[0],): ([0.5, 0.55], 10.0),
    (LRS[1],): ([0.3, 0.35], 4.0),
    (LRS[2],): ([0.7, 0.75], 3.0),
    (LRS[3],): ([0.2, 0.25], 5.0),
    (LRS[4],): ([0.1, 0.15], 5.0),
}


def curves() -> dict[tuple, list[Epoch]]:
    return {k: [Epoch(v, s, s - 1) for v in values] for k, (values, s) in CURVES.items()}


def problem(points: list[float], budget: int = 6, patience: int = 2, max_epochs: int = 2) -> Problem:
    return Problem({"train.lr": LRS}, [{"train.lr": lr} for lr in points], max_epochs, patience, "max",
                         "best_val_f1", budget)  # fmt: skip


# Both packages' successive halving keep a trial at epoch 1 only if it is the best so far there (with fewer than
# `reduction_factor` trials at the rung: Optuna's SuccessiveHalvingPruner, rf 4, keeps the best of them; Syne Tune's
# ASHA, rf 3, stops a trial whose rank is above 1/3), and the rung at epoch 4 (Optuna) or 3 (Syne Tune) lies beyond
# max_epochs 2. Forced order lr[0..3] with epoch-1 values 0.5, 0.3, 0.7, 0.2: trial 0 goes on (alone), 1 stops, 2 goes
# on, 3 stops.
ONE_SLOT = [(0, (LRS[0],), 1), (0, (LRS[0],), 2), (1, (LRS[1],), 1), (2, (LRS[2],), 1), (2, (LRS[2],), 2),
            (3, (LRS[3],), 1)]  # fmt: skip
# On 2 slots trials 0 (10 s an epoch) and 1 (4 s) start together: 1 reports at 4 s (alone at the rung: goes on) and
# ends at 8 s; 2 starts, 0 reports at 10 s (0.5 > 0.3: on), 2 at 11 s (on) and 14 s (ends); 3 starts and reports at
# 19 s (stopped), before trial 0's second epoch at 20 s.
TWO_SLOTS = [(1, (LRS[1],), 1), (1, (LRS[1],), 2), (0, (LRS[0],), 1), (2, (LRS[2],), 1), (2, (LRS[2],), 2),
             (3, (LRS[3],), 1)]  # fmt: skip


@pytest.mark.parametrize("name", ["optuna tpe+sha", "syne-tune asha"])
def test_successive_halving_peers_by_hand(name: str) -> None:
    points = list(LRS[:4])
    reports, started = peers.run_peer(name, problem(points), curves(), seed=0, slots=1)
    assert reports == ONE_SLOT and started[:4] == [(lr,) for lr in points]
    reports, started = peers.run_peer(name, problem(points), curves(), seed=0, slots=2)
    assert reports == TWO_SLOTS and started[:4] == [(lr,) for lr in points]


def test_a_config_trained_twice_pays_twice_and_patience_ends_a_trial() -> None:
    """Optuna trains an enqueued config again (a real study would): its epochs count again. With patience 1 a trial
    whose epoch 2 is no better than epoch 1 ends there; the peer's budget is still exactly B reports."""
    reports, _ = peers.run_peer("optuna gp", problem([LRS[2], LRS[2], LRS[0]], budget=5), curves(), 0, 1)
    assert reports == [(0, (LRS[2],), 1), (0, (LRS[2],), 2), (1, (LRS[2],), 1), (1, (LRS[2],), 2), (2, (LRS[0],), 1)]
    three = {k: [Epoch(v, 10.0, 9.0) for v in (0.1 * i, 0.1 * i + 0.05, 0.1 * i + 0.1)] for i, k in enumerate(CURVES)}
    three[(LRS[0],)] = [Epoch(v, 10.0, 9.0) for v in (0.5, 0.4, 0.6)]  # no better at epoch 2: patience 1 ends it
    three[(LRS[2],)] = [Epoch(v, 10.0, 9.0) for v in (0.7, 0.75, 0.8)]
    p = problem([LRS[0], LRS[2]], budget=5, patience=1, max_epochs=3)
    assert trial_length(three[(LRS[0],)], p) == 2 and trial_length(three[(LRS[2],)], p) == 3
    for name in ("optuna gp", "syne-tune asha"):  # ASHA (rf 3) keeps trial 1 at epoch 1: 0.7 > 0.5
        reports, _ = peers.run_peer(name, p, three, 0, 1)
        assert reports == [(0, (LRS[0],), 1), (0, (LRS[0],), 2), *((1, (LRS[2],), e) for e in (1, 2, 3))], name


def test_every_peer_reports_exactly_the_budget_and_repeats_itself() -> None:
    """Each installed peer, from one seed, gives B reports of configs in the space, the same ones when run again
    (Syne Tune's simulator on 2 slots too: its scheduler's compute time no longer moves simulated time)."""
    p = problem([LRS[0]], budget=9)
    for name in peers.PEERS:
        if peers.source(name) is None:
            continue
        first = peers.run_peer(name, p, curves(), seed=3, slots=2)
        assert len(first[0]) == 9 and {k for _, k, _ in first[0]} <= set(CURVES), name
        assert peers.run_peer(name, p, curves(), seed=3, slots=2) == first, name


def test_syne_tune_private_hook_matches_its_version() -> None:
    """bench/peers_syne.py's one private name: the simulator backend's time keeper (syne-tune 0.16.0)."""
    import peers_syne
    import syne_tune

    assert syne_tune.__version__ == "0.16.0"
    backend = peers_syne.Backend(problem([]), curves(), peers_syne.blackbox(problem([]), curves()))
    assert isinstance(backend.time_keeper, peers_syne.Clock)
    assert peers.source("syne-tune asha") == "syne-tune==0.16.0"
