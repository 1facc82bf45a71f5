"""Padding efficiency: real tokens / padded tokens per training epoch with the project's batching (length-grouped
batches, `lorahpo.data.LengthGroupedBatches`) against naive random batches padded to their longest
row (the predecessor's DataLoader), padding every row to `data.max_length`, and a global sort (the least padding
possible).

Counts only, no training: it takes seconds. Averaged over `--epochs` epochs (each epoch reshuffles).

    python bench/padding.py                        # the recorded run: configs/default.yaml's data and tokenizer
    python bench/padding.py --smoke --out /tmp/p   # the tiny tokenizer on 300 texts
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import DOCS_DIR, machine, matplotlib_pyplot, md_table, quiet, write_json

SMOKE = {"model.name": "tiny-random-llama", "data.max_examples": 300}
SCHEMES = {
    "project": "project: length-grouped batches (shuffled windows of 50 batches)",
    "random": "naive: random batches, padded to their longest row",
    "max_length": "pad every row to data.max_length",
    "sorted": "global sort by length (least padding possible; no randomness)",
}


def padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def epoch_batches(scheme: str, lengths: list[int], bs: int, seed: int, epoch: int) -> list[list[int]]:
    from lorahpo.data import LengthGroupedBatches
    from lorahpo.repro import epoch_seed

    if scheme == "project":
        sampler = LengthGroupedBatches(lengths, bs, seed)
        sampler.set_epoch(epoch)
        return list(sampler)
    order = list(range(len(lengths)))
    if scheme == "sorted":
        order.sort(key=lambda i: lengths[i])
    else:
        random.Random(epoch_seed(seed, epoch)).shuffle(order)
    return [order[i : i + bs] for i in range(0, len(order), bs)]


def measure(lengths: list[int], max_length: int, bs: int, seed: int, epochs: int) -> dict[str, Any]:
    real = sum(lengths)
    out: dict[str, Any] = {"batch_size": bs, "real_tokens_per_epoch": real}
    for scheme in SCHEMES:
        if scheme == "max_length":
            pads = [len(lengths) * max_length]
        else:
            pads = [padded_tokens(epoch_batches(scheme, lengths, bs, seed, e), lengths) for e in range(epochs)]
        out[scheme] = {
            "padded_tokens_per_epoch": statistics.mean(pads),
            "efficiency": real / statistics.mean(pads),
            "padded_tokens_per_row": statistics.mean(pads) / len(lengths),
        }
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    plt = matplotlib_pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rows = res["batch_sizes"]
    width = 0.8 / len(SCHEMES)
    for k, scheme in enumerate(SCHEMES):
        xs = [i + (k - (len(SCHEMES) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[scheme]["efficiency"] for r in rows], width, label=SCHEMES[scheme])
    ax.set_xticks(range(len(rows)), [f"batch {r['batch_size']}" for r in rows])
    ax.set_ylim(0, 1.45)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("real tokens / padded tokens")
    ax.set_title(f"padding efficiency per training epoch\n{res['data']}", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="results dir (default docs/benchmarks/padding)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    out = (args.out or DOCS_DIR / "padding").resolve()
    out.mkdir(parents=True, exist_ok=True)

    from lorahpo.config import apply_overrides, load_config, parse_overrides
    from lorahpo.data import load_task
    from lorahpo.sources import load_tokenizer

    quiet()
    t0 = time.perf_counter()
    cfg = apply_overrides(load_config(), {**(SMOKE if args.smoke else {}), **parse_overrides(args.overrides)})
    data = load_task(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    lengths = [len(t) for t in data.train.input_ids]
    res: dict[str, Any] = {
        "machine": machine(),
        "smoke": args.smoke,
        "data": f"{cfg.model.name} tokenizer, {len(lengths)} training texts, max_length {cfg.data.max_length}",
        "mean_tokens_per_text": statistics.mean(lengths),
        "epochs_averaged": args.epochs,
        "batch_sizes": [],
    }
    for bs in args.batch_sizes:
        row = measure(lengths, cfg.data.max_length, bs, cfg.seed, args.epochs)
        padded0 = padded_tokens(epoch_batches("project", lengths, bs, cfg.seed, 0), lengths)
        real = sum(lengths)
        row["padding_stats_epoch0"] = {"real_tokens": real, "padded_tokens": padded0, "efficiency": real / padded0}
        row["compute_saved_vs_random"] = (
            1 - row["project"]["padded_tokens_per_epoch"] / row["random"]["padded_tokens_per_epoch"]
        )
        res["batch_sizes"].append(row)
    res["wall_s"] = time.perf_counter() - t0
    write_json(out / "results.json", res)
    table = md_table(
        ["batch size", *[f"{s} efficiency" for s in SCHEMES], "padded tokens/row (project / random)", "tokens saved"],
        [
            [
                r["batch_size"],
                *[r[s]["efficiency"] for s in SCHEMES],
                f"{r['project']['padded_tokens_per_row']:.1f} / {r['random']['padded_tokens_per_row']:.1f}",
                f"{100 * r['compute_saved_vs_random']:.0f} %",
            ]
            for r in res["batch_sizes"]
        ],
    )
    (out / "table.md").write_text(table)
    plot(res, out / "padding.png")
    print(f"{res['data']}, mean {res['mean_tokens_per_text']:.1f} tokens per text\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
