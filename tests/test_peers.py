"""The peer adapters (bench/peers.py, bench/peers_syne.py) replay hand-computed cases: four configs forced as the start
points, so the first decisions are known, on 1 and 2 slots; the budget counted as each method really trains (a config
trained twice pays twice); a trial ended by patience; and Syne Tune's simulator made a function of its seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import peers  # noqa: E402
from tables import Epoch  # noqa: E402
from trials import Problem, trial_length  # noqa: E402

from .test_replay import LRS as TEN  # noqa: E402
from .test_replay import table  # noqa: E402

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
    p = problem([LRS[0]], budget=6)  # reachable by a peer that never repeats a config and stops 4 of 5 at epoch 1
    for name in peers.PEERS:
        if peers.source(name) is None:
            continue
        first = peers.run_peer(name, p, curves(), seed=3, slots=2)
        assert len(first[0]) == 6 and {k for _, k, _ in first[0]} <= set(CURVES), name
        assert peers.run_peer(name, p, curves(), seed=3, slots=2) == first, name


def test_syne_tune_private_hook_matches_its_version() -> None:
    """bench/peers_syne.py's one private name: the simulator backend's time keeper (syne-tune 0.16.0)."""
    import peers_syne
    import syne_tune

    assert syne_tune.__version__ == "0.16.0"
    backend = peers_syne.Backend(problem([]), curves(), peers_syne.blackbox(problem([]), curves()))
    assert isinstance(backend.time_keeper, peers_syne.Clock)
    assert peers.source("syne-tune asha") == "syne-tune==0.16.0"


# The peers in .venv-peers (bench/peers_venv.py: syne-tune 0.14.2 and dehb 0.1.2, which need numpy < 2), each through
# the subprocess the replay uses. `make bench-peers` creates the environment; .ci/run does before the suite.
VENV_MISSING = peers.source("dehb") is None or peers.source("syne-tune 0.14 asha") is None
venv = pytest.mark.skipif(VENV_MISSING, reason=f"no .venv-peers: {peers.left_out_note('dehb')}")


@venv
@pytest.mark.parametrize("name", ["syne-tune 0.14 asha", "syne-tune 0.14 mobster", "syne-tune 0.14 bohb"])
def test_syne_tune_0_14_asynchronous_peers_by_hand(name: str) -> None:
    """Syne Tune 0.14.2's legacy ASHA, MOBSTER (a GP searcher) and BOHB (a KDE searcher) stop trials as 0.16's ASHA
    does (reduction 3, one bracket, stopping type): the same hand-computed case, their searchers only ever proposing
    the four forced configs here."""
    points = list(LRS[:4])
    assert peers.source(name) == "syne-tune==0.14.2"
    runs = peers.run_seeds(name, problem(points), {0: curves()}, slots=1)
    assert runs[0][0] == (ONE_SLOT, [(lr,) for lr in points])
    assert peers.run_peer(name, problem(points), curves(), seed=0, slots=2) == (TWO_SLOTS, [(lr,) for lr in points])


@venv
def test_syne_tune_0_14_hypertune_by_hand_and_its_brackets() -> None:
    """Hyper-Tune: forced configs each better at epoch 1 than every one before stop in no bracket, so every trial
    runs its 2 epochs (1 slot), or pairs of trials that started together report together (2 slots; ties: the lower
    trial first). With more than one bracket (ours: as many as Syne Tune allows), a trial can draw the bracket
    without a rung at epoch 1: on the stopping case of one-bracket ASHA some seed keeps trial 1 (0.3 < 0.5)."""
    rising = [LRS[4], LRS[3], LRS[1], LRS[0]]  # epoch 1: 0.1, 0.2, 0.3, 0.5; 5, 5, 4 and 10 s an epoch
    reports, started = peers.run_peer("syne-tune 0.14 hypertune", problem(rising), curves(), seed=0, slots=1)
    assert reports == [(n, (lr,), e) for n, lr in enumerate(rising[:3]) for e in (1, 2)]
    assert started[:3] == [(lr,) for lr in rising[:3]]
    reports, _ = peers.run_peer("syne-tune 0.14 hypertune", problem(rising), curves(), seed=0, slots=2)
    # 0 and 1 report at 5 s and 10 s; 2 and 3 start at 10 s, 2 reports at 14 s and 18 s, 3 at 20 s
    assert reports == [(0, (LRS[4],), 1), (1, (LRS[3],), 1), (0, (LRS[4],), 2), (1, (LRS[3],), 2),
                       (2, (LRS[1],), 1), (2, (LRS[1],), 2)]  # fmt: skip
    runs = peers.run_seeds("syne-tune 0.14 hypertune", problem(list(LRS[:4])), dict.fromkeys(range(4), curves()), 1)
    assert any((1, (LRS[1],), 2) in run[0] for run, _, _ in runs.values())


@venv
def test_syne_tune_0_14_dehb_resumes_in_its_first_bracket_and_starts_anew_later() -> None:
    """Syne Tune's DEHB (synchronous Hyperband with differential evolution; rung levels 1 and 2 for max_epochs 2,
    reduction 3). Bracket 0 trains 3 trials to epoch 1 (forced: 0.5, 0.3, 0.7) and resumes the best (trial 2) from its
    checkpoint: only its epoch 2 is reported and paid. Bracket 1 starts at epoch 2: trial 3 trains epochs 1 and 2
    from scratch. On 2 slots: trial 1 reports at 4 s, trial 2 (started at 4 s) at 7 s; bracket 0 waits for trial 0,
    so trial 3 starts at 7 s (reports at 12 s, 17 s); trial 0 reports at 10 s, and trial 2 resumes for 3 s (13 s)."""
    points = list(LRS[:4])
    reports, _ = peers.run_peer("syne-tune 0.14 dehb", problem(points), curves(), seed=0, slots=1)
    assert reports == [(0, (LRS[0],), 1), (1, (LRS[1],), 1), (2, (LRS[2],), 1), (2, (LRS[2],), 2),
                       (3, (LRS[3],), 1), (3, (LRS[3],), 2)]  # fmt: skip
    reports, _ = peers.run_peer("syne-tune 0.14 dehb", problem(points), curves(), seed=0, slots=2)
    assert reports == [(1, (LRS[1],), 1), (2, (LRS[2],), 1), (0, (LRS[0],), 1), (3, (LRS[3],), 1),
                       (2, (LRS[2],), 2), (3, (LRS[3],), 2)]  # fmt: skip


def four_epochs() -> dict[tuple, list[Epoch]]:
    """CURVES extended to 4 rising epochs (no trial ends by patience)."""
    return {k: [Epoch(values[0] + 0.05 * i, s, s - 1) for i in range(4)] for k, (values, s) in CURVES.items()}


@venv
def test_dehb_package_trains_a_promoted_config_again_from_scratch() -> None:
    """dehb 0.1.2 with max_epochs 4 has fidelities 4/3 and 4 (eta 3): 1 and 4 epochs. Bracket 0 runs 3 jobs of 1
    epoch (forced: 0.5, 0.3, 0.7) and promotes the best, lr[2], to 4 epochs: a new trial from scratch, so its epoch 1
    is paid again (trial 3). Bracket 1 runs jobs of 4 epochs; the 4th forced config is its first (trial 4).
    On 2 slots: trials 1 and 2 end at 4 s and 7 s; bracket 0 waits for trial 0 (10 s), so bracket 1 starts trial 3
    (lr[3], 5 s an epoch) at 7 s; at 10 s the promoted lr[2] starts as trial 4 (3 s an epoch); reports at 12 (3), 13
    (4), 16 (4), 17 (3), 19 (4), 22 (3 before 4: ties go to the lower trial)."""
    p = problem(list(LRS[:4]), budget=9, max_epochs=4)
    assert peers.source("dehb") == "dehb==0.1.2"
    reports, started = peers.run_peer("dehb", p, four_epochs(), seed=0, slots=1)
    assert reports == [(0, (LRS[0],), 1), (1, (LRS[1],), 1), (2, (LRS[2],), 1),
                       *((3, (LRS[2],), e) for e in (1, 2, 3, 4)), (4, (LRS[3],), 1), (4, (LRS[3],), 2)]  # fmt: skip
    assert started == [(LRS[0],), (LRS[1],), (LRS[2],), (LRS[2],), (LRS[3],)]
    reports, _ = peers.run_peer("dehb", p, four_epochs(), seed=0, slots=2)
    assert reports == [(1, (LRS[1],), 1), (2, (LRS[2],), 1), (0, (LRS[0],), 1), (3, (LRS[3],), 1), (4, (LRS[2],), 1),
                       (4, (LRS[2],), 2), (3, (LRS[3],), 2), (4, (LRS[2],), 3), (3, (LRS[3],), 3)]  # fmt: skip


@venv
def test_venv_peers_private_hook_matches_its_version() -> None:
    """bench/peers_syne.py's one private name in Syne Tune 0.14.2 too, checked in .venv-peers itself."""
    import peers_venv

    code = """
import peers_syne, syne_tune
from trials import Epoch, Problem
assert syne_tune.__version__ == "0.14.2", syne_tune.__version__
p = Problem({"train.lr": (1e-4, 2e-4)}, [], 2, 2, "max", "best_val_f1", 4)
c = {(lr,): [Epoch(0.5, 1.0, 1.0)] * 2 for lr in (1e-4, 2e-4)}
print(type(peers_syne.Backend(p, c, peers_syne.blackbox(p, c)).time_keeper).__name__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(peers_venv.PYTHON), "-c", code], cwd=ROOT / "bench", env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert (out.returncode, out.stdout.strip()) == (0, "Clock"), out.stderr[-2000:]


@venv
def test_a_peer_that_crashes_in_its_own_package_is_left_out_and_says_why(tmp_path: Path) -> None:
    """Every .venv-peers peer through the replay's CLI on a table of 10 configs, 4 trials, seeds 3-5 (the CLI contract's
    table): a peer that raises inside its package (Syne Tune 0.14's tabular simulator does here) is left out with its
    error's last line, and every other method's results are still written."""
    path = tmp_path / "t.parquet"
    table({lr: [0.1 * i, 0.1 * i + 0.02 * (i % 3), 0.1 * i, 0.05 * i] for i, lr in enumerate(TEN)}).to_parquet(path)
    names = [n for n in peers.PEERS if peers.in_venv(n)]
    cmd = [sys.executable, str(ROOT / "bench" / "replay.py"), "--seeds", "3-5", "--out", str(tmp_path / "r")]
    proc = subprocess.run([*cmd, "--table", str(path), "--trials", "4", "--jobs", "1", "--methods", *names],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    crashed = {n: res["left_out"][n] for n in names if n not in res["methods"]}
    assert set(crashed) | (set(names) & set(res["methods"])) == set(names) and "random+fifo" in res["methods"]
    assert crashed and all(v.startswith("crashed in .venv-peers on this table: ") for v in crashed.values()), crashed
    assert any(v.endswith("IndexError: list index out of range") for v in crashed.values()), crashed
