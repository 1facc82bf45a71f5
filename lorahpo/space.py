"""The search space (YAML, keyed by dotted config path) as Optuna distributions: what the searcher samples from and
what the study records."""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna

from lorahpo.config import ExperimentConfig, ParamSpec


def distribution(spec: ParamSpec) -> optuna.distributions.BaseDistribution:
    if spec.type == "categorical":
        return optuna.distributions.CategoricalDistribution(list(spec.choices or ()))
    if spec.type == "int":
        return optuna.distributions.IntDistribution(int(spec.low), int(spec.high), log=spec.log)
    return optuna.distributions.FloatDistribution(float(spec.low), float(spec.high), log=spec.log)


def optuna_space(cfg: ExperimentConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    """Search space keyed by dotted config path (what each trial overrides)."""
    return {key: distribution(spec) for key, spec in cfg.search.items()}


def child_seed(seed: int, n: int) -> int:
    """A seed that is a fixed function of (seed, n), independent of its neighbours (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, n]).generate_state(1)[0])


def config_key(params: dict[str, Any]) -> tuple:
    """A trial's config as a hashable key: equal for equal configs."""
    return tuple(sorted(params.items()))


OWN_ASKS, RANDOM_ASKS = 10, 100
"""`ask_new`'s draws from the study's sampler, then from a seeded random sampler, before it repeats a config."""


def ask_new(
    study: optuna.Study, space: dict[str, optuna.distributions.BaseDistribution], seed: int
) -> optuna.trial.Trial:
    """Ask `study` for a config that none of its trials has (running or finished; a failed trial's may come again).
    Every trial trains with the root seed, so a repeat would reproduce an earlier trial's numbers and only spend epochs;
    yet on a space of choices TPE repeats its favourite often (docs/benchmarks.md, section 8d). A repeat is told
    FAILED, which the samplers ignore, and the sampler draws again; when TPE is sure of its favourite every draw is it,
    so after OWN_ASKS repeats a random sampler (seeded from `seed` and the trial count: reproducible) draws instead,
    as Ax falls back to Sobol on a duplicate. Only a space (nearly) tried out gets a repeat."""
    failed = optuna.trial.TrialState.FAIL
    trials = study.get_trials(deepcopy=False)
    tried = {config_key(t.params) for t in trials if t.state != failed}

    def draw(times: int) -> optuna.trial.Trial | None:
        for _ in range(times):
            trial = study.ask(fixed_distributions=space)
            if config_key(trial.params) not in tried:
                return trial
            study.tell(trial, state=failed)
        return None

    trial = draw(OWN_ASKS)
    if trial is None:
        own = study.sampler
        study.sampler = optuna.samplers.RandomSampler(seed=child_seed(seed, len(trials)))
        try:
            trial = draw(RANDOM_ASKS)
        finally:
            study.sampler = own
    return trial or study.ask(fixed_distributions=space)
