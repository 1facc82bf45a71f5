"""Syne Tune's schedulers on a table, in Syne Tune's own simulator (its Tuner with a blackbox simulator backend over
the curves one replay seed sees), in either of two versions:

- syne-tune 0.16.0 (the bench extra, this environment): `baselines.ASHA`, `BOHB`, `ASHACQR` and ASHA with a KDE per
  rung, Syne Tune's defaults (reduction factor 3, one bracket, grace period 1, stopping-type ASHA);
- syne-tune 0.14.2 (spec `legacy`: .venv-peers, bench/peers_venv.py, since it needs numpy < 1.27): its
  `legacy_baselines`, which still hold the GP-based multi-fidelity methods that 0.16 removed: `HyperTune`, `MOBSTER`,
  `DEHB` (synchronous), and `ASHA`, `BOHB` (a KDE at the largest rung with enough data, as Falkner et al.'s BOHB).

Every scheduler gets max_t (DEHB: max_resource_level) = max_epochs and package defaults otherwise, except Hyper-Tune's
`brackets`: its default, 1, would drop the bracket distribution it learns (Li et al., VLDB 2022), so it gets as many
brackets as Syne Tune allows (one per rung level, plus one).

What is ours, not Syne Tune's:
- the trial: `Backend.config_objectives` gives each config the epochs the project's trainable would report (its
  running best, ended by `train.patience`), with the cumulative `iter_s` as the elapsed time. A trial a scheduler
  pauses and resumes (synchronous Hyperband's first bracket) resumes from its checkpoint, as lorahpo's trainable
  does: Syne Tune's simulator reports only the epochs after the pause, so only those count; a config started again
  as a new trial (DEHB's later brackets) reports, and pays, every epoch again;
- decisions take no simulated time. Syne Tune's simulator adds the real seconds its scheduler computes to simulated
  time (realistic for a live run, but then a replay depends on the machine and its load: two runs of one seed on
  8 slots gave different trials). lorahpo's replay counts no time for decisions either, so the comparison is fair
  and a replay is a function of its seed. This needs one private name of Syne Tune (`_zero_decision_time`, the same
  in both versions);
- the budget: the first B reports in simulated time (Syne Tune's Tuner hands results over in batches).

Imports: only modules both versions have, and this environment's standard library, numpy and pandas, so that
.venv-peers can import this file; version-specific classes are imported where they are used.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from typing import Any

import numpy as np
import pandas as pd
from syne_tune import Tuner
from syne_tune.backend.simulator_backend.simulator_callback import SimulatorCallback
from syne_tune.backend.simulator_backend.time_keeper import SimulatedTimeKeeper
from syne_tune.blackbox_repository.blackbox_tabular import BlackboxTabular
from syne_tune.blackbox_repository.simulated_tabular_backend import UserBlackboxBackend
from syne_tune.config_space import choice, randint
from syne_tune.tuner_callback import TunerCallback
from trials import Curves, Problem, Run, native, trial_length, tuning_values

logging.getLogger("syne_tune").setLevel(logging.ERROR)  # its start-up banner and per-trial lines, once per replay
ELAPSED, EPOCH = "elapsed_s", "epoch"
POLL_S = 0.1  # simulated seconds between two looks of the Tuner at its trials (Syne Tune default 5 s)


class Clock(SimulatedTimeKeeper):
    """Simulated time that only the simulator advances: the scheduler's own compute takes none."""

    def real_time_since_last_recent_exit(self) -> float:
        return 0.0


def _zero_decision_time(backend: UserBlackboxBackend) -> None:
    """The one private name used (syne-tune 0.16.0 and 0.14.2, tests/test_peers.py checks both): the backend's time
    keeper."""
    assert isinstance(backend._time_keeper, SimulatedTimeKeeper)
    backend._time_keeper = Clock()


class Backend(UserBlackboxBackend):
    """A blackbox backend whose configs report what the project's trainable would report (see the module)."""

    def __init__(self, p: Problem, curves: Curves, blackbox: BlackboxTabular):
        super().__init__(blackbox=blackbox, elapsed_time_attr=ELAPSED, tuner_sleep_time=POLL_S)
        self.p, self.curves = p, curves
        _zero_decision_time(self)

    def config_objectives(self, config: dict[str, Any], seed: int) -> list[dict]:
        curve = self.curves[tuple(config[k] for k in self.p.space)]
        values, elapsed = tuning_values(curve, self.p.mode), np.cumsum([e.seconds for e in curve])
        return [{self.p.metric: values[i], ELAPSED: float(elapsed[i]), EPOCH: i + 1}
                for i in range(trial_length(curve, self.p))]  # fmt: skip


class Record(TunerCallback):
    """Every result the scheduler sees: (simulated time, trial id, grid values, epoch)."""

    def __init__(self, keys: list[str]):
        self.keys, self.rows = keys, []

    def on_trial_result(self, trial: Any, status: str, result: dict[str, Any], decision: str) -> None:
        key = tuple(native(trial.config[k]) for k in self.keys)
        self.rows.append((result["st_tuner_time"], trial.trial_id, key, int(result[EPOCH])))


def blackbox(p: Problem, curves: Curves) -> BlackboxTabular:
    """The space and fidelities as Syne Tune declares them (the values come from `Backend.config_objectives`)."""
    space = {k: choice(list(v)) for k, v in p.space.items()}
    hps = pd.DataFrame([dict(zip(p.space, key)) for key in curves])
    zeros = np.zeros((len(curves), 1, p.max_epochs, 2))
    return BlackboxTabular(hps, space, {EPOCH: randint(1, p.max_epochs)}, zeros, objectives_names=[p.metric, ELAPSED])


def scheduler(spec: dict[str, Any], space: dict[str, Any], p: Problem, seed: int) -> Any:
    name = spec["scheduler"]
    if spec.get("legacy"):  # syne-tune 0.14.2
        from syne_tune.optimizer import legacy_baselines

        fidelity = {"max_resource_level" if name == "DEHB" else "max_t": p.max_epochs}
        if name == "HyperTune":  # its default, 1 bracket, would leave out its learned bracket distribution
            fidelity["brackets"] = p.max_epochs  # Syne Tune caps it at the number of rung levels + 1
        return getattr(legacy_baselines, name)(space, metric=p.metric, resource_attr=EPOCH, mode=p.mode,
                                               random_seed=seed, points_to_evaluate=p.points, **fidelity)  # fmt: skip
    from syne_tune.optimizer import baselines
    from syne_tune.optimizer.schedulers.asha import AsynchronousSuccessiveHalving
    from syne_tune.optimizer.schedulers.searchers.multi_fidelity_searcher import IndependentMultiFidelitySearcher

    common = {"metric": p.metric, "do_minimize": p.mode == "min", "random_seed": seed}
    rungs = {"time_attr": EPOCH, "max_t": p.max_epochs, **common}
    if name == "kde per rung":  # a model per epoch, as Falkner et al.'s BOHB (Syne Tune's IndependentMultiFidelity)
        searcher = IndependentMultiFidelitySearcher(space, "kde", points_to_evaluate=p.points, random_seed=seed)
        return AsynchronousSuccessiveHalving(space, searcher=searcher, **rungs)
    return getattr(baselines, name)(space, points_to_evaluate=p.points, **rungs)


def run(spec: dict[str, Any], p: Problem, curves: Curves, seed: int, slots: int) -> Run:
    bb = blackbox(p, curves)
    np.random.seed(seed)  # ASHA draws brackets, the tabular backend its blackbox seeds, from numpy's global generator
    record = Record(list(p.space))
    folder, before = tempfile.mkdtemp(prefix="synetune_"), os.environ.get("SYNETUNE_FOLDER")
    os.environ["SYNETUNE_FOLDER"] = folder  # Syne Tune writes its results and metadata there
    try:
        tuner = Tuner(
            trial_backend=Backend(p, curves, bb),
            scheduler=scheduler(spec, bb.configuration_space, p, seed),
            stop_criterion=lambda status: len(record.rows) >= p.budget,
            n_workers=slots,
            sleep_time=0,
            callbacks=[SimulatorCallback(), record],
            save_tuner=False,
            tuner_name="replay",
        )
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its progress table and banners; statsmodels' KDE warnings
            tuner.run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if before is None:
            del os.environ["SYNETUNE_FOLDER"]
        else:
            os.environ["SYNETUNE_FOLDER"] = before
    if len(record.rows) < p.budget:  # its searchers propose no config twice: a small space can run out
        raise RuntimeError(f"Syne Tune {spec['scheduler']} ended after {len(record.rows)} of {p.budget} reports")
    rows = sorted(record.rows, key=lambda r: (r[0], r[1]))[: p.budget]
    started = sorted({r[1]: r[2] for r in record.rows}.items())
    numbers = {trial_id: i for i, (trial_id, _) in enumerate(started)}
    return [(numbers[t], key, epoch) for _, t, key, epoch in rows], [key for _, key in started]
