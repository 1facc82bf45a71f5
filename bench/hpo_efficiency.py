"""HPO efficiency: TPE + ASHA vs TPE + FIFO vs random + FIFO vs random + ASHA at the same budget of trial-epochs.

Every method runs through the project's own machinery (`lorahpo.tuner.make_tuner`, i.e. `make_searcher` and
`make_scheduler` driven by `sweep.searcher`, `sweep.scheduler` and `seed`), sequentially (`max_concurrent_trials=1`,
so each run is deterministic), and is ended by a Ray Tune stopper once the trials together have trained `--budget`
epochs. Trial 0 of every run is the config's `points_to_evaluate` (the untuned default). Per method and seed it
records the per-epoch val F-beta in the order the epochs ran, the chosen config (best running val F-beta, ties to the
earlier trial, as the sweep picks it) and its test F-beta (best checkpoint loaded with `load_trained`, scored with
`evaluate` on `data.test`), and the same for trial 0.

    python bench/hpo_efficiency.py                      # the recorded run (see docs/benchmarks.md; ~1-2 h on 2 cores)
    python bench/hpo_efficiency.py --smoke --out /tmp/h # plumbing check on the tiny random model (<1 min of training)

The full default task (SmolLM2, 4 layers, 3,000 SMS, max_length 64) costs ~15-20 s per trial-epoch on 2 cores, too
much for 4 methods x 3 seeds x 24 epochs here, so the recorded run scales it (SCALED below, printed into results.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import DOCS_DIR, WORK_DIR, machine, matplotlib_pyplot, md_table, quiet, write_json
from ray.tune.stopper import Stopper

METHODS = {  # name -> (sweep.searcher, sweep.scheduler)
    "tpe_asha": ("tpe", "asha"),
    "tpe_fifo": ("tpe", "fifo"),
    "random_fifo": ("random", "fifo"),
    "random_asha": ("random", "asha"),
}
LABELS = {
    "tpe_asha": "TPE + ASHA",
    "tpe_fifo": "TPE + FIFO",
    "random_fifo": "random + FIFO",
    "random_asha": "random + ASHA",
}
SCALED = {  # what the recorded run changes in configs/default.yaml (and why: CPU budget, see the module docstring)
    "model.num_layers": 2,
    "data.max_examples": 1500,
    "data.max_length": 48,
    "train.max_epochs": 3,
    "sweep.deterministic": False,  # the recorded run predates deterministic sweeps: keep its algorithm
}
SMOKE = {
    "model.name": "tiny-random-llama",
    "model.num_layers": 2,
    "data.max_examples": 200,
    "data.max_length": 32,
    "train.max_epochs": 2,
    "sweep.deterministic": False,
}
REFERENCE = "random_fifo"


class EpochBudget(Stopper):
    """Ends the experiment once the trials together have completed `budget` epochs. Counts the highest epoch each
    trial reported (Tune calls a stopper again with a trial's last result when its function returns)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.epochs: dict[str, int] = {}

    def used(self) -> int:
        return sum(self.epochs.values())

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self.epochs[trial_id] = max(self.epochs.get(trial_id, 0), int(result.get("epoch", 0)))
        return self.used() >= self.budget

    def stop_all(self) -> bool:
        return self.used() >= self.budget


def base_config(config: str | None, overrides: dict[str, Any]) -> Any:
    """configs/default.yaml (or --config) + overrides, with `lora.last_n`'s search range clipped to the kept layers."""
    from lorahpo.config import apply_overrides, load_config
    from lorahpo.sources import load_model_config

    cfg = apply_overrides(load_config(config), overrides)
    layers = load_model_config(cfg.model).num_hidden_layers
    search = dict(cfg.search)
    spec = search.get("lora.last_n")
    if spec is not None and spec.high is not None and spec.high > layers:
        search["lora.last_n"] = dataclasses.replace(spec, high=layers)
    return dataclasses.replace(cfg, search=search)


def run_method(base: Any, data: Any, method: str, seed: int, budget: int, work: Path) -> dict[str, Any]:
    """One sequential sweep of `method` with root seed `seed`, stopped at `budget` trial-epochs."""
    from lorahpo.config import apply_overrides, to_dict
    from lorahpo.module import evaluate
    from lorahpo.results import best_checkpoint, best_row, ordered, row_params, trials_frame
    from lorahpo.trainable import CKPT_NAME, load_trained
    from lorahpo.tuner import make_tuner

    searcher, scheduler = METHODS[method]
    name = f"{method}-seed{seed}"
    cfg = apply_overrides(
        base,
        {
            "seed": seed,
            "sweep.searcher": searcher,
            "sweep.scheduler": scheduler,
            "sweep.name": name,
            "sweep.storage_path": str(work),
            "sweep.num_samples": 10_000,  # the budget stopper ends the run, not the number of trials
            "sweep.max_concurrent_trials": 1,
        },
    )
    shutil.rmtree(work / name, ignore_errors=True)
    tuner = make_tuner(cfg, data, stop=EpochBudget(budget))
    start = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - start

    df = trials_frame(grid, cfg)
    curve: list[float] = []
    trials = []
    for r, (_, row) in zip(ordered(grid), df.iterrows()):
        hist = r.metrics_dataframe
        if r.error is not None:
            raise RuntimeError(f"{name}: trial {row['trial_id']} failed: {r.error}")
        curve += [float(v) for v in hist["val_fbeta"]]
        trials.append(
            {
                "trial_id": row["trial_id"],
                "params": row_params(row),
                "epochs": int(row["epochs"]),
                "val_fbeta": [float(v) for v in hist["val_fbeta"]],
                "best_val_fbeta": float(row["best_val_fbeta"]),
                "stop_reason": row["stop_reason"],
                "time_total_s": float(row["wall_time_s"]),
            }
        )

    if len(curve) != budget:  # interrupted (Ctrl-C stops a Tune run gracefully): keep no record of it
        raise RuntimeError(f"{name}: the trials ran {len(curve)} epochs, not the budget of {budget}")

    def test_score(trial_id: str, params: dict[str, Any]) -> dict[str, float]:
        trial_cfg = apply_overrides(cfg, params)
        result = next(r for r in grid if Path(r.path).name == trial_id)
        if result.best_checkpoints:
            ckpt = best_checkpoint(grid, trial_id, cfg).path
        else:  # the budget stopped the run as this trial's first epoch arrived: Tune wrote its checkpoint, unregistered
            ckpt = str(Path(result.path) / "checkpoint_000000")
        module = load_trained(trial_cfg, data, Path(ckpt) / CKPT_NAME)
        return {
            **{f"val_{k}": v for k, v in evaluate(module, data.val, trial_cfg, data.tokenizer).items()},
            **{f"test_{k}": v for k, v in evaluate(module, data.test, trial_cfg, data.tokenizer).items()},
        }

    best = best_row(df, cfg)
    chosen = next(t for t in trials if t["trial_id"] == best["trial_id"])
    default = trials[0]
    expected_default = dict(cfg.sweep.points_to_evaluate[0]) if cfg.sweep.points_to_evaluate else None
    return {
        "method": method,
        "seed": seed,
        "budget": budget,
        "config": to_dict(cfg),
        "wall_s": wall,
        "epochs_used": len(curve),
        "curve": curve,
        "trials": trials,
        "chosen": {**chosen, **test_score(chosen["trial_id"], chosen["params"])},
        "default": {
            **default,
            "is_points_to_evaluate": expected_default is not None
            and all(_close(default["params"][k], v) for k, v in expected_default.items()),
            **test_score(default["trial_id"], default["params"]),
        },
    }


def _close(a: Any, b: Any) -> bool:
    return abs(float(a) - float(b)) < 1e-9 if isinstance(b, (int, float)) else a == b


def reach(curve: list[float], target: float) -> int | None:
    """Cumulative epochs after which the best-so-far val F-beta first reaches `target` (None: never)."""
    best = np.maximum.accumulate(np.asarray(curve))
    hit = np.nonzero(best >= target - 1e-12)[0]
    return int(hit[0]) + 1 if len(hit) else None


def analyse(records: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    seeds = sorted({r["seed"] for r in records})
    by = {(r["method"], r["seed"]): r for r in records}
    out: dict[str, Any] = {"methods": {}, "seeds": seeds}
    for m in methods:
        runs = [by[(m, s)] for s in seeds if (m, s) in by]
        per_seed = []
        for r in runs:
            ref = by.get((REFERENCE, r["seed"]))
            target = max(ref["curve"]) if ref else None
            per_seed.append(
                {
                    "seed": r["seed"],
                    "final_best_val_fbeta": max(r["curve"]),
                    "reference_final_best": target,
                    "epochs_to_reference_best": reach(r["curve"], target) if target is not None else None,
                    "reference_epochs_to_its_best": reach(ref["curve"], target) if ref else None,
                    "trials": len(r["trials"]),
                    "chosen_trial": r["chosen"]["trial_id"],
                    "chosen_params": r["chosen"]["params"],
                    "chosen_val_fbeta": r["chosen"]["best_val_fbeta"],
                    "chosen_test_fbeta": r["chosen"]["test_fbeta"],
                    "chosen_test_accuracy": r["chosen"]["test_accuracy"],
                    "default_val_fbeta": r["default"]["best_val_fbeta"],
                    "default_test_fbeta": r["default"]["test_fbeta"],
                    "wall_s": r["wall_s"],
                }
            )
        mean_curve = np.mean([np.maximum.accumulate(r["curve"][:budget]) for r in runs], axis=0)
        reached = [p["epochs_to_reference_best"] for p in per_seed]
        ref_epochs = [p["reference_epochs_to_its_best"] for p in per_seed]
        saved = [b - a for a, b in zip(reached, ref_epochs) if a is not None and b is not None]
        # Per seed: epochs saved against random+FIFO; a seed where the method never got there within the budget
        # saved fewer than (random+FIFO's epochs - budget), i.e. it LOST at least that many.
        saved_text = [
            f"{b - a:+d}" if a is not None else f"< {b - budget:+d} (not reached in {budget})"
            for a, b in zip(reached, ref_epochs)
        ]
        out["methods"][m] = {
            "per_seed": per_seed,
            "mean_best_so_far": mean_curve.tolist(),
            "final_best_val_fbeta_mean": float(np.mean([p["final_best_val_fbeta"] for p in per_seed])),
            "reached_reference_in": f"{sum(a is not None for a in reached)}/{len(reached)} seeds",
            "epochs_to_reference_best_mean": float(np.mean([a for a in reached if a is not None]))
            if any(a is not None for a in reached)
            else None,
            "epochs_saved_vs_reference_mean": float(np.mean(saved)) if saved else None,
            "epochs_saved_vs_reference_per_seed": saved_text,
            "epochs_to_reference_best_per_seed": reached,
            "trials_mean": float(np.mean([p["trials"] for p in per_seed])),
            "chosen_test_fbeta_mean": float(np.mean([p["chosen_test_fbeta"] for p in per_seed])),
            "chosen_test_fbeta_sd": float(np.std([p["chosen_test_fbeta"] for p in per_seed])),
            "default_test_fbeta_mean": float(np.mean([p["default_test_fbeta"] for p in per_seed])),
            "gain_test_fbeta_over_default_mean": float(
                np.mean([p["chosen_test_fbeta"] - p["default_test_fbeta"] for p in per_seed])
            ),
            "gain_val_fbeta_over_default_mean": float(
                np.mean([p["chosen_val_fbeta"] - p["default_val_fbeta"] for p in per_seed])
            ),
            "wall_s_mean": float(np.mean([p["wall_s"] for p in per_seed])),
        }
    # Trial 0 is the untuned default only when the config has points_to_evaluate; otherwise it is a random draw.
    out["trial0"] = "default" if all(r["default"]["is_points_to_evaluate"] for r in records) else "trial 0"
    # Trial 0 is the same config, seed and data in every method of a seed: sequential runs must agree bit for bit.
    out["trial0_identical_across_methods"] = all(
        len({json.dumps(by[(m, s)]["trials"][0]["val_fbeta"]) for m in methods if (m, s) in by}) == 1 for s in seeds
    )
    return out


def plot(records: list[dict[str, Any]], analysis: dict[str, Any], budget: int, path: Path) -> None:
    plt = matplotlib_pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    colors = {"tpe_asha": "C0", "tpe_fifo": "C1", "random_fifo": "C2", "random_asha": "C3"}
    x = np.arange(1, budget + 1)
    for m, a in analysis["methods"].items():
        for r in (r for r in records if r["method"] == m):
            ax.step(x, np.maximum.accumulate(r["curve"][:budget]), where="post", color=colors[m], alpha=0.18, lw=1)
        ax.step(x, a["mean_best_so_far"], where="post", color=colors[m], lw=2.2, label=LABELS[m])
    ax.set_xlabel("cumulative trial-epochs")
    ax.set_ylabel("best val F-beta so far (beta=3)")
    ax.set_title(f"best-so-far val F-beta, mean of {len(analysis['seeds'])} seeds (thin: each seed)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    names = list(analysis["methods"])
    for i, m in enumerate(names):
        ps = analysis["methods"][m]["per_seed"]
        bx.scatter([i] * len(ps), [p["chosen_test_fbeta"] for p in ps], color=colors[m], zorder=3)
        bx.hlines(analysis["methods"][m]["chosen_test_fbeta_mean"], i - 0.25, i + 0.25, color=colors[m], lw=2)
    defaults = [p["default_test_fbeta"] for p in next(iter(analysis["methods"].values()))["per_seed"]]
    what = "untuned default (trial 0)" if analysis["trial0"] == "default" else "trial 0 (a random draw)"
    bx.axhline(float(np.mean(defaults)), color="k", ls="--", lw=1, label=f"{what}, mean")
    bx.set_xticks(range(len(names)), [LABELS[m] for m in names], rotation=15)
    bx.set_ylabel("test F-beta of the chosen config")
    bx.set_title("test F-beta (dots: seeds, bar: mean)")
    bx.grid(alpha=0.3)
    bx.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(analysis: dict[str, Any], budget: int) -> str:
    rows = []
    for m, a in analysis["methods"].items():
        rows.append(
            [
                LABELS[m],
                a["final_best_val_fbeta_mean"],
                a["trials_mean"],
                a["reached_reference_in"],
                ", ".join("never" if e is None else str(e) for e in a["epochs_to_reference_best_per_seed"]),
                ", ".join(a["epochs_saved_vs_reference_per_seed"]),
                f"{a['chosen_test_fbeta_mean']:.4f} ± {a['chosen_test_fbeta_sd']:.4f}",
                a["gain_val_fbeta_over_default_mean"],
                a["gain_test_fbeta_over_default_mean"],
                a["wall_s_mean"],
            ]
        )
    head = [
        "method",
        f"final best val F-beta (mean, {budget} epochs)",
        "trials (mean)",
        "reached random+FIFO's final best",
        "epochs to reach it (per seed)",
        "epochs saved vs random+FIFO (per seed)",
        "test F-beta of chosen config (mean ± sd)",
        f"val gain over {analysis['trial0']}",
        f"test gain over {analysis['trial0']}",
        "wall s per run (mean)",
    ]
    seed_rows = []
    for m, a in analysis["methods"].items():
        for p in a["per_seed"]:
            seed_rows.append(
                [
                    LABELS[m],
                    p["seed"],
                    p["trials"],
                    p["final_best_val_fbeta"],
                    p["reference_final_best"],
                    p["epochs_to_reference_best"] if p["epochs_to_reference_best"] is not None else "never",
                    p["reference_epochs_to_its_best"],
                    p["chosen_test_fbeta"],
                    p["default_val_fbeta"],
                    p["default_test_fbeta"],
                    json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in p["chosen_params"].items()}),
                ]
            )
    seed_head = [
        "method",
        "seed",
        "trials",
        "final best val F-beta",
        "random+FIFO final best",
        "epochs to reach it",
        "random+FIFO epochs to its best",
        "chosen test F-beta",
        f"{analysis['trial0']} val F-beta",
        f"{analysis['trial0']} test F-beta",
        "chosen params",
    ]
    return md_table(head, rows) + "\nPer seed:\n\n" + md_table(seed_head, seed_rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke", action="store_true", help="tiny random model, 1 seed, TPE+ASHA and random+FIFO, budget 3: plumbing"
    )
    p.add_argument("--config", default=None, help="base config (default configs/default.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="root seeds (default 0 1 2; smoke: 0)")
    p.add_argument("--budget", type=int, default=None, help="trial-epochs per run (default 24; smoke: 3)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, help="default all; smoke: 2")
    p.add_argument("--out", type=Path, default=None, help="results dir (default docs/benchmarks/hpo_efficiency)")
    p.add_argument("--work", type=Path, default=None, help="Ray experiments (default bench/out/hpo_efficiency)")
    p.add_argument("--fresh", action="store_true", help="rerun runs whose record already exists in --work")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more config overrides")
    args = p.parse_args(argv)
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    budget = args.budget or (3 if args.smoke else 24)
    methods = args.methods or (["tpe_asha", REFERENCE] if args.smoke else list(METHODS))
    out = (args.out or DOCS_DIR / "hpo_efficiency").resolve()
    work = (args.work or (out / "work" if args.smoke else WORK_DIR / "hpo_efficiency")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    import ray

    from lorahpo.config import parse_overrides, to_dict
    from lorahpo.data import load_task
    from lorahpo.sources import load_tokenizer

    quiet()
    overrides = {**(SMOKE if args.smoke else SCALED), **parse_overrides(args.overrides)}
    base = base_config(args.config, overrides)
    info = machine()
    t_all = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    records = []
    reused = []
    try:
        tok = load_tokenizer(base.model)
        data_info = []
        for seed in seeds:
            data = load_task(base.data, tok, seed)  # the split is seeded too: every method of a seed sees the same
            data_info.append({k: v for k, v in data.info.items() if k != "source"})
            for method in methods:
                rec_path = work / f"{method}-seed{seed}.json"
                if rec_path.is_file() and not args.fresh:
                    rec = json.loads(rec_path.read_text())
                    if rec["budget"] == budget and rec["config"]["model"] == to_dict(base)["model"]:
                        print(f"[hpo] {method} seed {seed}: reusing {rec_path}", flush=True)
                        records.append(rec)
                        reused.append(rec_path.name)
                        continue
                print(f"[hpo] {method} seed {seed}: running (budget {budget} trial-epochs)", flush=True)
                rec = run_method(base, data, method, seed, budget, work)
                write_json(rec_path, rec)
                print(
                    f"[hpo] {method} seed {seed}: {len(rec['trials'])} trials, best val F-beta {max(rec['curve']):.4f}"
                    f", chosen test F-beta {rec['chosen']['test_fbeta']:.4f}, {rec['wall_s']:.0f} s",
                    flush=True,
                )
                records.append(rec)
    finally:
        ray.shutdown()
    analysis = analyse(records, budget)
    result = {
        "machine": info,
        "smoke": args.smoke,
        "budget_trial_epochs": budget,
        "seeds": seeds,
        "overrides_of_default_config": overrides,
        "search_space": {k: {a: b for a, b in vars(v).items() if b is not None} for k, v in base.search.items()},
        "data": data_info,
        "analysis": analysis,
        "total_wall_s": time.perf_counter() - t_all,  # this invocation (runs reused from --work cost nothing here)
        "sum_of_run_wall_s": sum(r["wall_s"] for r in records),  # the sweeps themselves, whenever they ran
        "reused_runs": reused,
        # every trial of every run (params, per-epoch val F-beta, stop reason): the evidence behind the tables
        "runs": [{k: r[k] for k in ("method", "seed", "wall_s", "trials")} for r in records],
    }
    write_json(out / "results.json", result)
    (out / "table.md").write_text(markdown(analysis, budget))
    plot(records, analysis, budget, out / "hpo_efficiency.png")
    print((out / "table.md").read_text())
    print(f"[hpo] wrote {out} in {result['total_wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
