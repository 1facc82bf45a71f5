"""The final evaluation's pieces without training: the metrics from predictions (against torchmetrics), the bootstrap
interval on synthetic data whose answer is known, the paired gain and its coverage on simulated seeds and test sets,
the seeds, the plan, what a pair of runs shares, and the summary block; and the per-example predictions of the one
evaluation routine, in split order."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from lorahpo.checks import check_finished, check_same_config
from lorahpo.config import ExperimentConfig, apply_overrides, config_yaml
from lorahpo.data import TaskData, make_loader
from lorahpo.errors import UserError
from lorahpo.final import final_block, final_seeds, make_plan
from lorahpo.module import evaluate, make_metrics, score_split
from lorahpo.plots import write_final_plot
from lorahpo.stats import (
    CONFIDENCE,
    GAIN_METHOD,
    TEST_METRICS,
    bootstrap_ci,
    gain_test_variance,
    metrics,
    paired_gain,
    spread,
)
from lorahpo.summary import print_summary, summary_markdown
from lorahpo.trainable import build_module

from .conftest import tiny_config

METRICS = ["test_accuracy", "test_f1", "test_fbeta"]


def metric(name: str, preds: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    """One metric of TEST_METRICS over all examples."""
    return float(metrics(preds, labels, num_labels)[TEST_METRICS.index(name)])


def no_nan(obj: object) -> object:
    """JSON as summary.json holds it, refusing NaN and infinity."""
    return json.loads(json.dumps(obj, allow_nan=False))


@pytest.mark.parametrize("num_labels", [2, 3])
def test_metrics_from_predictions_equal_torchmetrics(num_labels: int) -> None:
    """The bootstrap's statistic is the metric the sweep reports: random cases, all-one-class predictions, a class
    that never occurs (left out of torchmetrics' macro average), a single example."""
    rng = np.random.default_rng(0)
    for case in range(60):
        n = int(rng.integers(1, 50))
        labels, preds = rng.integers(0, num_labels, n), rng.integers(0, num_labels, n)
        if case % 4 == 0:
            preds = np.zeros(n, dtype=int)
        if case % 5 == 0:
            labels = np.zeros(n, dtype=int)
        reference = make_metrics(num_labels)
        reference.update(torch.tensor(preds), torch.tensor(labels))
        for name, value in reference.compute().items():
            assert float(metric(name, preds, labels, num_labels)) == pytest.approx(value.item(), abs=1e-6), (case, name)


def test_bootstrap_interval_contains_the_estimate_and_shrinks_as_the_test_split_grows() -> None:
    """Exactly 90% of the predictions are right: accuracy is 0.9, and a 95% interval for a proportion is about
    0.9 +- 1.96 * sqrt(0.9 * 0.1 / n). The percentile interval contains 0.9, matches that width within 15%, and
    shrinks with n (about 1/sqrt(n)) for every metric."""
    widths: dict[str, list[float]] = {m: [] for m in METRICS}
    for n in (100, 400, 1600):
        labels = np.tile([0, 0, 0, 0, 1], n // 5)  # 20% positive
        preds = labels.copy()
        preds[: n // 10] = 1 - preds[: n // 10]  # 10% wrong, from both classes
        ci = bootstrap_ci(preds, labels, 2, seed=42)
        assert set(ci) == set(METRICS)
        for m in METRICS:
            estimate = float(metric(m.removeprefix("test_"), preds, labels, 2))
            assert ci[m][0] <= estimate <= ci[m][1], (n, m, ci[m], estimate)
            widths[m].append(ci[m][1] - ci[m][0])
        assert float(metric("accuracy", preds, labels, 2)) == pytest.approx(0.9)
        expected = 2 * scipy.stats.norm.ppf(0.5 + CONFIDENCE / 2) * math.sqrt(0.9 * 0.1 / n)
        assert widths["test_accuracy"][-1] == pytest.approx(expected, rel=0.15), n
    assert bootstrap_ci(preds[:100], labels[:100], 2, seed=42) != ci
    assert bootstrap_ci(preds, labels, 2, seed=42) == ci  # seeded: the same interval twice
    for m in METRICS:
        assert widths[m][0] > widths[m][1] > widths[m][2], (m, widths[m])


def test_bootstrap_of_a_perfect_classifier_is_a_point_not_nan() -> None:
    labels = np.array([0, 1] * 30)
    assert bootstrap_ci(labels, labels, 2, seed=1) == {m: [1.0, 1.0] for m in METRICS}
    assert bootstrap_ci([1], [1], 2, seed=1) == {m: [1.0, 1.0] for m in METRICS}  # nothing to resample


def test_paired_gain_without_predictions_is_a_t_interval_or_no_interval_never_a_point() -> None:
    tuned, baseline = [0.91, 0.95, 0.92], [0.90, 0.91, 0.90]
    d = np.subtract(tuned, baseline)
    half = scipy.stats.t.ppf(0.975, df=2) * d.std(ddof=1) / math.sqrt(3)
    gain = paired_gain(tuned, baseline)
    assert gain["mean"] == pytest.approx(d.mean())
    assert gain["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert gain["values"] == pytest.approx(list(d)) and "note" not in gain
    # no spread to estimate and no test-set noise given: no interval and a note, never [d, d] (the old answer), NaN
    # (scipy's t interval) nor a precision warning (float noise: 0.9 - 0.8 != 0.8 - 0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t, b in (([0.75, 0.5], [0.5, 0.25]), ([0.9, 0.8], [0.8, 0.7]), ([0.9], [0.8])):
            gain = no_nan(paired_gain(t, b))
            assert gain["ci95"] is None and gain["mean"] == pytest.approx(0.25 if t[0] == 0.75 else 0.1), (t, b)
            assert gain["note"].startswith("the gain's interval cannot be estimated: the per-seed differences do not")
    # the test set's noise alone (k = 1, or equal differences): a normal interval of that variance
    z = scipy.stats.norm.ppf(0.975)
    assert paired_gain([0.9], [0.8], 0.0004)["ci95"] == pytest.approx([0.1 - z * 0.02, 0.1 + z * 0.02])
    assert paired_gain([0.9, 0.8], [0.8, 0.7], 0.0004)["ci95"] == pytest.approx([0.1 - z * 0.02, 0.1 + z * 0.02])
    assert spread([0.5]) == {"mean": 0.5, "std": 0.0, "values": [0.5]}
    assert spread([0.5, 0.7])["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))


def test_three_seeds_one_example_apart_give_an_interval_of_positive_width() -> None:
    """The case of the review: on 375 test examples each of three seeds' tuned run gets one example more right than
    its baseline run (+1/375 every seed). The seeds do not vary, but the test set does: the interval has the width of
    one example's worth of test noise and holds 0 (one example is no evidence), where a t interval over seeds alone
    gave the point [1/375, 1/375]."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 375)
    baseline = np.stack([np.where(rng.random(375) < 0.85, labels, 1 - labels) for _ in range(3)])
    tuned = baseline.copy()
    for i in range(3):  # seed i's tuned run fixes one of its baseline's errors, a different one per seed
        wrong = np.flatnonzero(baseline[i] != labels)[i]
        tuned[i, wrong] = labels[wrong]
    acc_t, acc_b = metrics(tuned, labels, 2)[0], metrics(baseline, labels, 2)[0]
    assert acc_t - acc_b == pytest.approx([1 / 375] * 3)
    variance = gain_test_variance(tuned, baseline, labels, 2, seed=42)
    assert no_nan(variance.tolist()) and (variance > 0).all()
    assert gain_test_variance(tuned, baseline, labels, 2, seed=42).tolist() == variance.tolist()  # seeded
    gain = paired_gain(acc_t, acc_b, float(variance[0]))
    low, high = gain["ci95"]
    assert gain["mean"] == pytest.approx(1 / 375) and low < 0 < 1 / 375 < high
    # three different examples, drawn about once each per resample: the mean of the differences has a bootstrap
    # variance near 3 x (1/375)^2 / 3^2, so the half-width is about 1.96 x (1/375) / sqrt(3)
    assert (high - low) / 2 == pytest.approx(1.96 / 375 / math.sqrt(3), rel=0.1)
    # the same examples predicted alike by both: no noise anywhere, no interval (not [0, 0])
    same = paired_gain([0.8] * 3, [0.8] * 3, float(gain_test_variance(tuned, tuned, labels, 2, seed=42)[0]))
    assert same["ci95"] is None and "neither do they over test resamples" in same["note"]


def simulate(rng: np.random.Generator, n: int, k: int, seed_sd: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fresh test set of n examples from a population, and k seeds' runs of two configs whose true accuracies are
    0.70 and 0.66: example x (difficulty u ~ U(0, 1)) is right iff u + noise < skill, skill = the config's accuracy +
    the seed's shift (sd `seed_sd`), noise per run and example (sd 0.01); E[accuracy] = the config's accuracy."""
    u, labels = rng.random(n), rng.integers(0, 2, n)
    runs = []
    for accuracy in (0.70, 0.66):
        right = u + rng.normal(0, 0.01, (k, n)) < accuracy + rng.normal(0, seed_sd, (k, 1))
        runs.append(np.where(right, labels, 1 - labels))
    return runs[0], runs[1], labels


@pytest.mark.parametrize(
    ("n", "k", "seed_sd", "seeds_only_max"),
    [(200, 3, 0.001, 0.85), (200, 3, 0.03, 1.0), (400, 1, 0.001, 0.0)],
    ids=["test-noise", "seed-noise", "one-seed"],
)
def test_gain_interval_covers_the_true_difference_95_percent_of_the_time(
    n: int, k: int, seed_sd: float, seeds_only_max: float
) -> None:
    """400 simulated evaluations (test set and seeds drawn anew; true accuracy difference 0.04): the interval covers
    it in 90-98% of them where the test set's noise dominates, where the seeds' does, and with one seed. A t interval
    over the seeds alone (the old method) covers it in at most 85% where the test set's noise dominates (about 72%
    here) and gives none with one seed."""
    rng = np.random.default_rng(2024)
    covered, covered_by_seeds = [], []
    for rep in range(400):
        tuned, baseline, labels = simulate(rng, n, k, seed_sd)
        acc_t, acc_b = metrics(tuned, labels, 2)[0], metrics(baseline, labels, 2)[0]
        variance = gain_test_variance(tuned, baseline, labels, 2, seed=rep, resamples=499)[0]
        for gain, hits in (
            (paired_gain(acc_t, acc_b, variance), covered),
            (paired_gain(acc_t, acc_b), covered_by_seeds),
        ):
            hits.append(gain["ci95"] is not None and gain["ci95"][0] <= 0.04 <= gain["ci95"][1])
    assert 0.90 <= np.mean(covered) <= 0.98, np.mean(covered)
    assert np.mean(covered_by_seeds) <= seeds_only_max, np.mean(covered_by_seeds)


def test_final_seeds_are_derived_distinct_and_avoid_the_sweeps_seeds() -> None:
    seeds = final_seeds(42, 4, {42})
    # pinned: SeedSequence(42, spawn_key=(stream, i)); another derivation would change every published final result
    assert seeds[:2] == [848205069, 1421210842]
    assert seeds == final_seeds(42, 4, {42}) and len(set(seeds)) == 4 and 42 not in seeds
    assert all(0 <= s < 2**31 for s in seeds)
    assert final_seeds(42, 2, {42}) == seeds[:2]  # run i's seed does not depend on k: k=3 extends k=2
    assert final_seeds(7, 4, {7}) != seeds
    assert final_seeds(42, 3, {42, seeds[0]}) == seeds[1:4]  # a seed a trial used is skipped


def plan_config(**overrides: object) -> ExperimentConfig:
    return tiny_config(**{"final.seeds": 2, **overrides})


def test_plan_pairs_the_seeds_and_never_duplicates_a_baseline_that_won() -> None:
    cfg = plan_config()
    point = dict(cfg.sweep.points_to_evaluate[0])
    best = {**point, "train.lr": 1e-3}
    plan = make_plan(cfg, best, {cfg.seed})
    seeds = final_seeds(cfg.seed, 2, {cfg.seed})
    assert plan["seeds"] == seeds and plan["experiment"] == "final_seeds2"
    assert plan["baseline"] == point and plan["baseline_source"] == "sweep.points_to_evaluate[0]"
    assert [(r["role"], r["index"], r["seed"]) for r in plan["runs"]] == [
        ("tuned", 0, seeds[0]),
        ("baseline", 0, seeds[0]),
        ("tuned", 1, seeds[1]),
        ("baseline", 1, seeds[1]),
    ]
    assert plan["runs"][0]["overrides"] == {**best, "seed": seeds[0]}
    assert apply_overrides(cfg, plan["runs"][1]["overrides"]).seed == seeds[0]

    # the best trial IS the baseline (6 and 6.0 are the same setting): its runs once, said in the plan
    same = {k: int(v) if isinstance(v, float) and v == int(v) else v for k, v in point.items()}
    plan = make_plan(cfg, same, {cfg.seed})
    assert plan["baseline_is_best"] and [r["role"] for r in plan["runs"]] == ["tuned", "tuned"]

    # no points_to_evaluate: the config's own values for the space's keys
    own = make_plan(plan_config(**{"sweep.points_to_evaluate": []}), best, {42})
    assert own["baseline"] == {  # configs/default.yaml's own values
        "train.lr": 2e-3,
        "train.weight_decay": 0.0,
        "lora.dropout": 0.05,
        "lora.r": 8,
        "lora.last_n": 2,
        "train.class_weight": 6.0,
    }
    assert own["baseline_source"] == "the config's own values"
    tuned_only = make_plan(plan_config(**{"final.baseline": False}), best, {42})
    assert tuned_only["experiment"] == "final_seeds2_tuned_only"
    assert [r["role"] for r in tuned_only["runs"]] == ["tuned", "tuned"] and tuned_only["baseline"] is None
    # a sweep given more trials (--extend): beside the earlier final runs, named by the sweep's size
    extended = make_plan(plan_config(**{"sweep.num_samples": 24}), best, {42}, extended=True)
    assert extended["experiment"] == "final_seeds2_trials24"


def test_a_pair_shares_the_draws_its_two_configs_make_alike(tiny_data: TaskData) -> None:
    """Tuned and baseline run i share seed i, yet only what the two configs draw alike is alike: the head's init
    always; the LoRA init while r and last_n are equal; the batches while the batch size is. What differs stays in
    the pair's difference (the README's pairing sentence)."""
    base = tiny_config(seed=848205069)

    def trained(**overrides: object) -> dict[str, torch.Tensor]:
        module = build_module(apply_overrides(base, overrides), tiny_data)
        return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}

    tuned, baseline = trained(**{"train.lr": 1e-3}), trained(**{"train.lr": 5e-3, "train.class_weight": 2.0})
    assert tuned.keys() == baseline.keys() and all(torch.equal(tuned[n], baseline[n]) for n in tuned)
    head = "base_model.model.score.modules_to_save.default.weight"
    for other in (trained(**{"lora.r": 4}), trained(**{"lora.last_n": 1}), trained(**{"lora.dropout": 0.3})):
        assert torch.equal(other[head], tuned[head])
    last_a = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"
    assert trained(**{"lora.r": 4})[last_a].shape != tuned[last_a].shape
    assert not torch.equal(trained(**{"lora.last_n": 1})[last_a], tuned[last_a])  # drawn first, not after layer 2
    assert all(torch.equal(v, tuned[n]) for n, v in trained(**{"lora.dropout": 0.3}).items())

    def batches(batch_size: int) -> list[list[int]]:
        loader = make_loader(tiny_data.train, tiny_data.tokenizer, batch_size, base.seed, True)
        return loader.batch_sampler.batches(0)

    assert batches(16) == batches(16) and batches(16) != batches(8)


def records(plan: dict, data: TaskData, wrong: dict[str, list[int]]) -> list[dict]:
    """Synthetic per-run records, as final.score_runs writes them: run (role, i) predicts every test example right but
    `wrong[role][i]` of them, from example i on, and its test metrics are those of these predictions."""
    labels = np.asarray(data.test.labels)
    out = []
    for run in plan["runs"]:
        preds = labels.copy()
        flipped = slice(run["index"], run["index"] + wrong[run["role"]][run["index"]])
        preds[flipped] = 1 - preds[flipped]
        values = metrics(preds, labels, 2)
        out.append(
            {
                **{k: run[k] for k in ("role", "index", "seed")},
                "epochs": 2,
                "best_val_fbeta": float(values[2]) + 0.01,
                **{m: float(v) for m, v in zip(METRICS, values)},
                "test_predictions": preds.tolist(),
            }
        )
    return out


def expected_gains(cfg: ExperimentConfig, data: TaskData, runs: list[dict]) -> dict[str, dict]:
    """The gain per metric, from the records alone: the per-seed differences and the test-set variance over the runs'
    predictions, seeded with the root seed."""
    by_role = {
        role: sorted((r for r in runs if r["role"] == role), key=lambda r: r["index"]) for role in ("tuned", "baseline")
    }
    preds = {role: [r["test_predictions"] for r in rs] for role, rs in by_role.items()}
    variance = gain_test_variance(preds["tuned"], preds["baseline"], data.test.labels, 2, cfg.seed)
    return {
        m: paired_gain([r[m] for r in by_role["tuned"]], [r[m] for r in by_role["baseline"]], float(v))
        for m, v in zip(METRICS, variance)
    }


def test_final_block_holds_the_contract_without_nan(tiny_data: TaskData) -> None:
    cfg = plan_config(**{"final.seeds": 3})
    best = {**cfg.sweep.points_to_evaluate[0], "train.lr": 1e-3}
    plan = make_plan(cfg, best, {42})
    runs = records(plan, tiny_data, {"tuned": [6, 4, 5], "baseline": [9, 6, 6]})  # of 60 test examples
    block = no_nan(final_block(cfg, plan, runs, tiny_data))
    for role in ("tuned", "baseline"):
        assert block[role]["seeds"] == plan["seeds"]
        for m in METRICS:
            assert set(block[role][m]) == {"mean", "std", "values"}
    assert block["tuned"]["test_accuracy"]["values"] == pytest.approx([0.9, 0.9333333, 0.9166667])
    assert block["gain"] == no_nan(expected_gains(cfg, tiny_data, runs))
    assert block["gain_method"] == GAIN_METHOD and "bootstrap resamples of the test examples" in GAIN_METHOD
    assert not block["baseline_is_best"] and block["notes"] == []
    assert final_block(cfg, plan, runs, tiny_data) == block  # seeded: the same block twice

    # every seed +1/60 (the review's zero-variance case): an interval of positive width around 1/60, not [d, d]
    runs = records(plan, tiny_data, {"tuned": [5, 5, 5], "baseline": [6, 6, 6]})
    block = no_nan(final_block(cfg, plan, runs, tiny_data))
    gain = block["gain"]["test_accuracy"]
    assert gain["values"] == pytest.approx([1 / 60] * 3)
    assert gain["ci95"][0] < 0 < 1 / 60 < gain["ci95"][1] and block["notes"] == []

    # the best config is the baseline: gain 0 with interval [0, 0], said in a note
    same = make_plan(cfg, dict(cfg.sweep.points_to_evaluate[0]), {42})
    block = no_nan(final_block(cfg, same, records(same, tiny_data, {"tuned": [6, 4, 5]}), tiny_data))
    assert block["baseline_is_best"] and block["baseline"]["test_fbeta"] == block["tuned"]["test_fbeta"]
    assert all(block["gain"][m] == {"mean": 0.0, "ci95": [0.0, 0.0], "values": [0.0] * 3} for m in METRICS)
    assert "the best config is the baseline" in block["notes"][0]

    # one seed: an interval of the test set's noise only, and a note that says so
    one = plan_config(**{"final.seeds": 1})
    plan = make_plan(one, best, {42})
    runs = records(plan, tiny_data, {"tuned": [6], "baseline": [12]})
    block = no_nan(final_block(one, plan, runs, tiny_data))
    assert block["gain"] == no_nan(expected_gains(one, tiny_data, runs))
    low, high = block["gain"]["test_accuracy"]["ci95"]
    assert low < 0.1 < high and high - low > 0.02
    assert block["notes"] == ["final.seeds=1: the gain's interval holds test-set noise only; seed noise needs k >= 2"]

    # two configs whose runs predict every example alike: no noise to estimate, no interval (never [0, 0]), a note
    runs = records(make_plan(cfg, best, {42}), tiny_data, {"tuned": [6, 4, 5], "baseline": [6, 4, 5]})
    block = no_nan(final_block(cfg, make_plan(cfg, best, {42}), runs, tiny_data))
    assert all(block["gain"][m]["ci95"] is None for m in METRICS)
    assert block["notes"] == [block["gain"]["test_accuracy"]["note"]] and "cannot be estimated" in block["notes"][0]


def test_final_config_is_validated() -> None:
    with pytest.raises(UserError, match=r"^final.seeds=-1 must be >= 0"):
        tiny_config(**{"final.seeds": -1})
    with pytest.raises(UserError, match=r"^final.seeds=2 scores runs on the test split, but data.split=.* has none"):
        tiny_config(**{"final.seeds": 2, "data.split": [0.7, 0.3, 0.0]})


def test_score_split_returns_each_examples_prediction_in_split_order(tiny_cfg: ExperimentConfig, tiny_data: TaskData):
    """Batches run grouped by length, in another order than the split's: each prediction is put back in its place
    (checked against the model on the split in its own order), and the metrics are those of `evaluate`."""
    module = build_module(tiny_cfg, tiny_data).eval()
    split = tiny_data.val
    scores, preds = score_split(module, split, tiny_cfg, tiny_data.tokenizer)
    # one padded batch in split order (padding leaves the logits alone: test_padded_batch_matches_single_examples)
    batch = tiny_data.tokenizer.pad({"input_ids": split.input_ids}, padding="longest", return_tensors="pt")
    with torch.no_grad():
        in_order = module.model(**batch).logits.argmax(-1).tolist()
    assert preds == in_order and len(set(preds)) == 2  # both classes predicted: the order test is not vacuous
    assert scores == evaluate(module, split, tiny_cfg, tiny_data.tokenizer)
    for name in ("accuracy", "f1", "fbeta"):
        assert float(metric(name, preds, split.labels, 2)) == pytest.approx(scores[name], abs=1e-6)


def test_final_addresses_only_a_finished_sweep_whose_config_differs_in_final_keys_alone(tmp_path: Path) -> None:
    """--final's checks before anything runs (one line each); --resume also lets final.* change."""
    cfg = plan_config(**{"sweep.storage_path": str(tmp_path), "sweep.name": "s"})
    where = tmp_path / "s"
    with pytest.raises(UserError, match=rf"^--final: no sweep named 's' at {where}; check sweep.name and "):
        check_finished(cfg)
    where.mkdir()
    (where / "config.yaml").write_text(config_yaml(apply_overrides(cfg, {"final.seeds": 0})))
    with pytest.raises(UserError, match=rf"^--final: the sweep at {where} has not finished \(no summary.json\)"):
        check_finished(cfg)
    (where / "summary.json").write_text(json.dumps({"best_trial": None}))
    with pytest.raises(UserError, match=r"^--final: every trial of the sweep at .* failed; there is no best config"):
        check_finished(cfg)
    best = dict(cfg.sweep.points_to_evaluate[0])
    (where / "summary.json").write_text(json.dumps({"best_trial": "trial_000_x", "best_params": best}))
    check_finished(apply_overrides(cfg, {"final.seeds": 5, "final.baseline": False}))  # final.* may differ
    with pytest.raises(UserError, match=r"^--final needs final.seeds >= 1 \(fresh seeds per config\)"):
        check_finished(apply_overrides(cfg, {"final.seeds": 0}))
    with pytest.raises(UserError) as e:
        check_finished(apply_overrides(cfg, {"lora.r": 4, "final.seeds": 3}))
    assert str(e.value).startswith(
        "--final with a config that differs from the sweep's in more than final.* (lora.r: 8 -> 4);"
    )
    stored = (where / "config.yaml").read_text()
    check_same_config(apply_overrides(cfg, {"final.seeds": 3}), stored, str(where))  # --resume
    with pytest.raises(UserError, match=r"^--resume with a config that differs .* \(lora.r: 8 -> 4\)"):
        check_same_config(apply_overrides(cfg, {"lora.r": 4}), stored, str(where))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        # what a planted summary.json would use: the final runs apply best_params as overrides (code from a model
        # directory on the same storage, with remote code allowed)
        ({"model.name": "/shared/planted", "model.trust_remote_code": True}, "model.name, model.trust_remote_code"),
        ({"train.lr": None}, "train.lr"),  # a key of the space missing
        ({"train.lr": 0.5}, "train.lr"),  # outside its range
        ({"lora.r": 3}, "lora.r"),  # not among its choices
        ({"lora.dropout": "high"}, "lora.dropout"),  # of another type
    ],
    ids=["foreign-keys", "missing-key", "out-of-range", "not-a-choice", "wrong-type"],
)
def test_final_takes_only_best_params_inside_the_search_space(tmp_path: Path, change: dict, named: str) -> None:
    cfg = plan_config(**{"sweep.storage_path": str(tmp_path), "sweep.name": "s", "final.seeds": 1})
    where = tmp_path / "s"
    where.mkdir()
    (where / "config.yaml").write_text(config_yaml(cfg))
    best = {k: v for k, v in {**cfg.sweep.points_to_evaluate[0], **change}.items() if v is not None}
    (where / "summary.json").write_text(json.dumps({"best_trial": "trial_000_x", "best_params": best}))
    with pytest.raises(UserError) as e:
        check_finished(cfg)
    assert str(e.value) == (
        f"--final: {where}/summary.json is not a summary lorahpo wrote: its best_params do not fit the search "
        f"space ({named}: missing, foreign or outside it); restore it, or --resume"
    )


def test_every_kind_of_block_is_rendered(tmp_path: Path, capsys: pytest.CaptureFixture, tiny_data: TaskData) -> None:
    """summary.md, the console and final_seeds.png for a tuned-vs-baseline block, a baseline that won, no baseline,
    and a gain without an interval (two configs whose runs predict alike)."""
    cfg = plan_config()
    best = {**cfg.sweep.points_to_evaluate[0], "train.lr": 1e-3}
    wrong = {"tuned": [6, 3], "baseline": [12, 9]}  # of 60: accuracy 0.9, 0.95 and 0.8, 0.85
    variants = {
        "paired": (cfg, best, wrong),
        "same": (cfg, dict(cfg.sweep.points_to_evaluate[0]), wrong),
        "tuned_only": (plan_config(**{"final.baseline": False}), best, wrong),
        "no_interval": (cfg, best, {"tuned": [6, 3], "baseline": [6, 3]}),
    }
    summary = {
        "experiment": "x", "metric": "best_val_fbeta", "num_trials": 2, "stop_reasons": {}, "trial_epochs": 2,
        "best_trial": "t", "best_params": best, "best_value": 0.9, "best_epoch": 1, "test_size": 60,
        "test": {m: 0.9 for m in METRICS}, "test_ci95": {m: [0.85, 0.95] for m in METRICS},
        "val_test_gap": {"accuracy": 0.01, "f1": 0.02, "fbeta": 0.03},
    }  # fmt: skip
    for name, (c, params, errors) in variants.items():
        plan = make_plan(c, params, {42})
        block = final_block(c, plan, records(plan, tiny_data, errors), tiny_data)
        s = {**summary, "final": block, "final_run": {"experiment": "x/final_seeds2", "wall_time_s": 12.0}}
        md = summary_markdown(s, c)
        assert "## Final evaluation: 2 fresh seeds per config" in md and "test 95% interval" in md
        assert ("gain (tuned - baseline)" in md) == (name != "tuned_only")
        print_summary(s)
        out = capsys.readouterr().out
        assert "final evaluation, 2 seeds per config" in out and "wall time 12 s" in out
        assert ("+0.1000 [" in out) == (name == "paired")  # the gain; [0, 0] for "same"
        assert ("gain +0.0000 (no interval: see the note)" in out) == (name == "no_interval")
        assert ("(no interval: see the note)" in md) == (name == "no_interval")
        (tmp_path / name).mkdir()
        write_final_plot(block, tmp_path / name)
        assert (tmp_path / name / "final_seeds.png").stat().st_size > 10_000
