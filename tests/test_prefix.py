"""The frozen-prefix cache (lorahpo.prefix): the cached path gives the full model's logits within float noise (float32,
bfloat16, and float32 rounded otherwise), trains to the same metrics, resumes exactly, builds the same bits every
time, is placed or refused before anything runs, and a wrong cache fails the sweep."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lorahpo.prefix
from lorahpo.config import ExperimentConfig, apply_overrides
from lorahpo.data import LengthGroupedBatches, TaskData, make_loader, pad_states
from lorahpo.errors import UserError
from lorahpo.model import build_base, frozen_states
from lorahpo.prefix import (
    PrefixCache,
    PrefixPlan,
    build_in_memory,
    cut_for,
    last_n_values,
    noise_rtol,
    place,
    plan_prefix,
    split_states,
)
from lorahpo.repro import seed_everything_everywhere
from lorahpo.sources import DTYPES, load_model_config
from lorahpo.sweep import cache_check
from lorahpo.trainable import CKPT_NAME, build_module, fit

from .conftest import Crash, cli, crash_after, hooked, tiny_args, tiny_config

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


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float32 from float64 kernels"])
def states(request: pytest.FixtureRequest, tiny_data: TaskData) -> tuple[str, ExperimentConfig, PrefixCache]:
    """States at every layer input in float32, in bfloat16 (the frozen base in bf16, as trials run it), and in float32
    from frozen layers run in float64: the same sums rounded otherwise, as another CPU's kernels round them (run this
    way, the old fixed atol=1e-5 failed at last_n=3, cut=1 with 2.1e-5, the pattern an Intel Xeon showed)."""
    cfg = tiny_config(**{"model.dtype": request.param.split()[0]})
    with pytest.MonkeyPatch.context() as mp:
        if "float64" in request.param:  # test-only: the build's model in float64 (its states are stored as float32)
            mp.setattr(lorahpo.prefix, "build_base", lambda *a: build_base(*a).double())
        return request.param, cfg, build_in_memory(cfg, tiny_data, _plan(cfg, tiny_data, tuple(range(LAYERS))))


def _cached_and_full(module: torch.nn.Module, cache: PrefixCache, data: TaskData, cut: int, states_of: int) -> tuple:
    """Val logits in split order through the cached path (entering layer `cut` with the states of cut `states_of`)
    and through the full model, on the same padded batches."""
    split = data.val
    module.cut = cut
    loader = make_loader(split, data.tokenizer, 16, 0, False, split_states(cache, states_of, "val", split))
    logits, full, order = [], [], []
    for idx, batch in zip(loader.batch_sampler, loader):
        assert batch["states"].shape[:2] == batch["input_ids"].shape
        logits.append(module(batch))
        full.append(module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float())
        order += idx
    return torch.cat(logits)[np.argsort(order)], torch.cat(full)[np.argsort(order)]


def test_cached_logits_equal_full_model_for_every_last_n_and_cut(tiny_data: TaskData, states: tuple) -> None:
    """Per example, padded batches of cached states through the upper layers give the logits the full model gives the
    same padded batch (and, in float32, the example alone: padding moves logits by float noise too), within float
    noise: the rule of lorahpo.prefix.noise_rtol for the dtype and the depth, relative to the largest logit (the
    summary's cache check uses the same rule), for last_n 1..L and every cut at or below the lowest LoRA layer (the
    lowest-cut fallback runs the frozen layers in between). The states of the cut below are far outside it: the
    tolerance can fail."""
    case, cfg, cache = states
    split = tiny_data.val
    assert len({len(t) for t in split.input_ids}) > 10  # batches really are padded
    rtol = noise_rtol(cfg.model.dtype, LAYERS)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.model.dtype == "bfloat16")  # as trials run
    for last_n in range(1, LAYERS + 1):
        module = build_module(apply_overrides(cfg, {"lora.last_n": last_n}), tiny_data)
        with torch.no_grad():  # a trained-looking adapter and head: LoRA must change the logits the test compares
            for p in module.model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.2)
        module.eval()
        with torch.no_grad(), autocast:
            for cut in range(LAYERS - last_n + 1):
                cached, full = _cached_and_full(module, cache, tiny_data, cut, cut)
                atol = rtol * full.abs().max().item()
                torch.testing.assert_close(cached, full, rtol=0, atol=atol, msg=f"last_n={last_n} cut={cut}")
            assert (full[:, 1] - full[:, 0]).std() > 0.01  # not a constant the comparison would pass trivially
            if case == "float32":
                alone = torch.cat([module.model(input_ids=torch.tensor([t])).logits for t in split.input_ids])
                torch.testing.assert_close(cached, alone, rtol=0, atol=atol, msg=f"last_n={last_n} alone")
            if last_n == 1:  # the states of cut 2 entering layer 3: far outside the tolerance
                wrong, _ = _cached_and_full(module, cache, tiny_data, LAYERS - 1, LAYERS - 2)
                assert (wrong - full).abs().max() > 10 * atol


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_states_are_the_frozen_layers_outputs_bit_for_bit(dtype: str, tiny_data: TaskData) -> None:
    """float16 trains only on a GPU (refused on a CPU), so its states are checked here, where the build runs on a CPU
    too: each example's stored states are, bit for bit and in the model's dtype, what the frozen layers give its build
    batch, and a trial's padded batch of them holds zeros at the pads."""
    cfg = tiny_config(**{"model.dtype": dtype})
    cache = build_in_memory(cfg, tiny_data, _plan(cfg, tiny_data, (1, 3)))
    split = tiny_data.val
    lengths = [len(t) for t in split.input_ids]
    idx = next(iter(LengthGroupedBatches(lengths, cfg.train.eval_batch_size, cfg.seed, shuffle=False)))
    batch = tiny_data.tokenizer.pad({"input_ids": [split.input_ids[i] for i in idx]}, return_tensors="pt")
    seed_everything_everywhere(cfg.seed)
    model = build_base(cfg.model, tiny_data.num_labels, tiny_data.tokenizer.pad_token_id).eval()
    with torch.autocast("cpu", dtype=DTYPES[dtype]):
        expected = frozen_states(model, batch["input_ids"], batch["attention_mask"], [1, 3])
    real = batch["attention_mask"].bool()
    assert (~real).any()  # the batch is padded
    for c in (1, 3):
        stored = pad_states([split_states(cache, c, "val", split)[i] for i in idx], real.shape[1])
        assert stored.dtype == expected[c].dtype == DTYPES[dtype]
        assert torch.equal(stored[real], expected[c][real]) and not stored[~real].any()


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
    """The losses agree within float noise (noise_rtol); accuracy within one prediction (float noise on another CPU
    may flip a near-tie), and with equal accuracy (no flip) so do the F-scores."""
    cfg, _, cached = cached_run
    full = _rows(cfg, tiny_data)
    assert [r["prefix_cut"] for r in cached] == [2, 2, 2] and [r["prefix_cut"] for r in full] == [None] * 3
    for a, b in zip(full, cached):
        assert a["epoch"] == b["epoch"] and a["best_epoch"] == b["best_epoch"]
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1.01 / len(tiny_data.val))
        for k in ("val_f1", "val_fbeta"):
            assert a["val_accuracy"] != b["val_accuracy"] or a[k] == pytest.approx(b[k], abs=1e-6), k
        for k in ("val_loss", "train_loss"):
            assert a[k] == pytest.approx(b[k], rel=noise_rtol(cfg.model.dtype, LAYERS)), k
    assert full[-1]["train_loss"] < full[0]["train_loss"]  # it trained: the comparison is not of two untrained models


def test_resume_with_cache_is_bit_identical(tmp_path: Path, tiny_data: TaskData, cached_run: tuple) -> None:
    cfg, cache, uninterrupted = cached_run

    with pytest.raises(Crash):
        fit(cfg, tiny_data, crash_after(2, tmp_path / "ckpt"), prefix=cache)
    resumed = _rows(cfg, tiny_data, resume_from=tmp_path / "ckpt" / CKPT_NAME, prefix=cache)
    assert resumed == uninterrupted[2:]  # exact float equality, every metric


def test_place_keeps_every_cut_where_the_store_holds_them() -> None:
    """configs/llama32_3b*.yaml at the baseline: 24 cuts of 28 layers, 121,000 tokens x 3072 in bf16 (17.8 GB): every
    cut in a 20 GB share of the object store; in a 4.5 GB share, the lowest cut alone (from which a trial at cut 14
    recomputes 13 frozen layers in every epoch); the plan says what it chose and why."""
    cuts = tuple(range(1, 25))
    plan = PrefixPlan(28, cuts, cuts, {"train": 100_000, "val": 21_000}, 3072, "bfloat16")
    assert place(plan, 20e9, None).cuts == cuts
    placed = place(plan, 4.5e9, None)
    assert placed.cuts == (1,)
    assert placed.why == (
        "the lowest cut (0.743 GB of 17.8): the first that fits of every wanted cut, else the lowest cut alone, in "
        "Ray's object store (4.5 GB usable in Ray's object store; sweep.prefix_cache_max_gb=None)"
    )


def test_place_prefers_every_cut_then_the_lowest_within_the_cap() -> None:
    plan = PrefixPlan(4, (1, 2, 3), (1, 2, 3), {"train": 700, "val": 150, "test": 150}, 100, "bfloat16")
    one = plan.nbytes((1,))
    assert one == 1000 * 100 * 2
    assert place(plan, 3 * one, None).cuts == (1, 2, 3)
    assert place(plan, 3 * one - 1, None).cuts == place(plan, one, None).cuts == (1,)
    assert place(plan, 3 * one, 1.5 * one / 1e9).cuts == (1,)  # the cap bounds it
    assert place(plan, 2 * one, None).why.startswith("the lowest cut (0.0002 GB of")
    with pytest.raises(UserError) as err:
        place(plan, one - 1, None)
    assert str(err.value) == (
        "the prefix cache needs 0.0002 GB (1,000 tokens x 100 x bfloat16, the inputs of layer 1), more than a node "
        "has (0.0002 GB usable in Ray's object store; sweep.prefix_cache_max_gb=None); give Ray a larger object store "
        "(ray start --object-store-memory), set sweep.prefix_cache=false, or lower data.max_examples or "
        "data.max_length"
    )
    with pytest.raises(UserError, match=r"more than sweep.prefix_cache_max_gb=1e-06; raise it, set"):
        place(plan, 9 * one, 1e-6)


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


def test_a_base_with_attention_dropout_is_refused(tiny_cfg: ExperimentConfig, tiny_data: TaskData) -> None:
    """The cache is built in eval mode: under a base with attention dropout, a trial's frozen layers would run without
    the dropout the full model trains with. One line before anything runs (sweep.prepare plans the cache)."""
    model_config = load_model_config(tiny_cfg.model)
    model_config.attention_dropout = 0.1
    with pytest.raises(UserError) as err:
        plan_prefix(tiny_cfg, model_config, tiny_data)
    assert str(err.value) == (
        "model tiny-random-llama has attention_dropout=0.1: the prefix cache runs the frozen layers once without "
        "dropout, which training with dropout does not; set sweep.prefix_cache=false"
    )
    assert plan_prefix(apply_overrides(tiny_cfg, {"sweep.prefix_cache": False}), model_config, tiny_data) is None


def test_cache_check_fails_beyond_float_noise_of_the_dtype_and_depth() -> None:
    """The summary's check: the best checkpoint's val loss through the full model against its trial's cached report,
    within noise_rtol (times the loss when above 1); beyond it an error naming both values and the tolerance. A flipped
    near-tie (accuracy one example apart) is noise, not an error."""
    full = {"accuracy": 0.9, "f1": 0.8, "fbeta": 0.85, "loss": 0.5}

    def check(loss: float, dtype: str = "float32", accuracy: float = 0.9, full: dict = full) -> dict:
        cached = {"val_accuracy": accuracy, "val_f1": 0.8, "val_fbeta": 0.85, "val_loss": loss, "prefix_cut": 2}
        return cache_check(cached, full, {"dtype": dtype, "layers": 4})

    f32 = noise_rtol("float32", 4)
    assert f32 == pytest.approx(1.23e-4, rel=1e-3) and noise_rtol("bfloat16", 4) == pytest.approx(0.0626, rel=1e-3)
    assert check(0.5 + 0.9 * f32)["passed"] and check(0.5, accuracy=0.9 + 1 / 60)["passed"]
    assert check(0.5 + 0.05, "bfloat16")["passed"] and not check(0.5 + 0.05)["passed"]
    assert check(2.0 + 1.5 * f32, full={**full, "loss": 2.0})["passed"]  # relative above 1
    failed = check(0.5 + 1.1 * f32)
    assert not failed["passed"] and failed["loss_tolerance"] == f32
    assert failed["error"] == (
        "prefix cache check: the best checkpoint's val loss is 0.500000 through the full model but 0.500135 from the "
        "cached states (cut 2), beyond float noise (float32, 4 layers: tolerance 0.00012): its trials trained on wrong "
        "states. The results are written; run again with --overwrite (or sweep.prefix_cache=false)"
    )


@pytest.mark.slow
def test_a_wrong_cache_fails_the_sweep_after_its_results_are_written(tmp_path: Path) -> None:
    """A cache whose states are wrong (every token's states moved to the next token: the size and the layout of the
    right ones; tests/worker_hooks' LORAHPO_TEST_WRONG_PREFIX) is what the trial trains on, and the summary's check
    ends the sweep with exit 1 and one line naming both losses and the tolerance, after the results are written."""
    overrides = {"sweep.num_samples": 1, "train.max_epochs": 1, "data.max_examples": 200, "sweep.name": "wrong"}
    run = cli(tiny_args(tmp_path / "store", **overrides), env=hooked(LORAHPO_TEST_WRONG_PREFIX="1"))
    assert run.returncode == 1, run.stderr[-3000:]
    exp = tmp_path / "store" / "wrong"
    check = json.loads((exp / "summary.json").read_text())["prefix_cache"]
    assert check["best_trial_cut"] == 2 and not check["passed"]
    assert run.stderr.strip().splitlines()[-1] == f"failed: {check['error']}"
    full, cached = check["val_full_model"]["loss"], check["val_cached"]["loss"]
    assert (
        f"val loss is {full:.6f} through the full model but {cached:.6f} from the cached states (cut 2)"
        in (check["error"])
    )
    assert "(float32, 4 layers: tolerance 0.00012)" in check["error"] and abs(full - cached) > 0.00012
    assert (exp / "results.parquet").is_file() and (exp / "best" / "best_config.yaml").is_file()
    assert "Traceback" not in run.stderr
