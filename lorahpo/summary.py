"""What a finished sweep says about itself: summary.json (the best trial, its one test-split score with its bootstrap
interval and val-test gap, how the trials ended; the final evaluation's block when there is one), summary.md, the
console's summary, and test_predictions.csv (the interval's raw data). No model code: it reads the results table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from lorahpo.config import ExperimentConfig, apply_overrides, plain, tuning_metric
from lorahpo.data import TaskData
from lorahpo.results import row_config, row_params
from lorahpo.stats import TEST_LABELS, TEST_METRICS, bootstrap_ci, bootstrap_method


def make_summary(
    cfg: ExperimentConfig, df: pd.DataFrame, best: pd.Series | None, test: dict[str, float], test_size: int, where: str
) -> dict[str, Any]:
    """summary.json: the best trial and params, its one test-split score, how the trials ended."""
    metric = tuning_metric(cfg)
    return {
        "experiment": where,
        "metric": metric,
        "num_trials": len(df),
        "stop_reasons": df["stop_reason"].value_counts().to_dict(),
        "trial_epochs": int(df["epochs"].sum()),
        "best_trial": None if best is None else best["trial_id"],
        "best_params": {} if best is None else row_params(best),
        "best_value": None if best is None else float(best[metric]),
        "best_epoch": None if best is None else plain(best["best_epoch"]),
        "baseline_trial": baseline_trial(cfg, df),
        "test": {f"test_{k}": v for k, v in test.items()},
        "test_size": test_size,
    }


def baseline_trial(cfg: ExperimentConfig, df: pd.DataFrame) -> dict[str, Any] | None:
    """The trial of the untuned config, sweep.points_to_evaluate[0] (the sweep's first), at its best epoch: what the
    search is measured against. None without points_to_evaluate, or when that trial is not in the table."""
    if not cfg.sweep.points_to_evaluate:
        return None
    point = apply_overrides(cfg, dict(cfg.sweep.points_to_evaluate[0]))
    for _, row in df.iterrows():
        if row_config(cfg, row) == point:  # compared as configs: 6 and 6.0 are the same setting
            out = {"trial": row["trial_id"], "params": row_params(row), "value": None, "val": None}
            if pd.notna(row.get(tuning_metric(cfg))):  # a failed baseline trial has no score
                out["value"] = float(row[tuning_metric(cfg)])
                out["val"] = {f"val_{m}": float(row[f"best_epoch_val_{m}"]) for m in TEST_METRICS}
            return out
    return None


def baseline_line(s: dict[str, Any]) -> str | None:
    """The untuned config's trial beside the best (summary.md and the console): the gain the search found on val."""
    b = s.get("baseline_trial")
    if not b:
        return None
    if b["value"] is None:
        return f"baseline trial {b['trial']} (sweep.points_to_evaluate[0]) failed"
    gain = s["best_value"] - b["value"]
    where = f"baseline trial {b['trial']} (sweep.points_to_evaluate[0])"
    return f"{where}: {s['metric']} = {b['value']:.4f} (the best is {gain:+.4f} on it)"


def write_summary(summary: dict[str, Any], cfg: ExperimentConfig, out: Path) -> None:
    """summary.json and summary.md into `out`."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_markdown(summary, cfg))


def summary_markdown(s: dict[str, Any], cfg: ExperimentConfig) -> str:
    """summary.md: the sweep at a glance, the best params as a table, the final evaluation's section."""
    params = "\n".join(f"| `{k}` | {_number(v)} |" for k, v in s["best_params"].items())
    test = ", ".join(f"{k.removeprefix('test_')} {v:.4f}" for k, v in s["test"].items()) or "no test split"
    if s["best_trial"] is None:
        return f"# Sweep `{cfg.sweep.name}`\n\n- {s['num_trials']} trials, every one failed: see results.parquet\n"
    return (
        f"# Sweep `{cfg.sweep.name}`\n\n"
        f"- {s['num_trials']} trials, {s['trial_epochs']} trial-epochs; stop reasons: {s['stop_reasons']}\n"
        f"- best trial `{s['best_trial']}`: {s['metric']} = {s['best_value']:.4f} "
        f"(epoch {s['best_epoch']})\n"
        + "".join(f"- {line}\n" for line in filter(None, [baseline_line(s)]))
        + f"- test split ({s['test_size']} examples, {scored_times(s)}): {test}\n"
        + "".join(f"- {line}\n" for line in best_lines(s))
        + f"\n| param | best value |\n|---|---|\n{params}\n"
        + final_markdown(s)
    )


def _number(value: Any) -> str:
    """A param's value as summary.md and the console show it: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else f"{value}"


def _ci(interval: list[float] | None) -> str:
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "(no interval: see the note)"


def _spread(c: dict[str, Any]) -> str:
    """A config's score over the final seeds: mean ± sample std."""
    return f"{c['mean']:.4f} ± {c['std']:.4f}"


def _gain(g: dict[str, Any]) -> str:
    """The paired gain: its mean and 95% interval."""
    return f"{g['mean']:+.4f} {_ci(g['ci95'])}"


def best_lines(s: dict[str, Any]) -> list[str]:
    """The best checkpoint's test interval and val-test gap, one line each (summary.md and the console)."""
    lines = []
    if s.get("test_ci95"):
        cis = ", ".join(f"{k.removeprefix('test_')} {_ci(v)}" for k, v in s["test_ci95"].items())
        lines.append(f"test 95% interval (bootstrap over the {s['test_size']} test examples): {cis}")
    if s.get("val_test_gap"):
        gaps = ", ".join(f"{k} {v:+.4f}" for k, v in s["val_test_gap"].items())
        lines.append(f"val - test gap of the best trial (how optimistic its val score was): {gaps}")
    return lines


def final_markdown(s: dict[str, Any]) -> str:
    """summary.md's final-evaluation section: mean ± std per config, the gain with its interval, each seed's pair."""
    f = s.get("final")
    if not f:
        return ""
    tuned, baseline = f["tuned"], f["baseline"]
    head = "| config | " + " | ".join(TEST_LABELS.values()) + " |\n|---|" + "---|" * len(TEST_LABELS) + "\n"

    def row(name: str, c: dict[str, Any]) -> str:
        return f"| {name} | " + " | ".join(_spread(c[m]) for m in TEST_LABELS) + " |\n"

    table = head + row("tuned (best trial's params)", tuned)
    if baseline:
        table += row(f"baseline ({f['baseline_source']})", baseline)
        gain = " | ".join(_gain(f["gain"][m]) for m in TEST_LABELS)
        table += f"| gain (tuned - baseline), 95% interval | {gain} |\n"
    per_seed = "| seed | tuned test F-beta |" + (" baseline | difference |" if baseline else "") + "\n|---|---|"
    per_seed += "---|---|\n" if baseline else "\n"
    for i, seed in enumerate(tuned["seeds"]):
        t = tuned["test_fbeta"]["values"][i]
        pair = (
            f" {baseline['test_fbeta']['values'][i]:.4f} | {f['gain']['test_fbeta']['values'][i]:+.4f} |"
            if baseline
            else ""
        )
        per_seed += f"| {seed} | {t:.4f} |{pair}\n"
    run = s.get("final_run", {})
    notes = "".join(f"- {note}\n" for note in f["notes"])
    return (
        f"\n## Final evaluation: {f['num_seeds']} fresh seeds per config\n\n"
        "Each run trained from scratch like a sweep trial (no ASHA; early stopping), its best-val checkpoint scored "
        "once on the test split; mean ± sample std over the seeds. Tuned and baseline run i share seed i.\n\n"
        f"{table}\n{per_seed}\n- gain interval: {f['gain_method']}\n{notes}"
        + (f"- wall time {run['wall_time_s']:.0f} s; runs in `{run['experiment']}`\n" if run else "")
    )


def final_lines(s: dict[str, Any]) -> list[str]:
    """The final evaluation on the console: per metric, tuned vs baseline and the gain with its interval."""
    f = s.get("final")
    if not f:
        return []
    lines = [f"final evaluation, {f['num_seeds']} seeds per config {f['tuned']['seeds']}:"]
    for m in TEST_LABELS:
        line = f"    {m}: tuned {_spread(f['tuned'][m])}"
        if f["baseline"]:
            line += f", baseline {_spread(f['baseline'][m])}, gain {_gain(f['gain'][m])}"
        lines.append(line)
    lines += [f"    note: {note}" for note in f["notes"]]
    if s.get("final_run"):
        lines.append(f"    wall time {s['final_run']['wall_time_s']:.0f} s; runs in {s['final_run']['experiment']}")
    return lines


def scored_times(s: dict[str, Any]) -> str:
    """How often the test split has been looked at: once per finalisation (the sweep, then each --extend)."""
    k = s.get("test_scored", 1)
    return "scored once" if k == 1 else f"scored {k} times: once per finalisation, the sweep's and each extension's"


def print_summary(s: dict[str, Any]) -> None:
    """The summary on the console, after a sweep or --final."""
    print(f"\nResults: {s['experiment']}")
    print(f"  best trial {s['best_trial']}: {s['metric']} = {s['best_value']:.4f}")
    if baseline_line(s):
        print(f"  {baseline_line(s)}")
    print("  best params: " + ", ".join(f"{k}={_number(v)}" for k, v in s["best_params"].items()))
    if s["test"]:
        print(f"  test split ({scored_times(s)}): " + ", ".join(f"{k} {v:.4f}" for k, v in s["test"].items()))
    for line in best_lines(s):
        print(f"  {line}")
    print(f"  {s['num_trials']} trials, {s['trial_epochs']} trial-epochs; stop reasons: {s['stop_reasons']}")
    for line in final_lines(s):
        print(f"  {line}")


def best_statistics(
    cfg: ExperimentConfig, data: TaskData, best_val: dict[str, float], test: dict[str, float], preds: list[int]
) -> dict[str, Any]:
    """For the sweep's single best checkpoint: a 95% bootstrap interval over test examples per metric, and the val-test
    gap (its val score at the chosen epoch minus its test score: how optimistic the selection was)."""
    if not test:
        return {}
    return {
        "test_ci95": bootstrap_ci(preds, data.test.labels, data.num_labels, cfg.seed),
        "test_ci95_method": bootstrap_method(cfg.seed),
        "val_test_gap": {m: best_val[f"val_{m}"] - test[m] for m in TEST_METRICS},
    }


def predictions_table(data: TaskData, preds: list[int]) -> str:
    """test_predictions.csv: each test example's source row, true and predicted label (the intervals' raw data)."""
    names = data.label_names
    table = pd.DataFrame(
        {
            "row": data.test.rows,
            "label": [names[i] for i in data.test.labels],
            "prediction": [names[i] for i in preds],
        }
    )
    return table.to_csv(index=False)
