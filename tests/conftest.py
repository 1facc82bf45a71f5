"""Shared fixtures: a tiny random Llama config (no downloads), its tokenized data, and process helpers that poll
with a timeout and always stop what they start, by process id."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from filelock import FileLock

from lorahpo.config import ExperimentConfig, apply_overrides, load_config
from lorahpo.data import TaskData, load_task
from lorahpo.reading import BUNDLED_PATH
from lorahpo.sources import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "model.name": "tiny-random-llama",
    "model.num_layers": 4,
    "data.max_examples": 400,
    "train.max_epochs": 2,
    "train.batch_size": 16,
}


def word(i: int) -> str:
    """A distinct word per number, without digits: texts that differ only in a digit are near-duplicates
    (lorahpo.splitting.near_key), so synthetic texts spell their number in letters."""
    return "".join("abcdefghij"[int(d)] for d in str(i))


# `make test` runs the suite on 2 pytest-xdist workers, one test file per worker at a time (--dist loadfile: a file's
# module fixtures, such as test_cluster.py's cluster and S3 server, start once). Files are handed out in this order,
# the longest first, so that the two workers end together; the others follow in their usual order.
LONGEST_FIRST = ["test_sweep.py", "test_cluster.py", "test_errors.py", "test_owner.py", "test_bench_smoke.py",
                 "test_extend.py", "test_final_sweep.py", "test_prefix.py", "test_trainable.py", "test_intents.py",
                 "test_splits.py", "test_tracking.py"]  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order stays


def tiny_config(**overrides: object) -> ExperimentConfig:
    """The default config on the tiny random Llama, with dotted overrides (use dict(...) for dotted keys)."""
    return apply_overrides(load_config(), {**TINY, **overrides})


@pytest.fixture(scope="session")
def tiny_cfg() -> ExperimentConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_data(tiny_cfg: ExperimentConfig) -> TaskData:
    return load_task(tiny_cfg.data, load_tokenizer(tiny_cfg.model), tiny_cfg.seed)


def snapshot_trials(experiment_state: bytes | str, status: str | None = None) -> set[str]:
    """Trial directories in a Tune experiment-state snapshot (experiment_state-*.json): what --resume restores. Ray Tune
    writes one about every 10 s, so a trial started since the last one is not in it (--resume runs it again). With
    `status`, only the trials the snapshot records in it (TERMINATED: --resume does not run them again)."""
    trials = [json.loads(trial) for trial, _ in json.loads(experiment_state)["trial_data"]]
    logdirs = {t["relative_logdir"] for t in trials if status is None or t["status"] == status}
    return logdirs - {None}  # a trial not started yet has no directory (a deterministic sweep queues trials early)


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    """Poll `condition` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session=True and everything in its process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; each is killed (with its process group) when the test ends, pass or fail."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            kill_group(p)


def cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run tune_lora.py to completion as a real subprocess."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tune_lora.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def cli_background(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start tune_lora.py in its own process group (so a SIGKILL takes its local Ray with it)."""
    out = open(log, "w")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tune_lora.py"), *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def load_best(best: Path, split_json: Path, tmp_path: Path) -> dict[str, float]:
    """Val metrics of `best/` through the standard transformers loader, in a fresh process whose lorahpo cache is
    empty (as on another machine)."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "load_best.py"), str(best), str(split_json), str(BUNDLED_PATH)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "LORAHPO_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def tiny_args(storage: Path | str, **overrides: object) -> list[str]:
    """CLI overrides for a tiny sweep into `storage`."""
    merged = {**TINY, "sweep.storage_path": str(storage), **overrides}
    return [f"{k}={v}" for k, v in merged.items()]


# ---------------------------------------------------------------------------------------------------------------------
# One deterministic sweep, run one trial at a time (the reference), then again in parallel, killed, on two nodes:
# every run must give the same trials. One torch thread per trial whatever the CPU share, so that only the
# concurrency changes between runs (threads change floating-point sums).

DET_SWEEP = {
    "sweep.num_samples": 6,
    "sweep.trials_per_batch": 2,
    "train.num_threads": 1,
    "sweep.cpus_per_trial": 0.5,
}
DELAYS_ENV = "LORAHPO_TEST_TRIAL_DELAYS"  # see tests/worker_hooks/sitecustomize.py
WORKER_HOOKS = ROOT / "tests" / "worker_hooks"


def hooked(**variables: str) -> dict[str, str]:
    """The environment of a CLI run whose driver and Ray workers load tests/worker_hooks/sitecustomize.py (the test-only
    hooks into a sweep), with the hooks' variables."""
    path = [str(WORKER_HOOKS), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path), **variables}


@pytest.fixture(scope="session")
def det_reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The deterministic sweep with one trial at a time: its record (see `sweep_record`) and where it is."""
    # Run once for the whole session: under pytest-xdist the workers share one run (the first one there makes it,
    # under a file lock; the others wait and read it).
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    exp = shared / "det_reference" / "ref"
    with FileLock(str(shared / "det_reference.lock")):
        if not (exp / "summary.json").exists():
            shutil.rmtree(exp.parent, ignore_errors=True)  # a run that failed half-way
            args = {**DET_SWEEP, "sweep.name": "ref", "sweep.max_concurrent_trials": 1}
            run = cli(tiny_args(exp.parent, **args))
            assert run.returncode == 0, run.stderr[-3000:]
    return {"record": sweep_record(lambda rel: (exp / rel).read_bytes()), "path": exp}


def sweep_record(read: Callable[[str], bytes]) -> dict:
    """What a sweep's results consist of, without what may differ between runs of it (trial ids, times, pids,
    paths): per trial in number order its params, per-epoch metrics, epochs and stop reason; the Optuna study (params,
    values, intermediate values); the best trial, its params and its test-split score. `read(relative path)` reads
    a file of the experiment directory (local or in a bucket)."""
    df = pd.read_parquet(io.BytesIO(read("results.parquet")))
    study = pickle.loads(read("optuna_res.pkl"))
    summary = json.loads(read("summary.json"))
    number = lambda trial_id: int(trial_id.split("_")[1])  # noqa: E731 (trial_<n>_<id>)
    trials = []
    for row in df.to_dict("records"):
        curve = pd.read_csv(io.BytesIO(read(f"trials/{row['trial_id']}/metrics.csv")))
        trials.append(
            {
                "n": number(row["trial_id"]),
                "params": {k: v for k, v in row.items() if k.startswith("param.")},
                "epochs": row["epochs"],
                "stop_reason": row["stop_reason"],
                "best_val_fbeta": row["best_val_fbeta"],
                "curve": curve.drop(columns=["epoch_time_s"]).to_dict("list"),
            }
        )
    return {
        "trials": trials,
        "study": [(t.params, t.value, t.intermediate_values) for t in study.trials],
        "best": (number(summary["best_trial"]), summary["best_params"], summary["best_value"], summary["test"]),
    }


def first_report_times(exp: Path) -> dict[int, float]:
    """When each trial (by number) reported its first epoch (so far)."""
    times = {}
    for p in exp.glob("trial_*/progress.csv"):
        try:
            times[int(p.parent.name.split("_")[1])] = float(pd.read_csv(p)["timestamp"].iloc[0])
        except (pd.errors.EmptyDataError, pd.errors.ParserError, IndexError, KeyError, OSError):
            pass  # being written
    return times


def release_in_order(exp: Path, gates: dict[int, tuple[Path, list[int]]], timeout: float = 300) -> None:
    """Create each gate file (trial n waits for it, see tests/worker_hooks/sitecustomize.py) once the trials listed with
    it have reported their first epoch."""
    pending = dict(gates)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        reported = first_report_times(exp)
        for n, (gate, after) in list(pending.items()):
            if all(m in reported for m in after):
                gate.touch()
                del pending[n]
        time.sleep(0.2)
    assert not pending, f"trials {sorted(pending)} were never released: {first_report_times(exp)}"


class Crash(Exception):
    """Raised by `crash_after`: a trial dying mid-run."""


def crash_after(epoch: int, dest: Path) -> Callable[[dict, Path], None]:
    """A `fit` report hook that copies the checkpoint of `epoch` to `dest` and then crashes the trial."""

    def report(row: dict, ckpt: Path) -> None:
        if row["epoch"] == epoch:
            shutil.copytree(ckpt, dest)
            raise Crash

    return report
