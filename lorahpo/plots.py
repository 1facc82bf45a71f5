"""PNG plots written into every sweep's results: optimisation history, learning curves, parallel coordinates,
parameter importances (Optuna's matplotlib visualisations on the reconstructed study); and the final evaluation's
per-seed test scores."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # files only (savefig); without a display matplotlib picks Agg by itself
import optuna
import pandas as pd
from matplotlib.ticker import MaxNLocator
from optuna.visualization import matplotlib as ovm

from lorahpo.config import ExperimentConfig
from lorahpo.stats import TEST_LABELS

log = logging.getLogger(__name__)


def write_plots(study: optuna.Study, df: pd.DataFrame, cfg: ExperimentConfig, out: Path) -> list[str]:
    """Write the plots that the sweep supports (importances need 2+ finished trials); return their file names."""
    target = f"{cfg.train.metric} (running best)"
    plots = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(study, target_name=target),
        "learning_curves.png": lambda: _learning_curves(study, df, cfg),
        "parallel_coordinates.png": lambda: ovm.plot_parallel_coordinate(study, target_name=target),
        "param_importances.png": lambda: ovm.plot_param_importances(study, target_name=target),
    }
    written = []
    for name, make in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
                ax = make()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(9, 5.5)
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(name)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. one trial: no importances
            log.info("skipped %s: %s", name, e)
    return written


def _learning_curves(study: optuna.Study, df: pd.DataFrame, cfg: ExperimentConfig):
    """Per-trial val metric by epoch; trials stopped by ASHA or early stopping end early and are marked."""
    fig, ax = plt.subplots()
    reasons = dict(zip(df["trial_id"], df["stop_reason"]))
    styles = {"asha_stop": "x", "early_stop": "s", "error": "v"}
    for t in study.trials:
        if not t.intermediate_values:
            continue
        epochs, values = zip(*sorted(t.intermediate_values.items()))
        reason = reasons.get(t.user_attrs.get("trial_id"), "")
        (line,) = ax.plot(epochs, values, marker="o", ms=3, lw=1, label=f"{t.number} ({reason})")
        if reason in styles:
            ax.plot(epochs[-1], values[-1], styles[reason], color=line.get_color(), ms=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(cfg.train.metric)
    ax.set_title("Learning curves (x: stopped by ASHA, square: early stopping)")
    ax.legend(fontsize=7, ncol=2)
    return ax


FINAL_PLOT = "final_seeds.png"


def write_final_plot(block: dict[str, Any], out: Path) -> str:
    """final_seeds.png: each seed's test score of the baseline and the tuned config, joined per seed (the pairs the
    gain is computed from), with each config's mean; one panel per metric, the gain and its interval in the title."""
    fig, axes = plt.subplots(1, len(TEST_LABELS), figsize=(4 * len(TEST_LABELS), 4.2), squeeze=False)
    tuned, baseline = block["tuned"], block["baseline"]
    names = (["baseline"] if baseline else []) + ["tuned"]
    for ax, (metric, label) in zip(axes[0], TEST_LABELS.items()):
        for i, seed in enumerate(tuned["seeds"]):
            ys = ([baseline[metric]["values"][i]] if baseline else []) + [tuned[metric]["values"][i]]
            ax.plot(range(len(ys)), ys, marker="o", lw=1, alpha=0.8, label=f"seed {seed}")
        for x, name in enumerate(names):
            mean = (baseline if name == "baseline" else tuned)[metric]["mean"]
            ax.hlines(mean, x - 0.15, x + 0.15, color="black", lw=2)
        ax.set_xticks(range(len(names)), names)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_ylabel(label)
        gain = (block.get("gain") or {}).get(metric)
        ci = f"[{gain['ci95'][0]:+.4f}, {gain['ci95'][1]:+.4f}]" if gain and gain["ci95"] else "(no interval)"
        title = f"gain {gain['mean']:+.4f} {ci}" if gain else label
        ax.set_title(title, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Final evaluation: {block['num_seeds']} seeds per config (bars: means; 95% interval of the gain)")
    fig.tight_layout()
    fig.savefig(out / FINAL_PLOT, dpi=110)
    plt.close(fig)
    return FINAL_PLOT
