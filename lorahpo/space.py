"""The search space (YAML, keyed by dotted config path) and how configs are drawn from it: Optuna distributions (what
the searchers sample from and the study records), the seeded sampler, `ask_new` (no config twice), and
`DistinctSearch`, the asynchronous sweep's searcher (the deterministic one is lorahpo.ordered's)."""

from __future__ import annotations

import logging
import pickle
from typing import Any

import numpy as np
import optuna
from ray.tune.search import Searcher

from lorahpo.config import ExperimentConfig, direction, tuning_metric
from lorahpo.schema import ParamSpec

log = logging.getLogger(__name__)


def distribution(spec: ParamSpec) -> optuna.distributions.BaseDistribution:
    if spec.type == "categorical":
        return optuna.distributions.CategoricalDistribution(list(spec.choices or ()))
    if spec.type == "int":
        return optuna.distributions.IntDistribution(int(spec.low), int(spec.high), log=spec.log)
    return optuna.distributions.FloatDistribution(float(spec.low), float(spec.high), log=spec.log)


def optuna_space(cfg: ExperimentConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    """Search space keyed by dotted config path (what each trial overrides)."""
    return {key: distribution(spec) for key, spec in cfg.search.items()}


def space_ends(spec: ParamSpec) -> list[Any]:
    """The values of a search-space entry that bound what a trial can draw: every choice, or both ends of a range."""
    if spec.type == "categorical":
        return list(spec.choices or ())
    cast = int if spec.type == "int" else float
    return [cast(spec.low), cast(spec.high)]


def last_n_values(cfg: ExperimentConfig) -> list[int]:
    """Every `lora.last_n` a trial of this sweep can run with: the config's, or the search space's values."""
    spec = cfg.search.get("lora.last_n")
    if spec is None:
        return [cfg.lora.last_n]
    if spec.type == "categorical":
        return sorted({int(v) for v in spec.choices or ()})
    return list(range(int(np.ceil(spec.low)), int(np.floor(spec.high)) + 1))


def make_sampler(cfg: ExperimentConfig, seed: int) -> optuna.samplers.BaseSampler:
    """`sweep.searcher`'s sampler, seeded: TPE (random for its first `sweep.n_startup_trials` trials) or random."""
    if cfg.sweep.searcher == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.sweep.n_startup_trials)
    return optuna.samplers.RandomSampler(seed=seed)


def child_seed(seed: int, n: int) -> int:
    """A seed that is a fixed function of (seed, n), independent of its neighbours (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, n]).generate_state(1)[0])


def config_key(params: dict[str, Any]) -> tuple:
    """A trial's config as a hashable key: equal for equal configs."""
    return tuple(sorted(params.items()))


OWN_ASKS, RANDOM_ASKS = 100, 100
"""`ask_new`'s draws from the study's sampler, then from a seeded random sampler, before it repeats a config. Once
TPE has been told a few dozen trials its favourites are often tried already, and its later draws are still its ranking
of the untried configs, better than a random one (docs/benchmarks.md, section 8h; it was 10)."""


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


class DistinctSearch(Searcher):
    """The asynchronous sweep's searcher: one Optuna study with the seeded sampler, asked for each new trial through
    `ask_new` (no config an earlier trial has) and told each result as it arrives, as Ray's OptunaSearch does (the
    same study, asks and tells, so the same configs from the same seed): the running best per epoch as an
    intermediate value, the last one as the trial's value (FAIL for an error, PRUNED for no value); the
    `sweep.points_to_evaluate` first."""

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(metric=tuning_metric(cfg), mode=cfg.train.mode)
        self.space, self.seed = optuna_space(cfg), cfg.seed
        self.study = optuna.create_study(
            sampler=make_sampler(cfg, cfg.seed), pruner=optuna.pruners.NopPruner(), direction=direction(cfg)
        )
        for point in cfg.sweep.points_to_evaluate:
            self.study.enqueue_trial(dict(point))  # a partial point: the sampler fills in the rest
        self.trials: dict[str, optuna.trial.Trial] = {}
        self.completed: set[str] = set()

    def suggest(self, trial_id: str) -> dict[str, Any]:
        if trial_id not in self.trials:
            self.trials[trial_id] = ask_new(self.study, self.space, self.seed)
        return self.trials[trial_id].params

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id not in self.completed:
            self.trials[trial_id].report(result[self.metric], result["training_iteration"])

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self.completed:
            return
        value = result.get(self.metric) if result else None
        states = optuna.trial.TrialState
        state = states.COMPLETE if value is not None else states.FAIL if error else states.PRUNED
        try:
            self.study.tell(self.trials[trial_id], value, state=state)
        except Exception as e:  # as OptunaSearch: a value Optuna refuses is said, not raised mid-sweep
            log.warning("the searcher was not told %s: %s", trial_id, e)
        self.completed.add(trial_id)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
