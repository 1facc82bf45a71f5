"""Shared fixtures: a tiny random Llama config (no downloads), its tokenized data, and process helpers that poll
with a timeout and always stop what they start, by process id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lorahpo.config import ExperimentConfig, apply_overrides, load_config
from lorahpo.data import BUNDLED_PATH, TaskData, load_task
from lorahpo.sources import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "model.name": "tiny-random-llama",
    "model.num_layers": 4,
    "data.max_examples": 400,
    "train.max_epochs": 2,
    "train.batch_size": 16,
}


def tiny_config(**overrides: object) -> ExperimentConfig:
    """The default config on the tiny random Llama, with dotted overrides (use dict(...) for dotted keys)."""
    return apply_overrides(load_config(), {**TINY, **overrides})


@pytest.fixture(scope="session")
def tiny_cfg() -> ExperimentConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_data(tiny_cfg: ExperimentConfig) -> TaskData:
    return load_task(tiny_cfg.data, load_tokenizer(tiny_cfg.model), tiny_cfg.seed)


def snapshot_trials(experiment_state: bytes | str) -> set[str]:
    """Trial directories in a Tune experiment-state snapshot (experiment_state-*.json): what --resume restores. Ray Tune
    writes one about every 10 s, so a trial started since the last one is not in it (--resume runs it again)."""
    state = json.loads(experiment_state)
    return {json.loads(trial)["relative_logdir"] for trial, _ in state["trial_data"]}


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


def tiny_args(storage: Path, **overrides: object) -> list[str]:
    """CLI overrides for a tiny sweep into `storage`."""
    merged = {**TINY, "sweep.storage_path": str(storage), **overrides}
    return [f"{k}={v}" for k, v in merged.items()]
