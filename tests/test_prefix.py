"""The frozen-prefix cache (lorahpo.prefix): the cached path gives the full model's logits, trains to the same metrics,
resumes exactly, builds the same bits every time (memory or disk), and is placed or refused before anything runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from lorahpo.config import ExperimentConfig, apply_overrides
from lorahpo.data import TaskData, make_loader
from lorahpo.errors import UserError
from lorahpo.prefix import (
    PrefixCache,
    PrefixPlan,
    build_in_memory,
    cut_for,
    ensure_on_disk,
    last_n_values,
    place,
    plan_prefix,
    split_states,
)
from lorahpo.sources import load_model_config
from lorahpo.trainable import CKPT_NAME, build_module, fit

from .conftest import Crash, cli, crash_after, tiny_args, tiny_config

LAYERS = 4  # tests/conftest.py's tiny model keeps 4 layers
TIMING = {"epoch_time_s"}


def _plan(cfg: ExperimentConfig, data: TaskData, cuts: tuple[int, ...]) -> PrefixPlan:
    plan = plan_prefix(cfg, load_model_config(cfg.model), data)
    return dataclasses.replace(plan, cuts=cuts, wanted=cuts)


@pytest.fixture(scope="module")
def every_cut(tiny_cfg: ExperimentConfig, tiny_data: TaskData) -> PrefixCache:
    """States at every layer input, 0 (the embeddings) to L-1."""
    return build_in_memory(tiny_cfg, tiny_data, _plan(tiny_cfg, tiny_data, tuple(range(LAYERS))))


def test_plan_asks_for_every_cut_of_the_space(tiny_cfg: ExperimentConfig, tiny_data: TaskData) -> None:
    assert last_n_values(tiny_cfg) == [1, 2, 3, 4]  # default.yaml: lora.last_n int 1..4
    plan = plan_prefix(tiny_cfg, load_model_config(tiny_cfg.model), tiny_data)
    assert plan.wanted == plan.cuts == (1, 2, 3)  # last_n = 4 has no frozen layer: no cut 0
    assert plan.tokens == {n: sum(map(len, getattr(tiny_data, n).input_ids)) for n in ("train", "val")}
    assert plan.nbytes() == 3 * sum(plan.tokens.values()) * 64 * 4
    assert plan_prefix(apply_overrides(tiny_cfg, {"sweep.prefix_cache": False}), None, tiny_data) is None


def test_cached_logits_equal_full_model_for_every_last_n_and_cut(
    tiny_cfg: ExperimentConfig, tiny_data: TaskData, every_cut: PrefixCache
) -> None:
    """Per example, padded batches of cached states through the upper layers give the logits the full model gives the
    same padded batch (within 1e-5) and the example alone (within 1e-4: padding alone moves fp32 logits ~1e-5), for
    last_n 1..L and every cut at or below the lowest LoRA layer (the lowest-cut fallback runs the
    frozen layers in between)."""
    split = tiny_data.val
    assert len({len(t) for t in split.input_ids}) > 10  # batches really are padded
    for last_n in range(1, LAYERS + 1):
        cfg = apply_overrides(tiny_cfg, {"lora.last_n": last_n})
        module = build_module(cfg, tiny_data)
        with torch.no_grad():  # a trained-looking adapter and head: LoRA must change the logits the test compares
            for p in module.model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.2)
        module.eval()
        with torch.no_grad():
            alone = torch.cat([module.model(input_ids=torch.tensor([t])).logits for t in split.input_ids])
            for cut in range(LAYERS - last_n + 1):
                module.cut = cut
                loader = make_loader(
                    split, tiny_data.tokenizer, 16, 0, False, split_states(every_cut, cut, "val", split)
                )
                logits, full, order = [], [], []
                for idx, batch in zip(loader.batch_sampler, loader):
                    assert batch["states"].shape[:2] == batch["input_ids"].shape
                    logits.append(module(batch))
                    full.append(
                        module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    )
                    order += idx
                cached, full = torch.cat(logits)[np.argsort(order)], torch.cat(full)[np.argsort(order)]
                # the cached path against the full model on the same padded batches: float noise only
                torch.testing.assert_close(cached, full, rtol=0, atol=1e-5, msg=f"last_n={last_n} cut={cut}")
                # and padding changes nothing but float noise (the full model's own batched-vs-alone difference)
                torch.testing.assert_close(cached, alone, rtol=0, atol=1e-4, msg=f"last_n={last_n} cut={cut}")
        assert (alone[:, 1] - alone[:, 0]).std() > 0.01  # not a constant the comparison would pass trivially


def test_cut_for_picks_the_highest_cut_below_the_lora_layers(every_cut: PrefixCache) -> None:
    lowest_only = dataclasses.replace(every_cut, plan=dataclasses.replace(every_cut.plan, cuts=(1,)))
    assert [cut_for(every_cut, k) for k in (1, 2, 3, 4)] == [3, 2, 1, 0]
    assert [cut_for(lowest_only, k) for k in (1, 2, 3, 4)] == [1, 1, 1, None]


@pytest.fixture(scope="module")
def cached_run(tiny_data: TaskData) -> tuple[ExperimentConfig, PrefixCache, list[dict]]:
    """An uninterrupted 3-epoch trial trained from the cache (LoRA dropout on: the masks must replay too)."""
    cfg = tiny_config(**{"train.max_epochs": 3, "train.patience": 5, "lora.dropout": 0.1, "lora.last_n": 2})
    cache = build_in_memory(cfg, tiny_data, plan_prefix(cfg, load_model_config(cfg.model), tiny_data))
    return cfg, cache, _rows(cfg, tiny_data, prefix=cache)


def _rows(cfg: ExperimentConfig, data: TaskData, **kw) -> list[dict]:
    rows: list[dict] = []
    fit(cfg, data, lambda r, d: rows.append({k: v for k, v in r.items() if k not in TIMING}), **kw)
    return rows


def test_trial_with_and_without_cache_ends_with_the_same_metrics(tiny_data: TaskData, cached_run: tuple) -> None:
    cfg, _, cached = cached_run
    full = _rows(cfg, tiny_data)
    assert [r["prefix_cut"] for r in cached] == [2, 2, 2] and [r["prefix_cut"] for r in full] == [None] * 3
    for a, b in zip(full, cached):
        assert a["epoch"] == b["epoch"] and a["best_epoch"] == b["best_epoch"]
        for k in ("val_accuracy", "val_f1", "val_fbeta"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
        for k in ("val_loss", "train_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), k
    assert full[-1]["train_loss"] < full[0]["train_loss"]  # it trained: the comparison is not of two untrained models


def test_resume_with_cache_is_bit_identical(tmp_path: Path, tiny_data: TaskData, cached_run: tuple) -> None:
    cfg, cache, uninterrupted = cached_run

    with pytest.raises(Crash):
        fit(cfg, tiny_data, crash_after(2, tmp_path / "ckpt"), prefix=cache)
    resumed = _rows(cfg, tiny_data, resume_from=tmp_path / "ckpt" / CKPT_NAME, prefix=cache)
    assert resumed == uninterrupted[2:]  # exact float equality, every metric


def test_disk_cache_is_built_once_and_holds_the_memory_bits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_cfg: ExperimentConfig, tiny_data: TaskData
) -> None:
    monkeypatch.setenv("LORAHPO_CACHE", str(tmp_path))
    plan = dataclasses.replace(_plan(tiny_cfg, tiny_data, (1, 3)), where="disk")
    built = ensure_on_disk(tiny_cfg, tiny_data, plan)
    assert built.build_s > 0 and Path(built.directory).parent == tmp_path / "prefix"
    reused = ensure_on_disk(tiny_cfg, tiny_data, plan)
    assert reused.build_s == 0 and reused.directory == built.directory  # found, not rebuilt
    memory = build_in_memory(tiny_cfg, tiny_data, plan)
    assert reused.arrays.keys() == memory.arrays.keys()
    for key, values in memory.arrays.items():  # a deterministic build: the same bits, wherever it is stored
        assert isinstance(reused.arrays[key], np.memmap) and np.array_equal(reused.arrays[key], values), key
    on_disk = sum(f.stat().st_size for f in Path(built.directory).glob("*.npy"))
    assert plan.nbytes() <= on_disk < plan.nbytes() + 10_000


def test_place_prefers_every_cut_in_memory_then_lowest_then_disk() -> None:
    plan = PrefixPlan(4, (1, 2, 3), (1, 2, 3), {"train": 700, "val": 150, "test": 150}, 100, "bfloat16")
    one = plan.nbytes((1,))
    assert one == 1000 * 100 * 2
    d = Path("/scratch")
    assert place(plan, 3 * one, 0, None, d).cuts == (1, 2, 3)
    assert place(plan, 3 * one, 0, None, d).where == "memory"
    assert (place(plan, 2 * one, 9 * one, None, d).cuts, place(plan, 2 * one, 9 * one, None, d).where) == (
        (1,),
        "memory",
    )
    assert (place(plan, 0, 3 * one, None, d).cuts, place(plan, 0, 3 * one, None, d).where) == ((1, 2, 3), "disk")
    assert place(plan, 3 * one, 3 * one, 1.5 * one / 1e9, d).cuts == (1,)  # the cap bounds both
    with pytest.raises(UserError) as err:
        place(plan, one - 1, one - 1, None, d)
    assert str(err.value) == (
        "the prefix cache needs 0.0002 GB (1,000 tokens x 100 x bfloat16, the inputs of layer 1), more than a node "
        "has (0.0002 GB usable in Ray's object store, 0.0002 GB free at /scratch); free disk, set "
        "sweep.prefix_cache=false, or lower data.max_examples or data.max_length"
    )
    with pytest.raises(UserError, match=r"more than sweep.prefix_cache_max_gb=1e-06; raise it, set"):
        place(plan, 9 * one, 9 * one, 1e-6, d)


@pytest.mark.slow
def test_too_large_cache_is_one_line_exit_2_before_training(tmp_path: Path) -> None:
    run = cli(tiny_args(tmp_path, **{"sweep.prefix_cache_max_gb": 1e-5, "sweep.name": "big"}))
    assert run.returncode == 2, run.stderr[-2000:]
    err = run.stderr.strip().splitlines()
    assert err[-1].startswith("error: the prefix cache needs 0.00")
    assert err[-1].endswith(
        "more than sweep.prefix_cache_max_gb=1e-05; raise it, set sweep.prefix_cache=false, "
        "or lower data.max_examples or data.max_length"
    )
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "big").exists()  # nothing written, nothing trained
