"""Reproducibility: one seeding function run BEFORE a model is built, the threads and device of everything that runs
with a trial's resources (the same kernels, so the same bits), and the provenance manifest."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import lightning
import torch

from lorahpo.config import REPO_ROOT, ExperimentConfig, to_dict


def seed_everything_everywhere(seed: int) -> None:
    """Seed Python, NumPy, torch (CPU and CUDA) and Lightning, and make kernels deterministic."""
    if seed is None:  # 0 is a valid seed: never test truthiness
        raise ValueError("seed must be an integer")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    lightning.seed_everything(seed, workers=True, verbose=False)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def trial_threads(cfg: ExperimentConfig) -> int:
    """torch threads of a trial, and of every task run with a trial's resources (scoring, the prefix cache's build):
    `train.num_threads`, else its CPU share (Ray does not pin threads; too many oversubscribe the node)."""
    return cfg.train.num_threads or max(1, int(cfg.sweep.cpus_per_trial))


def use_gpu(cfg: ExperimentConfig) -> bool:
    """Trials (and evaluations) run on the GPU when the sweep gives them one and this process sees one."""
    return torch.cuda.is_available() and cfg.sweep.gpus_per_trial > 0


def trial_task_options(cfg: ExperimentConfig) -> dict[str, float]:
    """A Ray task's options for a trial's resources: where a trial runs, with its device and precision (also where
    the driver has no GPU)."""
    return {"num_cpus": cfg.sweep.cpus_per_trial, "num_gpus": cfg.sweep.gpus_per_trial}


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed for one epoch's randomness (dropout, shuffling): a trial resumed at epoch k replays epoch k exactly."""
    return (seed * 1_000_003 + epoch) % (2**31)


def _git(*args: str) -> str:
    """The output of a git command run in the code's checkout."""
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the code that ran (None outside a git checkout)."""
    try:
        return {"sha": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}


def versions() -> dict[str, str]:
    """Every installed distribution's version, by name: the whole environment a run had, not a chosen few (a paper's
    result can hinge on any of them, e.g. a BLAS wheel)."""
    return dict(sorted((d.metadata["Name"], d.version) for d in importlib.metadata.distributions()))


def cpuinfo() -> str | None:
    """/proc/cpuinfo (Linux), or None where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name: floating-point results are identical only on the same hardware type."""
    found = re.search(r"^model name\s*:(.*)$", cpuinfo() or "", re.MULTILINE)
    return found.group(1).strip() if found else platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX); elsewhere torch emulates bf16, very slowly."""
    flags = cpuinfo()
    if flags is None:
        return platform.machine().lower() in ("arm64", "aarch64")  # Apple silicon / Graviton have bf16 paths
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cuda_bf16() -> list[bool]:
    """bf16 support of each GPU this process sees (Ampere or newer)."""
    return [torch.cuda.get_device_capability(i)[0] >= 8 for i in range(torch.cuda.device_count())]


def hardware() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def manifest(cfg: ExperimentConfig, data_info: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Provenance of a run, written before training starts."""
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": to_dict(cfg),
        "seed": cfg.seed,
        "data": data_info,
        "git": git_state(),
        "versions": versions(),
        "hardware": hardware(),
        **extra,
    }
