"""The benchmark scripts' --smoke modes (tiny random model, real Ray, real subprocesses): each writes its outputs with
sane values. These are plumbing checks, not timed tests: no timing is asserted beyond being positive."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run_smoke(script: str, out: Path, *extra: str, timeout: float = 300) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--smoke", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    for name in ("results.json", "table.md"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert res["smoke"] is True
    assert res["machine"]["cpu_count"] >= 1 and res["machine"]["date_utc"]
    return res


def positive(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_hpo_efficiency_smoke(tmp_path: Path) -> None:
    res = run_smoke("hpo_efficiency.py", tmp_path)
    assert (tmp_path / "hpo_efficiency.png").stat().st_size > 10_000
    a = res["analysis"]
    assert set(a["methods"]) == {"tpe_asha", "random_fifo"}
    assert a["trial0_identical_across_methods"]  # same config, seed and data: sequential runs agree bit for bit
    for m in a["methods"].values():
        assert len(m["mean_best_so_far"]) == res["budget_trial_epochs"] == 3
        assert m["mean_best_so_far"] == sorted(m["mean_best_so_far"])  # a best-so-far curve never goes down
        for p in m["per_seed"]:
            assert 0 <= p["chosen_test_fbeta"] <= 1 and 0 <= p["default_test_fbeta"] <= 1
            assert p["final_best_val_fbeta"] >= p["default_val_fbeta"]  # trial 0 is among the trials
            assert p["trials"] >= 2
    for rec in (tmp_path / "work").glob("*-seed0.json"):
        r = json.loads(rec.read_text())
        assert r["epochs_used"] == 3 == sum(t["epochs"] for t in r["trials"])  # the stopper kept the budget
        assert r["default"]["is_points_to_evaluate"]
        assert r["chosen"]["val_fbeta"] == pytest.approx(r["chosen"]["best_val_fbeta"], abs=1e-6)


def test_overhead_smoke(tmp_path: Path) -> None:
    res = run_smoke("overhead.py", tmp_path)
    assert (tmp_path / "overhead.png").is_file()
    assert positive(res["ray_startup"]["init_s"]["median"]) and positive(res["cold_import_s"]["median"])
    assert positive(res["trial_startup"]["tiny"]["model_build_s"]["median"])
    assert {(r["n"], r["reuse_actors"]) for r in res["sweeps"]} == {(2, False), (2, True)}
    for r in res["sweeps"]:
        assert r["ratio"] >= 1 and positive(r["sum_trial_time_s"]) and r["wall_s"] > r["sum_trial_time_s"]
        assert len(r["val_fbeta"]) == r["n"]
    assert [r["worker_processes"] for r in res["sweeps"]] == [2, 1]  # reuse_actors: one process serves both
    assert res["reuse_actors_results_identical"] == [{"trial": "short", "n": 2, "identical": True}]


def test_throughput_smoke(tmp_path: Path) -> None:
    res = run_smoke("throughput.py", tmp_path)
    for kind in ("lightning", "plain"):
        assert positive(res[kind]["train_real_tok_s"]["median"])
        assert res[kind]["train_padded_tok_s"]["median"] >= res[kind]["train_real_tok_s"]["median"]
        assert 100 < res[kind]["peak_rss_mb"]["median"] < 8000
    assert positive(res["ratio_train_tok_s"])
    # the plain loop does the same training as the trial: same init, batches, dropout masks, optimizer -> same loss
    same = res["same_training"]
    assert same["plain_train_loss"] == pytest.approx(same["lightning_train_loss"], rel=1e-5)
    ck = res["checkpoint"]
    assert 0 < ck["mb"] < 5 and 0 < ck["share_of_trial"] < 1


def test_padding_smoke(tmp_path: Path) -> None:
    res = run_smoke("padding.py", tmp_path)
    assert (tmp_path / "padding.png").is_file()
    for row in res["batch_sizes"]:
        eff = {k: row[k]["efficiency"] for k in ("project", "random", "max_length", "sorted")}
        assert all(0 < v <= 1 for v in eff.values())
        assert eff["sorted"] >= eff["project"] > eff["random"] >= eff["max_length"]
        assert row["padding_stats_epoch0"]["real_tokens"] == row["real_tokens_per_epoch"]


def test_gpu_throughput_smoke(tmp_path: Path) -> None:
    res = run_smoke("gpu_throughput.py", tmp_path)
    assert [r["trials"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        assert "error" not in r, r.get("error")
        assert positive(r["aggregate_tok_s"]) and positive(r["flops_per_token"])
        assert len(r["per_trial_tok_s"]) == r["trials"]
        w = r["workers"][0]
        assert w["tokens"] == res["spec"]["steps"] * res["spec"]["batch"] * res["spec"]["seq"]
        assert 0 < w["trainable_params"] < w["total_params"]


def test_gpu_flops_formula() -> None:
    """Model FLOPs per token of the Llama-3.2-3B shape, checked against a hand count."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_throughput import LLAMA32_3B, flops_per_token
    finally:
        sys.path.remove(str(ROOT / "bench"))
    linear = 3072 * 3072 * 2 + 3072 * 1024 * 2 + 3 * 3072 * 8192  # q, o; k, v; gate, up, down
    assert linear == 100_663_296
    fpt = flops_per_token(LLAMA32_3B, 512, 14, 16, ["q_proj", "k_proj", "v_proj", "o_proj"])
    # forward ~ 2 x 2.82e9 linear + attention, backward ~ half of it (14 of 28 layers): ~8.8 GFLOP per token
    assert 8.6e9 < fpt < 9.0e9


def test_prefix_cache_smoke(tmp_path: Path) -> None:
    # every part but `deeper` (two more sweeps through the same `run_sweep` as `sweep`: 100 s of the suite's budget)
    res = run_smoke("prefix_cache.py", tmp_path, "--parts", "epochs,sweep,flops", timeout=600)
    e = res["epochs"]
    assert e["build"]["cuts"] == [2, 3] and positive(e["build"]["build_s"]) and positive(e["build"]["gb"])
    assert [r["cut"] for r in e["table"]] == [3, 2, None]  # last_n 1, 2, 4 of 4 layers
    for r in e["table"]:
        assert positive(r["cached_train_tok_s"]["median"]) and positive(r["ratio_train_s"])
        assert r["val_loss_diff"] < 1e-4  # the same training, with and without the cache
    s = res["sweep"]
    assert s["same_trials"] and s["last_n_of_trials"] == [1, 1, 2, 2]  # random + FIFO, seed 3: two of each
    assert s["with_cache"]["cache"]["cuts"] == [2, 3] and s["without_cache"]["cache"] is None
    assert s["with_cache"]["cache"]["passed"]  # within the float noise of the dtype and depth (prefix.noise_rtol)
    assert positive(s["ratio_sum_trial_s"]) and positive(s["ratio_wall_s"])
    assert s["with_cache"]["best_val_fbeta"] == pytest.approx(s["without_cache"]["best_val_fbeta"], abs=1e-6)
    f = res["flops"]
    assert [r["last_n"] for r in f["rows"]] == [10, 11, 12, 13, 14]
    # fewer layers cached away, smaller gain: the speed-up falls as last_n grows, and stays above 1
    assert [r["train_speedup"] for r in f["rows"]] == sorted((r["train_speedup"] for r in f["rows"]), reverse=True)
    assert all(r["train_speedup"] > 1 and r["val_speedup"] > r["train_speedup"] for r in f["rows"])
    assert "deeper" not in res


def test_determinism_cost_smoke(tmp_path: Path) -> None:
    res = run_smoke("determinism_cost.py", tmp_path)
    assert res["simulated"] and [(r["slots"], r["trials_per_batch"]) for r in res["rows"]] == [
        (1, 1),
        (1, 4),
        (2, 2),
        (2, 4),
    ]
    for r in res["rows"]:
        assert 0 < r["det_utilisation"] <= 1 and 0 < r["async_utilisation"] <= 1 and positive(r["wall_ratio_mean"])
        for run in r["runs"]:
            assert run["det"]["trial_epochs"] >= 8 and 0 < run["det"]["best"] <= 1
    # a deterministic sweep with the same trials_per_batch is the same sweep at 1 and 2 slots
    same = [r for r in res["rows"] if r["trials_per_batch"] == 4]
    for one, two in zip(same[0]["runs"], same[1]["runs"]):
        assert (one["det"]["best"], one["det"]["trial_epochs"]) == (two["det"]["best"], two["det"]["trial_epochs"])
    assert same[0]["det_utilisation"] == 1.0 and same[1]["det_utilisation"] < 1.0
