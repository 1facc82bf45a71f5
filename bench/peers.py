"""Peer methods, run in their own packages against the same table, budget, seeds, space and noise draw as lorahpo's
(`pip install -e '.[bench]'`; never a dependency of lorahpo itself).

Every peer searches the grid's categorical values, starts from the config's `points_to_evaluate` (the untuned
baseline: every lorahpo method's trial 0 too), seeds its own random generator(s) with the replay seed s, sees the
curves of seed s's noise draw, runs on the replay's slots, and stops once it has B epoch reports. A trial is the
project's trainable: it reports, after each epoch, its running best of the metric (the tuning metric, e.g.
`best_val_f1`), and ends after `train.patience` epochs without improvement or at `train.max_epochs`. Package defaults
everywhere else, as a user of the package would run it, except the fidelity range (epochs 1..max_epochs).

- Optuna (ask/tell, driven here in simulated time: bench/asktell.py): TPESampler with SuccessiveHalvingPruner or
  HyperbandPruner, and GPSampler (no pruner: a GP models final values). The objective is Optuna's documented pattern:
  `trial.report(value, epoch)` after every epoch, then `trial.should_prune()`; a pruned trial is told PRUNED, a
  finished one COMPLETE with its running best. Trials with the same config are trained again (Optuna proposes them;
  they cost epochs as in a real study).
- Syne Tune (bench/peers_syne.py): its own simulator backend over the table.

Left out, and why: `LEFT_OUT`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from typing import Any

from asktell import Problem
from methods import Run
from tables import Curves

# name -> (package, its runner as module.function, its settings). A peer's name starts with its package's; its module
# is imported when it runs (bench/peers_syne.py needs the bench extra).
PEERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "optuna tpe+sha": ("optuna", "asktell.optuna_run", {"sampler": "tpe", "pruner": "sha"}),
    "optuna tpe+hyperband": ("optuna", "asktell.optuna_run", {"sampler": "tpe", "pruner": "hyperband"}),
    "optuna gp": ("optuna", "asktell.optuna_run", {"sampler": "gp", "pruner": "none"}),
    "syne-tune asha": ("syne-tune", "peers_syne.run", {"scheduler": "ASHA"}),
    "syne-tune bohb": ("syne-tune", "peers_syne.run", {"scheduler": "BOHB"}),
    "syne-tune bohb per rung": ("syne-tune", "peers_syne.run", {"scheduler": "kde per rung"}),
    "syne-tune asha+cqr": ("syne-tune", "peers_syne.run", {"scheduler": "ASHACQR"}),
}
MODULE = {"optuna": "optuna", "syne-tune": "syne_tune"}
LEFT_OUT = {
    "dehb": "dehb 0.1.2 (the only version on PyPI here) requires numpy<2.0; the project pins numpy 2.4.6",
    "syne-tune hypertune, mobster, dehb": "not in syne-tune 0.16.0 (the only version on PyPI here): its schedulers "
    "are ASHA and BOHB-style ASHA with a searcher (KDE, BORE, CQR, BoTorch); the GP-based multi-fidelity methods of "
    "earlier versions were removed",
}


def source(name: str) -> str | None:
    """`<package>==<version>` of an installed peer; None when its package is not installed."""
    package = PEERS[name][0]
    if importlib.util.find_spec(MODULE[package]) is None:
        return None
    return f"{package}=={importlib.metadata.version(package)}"


def run_peer(name: str, p: Problem, curves: Curves, seed: int, slots: int) -> Run:
    _, runner, spec = PEERS[name]
    module, function = runner.split(".")
    return getattr(importlib.import_module(module), function)(spec, p, curves, seed, slots)
