"""The replay's new measures and tables on inputs small enough to know the answer: the seconds fraction, anytime
regret at B/8..B and the comparison with random + FIFO on hand-made curves, the bootstrap interval against the exact
bootstrap distribution of a median, the training-noise draw on a two-seed table, and the table registry's CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lorahpo.config import apply_overrides, load_config
from lorahpo.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import measures  # noqa: E402
import peers  # noqa: E402
import peers_venv  # noqa: E402
import replay  # noqa: E402
import tables  # noqa: E402

# the intents config with the planner of before search v2 (its tests pin those scenarios; the v2 default is
# replayed through the CLI tests below)
INTENTS = load_config(ROOT / "configs" / "intents.yaml", {"sweep.planning_lag": 2, "sweep.told": "final",
                                                          "sweep.rung_min_trials": 1})  # fmt: skip
LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3]


def test_seconds_fraction_by_hand() -> None:
    """Training seconds consumed until the running best first reaches b_s, over random + FIFO's seconds for its B
    trial-epochs at the same seed; 2.0 if it never does, capped at 2.0. A method that reaches b_s after MORE
    trial-epochs than the reference but on cheaper ones wins on seconds and loses on epochs."""
    curves = {
        "random+fifo": [[0.1, 0.5, 0.5, 0.6], [0.2, 0.2, 0.7, 0.7]],
        "cheap": [[0.1, 0.2, 0.3, 0.6], [0.7, 0.7, 0.7, 0.7]],
        "dear": [[0.6, 0.6, 0.6, 0.6], [0.1, 0.1, 0.1, 0.1]],
    }
    costs = {
        "random+fifo": [[1, 2, 3, 4], [2, 2, 2, 2]],  # 10 s and 8 s for B
        "cheap": [[0.5, 0.5, 0.5, 0.5], [1, 1, 1, 1]],
        "dear": [[25, 1, 1, 1], [1, 1, 1, 1]],
    }
    m = measures.measures(curves, 1.0, 1.0, costs)
    assert m["random+fifo"]["per_seed"]["seconds_fraction"] == [1.0, 6 / 8]
    assert m["random+fifo"]["per_seed"]["fraction"] == [1.0, 0.75]
    assert m["cheap"]["per_seed"]["seconds_fraction"] == [2.0 / 10, 1 / 8]
    assert m["cheap"]["per_seed"]["fraction"] == [1.0, 0.25]
    assert m["dear"]["per_seed"]["seconds_fraction"] == [2.0, 2.0]  # 25/10 capped; never reached at seed 1
    assert m["dear"]["per_seed"]["fraction"] == [0.25, 2.0]
    assert m["cheap"]["seconds_to_reach_random_fifo_best"]["median"] == pytest.approx((0.2 + 0.125) / 2)
    # without costs every trial-epoch costs 1: the seconds fraction is E/B
    plain = measures.measures(curves, 1.0, 1.0)
    assert all(v["per_seed"]["seconds_fraction"] == v["per_seed"]["fraction"] for v in plain.values())


def test_anytime_regret_at_fractions_of_the_budget_and_against_the_reference() -> None:
    """B = 10: regret after ceil(10/8) = 2, ceil(10/4) = 3, 5 and 10 trial-epochs, from the best each seed could
    reach (one per seed here); per point, the median paired difference to random + FIFO and the seeds lower/higher."""
    ref = [[0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.6], [0.0] * 9 + [0.8], [0.5] * 10]
    other = [[0.0, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.9], [0.1] * 10, [0.5] * 10]
    m = measures.measures({"random+fifo": ref, "m": other}, [1.0, 0.9, 0.5], 1.0)
    at = m["m"]["per_seed"]["regret_at"]
    assert at["B/8"] == pytest.approx([0.7, 0.8, 0.0])
    assert at["B/4"] == pytest.approx([0.7, 0.8, 0.0])
    assert at["B/2"] == pytest.approx([0.7, 0.8, 0.0])
    assert at["B"] == pytest.approx([0.1, 0.8, 0.0])
    r = m["random+fifo"]["per_seed"]["regret_at"]
    assert r["B/8"] == pytest.approx([0.8, 0.9, 0.0]) and r["B/2"] == pytest.approx([0.5, 0.9, 0.0])
    assert r["B"] == pytest.approx([0.4, 0.1, 0.0])
    assert m["m"]["anytime_regret_at"]["B"] == pytest.approx({"median": 0.1, "q25": 0.05, "q75": 0.45, "mean": 0.3})
    assert m["m"]["vs_random_fifo"]["B/8"] == pytest.approx({"median_diff": -0.1, "lower": 2, "higher": 0})
    assert m["m"]["vs_random_fifo"]["B/2"] == pytest.approx({"median_diff": 0.0, "lower": 1, "higher": 1})
    assert m["m"]["vs_random_fifo"]["B"] == pytest.approx({"median_diff": 0.0, "lower": 1, "higher": 1})
    assert measures.point_index(128, 8) == 15 and measures.point_index(3, 8) == 0


def test_bootstrap_interval_of_the_median_is_the_exact_bootstrap_quantiles() -> None:
    """Nine distinct fractions: the median of a resample is its 5th order statistic, so the bootstrap distribution is
    exact: P(median <= x_(j)) = P(Binomial(9, j/9) >= 5) = 0.0015, 0.0304, 0.145, ..., 0.9696, 0.9986. Its 2.5th
    percentile is therefore x_(2) and its 97.5th x_(8); with 10,000 resamples the estimate is those order statistics
    (each more than 3 standard errors from the neighbouring one)."""
    x = [0.9, 0.1, 0.5, 0.3, 2.0, 0.2, 0.7, 0.4, 0.6]
    s = sorted(x)
    cdf = [sum(comb(9, k) * (j / 9) ** k * (1 - j / 9) ** (9 - k) for k in range(5, 10)) for j in range(1, 10)]
    lo = next(j for j, p in enumerate(cdf) if p >= 0.025)
    hi = next(j for j, p in enumerate(cdf) if p >= 0.975)
    assert (lo, hi) == (1, 7)
    assert measures.median_ci95(x) == [s[lo], s[hi]] == [0.2, 0.9]
    assert measures.median_ci95([0.3] * 5) == [0.3, 0.3]
    m = measures.measures({"random+fifo": [[0.5]] * 9}, 1.0, 1.0)
    assert m["random+fifo"]["median_ci95"]["epochs_to_reach_random_fifo_best"] == [1.0, 1.0]


def two_seed_files(tmp_path: Path) -> Path:
    """A table of 5 configs x 1 epoch: the root seed's file (no train_seed column: the grid config's seed, 42) and
    training seed 1's next to it, whose every value is 0.5 higher (so a value tells which seed it came from)."""
    root = pd.DataFrame(
        [
            {
                "config_id": i,
                "param.train.lr": lr,
                "epoch": 1,
                "val_f1": 0.1 * i,
                "iter_s": 5.0 + i,
                "epoch_time_s": 4.0,
            }
            for i, lr in enumerate(LRS)
        ]  # fmt: skip
    )
    root.to_parquet(tmp_path / "t.parquet")
    root.assign(val_f1=root["val_f1"] + 0.5, train_seed=1).to_parquet(tmp_path / "t_train1.parquet")
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "t_trainx.parquet")  # not a training seed's file: ignored
    return tmp_path / "t.parquet"


def test_training_noise_is_drawn_per_seed_and_config_and_shared_by_every_method(tmp_path: Path) -> None:
    """Replay seed s sees, for config c, training seed sorted(seeds)[default_rng([s, config_id]).integers(2)]; every
    method replayed with seed s (lorahpo's and a peer) reports exactly those curves; the best reachable is that of
    the drawn curves."""
    df = tables.load_table(two_seed_files(tmp_path), "val_f1", root_seed=42)
    assert tables.train_seeds(df) == [1, 42] and len(df) == 10
    table = tables.table_of(df, "val_f1", 1)
    drawn = {s: [[1, 42][np.random.default_rng([s, i]).integers(2)] for i in range(5)] for s in range(6)}
    for s, picks in drawn.items():
        curves = table.curves(s)
        assert [curves[(lr,)][0].value for lr in LRS] == pytest.approx(
            [0.1 * i + (0.5 if p == 1 else 0.0) for i, p in enumerate(picks)]
        )
    assert len({tuple(p) for p in drawn.values()}) > 1  # the draw varies with the seed
    assert table.curves(None)[(LRS[4],)][0].value == pytest.approx(0.9)  # None: the lowest training seed (1)

    base = apply_overrides(INTENTS, {"train.max_epochs": 1, "train.patience": 1, "sweep.points_to_evaluate": []})
    res = replay.replay(base, df, [0, 1, 2, 3], 3, methods=["tpe+asha", "optuna tpe+sha"])
    for s, best in zip(range(4), res["seed_best"]):
        assert best == pytest.approx(max(0.1 * i + (0.5 if p == 1 else 0.0) for i, p in enumerate(drawn[s])))
    cfg = replay.replay_config(base, replay.grid_of(df), 3)
    problem = replay.Problem(replay.grid_of(df), [], 1, 1, "max", "best_val_f1", 3)
    replay._init(table, problem)
    for s in range(4):
        runs = [replay._run(("random+fifo", replay.variants(cfg, 1)["random+fifo"][0], 1, s)),
                replay._run(("optuna tpe+sha", None, 1, s))]  # fmt: skip
        for values, costs, firsts, _ in runs:
            expect = [0.1 * LRS.index(k[0]) + (0.5 if drawn[s][LRS.index(k[0])] == 1 else 0.0) for k in firsts]
            assert values == pytest.approx(expect) and costs == [4.0] * 3


def test_a_table_with_one_training_seed_replays_as_before(tmp_path: Path) -> None:
    """One training seed: every replay seed sees the table itself, and the best reachable is the table's best."""
    path = two_seed_files(tmp_path)
    (tmp_path / "t_train1.parquet").unlink()
    df = tables.load_table(path, "val_f1", root_seed=42)
    table = tables.table_of(df, "val_f1", 1)
    assert tables.train_seeds(df) == [42]
    assert all(table.curves(s) == table.curves(None) for s in range(10))
    base = apply_overrides(INTENTS, {"train.max_epochs": 1, "train.patience": 1, "sweep.points_to_evaluate": []})
    res = replay.replay(base, df, [0, 1, 2], 3, methods=[])
    assert res["seed_best"] == [pytest.approx(0.4)] * 3 and res["table_best"] == pytest.approx(0.4)


def test_a_training_seed_missing_for_a_config_is_an_error(tmp_path: Path) -> None:
    path = two_seed_files(tmp_path)
    part = pd.read_parquet(tmp_path / "t_train1.parquet")
    part[part["config_id"] != 3].to_parquet(tmp_path / "t_train1.parquet")
    with pytest.raises(UserError, match=r"config 3 of .* lacks training seed\(s\) \[1\]"):
        tables.load_table(path, "val_f1", root_seed=42)


def test_list_tables_and_a_table_by_name(tmp_path: Path) -> None:
    """--list-tables prints the bundled tables whose files are present, one per line; --table NAME replays it with
    its own task config (its sweep settings are `default`), every method on --slots; a peer's source is its
    package==version; an unknown name is a one-line error."""
    script = [sys.executable, str(ROOT / "bench" / "replay.py")]
    proc = subprocess.run([*script, "--list-tables"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [n for n, b in tables.TABLES.items() if b.table.is_file()]
    assert "intents" in proc.stdout.splitlines()

    out = tmp_path / "r"
    args = ["--table", "intents", "--seeds", "0-1", "--slots", "8", "--trials", "2", "--jobs", "1", "--out", str(out)]
    # dehb runs in .venv-peers where there is one (CI makes it): through the same CLI, as a subprocess
    venv = ["dehb"] if peers.source("dehb") else []
    proc = subprocess.run([*script, *args, "--methods", "optuna tpe+sha", *venv], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["slots"] == 8 and res["table"] == "intents" and res["config"].endswith("configs/intents.yaml")
    # intents.yaml's settings; no @8: every method has 8
    assert res["default"] == "tpe+asha startup=8 rf=16 planning_lag=1 told=first_rung rung_min_trials=16 det1"
    assert list(res["methods"]) == ["random+fifo", "optuna tpe+sha", *venv]
    import optuna

    assert res["methods"]["random+fifo"]["source"] == "lorahpo"
    assert res["methods"]["optuna tpe+sha"]["source"] == f"optuna=={optuna.__version__}"
    if venv:
        assert res["methods"]["dehb"]["source"] == "dehb==0.1.2" and "dehb" not in res["left_out"]
        assert res["first_trials"]["dehb"][0][0] == res["first_trials"]["random+fifo"][0][0]  # the baseline first
    proc = subprocess.run([*script, "--table", "nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --table 'nope'") and proc.stderr.count("\n") == 1


def test_venv_peers_are_left_out_without_their_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without .venv-peers (here: pointed at a folder that does not exist), the replay runs everything else and lists
    syne-tune 0.14.2's and dehb's peers in `left_out`, each with the reason and the command that creates it; asking
    for one by name is a one-line error with the same note."""
    path = two_seed_files(tmp_path)
    monkeypatch.setattr(peers_venv, "VENV", tmp_path / "absent" / ".venv-peers")
    df = tables.load_table(path, "val_f1", root_seed=42)
    base = apply_overrides(INTENTS, {"train.max_epochs": 1, "train.patience": 1, "sweep.points_to_evaluate": []})
    res = replay.replay(base, df, [0], 3, methods=[])
    names = ["syne-tune 0.14 hypertune", "syne-tune 0.14 mobster", "syne-tune 0.14 dehb", "syne-tune 0.14 bohb",
             "syne-tune 0.14 asha", "dehb"]  # fmt: skip
    assert [n for n in peers.PEERS if peers.in_venv(n)] == names
    for name in names:
        package = "dehb" if name == "dehb" else "syne-tune"
        assert res["left_out"][name] == (f"{package} runs in its own environment .venv-peers (it needs numpy < 2), "
                                         "which is not there: make bench-peers")  # fmt: skip
    assert list(res["methods"]) == ["random+fifo"]
    with pytest.raises(UserError, match=r"^\['dehb'\]: dehb runs in its own environment .* make bench-peers$"):
        replay.replay(base, df, [0], 3, methods=["dehb"])
