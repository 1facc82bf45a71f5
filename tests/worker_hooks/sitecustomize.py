"""Test-only hooks into a sweep, with no test code in lorahpo/. Python imports `sitecustomize` when it starts, so every
process started with this directory on its PYTHONPATH loads this file: the CLI's driver, and the Ray workers of the
local cluster it starts (they inherit its environment). tests/conftest.py `hooked` sets both. Each hook patches one
lorahpo function when its module is first imported (nothing is imported here ahead of time), and only while its
variable is set:

- LORAHPO_TEST_TRIAL_DELAYS={"<n>": [first, later]}: trial_<n>_* waits `first` before it starts and `later` before it
  resumes from a checkpoint (after a pause or a failure), each a number of seconds or the path of a file the test
  creates when the trial may go on; it logs its pid. This reorders when trials report and opens a window in which to
  kill a trial's worker; a deterministic sweep must give the same trials all the same (tests/test_sweep.py).
- LORAHPO_TEST_CPU_BF16=0|1: whether this CPU counts as having native bf16 (tests force the emulated path).
- LORAHPO_TEST_WRONG_PREFIX=1: the prefix cache's build moves every token's states to the next token (the size and
  the layout of the right ones): a cache with wrong states, which the sweep's check must catch.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

DELAYS = "LORAHPO_TEST_TRIAL_DELAYS"
CPU_BF16 = "LORAHPO_TEST_CPU_BF16"
WRONG_PREFIX = "LORAHPO_TEST_WRONG_PREFIX"
log = logging.getLogger("tests.worker_hooks")


def delay_trials(module: ModuleType) -> None:
    """lorahpo.trainable.tune_trial waits as LORAHPO_TEST_TRIAL_DELAYS says before the trial runs."""
    run = module.tune_trial

    @functools.wraps(run)
    def tune_trial(*args: Any, **kwargs: Any) -> None:
        from ray import tune  # in the trial's worker, where Tune's context is set

        name = os.path.basename(tune.get_context().get_trial_dir())
        delays = json.loads(os.environ[DELAYS])
        wait = delays.get(str(int(name.split("_")[1])), (0, 0))[1 if tune.get_checkpoint() is not None else 0]
        if wait:
            log.warning("test delay: %s waits for %s in pid %d", name, wait, os.getpid())
            if isinstance(wait, str):
                deadline = time.monotonic() + 600  # a test that died creates nothing: go on eventually
                while not os.path.exists(wait) and time.monotonic() < deadline:
                    time.sleep(0.1)
            else:
                time.sleep(wait)
        run(*args, **kwargs)

    module.tune_trial = tune_trial


def cpu_bf16(module: ModuleType) -> None:
    """lorahpo.repro.cpu_has_bf16 answers as LORAHPO_TEST_CPU_BF16 says."""
    module.cpu_has_bf16 = lambda: os.environ[CPU_BF16] == "1"


def wrong_prefix(module: ModuleType) -> None:
    """lorahpo.prefix.build_in_memory builds the right states, then shifts them by one token."""
    build = module.build_in_memory

    @functools.wraps(build)
    def build_in_memory(*args: Any, **kwargs: Any) -> Any:
        import numpy as np

        cache = build(*args, **kwargs)
        cache.arrays = {key: np.roll(values, 1, axis=0) for key, values in cache.arrays.items()}
        return cache

    module.build_in_memory = build_in_memory


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds a module as Python would without it, and patches the module once it has run."""

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]):
        self.patches = patches

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in self.patches:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            self.patches[name](module)

        spec.loader.exec_module = exec_module  # this spec's own loader object
        return spec


patches = {}
if os.environ.get(DELAYS):
    patches["lorahpo.trainable"] = delay_trials
if os.environ.get(CPU_BF16) in ("0", "1"):
    patches["lorahpo.repro"] = cpu_bf16
if os.environ.get(WRONG_PREFIX) == "1":
    patches["lorahpo.prefix"] = wrong_prefix
if patches:
    sys.meta_path.insert(0, PatchOnImport(patches))
