"""The frozen-prefix cache (`sweep.prefix_cache`, lorahpo/prefix.py): what computing the frozen layers once per sweep
saves, and what it costs.

Parts (`--parts`, comma-separated; default `epochs,sweep,flops`):

- `epochs`: one trial-epoch of configs/default.yaml (SmolLM2-135M, first 4 layers, 2,100 training SMS) through
  `lorahpo.trainable.fit`, with and without the cache, for `lora.last_n` = 1, 2, 4 of 4, interleaved, `--repeats`
  times each (medians): training and validation time, real tokens/s, the whole fit (model build included); and the
  cache's build time and size (built in this process, as the sweep's Ray task builds it).
- `sweep`: the default sweep with and without the cache, the same trials (random searcher + FIFO, seed 3, no
  points_to_evaluate, 4 trials x 2 epochs, `lora.last_n` categorical {1, 2}: two trials of each), side by side,
  each through the project's own `sweep.prepare` + `sweep.run` (Ray start, cache build and the final full-model check
  included): summed trial time (Tune's time_total_s), wall, and their ratios. The issue's target: summed trial time
  with/without <= 0.67.
- `flops`: the predecessor's shape on paper (Llama-3.2-3B: 28 layers, `last_n` 10-14, sequences padded to 512):
  FLOPs of a training and a validation token with and without the cache, the speed-up they imply, and the build cost.
- `deeper`: the default sweep as shipped (configs/default.yaml: TPE + ASHA, 8 trials, up to 3 epochs) with more of
  SmolLM2's 30 layers under the cache (`--layers`), against today's default (4 layers, no cache): wall, summed trial
  time, build time, best val F-beta and its test F-beta. Whether a deeper default is affordable, and better.

    python bench/prefix_cache.py                                # epochs + sweep + flops (~12 min on 2 idle cores)
    python bench/prefix_cache.py --parts deeper --layers 4,8,12 # today's default + 3 cached sweeps (~15-20 min)
    python bench/prefix_cache.py --smoke --out /tmp/p           # plumbing check on the tiny random model (~2 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from common import DOCS_DIR, WORK_DIR, machine, md_table, quiet, summary, write_json

PARTS = ("epochs", "sweep", "flops", "deeper")
EPOCH_LAST_N = (1, 2, 4)
SWEEP = {  # the side-by-side sweep: the same 4 trials with and without the cache
    "seed": 3,
    "sweep.searcher": "random",
    "sweep.scheduler": "fifo",
    "sweep.points_to_evaluate": [],
    "sweep.num_samples": 4,
    "train.max_epochs": 2,
}
SMOKE = {  # the tiny random Llama: seconds per trial
    "model.name": "tiny-random-llama",
    "model.num_layers": 4,
    "data.max_examples": 200,
    "data.max_length": 32,
}
SWEEP_TRIAL_EPOCHS = (8, 24, 48)  # sweep sizes for the FLOP ratio of a whole sweep, the build included
PREDECESSOR = {"seq": 512, "last_n": (10, 11, 12, 13, 14), "r": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def base_config(smoke: bool, overrides: dict[str, Any]) -> Any:
    from lorahpo.config import apply_overrides, load_config

    return apply_overrides(load_config(), {**(SMOKE if smoke else {}), **overrides})


def with_last_n_space(cfg: Any, choices: tuple[int, ...]) -> Any:
    from lorahpo.config import ParamSpec

    return dataclasses.replace(cfg, search={**cfg.search, "lora.last_n": ParamSpec("categorical", choices=choices)})


# ---------------------------------------------------------------------------------------------------------------------
# Part 1: trial-epochs


def epoch_timing() -> Any:
    import lightning as L

    class EpochTiming(L.Callback):
        """Training phase (every step, data loading included), validation phase, real tokens trained."""

        def __init__(self) -> None:
            self.train_s = self.val_s = 0.0
            self.tokens = 0
            self.t = 0.0

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, idx: int) -> None:
            self.tokens += int(batch["attention_mask"].sum())

        def on_validation_start(self, trainer: Any, module: Any) -> None:
            self.train_s = time.perf_counter() - self.t
            self.t = time.perf_counter()

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            self.val_s = time.perf_counter() - self.t

    return EpochTiming()


def one_epoch(cfg: Any, data: Any, prefix: Any, threads: int) -> tuple[Any, dict[str, Any]]:
    from lorahpo.trainable import fit

    timing = epoch_timing()
    rows: list[dict[str, Any]] = []
    fit(cfg, data, lambda r, d: rows.append(r), None, threads, callbacks=[timing], prefix=prefix)
    return timing, rows[-1]


def part_epochs(smoke: bool, repeats: int) -> dict[str, Any]:
    import os

    from lorahpo.config import apply_overrides
    from lorahpo.data import load_task
    from lorahpo.prefix import build_in_memory, cut_for, plan_prefix
    from lorahpo.sources import load_model_config, load_tokenizer
    from lorahpo.trainable import trial_threads

    cfg = with_last_n_space(base_config(smoke, {"train.max_epochs": 1}), EPOCH_LAST_N)
    data = load_task(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    plan = plan_prefix(cfg, load_model_config(cfg.model), data)
    t = time.perf_counter()
    cache = build_in_memory(cfg, data, plan)
    build = {"build_s": time.perf_counter() - t, "gb": plan.nbytes() / 1e9, "cuts": list(plan.cuts)}
    print(f"[prefix] cache of cuts {plan.cuts}: {build['gb']:.3f} GB built in {build['build_s']:.1f} s", flush=True)
    runs = []
    for rep in range(repeats):
        for last_n in EPOCH_LAST_N:
            for cached in (False, True):
                trial = apply_overrides(cfg, {"lora.last_n": last_n})
                load = os.getloadavg()[0]
                t = time.perf_counter()
                timing, last = one_epoch(trial, data, cache if cached else None, trial_threads(cfg))
                runs.append(
                    {
                        "repeat": rep,
                        "last_n": last_n,
                        "cached": cached,
                        "cut": cut_for(cache, last_n) if cached else None,
                        "fit_s": time.perf_counter() - t,
                        "train_s": timing.train_s,
                        "val_s": timing.val_s,
                        "train_tok_s": timing.tokens / timing.train_s,
                        "val_fbeta": last["val_fbeta"],
                        "val_loss": last["val_loss"],
                        "loadavg": load,
                    }
                )
                r = runs[-1]
                print(
                    f"[prefix] last_n={last_n} cached={cached}: train {r['train_s']:.1f} s, val {r['val_s']:.1f} s, "
                    f"{r['train_tok_s']:.0f} tok/s",
                    flush=True,
                )
    table = []
    for last_n in EPOCH_LAST_N:
        row: dict[str, Any] = {"last_n": last_n, "cut": cut_for(cache, last_n)}
        for cached in (False, True):
            mine = [r for r in runs if r["last_n"] == last_n and r["cached"] == cached]
            tag = "cached" if cached else "full"
            for k in ("fit_s", "train_s", "val_s", "train_tok_s"):
                row[f"{tag}_{k}"] = summary([r[k] for r in mine])
            row[f"{tag}_val_loss"] = mine[0]["val_loss"]
        for k in ("fit_s", "train_s", "val_s"):
            row[f"ratio_{k}"] = row[f"cached_{k}"]["median"] / row[f"full_{k}"]["median"]
        row["val_loss_diff"] = abs(row["cached_val_loss"] - row["full_val_loss"])
        table.append(row)
    return {"build": build, "runs": runs, "table": table, "tokens_train": plan.tokens["train"]}


# ---------------------------------------------------------------------------------------------------------------------
# Parts 2 and 4: whole sweeps through the project's own driver


def run_sweep(cfg: Any, name: str, work: Path) -> dict[str, Any]:
    import pandas as pd

    from lorahpo import sweep
    from lorahpo.config import apply_overrides

    cfg = apply_overrides(cfg, {"sweep.name": name, "sweep.storage_path": str(work)})
    t = time.perf_counter()
    data, plan = sweep.prepare(cfg, overwrite=True)
    result = sweep.run(cfg, data, plan, overwrite=True)
    wall = time.perf_counter() - t
    df = pd.read_parquet(work / name / "results.parquet")
    params = [c for c in df if c.startswith("param.")]
    out = {
        "name": name,
        "prefix_cache": cfg.sweep.prefix_cache,
        "num_layers": cfg.model.num_layers,
        "wall_s": wall,
        "sum_trial_s": float(df["wall_time_s"].sum()),
        "trial_epochs": int(df["epochs"].sum()),
        "best_val_fbeta": result["best_value"],
        "test_fbeta": result["test"].get("test_fbeta"),
        "trials": [
            {
                **{p: r[p] for p in params},
                "wall_time_s": r["wall_time_s"],
                "best_val_fbeta": r["best_val_fbeta"],
                "epochs": int(r["epochs"]),
            }
            for _, r in df.iterrows()
        ],
        "cache": result.get("prefix_cache"),
    }
    print(
        f"[prefix] sweep {name}: wall {wall:.1f} s, trials {out['sum_trial_s']:.1f} s, best val F-beta "
        f"{out['best_val_fbeta']:.4f}, test F-beta {out['test_fbeta']}",
        flush=True,
    )
    return out


def sweep_config(smoke: bool, cache: bool) -> Any:
    overrides = {**SWEEP, "sweep.prefix_cache": cache, **({"train.max_epochs": 1} if smoke else {})}
    return with_last_n_space(base_config(smoke, overrides), (1, 2))


def part_sweep(smoke: bool, work: Path) -> dict[str, Any]:
    on = run_sweep(sweep_config(smoke, True), "cached", work)  # first: cold-start costs land on the cache's side
    off = run_sweep(sweep_config(smoke, False), "full", work)
    strip = [{k: v for k, v in t.items() if k.startswith("param.")} for t in on["trials"]]
    same = strip == [{k: v for k, v in t.items() if k.startswith("param.")} for t in off["trials"]]
    last_n = sorted(int(t["param.lora.last_n"]) for t in on["trials"])
    return {
        "with_cache": on,
        "without_cache": off,
        "same_trials": same,
        "last_n_of_trials": last_n,
        "ratio_sum_trial_s": on["sum_trial_s"] / off["sum_trial_s"],
        "ratio_wall_s": on["wall_s"] / off["wall_s"],
        "target_ratio_sum_trial_s": 0.67,
    }


def part_deeper(smoke: bool, layers: list[int], work: Path) -> dict[str, Any]:
    small = {"sweep.num_samples": 2, "train.max_epochs": 1} if smoke else {}
    base = run_sweep(base_config(smoke, {**small, "sweep.prefix_cache": False}), "deeper_4_full", work)
    rows = [base]
    for n in layers:
        cfg = base_config(smoke, {**small, "model.num_layers": n, "sweep.prefix_cache": True})
        rows.append(run_sweep(cfg, f"deeper_{n}_cached", work))
    for r in rows:
        r["wall_vs_default"] = r["wall_s"] / base["wall_s"]
    return {"sweeps": rows}


# ---------------------------------------------------------------------------------------------------------------------
# Part 3: the predecessor's shape on paper


def part_flops() -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_throughput import LLAMA32_3B, flops_per_token

    shape, seq = LLAMA32_3B, PREDECESSOR["seq"]
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d_q, d_kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    layer_fwd = 2 * (h * d_q + 2 * h * d_kv + d_q * h + 3 * h * inter) + 4 * seq * d_q  # as flops_per_token counts
    rows = []
    for k in PREDECESSOR["last_n"]:
        train_full = flops_per_token(shape, seq, k, PREDECESSOR["r"], PREDECESSOR["targets"])
        train_cached = train_full - (layers - k) * layer_fwd  # the frozen layers' forward is what the cache removes
        lora_fwd = train_full - flops_per_token(shape, seq, k, 0, PREDECESSOR["targets"])  # LoRA's share (fwd+bwd)
        val_full = layers * layer_fwd + lora_fwd / 3  # forward only; LoRA's forward is a third of its fwd+bwd
        val_cached = k * layer_fwd + lora_fwd / 3
        rows.append(
            {
                "last_n": k,
                "train_gflop_per_token": [train_full / 1e9, train_cached / 1e9],
                "val_gflop_per_token": [val_full / 1e9, val_cached / 1e9],
                "train_speedup": train_full / train_cached,
                "val_speedup": val_full / val_cached,
            }
        )
    mean = sum(r["train_speedup"] for r in rows) / len(rows)
    # one build over train + val through the highest cut (last_n = 10: 18 layers' forward per token), once per sweep
    build = (layers - min(PREDECESSOR["last_n"])) * layer_fwd
    # a whole sweep: val tokens are 0.15 / 0.70 of the train tokens (data.split), last_n spread evenly over 10-14
    val_share = 0.15 / 0.70
    epoch_full = sum(r["train_gflop_per_token"][0] + val_share * r["val_gflop_per_token"][0] for r in rows)
    epoch_cached = sum(r["train_gflop_per_token"][1] + val_share * r["val_gflop_per_token"][1] for r in rows)
    sweep = {
        n: (n * epoch_cached / len(rows) + (1 + val_share) * build / 1e9) / (n * epoch_full / len(rows))
        for n in SWEEP_TRIAL_EPOCHS
    }
    return {
        "shape": "Llama-3.2-3B",
        "seq": seq,
        "rows": rows,
        "mean_train_speedup": mean,
        "layer_fwd_gflop_per_token": layer_fwd / 1e9,
        "build_gflop_per_token": build / 1e9,
        "sweep_flop_ratio_by_trial_epochs": sweep,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Report


def markdown(res: dict[str, Any]) -> str:
    out = []
    if "epochs" in res:
        e = res["epochs"]
        b = e["build"]
        out.append(f"Cache of cuts {b['cuts']}: {b['gb']:.3f} GB, built in {b['build_s']:.1f} s.\n")
        rows = [
            [
                r["last_n"],
                r["cut"],
                r["full_train_s"]["median"],
                r["cached_train_s"]["median"],
                r["ratio_train_s"],
                r["full_val_s"]["median"],
                r["cached_val_s"]["median"],
                r["ratio_val_s"],
                r["full_fit_s"]["median"],
                r["cached_fit_s"]["median"],
                r["ratio_fit_s"],
                r["full_train_tok_s"]["median"],
                r["cached_train_tok_s"]["median"],
            ]
            for r in e["table"]
        ]
        out.append(
            md_table(
                [
                    "last_n",
                    "cut",
                    "train s",
                    "train s cached",
                    "ratio",
                    "val s",
                    "val s cached",
                    "ratio",
                    "fit s",
                    "fit s cached",
                    "ratio",
                    "train tok/s",
                    "train tok/s cached",
                ],
                rows,
            )
        )
    if "sweep" in res:
        s = res["sweep"]
        rows = [
            [name, x["sum_trial_s"], x["wall_s"], x["best_val_fbeta"], x["test_fbeta"]]
            for name, x in (("without cache", s["without_cache"]), ("with cache", s["with_cache"]))
        ]
        rows.append(["with / without", s["ratio_sum_trial_s"], s["ratio_wall_s"], "", ""])
        out.append(f"\nSweep: same trials {s['same_trials']}, last_n of the trials {s['last_n_of_trials']}.\n\n")
        out.append(md_table(["sweep", "summed trial time s", "wall s", "best val F-beta", "test F-beta"], rows))
    if "flops" in res:
        f = res["flops"]
        rows = [
            [r["last_n"], *r["train_gflop_per_token"], r["train_speedup"], *r["val_gflop_per_token"], r["val_speedup"]]
            for r in f["rows"]
        ]
        ratios = ", ".join(f"{n} trial-epochs {v:.2f}" for n, v in f["sweep_flop_ratio_by_trial_epochs"].items())
        out.append(f"\n{f['shape']}, seq {f['seq']} (GFLOP per token); a whole sweep, cached / full: {ratios}\n\n")
        out.append(
            md_table(["last_n", "train full", "train cached", "speed-up", "val full", "val cached", "speed-up"], rows)
        )
    if "deeper" in res:
        rows = [
            [
                r["name"],
                r["num_layers"],
                r["prefix_cache"],
                r["wall_s"],
                r["wall_vs_default"],
                r["sum_trial_s"],
                (r["cache"] or {}).get("build_s", ""),
                r["best_val_fbeta"],
                r["test_fbeta"],
            ]
            for r in res["deeper"]["sweeps"]
        ]
        out.append(
            "\n"
            + md_table(
                [
                    "sweep",
                    "layers",
                    "cache",
                    "wall s",
                    "wall / default",
                    "summed trial s",
                    "build s",
                    "best val F-beta",
                    "test F-beta",
                ],
                rows,
            )
        )
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random model, one repeat: plumbing check")
    p.add_argument("--parts", default=None, help=f"comma-separated of {','.join(PARTS)} (smoke: all)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each trial-epoch (part epochs)")
    p.add_argument("--layers", default=None, help="model.num_layers values of part deeper (default 4,8,12)")
    p.add_argument("--out", type=Path, default=None, help="results dir (default docs/benchmarks/prefix_cache)")
    args = p.parse_args(argv)
    quiet()
    parts = (args.parts or (",".join(PARTS) if args.smoke else "epochs,sweep,flops")).split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    layers = [int(x) for x in (args.layers or ("6" if args.smoke else "4,8,12")).split(",")]
    out = (args.out or DOCS_DIR / "prefix_cache").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (out / "work") if args.smoke else WORK_DIR / "prefix_cache"
    shutil.rmtree(work, ignore_errors=True)
    res: dict[str, Any] = {"machine": machine(), "smoke": args.smoke, "parts": parts}
    if "epochs" in parts:
        res["epochs"] = part_epochs(args.smoke, 1 if args.smoke else args.repeats)
    if "sweep" in parts:
        res["sweep"] = part_sweep(args.smoke, work)
    if "flops" in parts:
        res["flops"] = part_flops()
    if "deeper" in parts:
        res["deeper"] = part_deeper(args.smoke, layers, work)
    write_json(out / "results.json", res)
    (out / "table.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
