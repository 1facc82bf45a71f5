"""Optuna's samplers and pruners as peers (bench/peers.py), through Optuna's ask/tell interface, driven in simulated
time by `trials.asktell`: the objective is Optuna's documented pattern, `trial.report(value, epoch)` after every epoch,
then `trial.should_prune()`; a pruned trial is told PRUNED, a finished one COMPLETE with its running best."""

from __future__ import annotations

from typing import Any

from trials import Curves, Problem, Run, asktell


def run(spec: dict[str, Any], p: Problem, curves: Curves, seed: int, slots: int) -> Run:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
               "gp": lambda: optuna.samplers.GPSampler(seed=seed)}[spec["sampler"]]()  # fmt: skip
    pruner = {"none": optuna.pruners.NopPruner,
              "sha": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=p.max_epochs)}[
        spec["pruner"]]()  # fmt: skip
    # a fixed name: HyperbandPruner assigns a trial's bracket from a hash of the study name and trial number
    study = optuna.create_study(study_name="replay", direction=f"{p.mode}imize", sampler=sampler, pruner=pruner)
    for point in p.points:
        study.enqueue_trial(point)
    dists = {k: optuna.distributions.CategoricalDistribution(v) for k, v in p.space.items()}

    def start() -> tuple[Any, tuple]:
        trial = study.ask(dists)
        return trial, tuple(trial.params[k] for k in p.space)

    def report(trial: Any, epoch: int, value: float, last: bool) -> bool:
        trial.report(value, epoch)
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return False
        if last:
            study.tell(trial, value)
        return True

    return asktell(start, report, curves, p, slots)
