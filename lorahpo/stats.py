"""The statistics of a sweep's result (numpy and scipy only, no model code): the pinned test metrics recomputed from
per-example predictions, a percentile bootstrap interval over test examples, a config's spread over seeds, and the
paired tuning gain with a t interval over the per-seed differences. No result is NaN: a spread of zero gives [x, x]."""

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
GAIN_METHOD = (
    "paired by seed: a t interval (k-1 degrees of freedom) over the k per-seed differences tuned - baseline "
    "(scipy.stats.ttest_rel); [d, d] when the differences do not vary or k = 1"
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
    fp, fn = cm.sum(-2) - tp, cm.sum(-1) - tp
    total = cm.sum((-2, -1))
    accuracy = np.where(total > 0, tp.sum(-1) / np.maximum(total, 1), 0.0)
    f1 = _macro(_fbeta(tp, fp, fn, 1.0), tp, fp, fn)
    if num_labels == 2:
        fbeta = _fbeta(tp[..., 1], fp[..., 1], fn[..., 1], FBETA_BETA)
    else:
        fbeta = _macro(_fbeta(tp, fp, fn, FBETA_BETA), tp, fp, fn)
    return np.stack([accuracy, f1, fbeta])


def metric(name: str, preds: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    """One metric of TEST_METRICS over all examples."""
    return float(metrics(preds, labels, num_labels)[TEST_METRICS.index(name)])


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


def paired_gain(tuned: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """{mean, ci95, values}: tuned - baseline per seed (the same seed for both: model init, dropout and batch order
    cancel out of each difference) and a 95% t interval over those differences (see GAIN_METHOD)."""
    a, b = np.asarray(tuned, dtype=float), np.asarray(baseline, dtype=float)
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_gain needs as many tuned as baseline values, at least one ({len(a)} vs {len(b)})")
    d = a - b
    mean = float(d.mean())
    # No spread to estimate (float noise aside: 0.9 - 0.8 != 0.8 - 0.7): the interval is the difference itself. scipy
    # would give NaN for none and a warning about lost precision for float noise.
    if len(d) < 2 or np.ptp(d) <= 1e-12:
        return {"mean": mean, "ci95": [mean, mean], "values": [float(x) for x in d]}
    ci = scipy.stats.ttest_rel(a, b).confidence_interval(CONFIDENCE)
    return {"mean": mean, "ci95": [float(ci.low), float(ci.high)], "values": [float(x) for x in d]}
