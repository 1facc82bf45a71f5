"""Orchestration overhead: what Ray Tune costs around the trials themselves.

For sweeps of N very short trials (tiny random Llama, 1 epoch) run with the project's `make_tuner`:

    overhead ratio = (sweep wall time x concurrent slots) / (sum of the trials' own time, Tune's `time_total_s`)

plus Ray's start-up time (`ray.init` as `run_sweep` calls it), the per-trial start-up inside a trial (model build,
data from the object store, loaders, Trainer), and the cold import of the trial's code in a fresh worker process.
Every sweep runs twice: with `sweep.reuse_actors=false` (a fresh worker process per trial: the project before the
fix) and with `sweep.reuse_actors=true` (one worker process serves trial after trial: the project default). The two
must give identical configs and metrics. A sweep of real trials (the default model and data, one epoch each) shows what
the overhead is for the trials the project actually runs.

    python bench/overhead.py                         # the recorded run (N = 4, 16, 64 + 4 default trials; ~20 min)
    python bench/overhead.py --smoke --out /tmp/o    # plumbing check (N = 2)

`--trackers` measures what watching a sweep costs instead: the default sweep (configs/default.yaml as it is) with
`sweep.loggers=[]` and with the default `[tensorboard]`, alternating, both writing the live Optuna journal, whose own
cost is timed apart (LiveStudy driven for 64 trials x 3 epochs). Target: under 2% of the sweep's wall time.

    python bench/overhead.py --trackers --repeats 2  # the recorded run (4 default sweeps, ~25 min)
    python bench/overhead.py --trackers --smoke --out /tmp/o   # plumbing check (tiny trials, N = 2)
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import DOCS_DIR, REPO_ROOT, WORK_DIR, machine, matplotlib_pyplot, md_table, quiet, summary, write_json

SHORT_TRIAL = {  # a very short trial: the tiny random Llama, 140 training examples, one epoch
    "model.name": "tiny-random-llama",
    "model.num_layers": 4,  # the default search space puts LoRA on up to 4 layers
    "data.max_examples": 200,
    "data.max_length": 32,
    "train.max_epochs": 1,
    "sweep.scheduler": "fifo",  # every trial runs its epoch: the denominator is the same work for every N
}
DEFAULT_TRIAL = {  # a real trial: configs/default.yaml (SmolLM2, 3,000 SMS), one epoch, FIFO
    "train.max_epochs": 1,
    "sweep.scheduler": "fifo",
}
IMPORT_PROBE = (
    "import time; t = time.perf_counter(); import lorahpo.trainable, lorahpo.tuner; print(time.perf_counter() - t)"
)


def ray_startup(repeats: int) -> dict[str, Any]:
    """`ray.init` as `run_sweep` calls it (a fresh local Ray), and `ray.shutdown`."""
    import ray

    inits, downs = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        ray.init(address="local", log_to_driver=True, configure_logging=False)
        inits.append(time.perf_counter() - t)
        t = time.perf_counter()
        ray.shutdown()
        downs.append(time.perf_counter() - t)
    return {"init_s": summary(inits), "shutdown_s": summary(downs), "init_all_s": inits}


def cold_import(repeats: int) -> dict[str, Any]:
    """What a fresh trial worker pays before the trial function can run: importing torch, transformers, peft,
    Lightning, torchmetrics, Ray Tune (through lorahpo.trainable / lorahpo.tuner)."""
    times = []
    for _ in range(repeats):
        proc = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, cwd=REPO_ROOT, check=True
        )
        times.append(float(proc.stdout.strip().splitlines()[-1]))
    return summary(times)


def trial_startup(cfg: Any, data: Any, repeats: int) -> dict[str, Any]:
    """The start of a trial, in-process and warm: data from the object store (a pickle round trip of TaskData),
    seeding + model build + LoRA, loaders, the Lightning Trainer."""
    from lorahpo.data import make_loader
    from lorahpo.module import make_trainer
    from lorahpo.trainable import EpochReporter, build_module

    steps: dict[str, list[float]] = {"data_unpickle_s": [], "model_build_s": [], "loaders_s": [], "trainer_s": []}
    blob = pickle.dumps(data)
    for _ in range(repeats):
        t = time.perf_counter()
        pickle.loads(blob)
        steps["data_unpickle_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        build_module(cfg, data)
        steps["model_build_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        make_loader(data.train, data.tokenizer, cfg.train.batch_size, cfg.seed, shuffle=True)
        make_loader(data.val, data.tokenizer, cfg.train.eval_batch_size, cfg.seed, shuffle=False)
        steps["loaders_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        make_trainer(cfg, [EpochReporter(cfg, lambda r, d: None, {})], False)
        steps["trainer_s"].append(time.perf_counter() - t)
    return {"data_mb": len(blob) / 2**20, **{k: summary(v) for k, v in steps.items()}}


def sweep(base: Any, data: Any, n: int, slots: int, reuse: bool, work: Path, tag: str, trial: str) -> dict[str, Any]:
    """One sweep of n short trials on the already running Ray; wall time of `Tuner.fit` only."""
    import shutil

    from lorahpo.config import apply_overrides
    from lorahpo.results import ordered
    from lorahpo.tuner import make_tuner

    name = f"{tag}-{trial}-n{n}-slots{slots}" + ("-reuse" if reuse else "")
    cfg = apply_overrides(
        base,
        {
            "sweep.name": name,
            "sweep.storage_path": str(work),
            "sweep.num_samples": n,
            "sweep.max_concurrent_trials": slots,
            "sweep.cpus_per_trial": 2 / slots,
            "sweep.reuse_actors": reuse,
        },
    )
    shutil.rmtree(work / name, ignore_errors=True)
    tuner = make_tuner(cfg, data)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t
    results = ordered(grid)
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} trials failed, first: {errors[0]}")
    own = [float(r.metrics["time_total_s"]) for r in results]
    epochs = [float(r.metrics_dataframe["epoch_time_s"].sum()) for r in results]
    pids = {int(r.metrics["pid"]) for r in results}
    return {
        "name": name,
        "trial": trial,
        "n": n,
        "slots": slots,
        "reuse_actors": reuse,
        "wall_s": wall,
        "sum_trial_time_s": sum(own),
        "ratio": wall * slots / sum(own),
        "overhead_per_trial_s": (wall * slots - sum(own)) / n,
        "trial_time_s": summary(own),
        "trial_epoch_time_s": summary(epochs),  # the epochs inside a trial (train + val + checkpoint report)
        "in_trial_startup_s": summary([a - b for a, b in zip(own, epochs)]),
        "worker_processes": len(pids),
        "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "val_fbeta": [round(float(r.metrics["val_fbeta"]), 6) for r in results],
        "params": [r.config for r in results],
    }


def tracker_overhead(cfg: Any, data: Any, work: Path, repeats: int) -> dict[str, Any]:
    """The same sweep without trackers and with the default one (TensorBoard), alternating the order per repeat
    (drift on a shared machine cancels); both write the live journal (see journal_cost). Seeded and sequential: the
    trials must be identical with and without trackers (they never feed the searcher)."""
    import shutil

    from lorahpo.config import apply_overrides
    from lorahpo.results import ordered
    from lorahpo.tuner import make_tuner

    runs = []
    for rep in range(repeats):
        for loggers in ([], ["tensorboard"]) if rep % 2 == 0 else (["tensorboard"], []):
            name = f"trackers-{'-'.join(loggers) or 'none'}-rep{rep}"
            c = apply_overrides(cfg, {"sweep.loggers": loggers, "sweep.name": name, "sweep.storage_path": str(work)})
            shutil.rmtree(work / name, ignore_errors=True)
            tuner = make_tuner(c, data)
            t = time.perf_counter()
            results = ordered(tuner.fit())
            wall = time.perf_counter() - t
            row = {
                "loggers": loggers,
                "repeat": rep,
                "wall_s": wall,
                "sum_trial_time_s": sum(float(r.metrics["time_total_s"]) for r in results),
                "event_files": len(list((work / name).glob("trial_*/events.out.tfevents.*"))),
                "val_fbeta": [[float(v) for v in r.metrics_dataframe["val_fbeta"]] for r in results],
            }
            runs.append(row)
            print(f"[overhead] trackers {loggers}: wall {wall:.1f} s, {row['event_files']} event files", flush=True)
    none = statistics.median(r["wall_s"] for r in runs if not r["loggers"])
    tb = statistics.median(r["wall_s"] for r in runs if r["loggers"])
    curves = {tuple(map(tuple, r["val_fbeta"])) for r in runs}
    return {"runs": runs, "wall_none_s": none, "wall_tensorboard_s": tb,
            "tensorboard_overhead_pct": 100 * (tb - none) / none, "identical_trials": len(curves) == 1}  # fmt: skip


def journal_cost(cfg: Any, work: Path, trials: int = 64, epochs: int = 3) -> dict[str, Any]:
    """The live journal's own cost on the driver: LiveStudy's hooks for `trials` trials of `epochs` epochs each, on
    local disk, as Tune calls them (start, one result per epoch, complete)."""
    import shutil
    from types import SimpleNamespace

    from lorahpo.config import apply_overrides, tuning_metric
    from lorahpo.tracking import LiveStudy

    c = apply_overrides(cfg, {"sweep.name": "journal-cost", "sweep.storage_path": str(work)})
    shutil.rmtree(work / "journal-cost", ignore_errors=True)
    live = LiveStudy(c)
    live.setup()
    params = dict(c.sweep.points_to_evaluate[0]) if c.sweep.points_to_evaluate else {}
    t = time.perf_counter()
    for i in range(trials):
        trial = SimpleNamespace(path=f"{work}/journal-cost/trial_{i:03d}_x", config=params, last_result=None)
        live.on_trial_start(0, [], trial)
        for epoch in range(1, epochs + 1):
            trial.last_result = {"epoch": epoch, c.train.metric: 0.5 + epoch / 10, tuning_metric(c): 0.5 + epoch / 10}
            live.on_trial_result(0, [], trial, trial.last_result)
        live.on_trial_complete(0, [], trial)
    per_trial = (time.perf_counter() - t) / trials
    assert not live._failed, "the journal failed to write"
    return {"trials": trials, "epochs": epochs, "seconds_per_trial": per_trial}


def trackers_main(args: argparse.Namespace) -> int:
    import ray

    from lorahpo.config import apply_overrides, load_config
    from lorahpo.data import load_task
    from lorahpo.sources import load_tokenizer

    quiet()
    out = (args.out or DOCS_DIR / "overhead").resolve()
    work = (args.work or (out / "work" if args.smoke else WORK_DIR / "overhead")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = apply_overrides(load_config(), {**SHORT_TRIAL, "sweep.num_samples": 2}) if args.smoke else load_config()
    data = load_task(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    res: dict[str, Any] = {"machine": machine(), "smoke": args.smoke, "sweep": f"{cfg.model.name}, "
                           f"{cfg.sweep.num_samples} trials x up to {cfg.train.max_epochs} epochs"}  # fmt: skip
    res["journal"] = journal_cost(cfg, work)
    ray.init(address="local", log_to_driver=False, configure_logging=False)
    try:
        res["trackers"] = tracker_overhead(cfg, data, work, 1 if args.smoke else args.repeats)
    finally:
        ray.shutdown()
    t, j = res["trackers"], res["journal"]
    trial_s = statistics.median(r["sum_trial_time_s"] / cfg.sweep.num_samples for r in t["runs"])
    res["journal_pct_of_trial"] = 100 * j["seconds_per_trial"] / trial_s
    write_json(out / "trackers.json", res)
    print(
        f"[overhead] TensorBoard: {t['wall_none_s']:.1f} s -> {t['wall_tensorboard_s']:.1f} s "
        f"({t['tensorboard_overhead_pct']:+.2f}%), identical trials: {t['identical_trials']}; live journal "
        f"{1000 * j['seconds_per_trial']:.1f} ms per trial ({res['journal_pct_of_trial']:.3f}% of a trial); "
        f"wrote {out / 'trackers.json'}",
        flush=True,
    )
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = matplotlib_pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for reuse, style in ((False, "o-"), (True, "s--")):
        pts = sorted((r["n"], r["ratio"], r["overhead_per_trial_s"]) for r in rows if r["reuse_actors"] == reuse)
        if not pts:
            continue
        label = "reused workers (reuse_actors=true, default)" if reuse else "fresh worker per trial (before)"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        bx.plot([p[0] for p in pts], [p[2] for p in pts], style, label=label)
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xticks(sorted({r["n"] for r in rows}), [str(n) for n in sorted({r["n"] for r in rows})])
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks([1, 2, 4, 8, 16, 32])
    ax.set_xlabel("trials in the sweep (N)")
    bx.set_xlabel("trials in the sweep (N)")
    ax.set_ylabel("wall x slots / sum of trial time")
    bx.set_ylabel("orchestration seconds per trial")
    ax.set_title("overhead ratio, very short trials (1 slot)\n(denominator: noisy sub-second trials)", fontsize=10)
    bx.set_title("orchestration seconds per trial\n(wall - sum of trial time) / N", fontsize=10)
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(res: dict[str, Any]) -> str:
    rows = [
        [
            r["trial"],
            r["n"],
            r["slots"],
            "yes" if r["reuse_actors"] else "no",
            r["wall_s"],
            r["sum_trial_time_s"],
            r["trial_time_s"]["median"],
            r["ratio"],
            r["overhead_per_trial_s"],
            r["worker_processes"],
            f"{r['loadavg_1min'][0]} / {r['loadavg_1min'][1]}",
        ]
        for r in res["sweeps"]
    ]
    head = [
        "trial",
        "N",
        "slots",
        "reuse_actors",
        "wall s",
        "sum of trial time s",
        "trial time s (median)",
        "overhead ratio",
        "overhead s per trial",
        "worker processes",
        "load avg (start / end)",
    ]
    start = res["trial_startup"]
    parts = [
        md_table(head, rows),
        "\nStart-up costs (median of repeats):\n\n",
        md_table(
            ["what", "seconds"],
            [
                ["ray.init (fresh local Ray, as run_sweep)", res["ray_startup"]["init_s"]["median"]],
                ["ray.shutdown", res["ray_startup"]["shutdown_s"]["median"]],
                ["cold import of lorahpo.trainable + tuner in a fresh process", res["cold_import_s"]["median"]],
                ["tiny model: data unpickle (object store copy)", start["tiny"]["data_unpickle_s"]["median"]],
                ["tiny model: seed + model build + LoRA", start["tiny"]["model_build_s"]["median"]],
                ["tiny model: loaders", start["tiny"]["loaders_s"]["median"]],
                ["tiny model: Lightning Trainer", start["tiny"]["trainer_s"]["median"]],
            ]
            + (
                [
                    [
                        f"default model ({res['default_model']}): data unpickle",
                        start["default"]["data_unpickle_s"]["median"],
                    ],
                    [
                        f"default model ({res['default_model']}): seed + model build + LoRA",
                        start["default"]["model_build_s"]["median"],
                    ],
                ]
                if "default" in start
                else []
            ),
        ),
    ]
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="N=2, one repeat, no default-model runs: plumbing check")
    p.add_argument("--ns", type=int, nargs="+", default=None, help="sweep sizes (default 4 16 64; smoke: 2)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the smallest N and of the start-up timings")
    p.add_argument("--two-slots", type=int, nargs="*", default=None, help="N for an extra 2-slot run (default 16)")
    p.add_argument("--default-n", type=int, default=None, help="trials of the default-model sweep (default 4; 0: none)")
    p.add_argument("--out", type=Path, default=None, help="results dir (default docs/benchmarks/overhead)")
    p.add_argument("--work", type=Path, default=None, help="Ray experiments (default bench/out/overhead)")
    p.add_argument("--trackers", action="store_true", help="only the cost of watching a sweep (see the docstring)")
    args = p.parse_args(argv)
    if args.trackers:
        return trackers_main(args)
    ns = args.ns or ([2] if args.smoke else [4, 16, 64])
    repeats = 1 if args.smoke else args.repeats
    two_slots = args.two_slots if args.two_slots is not None else ([] if args.smoke else [16])
    default_n = args.default_n if args.default_n is not None else (0 if args.smoke else 4)
    out = (args.out or DOCS_DIR / "overhead").resolve()
    work = (args.work or (out / "work" if args.smoke else WORK_DIR / "overhead")).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import ray

    from lorahpo.config import apply_overrides, load_config
    from lorahpo.data import load_task
    from lorahpo.sources import load_tokenizer

    quiet()
    res: dict[str, Any] = {"machine": machine(), "smoke": args.smoke, "short_trial": SHORT_TRIAL}
    t_all = time.perf_counter()
    base = apply_overrides(load_config(), SHORT_TRIAL)
    data = load_task(base.data, load_tokenizer(base.model), base.seed)
    res["cold_import_s"] = cold_import(repeats)
    print(f"[overhead] cold import {res['cold_import_s']['median']:.2f} s", flush=True)
    res["trial_startup"] = {"tiny": trial_startup(base, data, repeats)}
    inputs = {"short": (base, data)}
    if not args.smoke:
        default = load_config()
        res["default_model"] = f"{default.model.name}, {default.model.num_layers} layers"
        ddata = load_task(default.data, load_tokenizer(default.model), default.seed)
        res["trial_startup"]["default"] = trial_startup(default, ddata, repeats)
        # real trials: the default model and data, one epoch each, every trial runs it (FIFO)
        res["default_trial"] = DEFAULT_TRIAL
        inputs["default"] = (apply_overrides(default, DEFAULT_TRIAL), ddata)
    res["ray_startup"] = ray_startup(repeats)
    print(f"[overhead] ray.init {res['ray_startup']['init_s']['median']:.2f} s", flush=True)

    ray.init(address="local", log_to_driver=False, configure_logging=False)
    res["sweeps"] = []
    try:
        plan = []
        for reuse in (False, True):  # before the fix, then the project default
            plan += [("short", n, 1, reuse) for n in ns] + [("short", n, 2, reuse) for n in two_slots]
            plan += [("default", default_n, 1, reuse)] if default_n else []
        for trial, n, slots, reuse in plan:
            for rep in range(repeats if trial == "short" and n == min(ns) else 1):
                row = sweep(*inputs[trial], n, slots, reuse, work, f"rep{rep}", trial)
                row["repeat"] = rep
                res["sweeps"].append(row)
                print(
                    f"[overhead] {trial} N={n} slots={slots} reuse={reuse} rep={rep}: wall {row['wall_s']:.1f} s, "
                    f"trials {row['sum_trial_time_s']:.1f} s, ratio {row['ratio']:.2f}, "
                    f"{row['overhead_per_trial_s']:.2f} s/trial",
                    flush=True,
                )
    finally:
        ray.shutdown()
    # The fix must not change results: the same seeded, sequential sweep gives the same configs and metrics.
    checks = []
    for trial, n, slots in sorted({(r["trial"], r["n"], r["slots"]) for r in res["sweeps"]}):
        same = [r for r in res["sweeps"] if (r["trial"], r["n"], r["slots"]) == (trial, n, slots)]
        a = next((r for r in same if not r["reuse_actors"]), None)
        b = next((r for r in same if r["reuse_actors"]), None)
        if a and b and slots == 1:  # 2 slots: completion order, hence TPE's history, may differ
            identical = a["val_fbeta"] == b["val_fbeta"] and a["params"] == b["params"]
            checks.append({"trial": trial, "n": n, "identical": identical})
    res["reuse_actors_results_identical"] = checks
    by_n: dict[tuple[str, int, int, bool], list[float]] = {}
    for r in res["sweeps"]:
        by_n.setdefault((r["trial"], r["n"], r["slots"], r["reuse_actors"]), []).append(r["ratio"])
    res["ratio_median"] = {
        f"{t}-n{n}-slots{s}" + ("-reuse" if u else ""): statistics.median(v) for (t, n, s, u), v in by_n.items()
    }
    res["total_wall_s"] = time.perf_counter() - t_all
    write_json(out / "results.json", res)
    (out / "table.md").write_text(markdown(res))
    plot([r for r in res["sweeps"] if r["slots"] == 1 and r["trial"] == "short"], out / "overhead.png")
    print((out / "table.md").read_text())
    print(f"[overhead] wrote {out} in {res['total_wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
