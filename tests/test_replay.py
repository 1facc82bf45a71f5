"""bench/replay.py on tables small enough to know the answer: random + FIFO's trajectory computed by hand, the expected
best of k random draws in closed form, the measures on hand-made curves (2.0 for a method that never reaches b_s), and
the CLI's results.json contract."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from lorahpo.config import apply_overrides, load_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import replay  # noqa: E402
from simulate import report_row  # noqa: E402

# the intents config with the planner of before search v2 (its tests pin those scenarios; the v2 default is
# replayed through the CLI tests below)
INTENTS = load_config(ROOT / "configs" / "intents.yaml", {"sweep.planning_lag": 2, "sweep.told": "final",
                                                          "sweep.rung_min_trials": 1})  # fmt: skip
LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]


def table(curves: dict[float, list[float]]) -> pd.DataFrame:
    """A bench/tabulate.py table over one key (train.lr): each config's val_f1 per epoch, 10 s an epoch."""
    rows = [
        {"config_id": i, "param.train.lr": lr, "epoch": e, "val_f1": v, "iter_s": 10.0}
        for i, (lr, vals) in enumerate(curves.items())
        for e, v in enumerate(vals, 1)
    ]
    return pd.DataFrame(rows)


def base(max_epochs: int, **sweep: object) -> object:
    """The intents config, no start point, `max_epochs` epochs, patience never ending a trial early."""
    over = {"train.max_epochs": max_epochs, "train.patience": max_epochs, "sweep.points_to_evaluate": []}
    return apply_overrides(INTENTS, {**over, **{f"sweep.{k}": v for k, v in sweep.items()}})


def test_random_fifo_trajectory_by_hand() -> None:
    """random + FIFO at one slot: trials one after another, each to max_epochs; its params are those a seeded Optuna
    RandomSampler asks for in that space, and its running best after each trial-epoch is the running max of the
    table's values in that order. B = N x max_epochs, b_s = that max."""
    curves = {lr: [0.1 * i, 0.1 * i + 0.05] for i, lr in enumerate(LRS[:5])}
    df, trials, seed = table(curves), 3, 7
    res = replay.replay(base(2, deterministic=False), df, [seed], trials, methods=["random+fifo"])
    assert res["budget"] == {"trials": 3, "max_epochs": 2, "trial_epochs": 6}

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    space = {"train.lr": optuna.distributions.CategoricalDistribution(sorted(curves))}
    lrs = [study.ask(fixed_distributions=space).params["train.lr"] for _ in range(trials)]
    assert len(set(lrs)) == trials  # no repeat among them: the sweep's own rule (no config twice) is moot here
    by_hand = np.maximum.accumulate([v for lr in lrs for v in curves[lr]]).tolist()
    m = res["methods"]["random+fifo"]
    assert res["first_trials"] == {"random+fifo": [[[lr] for lr in lrs]]}  # per method, per seed, in start order
    best = max(by_hand)
    assert m["anytime_regret"]["median"] == pytest.approx([0.45 - b for b in by_hand], abs=1e-12)
    assert res["table_best"] == pytest.approx(0.45)
    assert m["final_regret"]["median"] == pytest.approx(0.45 - best, abs=1e-12)
    assert m["epochs_to_reach_random_fifo_best"]["median"] == (by_hand.index(best) + 1) / 6


def test_expected_best_of_k_random_draws() -> None:
    """One epoch per config, M distinct values v_1 < ... < v_M: random + FIFO's best after k trials is the max of k
    uniform draws WITHOUT replacement (the sweep trains no config twice: space.ask_new), E = sum_j v_j (C(j,k) -
    C(j-1,k)) / C(M,k). Over 300 seeds the mean final regret must match it within 4 standard errors (the closed form's
    own variance / 300): a fixed-seed test, so it cannot flake. Draws with replacement (E 0.847) would land 4.3
    standard errors away, and a sampler that never drew the best config 10.4."""
    M, k, seeds = 10, 4, list(range(300))
    values = [float(j) / M for j in range(1, M + 1)]
    df = table({lr: [v] for lr, v in zip(LRS, values)})
    res = replay.replay(base(1, deterministic=False), df, seeds, k, methods=["random+fifo"])
    p = [(math.comb(j, k) - math.comb(j - 1, k)) / math.comb(M, k) for j in range(1, M + 1)]
    mean = sum(v * q for v, q in zip(values, p))
    sd = math.sqrt(sum(v * v * q for v, q in zip(values, p)) - mean**2)
    regret = res["methods"]["random+fifo"]["final_regret"]["mean"]
    assert abs((values[-1] - regret) - mean) < 4 * sd / math.sqrt(len(seeds))
    per_seed = res["methods"]["random+fifo"]["per_seed"]["final_regret"]
    assert set(np.round(per_seed, 9)) <= {round(values[-1] - v, 9) for v in values}
    assert all(len(set(map(tuple, first))) == k for first in res["first_trials"]["random+fifo"])  # k configs


def test_measures_on_hand_made_curves() -> None:
    """Per seed: b_s = random + FIFO's running best at B; E/B when a method's running best first reaches it, 2.0 when
    it never does; final regret = table best - running best at B; quartiles over seeds (numpy's linear rule)."""
    curves = {
        "random+fifo": [[0.1, 0.5, 0.5, 0.6], [0.2, 0.2, 0.7, 0.7], [0.3, 0.3, 0.3, 0.4]],
        "fast": [[0.6, 0.6, 0.6, 0.9], [0.7, 0.7, 0.7, 0.7], [0.1, 0.4, 0.4, 0.4]],
        "never": [[0.5, 0.5, 0.5, 0.5], [0.1, 0.2, 0.3, 0.6], [0.0, 0.0, 0.1, 0.2]],
    }
    m = replay.measures(curves, table_best=1.0, sign=1.0)
    assert m["random+fifo"]["per_seed"]["fraction"] == [1.0, 0.75, 1.0]
    assert m["fast"]["per_seed"]["fraction"] == [0.25, 0.25, 0.5]
    assert m["never"]["per_seed"]["fraction"] == [2.0, 2.0, 2.0] and m["never"]["reached"] == 0
    assert m["fast"]["epochs_to_reach_random_fifo_best"] == {"median": 0.25, "q25": 0.25, "q75": 0.375}
    assert m["fast"]["final_regret"]["median"] == pytest.approx(0.3)
    assert m["never"]["final_regret"] == pytest.approx({"median": 0.5, "q25": 0.45, "q75": 0.65, "mean": 0.5666667})
    assert m["random+fifo"]["anytime_regret"]["median"] == pytest.approx([0.8, 0.7, 0.5, 0.4])


def test_patience_and_asha_follow_the_trainable_and_tune() -> None:
    """A trial that stops improving ends after `train.patience` epochs (as the trainable reports it), and the budget is
    counted in reported trial-epochs whatever the scheduler: every method's curve has exactly B points."""
    row = report_row(apply_overrides(INTENTS, {"train.patience": 1}), [0.5, 0.4])
    assert row["early_stopped"] and row["best_val_f1"] == 0.5
    df = table({lr: [0.5, 0.4, 0.3, 0.2] if i % 2 else [0.1, 0.2, 0.3, 0.9] for i, lr in enumerate(LRS)})
    res = replay.replay(base(4), df, [0, 1], 8)
    own = replay.method_name(base(4), 1)  # the config's own settings, here not one of METHODS
    assert (
        set(res["methods"]) == {replay.method_name(apply_overrides(base(4), o), n) for o, n in replay.METHODS} | {own}
        and res["default"] == own
    )
    for name, m in res["methods"].items():
        assert len(m["anytime_regret"]["median"]) == 32, name
        assert all(0 <= f <= 1 or f == 2.0 for f in m["per_seed"]["fraction"]), name
    assert res["methods"]["random+fifo"]["reached"] == 2  # the reference always reaches its own best


def test_trial_epochs_counted_in_the_order_they_arrive() -> None:
    """On 4 slots the trials of a batch run at once and report in the order of their durations (the table's iter_s):
    here the better a config, the sooner it reports, so the running best is flat from the first trial-epoch. On 1 slot
    the same trials report one after another (not flat for some seed: the check is not vacuous)."""
    df = table({lr: [v] for lr, v in zip(LRS, np.linspace(0.1, 1.0, 10))})
    df["iter_s"] = 11.0 - 10.0 * df["val_f1"]
    cfg = replay.replay_config(base(1, searcher="random", scheduler="fifo", trials_per_batch=4), replay.grid_of(df), 4)
    lookup = replay.lookup(df, "val_f1", 1)
    flat = [len(set(replay.running_best(apply_overrides(cfg, {"seed": s}), lookup, n, 4)[0])) == 1 for s in range(5)
            for n in (4, 1)]  # fmt: skip
    assert all(flat[0::2]) and not all(flat[1::2])


def test_compare_a_real_sweep_with_its_replay() -> None:
    """Trial by trial in creation order: the count of first trials with the same params (up to the first that
    differs), and the largest score difference over those that also ran the same epochs."""
    replayed = [{"params": [1e-3, 4], "values": [0.5, 0.6]}, {"params": [2e-4, 1], "values": [0.1]},
                {"params": [3e-5, 2], "values": [0.2, 0.3]}, {"params": [1e-2, 2], "values": [0.0]}]  # fmt: skip
    real = [{"params": [1e-3, 4], "values": [0.5, 0.625]}, {"params": [2e-4, 1], "values": [0.1, 0.2]},
            {"params": [3e-5, 2], "values": [0.2, 0.3]}, {"params": [1e-2, 4], "values": [0.9]}]  # fmt: skip
    assert replay.compare(real, replayed) == {
        "trials": [4, 4], "same_first_trials": 3, "same_epochs": 2, "max_abs_score_diff": pytest.approx(0.025)
    }  # fmt: skip
    assert replay.compare(real[:1], []) == {
        "trials": [1, 0], "same_first_trials": 0, "same_epochs": 0, "max_abs_score_diff": None
    }  # fmt: skip


def test_cli_contract(tmp_path: Path) -> None:
    """`python bench/replay.py --seeds A-B --out DIR --table PATH` writes DIR/results.json with "default", the
    budget, and per method the E/B quartiles and the median final regret; and the plot. A missing table: exit 2, one
    line. (lorahpo's methods only: the peers, slow in .venv-peers, have tests/test_peers.py.)"""
    path = tmp_path / "t.parquet"
    table({lr: [0.1 * i, 0.1 * i + 0.02 * (i % 3), 0.1 * i, 0.05 * i] for i, lr in enumerate(LRS)}).to_parquet(path)
    cmd = [sys.executable, str(ROOT / "bench" / "replay.py"), "--seeds", "3-5", "--out", str(tmp_path / "r")]
    proc = subprocess.run(
        [*cmd, "--table", str(path), "--trials", "4", "--jobs", "1", "--no-peers"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert (
        res["default"] == "tpe+asha startup=8 rf=16 planning_lag=1 told=first_rung rung_min_trials=16 det1@1"
        and res["default"] in res["methods"]
    )
    assert res["seeds"] == [3, 4, 5] and res["budget"] == {"trials": 4, "max_epochs": 4, "trial_epochs": 16}
    assert {"random+fifo", "tpe+asha", "tpe+fifo", "random+asha", "tpe+asha det4@4"} <= set(res["methods"])
    for m in res["methods"].values():
        assert set(m["epochs_to_reach_random_fifo_best"]) == {"median", "q25", "q75"}
        assert "median" in m["final_regret"]
    assert (tmp_path / "r" / "anytime_regret.png").stat().st_size > 10_000

    proc = subprocess.run([*cmd, "--table", str(tmp_path / "none.parquet")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no table at ") and proc.stderr.count("\n") == 1


def test_the_sweep_goes_on_after_a_paused_trial_is_stopped_while_choosing() -> None:
    """On the committed table, the default deterministic method at 4 slots, seed 0: the trial that holds back the next
    batch's gate is a paused one, stopped by the scheduler while it chooses what runs next. Tune asks the searcher at
    its next step and the sweep goes on; the simulator used to end the sweep there (102 of 128 trial-epochs)."""
    df = replay.load_table(replay.TABLE, INTENTS.train.metric)
    table, grid = replay.lookup(df, "val_f1", 4), replay.grid_of(df)
    sweep = {"deterministic": True, "trials_per_batch": 4, "n_startup_trials": 4, "reduction_factor": 2}
    cfg = apply_overrides(
        replay.replay_config(INTENTS, grid, 32), {"seed": 0, **{f"sweep.{k}": v for k, v in sweep.items()}}
    )
    curve, _ = replay.running_best(cfg, table, slots=4, budget=128)
    assert len(curve) == 128
