"""Peer methods, run in their own packages against the same table, budget, seeds, space and noise draw as lorahpo's
(bench extras only; never a dependency of lorahpo itself).

Every peer searches the grid's categorical values, starts from the config's `points_to_evaluate` (the untuned
baseline: every lorahpo method's trial 0 too), seeds its own random generator(s) with the replay seed s, sees the
curves of seed s's noise draw, runs on the replay's slots, and stops once it has B epoch reports. A trial is the
project's trainable: it reports, after each epoch, its running best of the metric (the tuning metric, e.g.
`best_val_f1`), and ends after `train.patience` epochs without improvement or at `train.max_epochs`. Package defaults
everywhere else, as a user of the package would run it, except the fidelity range (epochs 1..max_epochs).

- Optuna (bench/peers_optuna.py, this environment): TPESampler with SuccessiveHalvingPruner or HyperbandPruner, and
  GPSampler (no pruner: a GP models final values). Trials with the same config are trained again (Optuna proposes
  them; they cost epochs as in a real study).
- Syne Tune 0.16.0 (bench/peers_syne.py, the bench extra): its own simulator backend over the table.
- Syne Tune 0.14.2 and dehb 0.1.2 (bench/peers_syne.py, bench/peers_dehb.py) in .venv-peers, their own environment
  (bench/peers_venv.py; `make bench-peers`): both need numpy < 2. Without it they are left out, with the command.

Left out, and why: `LEFT_OUT`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from typing import Any

import peers_venv
from trials import Curves, Problem, Run

VENV_SYNE = ("syne-tune", "peers_syne.run")  # syne-tune 0.14.2 in .venv-peers: spec {"legacy": True, "venv": True}
# name -> (package, its runner as module.function, its settings; "venv": runs in .venv-peers). A peer's name starts
# with its package's; its module is imported when it runs (bench/peers_syne.py needs the bench extra).
PEERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "optuna tpe+sha": ("optuna", "peers_optuna.run", {"sampler": "tpe", "pruner": "sha"}),
    "optuna tpe+hyperband": ("optuna", "peers_optuna.run", {"sampler": "tpe", "pruner": "hyperband"}),
    "optuna gp": ("optuna", "peers_optuna.run", {"sampler": "gp", "pruner": "none"}),
    "syne-tune asha": ("syne-tune", "peers_syne.run", {"scheduler": "ASHA"}),
    "syne-tune bohb": ("syne-tune", "peers_syne.run", {"scheduler": "BOHB"}),
    "syne-tune bohb per rung": ("syne-tune", "peers_syne.run", {"scheduler": "kde per rung"}),
    "syne-tune asha+cqr": ("syne-tune", "peers_syne.run", {"scheduler": "ASHACQR"}),
    # syne-tune 0.14.2's legacy_baselines: the GP-based multi-fidelity methods 0.16 removed, its own ASHA and BOHB
    "syne-tune 0.14 hypertune": (*VENV_SYNE, {"scheduler": "HyperTune", "legacy": True, "venv": True}),
    "syne-tune 0.14 mobster": (*VENV_SYNE, {"scheduler": "MOBSTER", "legacy": True, "venv": True}),
    "syne-tune 0.14 dehb": (*VENV_SYNE, {"scheduler": "DEHB", "legacy": True, "venv": True}),
    "syne-tune 0.14 bohb": (*VENV_SYNE, {"scheduler": "BOHB", "legacy": True, "venv": True}),
    "syne-tune 0.14 asha": (*VENV_SYNE, {"scheduler": "ASHA", "legacy": True, "venv": True}),
    "dehb": ("dehb", "peers_dehb.run", {"venv": True}),
}  # fmt: skip
MODULE = {"optuna": "optuna", "syne-tune": "syne_tune"}
LEFT_OUT = {
    "syne-tune asha+bore": "on this finite space its searcher fails to draw new configs ('Tried 10000 times to "
    "sample a new configuration without replacement') many times per replay, at 36 s per seed",
    "syne-tune botorch": "needs botorch (Syne Tune's `extra`), not installed; BoTorch is single-fidelity",
}


def in_venv(name: str) -> bool:
    return bool(PEERS[name][2].get("venv"))


def source(name: str) -> str | None:
    """`<package>==<version>` of an installed peer (in .venv-peers for a venv peer); None when its package is not
    installed there."""
    package = PEERS[name][0]
    if in_venv(name):
        v = peers_venv.version(package)
        return None if v is None else f"{package}=={v}"
    if importlib.util.find_spec(MODULE[package]) is None:
        return None
    return f"{package}=={importlib.metadata.version(package)}"


def left_out_note(name: str) -> str:
    """Why a peer whose `source` is None is left out, and the command that installs it."""
    if in_venv(name):
        return (f"{PEERS[name][0]} runs in its own environment {peers_venv.VENV.name} (it needs numpy < 2), which "
                f"is not there: {peers_venv.CREATE}")  # fmt: skip
    return f"{PEERS[name][0]} is not installed: pip install -e '.[bench]'"


def run_seeds(name: str, p: Problem, seed_curves: dict[int, Curves], slots: int, jobs: int = 1) -> dict[int, Any]:
    """A venv peer at every seed (one process per chunk of seeds): seed -> (its Run, wall s, CPU s)."""
    _, runner, spec = PEERS[name]
    return peers_venv.run_seeds(runner, spec, p, seed_curves, slots, jobs)


def run_peer(name: str, p: Problem, curves: Curves, seed: int, slots: int) -> Run:
    _, runner, spec = PEERS[name]
    if in_venv(name):
        return run_seeds(name, p, {seed: curves}, slots)[seed][0]
    module, function = runner.split(".")
    return getattr(importlib.import_module(module), function)(spec, p, curves, seed, slots)
