"""The statistics of a sweep's result (numpy and scipy only, no model code): the pinned test metrics recomputed from
per-example predictions, a percentile bootstrap interval over test examples, a config's spread over seeds, and the
paired tuning gain with an interval that holds both seed and test-set noise. No result is NaN: a bootstrap of a
constant gives [x, x]; a gain whose noise cannot be estimated has no interval (None) and a note, never a point."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy
import scipy.stats

from lorahpo.config import FBETA_BETA

CONFIDENCE = 0.95
N_RESAMPLES = 9999  # scipy's default: percentile endpoints stable to about 0.1 point on a few hundred examples
TEST_METRICS = ("accuracy", "f1", "fbeta")  # the per-example metrics (the loss is a mean of losses, not predictions)
# their columns in the final evaluation (`test_*`) and how summary.md, the console and the plots name them
TEST_LABELS = {"test_accuracy": "test accuracy", "test_f1": "test macro-F1", "test_fbeta": "test F-beta"}
GAIN_METHOD = (
    "mean of the k per-seed differences tuned - baseline ± t x SE, SE² = s²/k (s: the differences' spread over seeds) "
    f"+ the variance of that mean over {N_RESAMPLES} bootstrap resamples of the test examples (one resample shared by "
    "every run, generator seeded with the root seed); t with Welch-Satterthwaite degrees of freedom (k-1 when seed "
    "noise dominates, normal when test noise does; with k = 1, test noise only); one 95% interval per metric"
)


def confusion(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Confusion counts [true, predicted] of the last axis, for every index of the leading ones: one bincount over
    all rows at once (each row's pairs offset into their own block), so 9,999 resamples cost one pass."""
    p, y = np.asarray(preds, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    lead, cells = p.shape[:-1], num_labels * num_labels
    rows = int(np.prod(lead))
    codes = (y * num_labels + p).reshape(rows, -1) + (np.arange(rows) * cells)[:, None]
    return np.bincount(codes.ravel(), minlength=rows * cells).reshape(*lead, num_labels, num_labels)


def _fbeta(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, beta: float) -> np.ndarray:
    """F-beta per class, 0 where it is 0/0 (torchmetrics' zero_division=0)."""
    b2 = beta**2
    num = (1 + b2) * tp
    den = num + b2 * fn + fp
    return np.where(den > 0, num / np.maximum(den, 1), 0.0)


def _macro(score: np.ndarray, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Mean over the classes that occur in labels or predictions (torchmetrics leaves the others out of a macro
    average); 0 when none does."""
    present = (tp + fp + fn) > 0
    count = present.sum(-1)
    return np.where(count > 0, (score * present).sum(-1) / np.maximum(count, 1), 0.0)


def metrics(preds: np.ndarray, labels: np.ndarray, num_labels: int, axis: int = -1) -> np.ndarray:
    """The metrics of TEST_METRICS (stacked on a new first axis) of module.make_metrics, from predicted and true label
    indices along `axis`, vectorised over the others. Binary: accuracy, macro-F1 over both classes, F-beta of the
    positive class (index 1); multi-class: accuracy, macro-F1, macro F-beta. Equal to torchmetrics (a test checks)."""
    cm = confusion(np.moveaxis(np.asarray(preds), axis, -1), np.moveaxis(np.asarray(labels), axis, -1), num_labels)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    return scores(tp, cm.sum(-2) - tp, cm.sum(-1) - tp, num_labels)


def scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, num_labels: int) -> np.ndarray:
    """The metrics of TEST_METRICS (stacked on a new first axis) from per-class counts on the last axis."""
    total = (tp + fn).sum(-1)
    accuracy = np.where(total > 0, tp.sum(-1) / np.maximum(total, 1), 0.0)
    f1 = _macro(_fbeta(tp, fp, fn, 1.0), tp, fp, fn)
    if num_labels == 2:
        fbeta = _fbeta(tp[..., 1], fp[..., 1], fn[..., 1], FBETA_BETA)
    else:
        fbeta = _macro(_fbeta(tp, fp, fn, FBETA_BETA), tp, fp, fn)
    return np.stack([accuracy, f1, fbeta])


def bootstrap_ci(preds: Sequence[int], labels: Sequence[int], num_labels: int, seed: int) -> dict[str, list[float]]:
    """{"test_<metric>": [low, high]}: a 95% percentile bootstrap interval over examples for each metric, all from the
    same resamples. Percentile, not BCa: BCa is NaN when every resample gives the same value (a perfect classifier);
    percentile gives [x, x]."""
    p, y = np.asarray(preds), np.asarray(labels)
    if len(y) < 2:  # nothing to resample
        values = metrics(p, y, num_labels) if len(y) else np.zeros(len(TEST_METRICS))
        return {f"test_{name}": [float(v), float(v)] for name, v in zip(TEST_METRICS, values)}
    res = scipy.stats.bootstrap(
        (p, y),
        lambda a, b, axis=-1: metrics(a, b, num_labels, axis),
        paired=True,
        vectorized=True,
        n_resamples=N_RESAMPLES,
        batch=max(1, 2**24 // len(y)),  # memory: resamples x examples indices per batch
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = res.confidence_interval
    return {f"test_{name}": [float(lo), float(hi)] for name, lo, hi in zip(TEST_METRICS, low, high)}


def bootstrap_method(seed: int) -> dict[str, Any]:
    """How `bootstrap_ci` computed its intervals (recorded next to them)."""
    return {
        "method": "percentile bootstrap over test examples, the same resamples for every metric",
        "implementation": f"scipy.stats.bootstrap {scipy.__version__}",
        "n_resamples": N_RESAMPLES,
        "confidence": CONFIDENCE,
        "seed": seed,
    }


def spread(values: Sequence[float]) -> dict[str, Any]:
    """{mean, std, values} over seeds; std is the sample standard deviation (ddof 1), 0 for a single value."""
    v = np.asarray(values, dtype=float)
    return {
        "mean": float(v.mean()) if len(v) else 0.0,
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "values": [float(x) for x in v],
    }


def gain_test_variance(
    tuned: Sequence, baseline: Sequence, labels: Sequence[int], num_labels: int, seed: int, resamples: int = N_RESAMPLES
) -> np.ndarray:
    """Per metric of TEST_METRICS, the variance over bootstrap resamples of the test examples of the mean difference
    tuned - baseline over seeds (`tuned`, `baseline`: predictions, one row per seed, row i of both from seed i). One
    resample of example indices serves every run and metric: the test set is a single draw shared by all seeds, so its
    noise does not average out over seeds, and each pair stays paired on the same examples."""
    runs, y = np.concatenate([np.asarray(tuned), np.asarray(baseline)]), np.asarray(labels)
    n, eye = len(y), np.eye(num_labels)
    if n < 2:  # nothing to resample
        return np.zeros(len(TEST_METRICS))
    # A resample's per-class counts (true, predicted, right) of every run = how often it drew each example x that
    # example's one-hot rows: one matrix product, instead of gathering runs x resamples x examples predictions.
    pred = eye[runs]  # run, example, class
    design = np.stack(np.broadcast_arrays(eye[y], pred, pred * eye[y]))  # (true, predicted, right), run, example, class
    design = np.moveaxis(design, 2, 0).reshape(n, -1)
    rng = np.random.default_rng(seed)
    batch = max(1, 2**22 // max(design.shape))  # memory: resamples x examples and x counts per batch
    means = []
    for start in range(0, resamples, batch):
        size = min(batch, resamples - start)
        drawn = rng.integers(0, n, (size, n)) + np.arange(size)[:, None] * n
        counts = np.bincount(drawn.ravel(), minlength=size * n).reshape(size, n).astype(float)
        true, predicted, tp = np.moveaxis((counts @ design).reshape(size, 3, len(runs), num_labels), 1, 0)
        per_run = scores(tp, predicted - tp, true - tp, num_labels)  # metric, resample, run
        means.append(per_run[..., : len(runs) // 2].mean(-1) - per_run[..., len(runs) // 2 :].mean(-1))
    return np.concatenate(means, axis=1).var(axis=1, ddof=1)


def paired_gain(tuned: Sequence[float], baseline: Sequence[float], test_var: float | None = None) -> dict[str, Any]:
    """{mean, ci95, values}: tuned - baseline per seed (run i of both configs has seed i: what the two configs draw
    alike, such as the head's init, cancels out of each difference; what they draw differently stays in it) and a 95%
    interval (see GAIN_METHOD). Without `test_var` (from gain_test_variance) the interval is the t interval over
    the differences, which misses the test set's noise. No noise to estimate: ci95 None and a `note`, never a point."""
    a, b = np.asarray(tuned, dtype=float), np.asarray(baseline, dtype=float)
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_gain needs as many tuned as baseline values, at least one ({len(a)} vs {len(b)})")
    d, k = a - b, len(a)
    gain: dict[str, Any] = {"mean": float(d.mean()), "ci95": None, "values": [float(x) for x in d]}
    # Float noise is no spread: 0.9 - 0.8 != 0.8 - 0.7
    seed_var = float(d.var(ddof=1)) / k if k > 1 and np.ptp(d) > 1e-12 else 0.0
    var = seed_var + (test_var or 0.0)
    if var <= 1e-24:
        gain["note"] = (
            "the gain's interval cannot be estimated: the per-seed differences do not vary (or k = 1) and "
            + ("neither do they over test resamples" if test_var is not None else "no test-set noise was given")
        )
        return gain
    # Not a two-level percentile bootstrap (seeds, then examples within each): with 3 seeds it has 10 distinct seed
    # resamples and no t quantile; in the simulation of tests/test_final.py it covered 78% where seed noise dominated
    # (84% where test noise did). Welch-Satterthwaite: k-1 degrees of freedom where seed noise dominates, normal where
    # test noise does (a variance from thousands of resamples counts as known).
    df = (k - 1) * (var / seed_var) ** 2 if seed_var > 0 else np.inf
    half = float(scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, df) * np.sqrt(var))
    gain["ci95"] = [gain["mean"] - half, gain["mean"] + half]
    return gain
