from pathlib import Path

import pytest
import yaml

from lorahpo.config import (
    ExperimentConfig,
    apply_overrides,
    config_yaml,
    load_config,
    parse_overrides,
    to_dict,
)
from lorahpo.errors import UserError
from lorahpo.schema import flatten, valid_keys

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
    (tmp_path / "c.yaml").write_text(config_yaml(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg
    assert apply_overrides(cfg, {}) == cfg
    assert to_dict(apply_overrides(cfg, {"train.lr": 1e-4})) == to_dict(cfg)


def test_yaml_exponent_without_dot_is_a_float() -> None:
    # PyYAML reads `1e-4` as a string; the config must not.
    assert parse_overrides(["train.lr=1e-4"]) == {"train.lr": "1e-4"}
    assert load_config(None, ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)


def test_unknown_key_names_nearest() -> None:
    """The exact message: the nearest key by spelling (difflib), or every valid key when none is near."""
    cases = {
        "train.learning_rat=1": "unknown config key 'train.learning_rat': did you mean 'train.warmup_ratio'?",
        "lora.rr=4": "unknown config key 'lora.rr': did you mean 'lora.r'?",
        "sweep.num_sample=4": "unknown config key 'sweep.num_sample': did you mean 'sweep.num_samples'?",
    }
    for override, message in cases.items():
        with pytest.raises(UserError) as e:
            load_config(None, [override])
        assert str(e.value) == message
    with pytest.raises(UserError) as e:
        load_config(None, ["zzzzzzzz=1"])
    assert str(e.value).startswith("unknown config key 'zzzzzzzz': valid keys: seed, data.path, ")


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
