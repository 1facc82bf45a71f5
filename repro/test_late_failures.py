"""README: "2 with one line on stderr for a user error, before any training". Two config values the config accepts
(and --dry-run passes, repro/test_user_errors.py) fail only once Ray and the trials run. Slow (a local Ray each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, TINY_ARGS

pytestmark = pytest.mark.slow
SMALL = ["sweep.cpus_per_trial=0.5", "sweep.num_samples=1", "train.max_epochs=1", "sweep.name=s"]


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tune_lora.py"), *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


@pytest.mark.parametrize("bad", ["train.weight_decay=-0.1", "train.num_threads=-1"])
def test_refused_before_ray_starts(tmp_path: Path, bad: str) -> None:
    run = cli([*TINY_ARGS, *SMALL, f"sweep.storage_path={tmp_path / 'store'}", bad])
    last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ""
    assert run.returncode == 2 and last.startswith("error: "), (
        f"exit {run.returncode}, traceback: {'Traceback' in run.stderr}, Ray started: "
        f"{'Started a local Ray instance' in run.stderr + run.stdout}; last line: {last[:300]}"
    )
