"""What --final and --resume run from the sweep's storage. The README says `load_experiment` unpickles ("use it on
storage you trust"), `read_tables` unpickles nothing, every parquet file is checked, and "a checkpoint on shared
storage cannot run code in whoever loads it"; it recommends a shared bucket for clusters and `read_tables` for
"storage others can write". It never says that --resume and --final trust the storage: anyone who can write the
sweep's directory runs code in the next --resume or --final of it:

- --final: summary.json's `best_params` become the final runs' overrides unchecked (sweep.final_trial ->
  trainable.tune_trial -> apply_overrides), so they can set ANY key, e.g. model.name (a directory on the same storage)
  and model.trust_remote_code=true: the final run imports that directory's Python;
- --final: a `final_seeds<k>/tuner.pkl` next to a matching plan.json is unpickled (final.fit_runs -> Tuner.restore);
- --resume: `tuner.pkl` (and Ray's experiment state, which has a cloudpickle fallback) is unpickled
  (tuner.restore_tuner -> Tuner.restore).

Each test plants its payload in an otherwise minimal sweep directory, runs the CLI, and asserts the payload did not
run. Slow: each starts a local Ray (about 1-2 min on one core)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lorahpo.config import config_yaml, load_config
from lorahpo.final import make_plan, trial_seeds

from .conftest import ROOT, TINY_ARGS

pytestmark = pytest.mark.slow
SMALL = ["sweep.cpus_per_trial=0.5", "train.num_threads=1", "sweep.prefix_cache=false", "train.max_epochs=1"]


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tune_lora.py"), *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def planted_sweep(tmp: Path, best_params: dict, final_seeds: int) -> tuple[Path, list[str]]:
    """A finished sweep as --final and --resume find it (config, summary, manifest, results table, marker)."""
    store = tmp / "store"
    args = [*TINY_ARGS, f"sweep.storage_path={store}", "sweep.name=s", *SMALL, f"final.seeds={final_seeds}"]
    cfg = load_config(None, args)
    exp = store / "s"
    exp.mkdir(parents=True)
    (exp / ".lorahpo-sweep").write_text(json.dumps({"name": "s", "created": "2026-01-01T00:00:00+00:00"}))
    (exp / "config.yaml").write_text(config_yaml(cfg))
    (exp / "manifest.json").write_text("{}")
    summary = {"best_trial": "trial_000_x", "best_params": best_params, "test": {}, "test_ci95": {}}
    (exp / "summary.json").write_text(json.dumps(summary))
    pd.DataFrame({"trial_id": ["trial_000_x"]}).to_parquet(exp / "results.parquet")
    return exp, args


def test_final_does_not_take_any_config_key_from_summary_json(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "store" / "shared_model"  # a directory on the same shared storage
    evil.mkdir(parents=True)
    (evil / "config.json").write_text(
        json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                    "AutoModelForSequenceClassification": "evil.EvilModel"}})  # fmt: skip
    )
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    best = {"train.lr": 1e-3, "model.name": str(evil), "model.trust_remote_code": True}
    exp, args = planted_sweep(tmp_path, best, final_seeds=1)
    run = cli([*args, "final.baseline=false", "--final"])
    assert not marker.exists(), f"summary.json's best_params ran code from {evil} (exit {run.returncode})"


def test_final_does_not_unpickle_a_planted_final_experiment(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    exp, args = planted_sweep(tmp_path, {"train.lr": 1e-3}, final_seeds=1)
    cfg = load_config(None, args)
    plan = make_plan(cfg, {"train.lr": 1e-3}, trial_seeds(cfg, pd.read_parquet(exp / "results.parquet")))
    (exp / plan["experiment"]).mkdir()
    (exp / plan["experiment"] / "plan.json").write_text(json.dumps(plan))
    (exp / plan["experiment"] / "tuner.pkl").write_bytes(pickle.dumps(Payload(marker)))
    run = cli([*args, "--final"])
    assert not marker.exists(), f"--final unpickled {plan['experiment']}/tuner.pkl (exit {run.returncode})"


def test_resume_does_not_unpickle_a_planted_tuner_state(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    exp, args = planted_sweep(tmp_path, {"train.lr": 1e-3}, final_seeds=0)
    (exp / "summary.json").unlink()
    (exp / "tuner.pkl").write_bytes(pickle.dumps(Payload(marker)))
    run = cli([*args, "--resume"])
    assert not marker.exists(), f"--resume unpickled tuner.pkl (exit {run.returncode})"
