"""Training throughput: one trial's Lightning training (`lorahpo.trainable.fit`) against a minimal plain-PyTorch loop
over the same model (`build_module`, same seed), the same batches (`lorahpo.data.make_loader`), the same optimizer and
schedule (AdamW + linear warmup/decay over the LoRA and head parameters) and the same loss; plus a trial's peak RSS
and its checkpoints (size, and time to save + persist them as a share of the trial).

Each measurement runs in a fresh process (so peak RSS is that run's alone), Lightning and plain runs interleaved,
`--repeats` times each; the tables report medians. A trial here is ONE epoch of configs/default.yaml (SmolLM2-135M,
first 4 layers, 2,100 training SMS), i.e. the first epoch of the default sweep's trials.

Lightning's training phase is timed with a callback added in front of the trial's own callbacks (bench-local
instrumentation through `lorahpo.trainable.fit(callbacks=...)`; it only reads clocks): from `on_train_epoch_start` to
`on_validation_start` (every training step, data loading included), and the steps alone.

    python bench/throughput.py                        # the recorded run (~10 min on 2 cores)
    python bench/throughput.py --smoke --out /tmp/t   # plumbing check on the tiny random model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import DOCS_DIR, machine, md_table, peak_rss_mb, quiet, summary, write_json

ONE_EPOCH = {"train.max_epochs": 1}
SMOKE = {
    "model.name": "tiny-random-llama",
    "model.num_layers": 2,
    "data.max_examples": 300,
    "train.max_epochs": 1,
}


def _config(smoke: bool, overrides: list[str]) -> Any:
    from lorahpo.config import apply_overrides, load_config, parse_overrides

    return apply_overrides(load_config(), {**(SMOKE if smoke else ONE_EPOCH), **parse_overrides(overrides)})


def _tokens(batch: dict[str, Any]) -> tuple[int, int]:
    mask = batch["attention_mask"]
    return int(mask.sum()), int(mask.numel())


def worker_lightning(cfg: Any, data: Any) -> dict[str, Any]:
    import lightning as L

    import lorahpo.trainable as T

    class Timing(L.Callback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.train_phase: list[float] = []
            self.val_phase: list[float] = []
            self.real = self.padded = 0
            self.t_epoch = self.t_batch = self.t_val = self.t_val_end = 0.0

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.t_epoch = time.perf_counter()

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
            self.t_batch = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, idx: int) -> None:
            self.steps.append(time.perf_counter() - self.t_batch)
            real, padded = _tokens(batch)
            self.real += real
            self.padded += padded

        def on_validation_start(self, trainer: Any, module: Any) -> None:
            if not trainer.sanity_checking:
                self.t_val = time.perf_counter()
                self.train_phase.append(self.t_val - self.t_epoch)

        def on_validation_end(self, trainer: Any, module: Any) -> None:  # runs before the trial's EpochReporter
            if not trainer.sanity_checking:
                self.t_val_end = time.perf_counter()
                self.val_phase.append(self.t_val_end - self.t_val)

    timing = Timing()
    ckpts: list[dict[str, float]] = []
    rows: list[dict[str, Any]] = []
    persist = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))

    def report(row: dict[str, Any], ckpt_dir: Path) -> None:
        saved = time.perf_counter()
        size = sum(f.stat().st_size for f in ckpt_dir.rglob("*") if f.is_file())
        t = time.perf_counter()
        shutil.copytree(ckpt_dir, persist / f"epoch{row['epoch']}")  # what Tune does with a local storage_path
        ckpts.append({"save_s": saved - timing.t_val_end, "persist_s": time.perf_counter() - t, "bytes": size})
        rows.append(row)

    try:
        t = time.perf_counter()
        T.fit(cfg, data, report, callbacks=[timing])
        fit_s = time.perf_counter() - t
    finally:
        shutil.rmtree(persist, ignore_errors=True)
    return {
        "fit_s": fit_s,
        "train_phase_s": sum(timing.train_phase),
        "val_phase_s": sum(timing.val_phase),
        "steps_s": timing.steps,
        "real_tokens": timing.real,
        "padded_tokens": timing.padded,
        "train_loss": rows[-1]["train_loss"],
        "val_fbeta": rows[-1]["val_fbeta"],
        "checkpoints": ckpts,
    }


def worker_plain(cfg: Any, data: Any) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from transformers import get_linear_schedule_with_warmup

    from lorahpo.data import make_loader
    from lorahpo.repro import epoch_seed
    from lorahpo.trainable import build_module

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.train.num_threads or torch.get_num_threads())  # as fit() does
    module = build_module(cfg, data)  # seeded exactly like a trial: same init
    model, weights = module.model, module.weights
    train_dl = make_loader(data.train, data.tokenizer, cfg.train.batch_size, cfg.seed, shuffle=True)
    val_dl = make_loader(data.val, data.tokenizer, cfg.train.eval_batch_size, cfg.seed, shuffle=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    total = len(train_dl) * cfg.train.max_epochs
    sched = get_linear_schedule_with_warmup(opt, int(cfg.train.warmup_ratio * total), total)
    steps, train_phase, val_phase = [], [], []
    real = padded = 0
    loss_sum, n_sum = 0.0, 0
    for epoch in range(cfg.train.max_epochs):
        train_dl.batch_sampler.set_epoch(epoch)
        te = time.perf_counter()
        # Lightning creates the loader's iterator (which draws its base seed from torch's RNG) before the module's
        # on_train_epoch_start reseeds for dropout: the same order here gives the same dropout masks.
        batches = iter(train_dl)
        torch.manual_seed(epoch_seed(cfg.seed, epoch))  # the trial's per-epoch dropout seed
        model.train()
        for batch in batches:
            tb = time.perf_counter()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss = F.cross_entropy(logits, batch["labels"], weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps.append(time.perf_counter() - tb)
            r, p = _tokens(batch)
            real, padded = real + r, padded + p
            loss_sum, n_sum = loss_sum + loss.item() * len(logits), n_sum + len(logits)
        train_phase.append(time.perf_counter() - te)
        tv = time.perf_counter()
        model.eval()
        with torch.no_grad():
            for batch in val_dl:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().argmax(-1)
        val_phase.append(time.perf_counter() - tv)
    return {
        "fit_s": time.perf_counter() - t0,
        "train_phase_s": sum(train_phase),
        "val_phase_s": sum(val_phase),
        "steps_s": steps,
        "real_tokens": real,
        "padded_tokens": padded,
        "train_loss": loss_sum / n_sum,
    }


def run_worker(kind: str, smoke: bool, overrides: list[str]) -> dict[str, Any]:
    quiet()
    from lorahpo.data import load_task
    from lorahpo.sources import load_tokenizer

    cfg = _config(smoke, overrides)
    t = time.perf_counter()
    data = load_task(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    load_s = time.perf_counter() - t
    out = worker_lightning(cfg, data) if kind == "lightning" else worker_plain(cfg, data)
    out.update(kind=kind, data_load_s=load_s, peak_rss_mb=peak_rss_mb(), threads=__import__("torch").get_num_threads())
    return out


def derived(r: dict[str, Any]) -> dict[str, float]:
    steps = r["steps_s"]
    return {
        "train_real_tok_s": r["real_tokens"] / r["train_phase_s"],
        "train_padded_tok_s": r["padded_tokens"] / r["train_phase_s"],
        "step_median_s": statistics.median(steps),
        "step_sum_s": sum(steps),
        "between_steps_s": r["train_phase_s"] - sum(steps),  # data loading + loop bookkeeping
        "epoch_s": r["train_phase_s"] + r["val_phase_s"],
    }


def markdown(res: dict[str, Any]) -> str:
    L, P = res["lightning"], res["plain"]
    keys = [
        ("train tokens/s (real tokens)", "train_real_tok_s"),
        ("train tokens/s (padded tokens)", "train_padded_tok_s"),
        ("median step (fwd+bwd+AdamW) s", "step_median_s"),
        ("training phase s (steps + data)", "train_phase_s"),
        ("sum of steps s", "step_sum_s"),
        ("between steps s (data, loop)", "between_steps_s"),
        ("validation s", "val_phase_s"),
        ("whole run s (model build .. end)", "fit_s"),
        ("peak RSS MB", "peak_rss_mb"),
    ]
    rows = [[name, L[k]["median"], P[k]["median"], L[k]["median"] / P[k]["median"]] for name, k in keys]
    t = md_table(["per run (median of repeats)", "Lightning (fit)", "plain PyTorch", "Lightning / plain"], rows)
    c = res["checkpoint"]
    t += "\n" + md_table(
        ["checkpoint (per epoch)", "value"],
        [
            ["size MB (trial.ckpt: LoRA + head + AdamW state)", c["mb"]],
            ["save s (trainer.save_checkpoint)", c["save_s"]["median"]],
            ["persist s (copy into storage)", c["persist_s"]["median"]],
            ["share of the trial's wall time", f"{100 * c['share_of_trial']:.2f} %"],
        ],
    )
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random model, one repeat: plumbing check")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="results dir (default docs/benchmarks/throughput)")
    p.add_argument("--worker", choices=["lightning", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args(argv)
    if args.worker:
        write_json(args.worker_out, run_worker(args.worker, args.smoke, args.overrides))
        return 0

    out = (args.out or DOCS_DIR / "throughput").resolve()
    out.mkdir(parents=True, exist_ok=True)
    repeats = 1 if args.smoke else args.repeats
    res: dict[str, Any] = {"machine": machine(), "smoke": args.smoke, "runs": []}
    cfg = _config(args.smoke, args.overrides)
    res["config"] = {
        "model": f"{cfg.model.name}, {cfg.model.num_layers} layers",
        "data.max_examples": cfg.data.max_examples,
        "data.max_length": cfg.data.max_length,
        "train.batch_size": cfg.train.batch_size,
        "train.max_epochs": cfg.train.max_epochs,
        "lora": f"r={cfg.lora.r}, last_n={cfg.lora.last_n}, {','.join(cfg.lora.target_modules)}",
    }
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for kind in ("lightning", "plain"):
                path = Path(tmp) / f"{kind}{rep}.json"
                cmd = [sys.executable, __file__, "--worker", kind, "--worker-out", str(path), *args.overrides]
                if args.smoke:
                    cmd.insert(2, "--smoke")
                load = os.getloadavg()[0]
                t = time.perf_counter()
                subprocess.run(cmd, check=True, timeout=1800)
                r = json.loads(path.read_text())
                r.update(derived(r), repeat=rep, process_s=time.perf_counter() - t, loadavg_1min=round(load, 2))
                res["runs"].append(r)
                print(
                    f"[throughput] {kind} rep {rep}: {r['train_real_tok_s']:.0f} real tok/s, "
                    f"train {r['train_phase_s']:.1f} s, step median {r['step_median_s'] * 1e3:.0f} ms, "
                    f"load {load:.2f}",
                    flush=True,
                )
    for kind in ("lightning", "plain"):
        runs = [r for r in res["runs"] if r["kind"] == kind]
        keys = [
            "train_real_tok_s",
            "train_padded_tok_s",
            "step_median_s",
            "train_phase_s",
            "step_sum_s",
            "between_steps_s",
            "val_phase_s",
            "fit_s",
            "peak_rss_mb",
        ]
        res[kind] = {k: summary([r[k] for r in runs]) for k in keys}
        res[kind]["train_loss"] = [r["train_loss"] for r in runs]
    lr = [r for r in res["runs"] if r["kind"] == "lightning"]
    ck = [c for r in lr for c in r["checkpoints"]]
    res["checkpoint"] = {
        "mb": statistics.median(c["bytes"] for c in ck) / 2**20,
        "save_s": summary([c["save_s"] for c in ck]),
        "persist_s": summary([c["persist_s"] for c in ck]),
        "share_of_trial": statistics.median(
            sum(c["save_s"] + c["persist_s"] for c in r["checkpoints"]) / r["fit_s"] for r in lr
        ),
    }
    # Headline: Lightning / plain tokens per second in the training phase; also pairwise per repeat (same noise).
    res["ratio_train_tok_s"] = (
        res["lightning"]["train_real_tok_s"]["median"] / res["plain"]["train_real_tok_s"]["median"]
    )
    res["ratio_step_median"] = res["plain"]["step_median_s"]["median"] / res["lightning"]["step_median_s"]["median"]
    res["ratio_per_repeat"] = [
        a["train_real_tok_s"] / b["train_real_tok_s"]
        for a, b in zip(lr, [r for r in res["runs"] if r["kind"] == "plain"])
    ]
    res["same_training"] = {
        "lightning_train_loss": res["lightning"]["train_loss"][0],
        "plain_train_loss": res["plain"]["train_loss"][0],
    }
    res["total_wall_s"] = time.perf_counter() - t_all
    write_json(out / "results.json", res)
    (out / "table.md").write_text(markdown(res))
    print((out / "table.md").read_text())
    print(
        f"[throughput] Lightning/plain tokens/s {res['ratio_train_tok_s']:.3f} (per repeat "
        f"{[round(x, 3) for x in res['ratio_per_repeat']]}); wrote {out} in {res['total_wall_s']:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
