"""The search space (YAML, keyed by dotted config path) as Optuna distributions: what the searcher samples from and
what the study records."""

from __future__ import annotations

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
