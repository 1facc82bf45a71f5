from pathlib import Path

import pytest
import yaml

from lorahpo.config import (
    ExperimentConfig,
    apply_overrides,
    dump_config,
    flatten,
    load_config,
    parse_overrides,
    to_dict,
)
from lorahpo.errors import UserError
from lorahpo.schema import valid_keys

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.search, "every shipped config declares a search space"


@pytest.mark.parametrize("path", [*CONFIGS, *(ROOT / "bench").glob("*.yaml")], ids=lambda p: p.name)
def test_every_shipped_config_lists_every_key(path: Path) -> None:
    """The README promises it: a user reads every knob, with its comment, in the file they run."""
    listed = set(flatten({k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "search"}))
    assert sorted(set(valid_keys(ExperimentConfig)) - {"search"} - listed) == []


def test_shipped_configs_present() -> None:
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "llama32_3b.yaml", "seed_space.yaml"} <= names


def test_overrides_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "train.lr=1e-4",
            "lora.r=16",
            "data.split=[0.7,0.3,0]",
            "model.num_layers=null",
            "lora.target_modules=q_proj,v_proj",
            "sweep.gpus_per_trial=0.5",
        ],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.lora.r == 16
    assert cfg.data.split == (0.7, 0.3, 0.0)
    assert cfg.model.num_layers is None
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.sweep.gpus_per_trial == 0.5
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert apply_overrides(cfg, {}) == cfg
    assert to_dict(apply_overrides(cfg, {"train.lr": 1e-4})) == to_dict(cfg)


def test_yaml_exponent_without_dot_is_a_float() -> None:
    # PyYAML reads `1e-4` as a string; the config must not.
    assert parse_overrides(["train.lr=1e-4"]) == {"train.lr": "1e-4"}
    assert load_config(None, ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)


def test_unknown_key_names_nearest() -> None:
    with pytest.raises(
        UserError,
        match=r"unknown config key 'train.learning_rat'.*did you mean 'train.lr'|"
        r"unknown config key 'train.learning_rat'",
    ):
        load_config(None, ["train.learning_rat=1"])
    with pytest.raises(UserError, match=r"unknown config key 'lora.rr': did you mean 'lora.r'\?"):
        load_config(None, ["lora.rr=4"])
    with pytest.raises(UserError, match=r"unknown config key 'sweep.num_sample': did you mean 'sweep.num_samples'\?"):
        load_config(None, ["sweep.num_sample=4"])


def test_wrong_type_is_named() -> None:
    with pytest.raises(UserError, match=r"lora.r='abc' must be an integer"):
        load_config(None, ["lora.r=abc"])
    with pytest.raises(
        UserError, match=r"sweep.scheduler='hyperband' is not allowed; choose one of \['asha', 'fifo'\]"
    ):
        load_config(None, ["sweep.scheduler=hyperband"])


def test_frozen() -> None:
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_points_to_evaluate_must_lie_in_the_search_space() -> None:
    """A deterministic sweep tells each batch's sampler the earlier trials as trials of the space."""
    with pytest.raises(UserError, match=r"sweep.points_to_evaluate\[0\].train.lr=0.5 is outside the search space"):
        load_config(None, ["sweep.points_to_evaluate=[{train.lr: 0.5}]"])
    with pytest.raises(UserError, match=r"points_to_evaluate\[1\].lora.r=5 is outside .*one of \[4, 8, 16\]"):
        load_config(None, ["sweep.points_to_evaluate=[{lora.r: 8}, {lora.r: 5}]"])
    assert load_config(None, ["sweep.points_to_evaluate=[{lora.last_n: 4, train.lr: 5.0e-3}]"])
