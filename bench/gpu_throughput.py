"""GPU throughput: tokens/s, model FLOP utilisation (MFU) and peak GPU memory of LoRA training on a random-init model
with Llama-3.2-3B's exact shape (bf16, sequence 512, LoRA r=16 on q/k/v/o of the last 14 of 28 layers, batch 8), for
1 trial on the GPU and for 2 and 4 trials sharing it (separate processes, as fractional `sweep.gpus_per_trial` runs
them).

Each trial process builds the model the way a trial does (`lorahpo.model.add_lora` with configs/llama32_3b.yaml's
LoRA settings, trainable tensors in fp32, `LoraClassifier`, the trial's Lightning Trainer from
`lorahpo.module.make_trainer` with bf16-mixed precision), trains on synthetic full-length batches (random token ids:
no padding, every token real), runs `--warmup` steps, waits at a barrier until every process is warm, then times
`--steps` steps (CUDA-synchronised). Aggregate tokens/s = all tokens of all processes / (last end - first start).

Model FLOPs per token (no recompute): forward 2 x linear params x layers + attention 4 x seq x d_attn per layer;
backward only above the lowest LoRA layer (the frozen layers below need none): input gradients (2 x linear params)
and attention backward (2 x its forward) per LoRA layer, plus LoRA's own 4 x r x (in + out). MFU uses the GPU's dense
bf16 peak (H100/H200 SXM: 989 TFLOP/s; override with --peak-tflops).

    python bench/gpu_throughput.py                        # on a GPU machine (the recorded shape)
    python bench/gpu_throughput.py --smoke --out /tmp/g   # CPU: tiny shape, 1 and 2 processes (plumbing only)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import DOCS_DIR, REPO_ROOT, machine, md_table, peak_rss_mb, quiet, write_json

LLAMA32_3B = {  # meta-llama/Llama-3.2-3B-Instruct's config.json (architecture fields)
    "vocab_size": 128256,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    },
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "pad_token_id": 128004,
}
TINY = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
}
FULL = {"shape": LLAMA32_3B, "seq": 512, "batch": 8, "last_n": 14, "steps": 20, "warmup": 5, "trials": [1, 2, 4]}
SMOKE = {"shape": TINY, "seq": 32, "batch": 4, "last_n": 2, "steps": 4, "warmup": 2, "trials": [1, 2]}
PEAK_BF16_TFLOPS = [  # dense (no sparsity) bf16 tensor-core peaks from the vendor data sheets; first match wins
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10", 125.0),
]


def flops_per_token(shape: dict[str, Any], seq: int, last_n: int, r: int, targets: list[str]) -> float:
    """Model FLOPs per trained token (see the module docstring)."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d_q = shape["num_attention_heads"] * shape["head_dim"]
    d_kv = shape["num_key_value_heads"] * shape["head_dim"]
    dims = {"q_proj": (h, d_q), "k_proj": (h, d_kv), "v_proj": (h, d_kv), "o_proj": (d_q, h)}
    linear = h * d_q + 2 * h * d_kv + d_q * h + 3 * h * inter
    attn_fwd = 4 * seq * d_q  # Q K^T and P V, per token and layer (causal masking not discounted)
    lora = sum(r * (dims[m][0] + dims[m][1]) for m in targets)
    fwd = layers * (2 * linear + attn_fwd) + last_n * 2 * lora
    # Above the lowest LoRA layer everything back-propagates to its input; in the lowest one the frozen q/k/v
    # projections' input gradients are not needed (their input does not require grad).
    bwd = last_n * (2 * linear + 2 * attn_fwd + 4 * lora) - 2 * (h * d_q + 2 * h * d_kv)
    return float(fwd + bwd)


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


# ---------------------------------------------------------------------------------------------------------------------
# One trial process


def worker(spec: dict[str, Any], barrier: Path, out: Path, threads: int) -> None:
    import lightning as L
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from lorahpo.config import apply_overrides, load_config
    from lorahpo.model import add_lora, trainable_parameters
    from lorahpo.module import LoraClassifier, make_trainer
    from lorahpo.repro import seed_everything_everywhere
    from lorahpo.sources import DTYPES

    quiet()
    gpu = torch.cuda.is_available()
    torch.set_num_threads(threads)
    cfg = apply_overrides(
        load_config(REPO_ROOT / "configs" / "llama32_3b.yaml"),
        {
            "lora.last_n": spec["last_n"],
            "lora.r": 16,
            "train.batch_size": spec["batch"],
            "train.max_epochs": 1,
            "data.max_length": spec["seq"],
            "model.dtype": "bfloat16",
        },
    )
    t_build = time.perf_counter()
    seed_everything_everywhere(cfg.seed + spec["rank"])
    mc = LlamaConfig(**spec["shape"], num_labels=2)
    with torch.device("cuda" if gpu else "cpu"):
        base = LlamaForSequenceClassification._from_config(mc, dtype=DTYPES[cfg.model.dtype])
    model = add_lora(base, cfg)
    for p in model.parameters():  # as build_module: adapters and head train in fp32, the frozen base stays bf16
        if p.requires_grad:
            p.data = p.data.float()
    weights = torch.tensor([1.0, cfg.train.class_weight])
    module = LoraClassifier(model, cfg.train, 2, weights, cfg.seed)
    module.train()  # as fit() does: dropout on
    build_s = time.perf_counter() - t_build

    n_batches = spec["warmup"] + spec["steps"]
    g = torch.Generator().manual_seed(spec["rank"])
    vocab, pad = spec["shape"]["vocab_size"], spec["shape"]["pad_token_id"]
    ids = torch.randint(0, vocab - 1, (n_batches * spec["batch"], spec["seq"]), generator=g)
    ids[ids >= pad] += 1  # no pad tokens: every position is a real token
    rows = [
        {"input_ids": ids[i], "attention_mask": torch.ones(spec["seq"], dtype=torch.long), "labels": int(i % 2)}
        for i in range(len(ids))
    ]
    loader = torch.utils.data.DataLoader(rows, batch_size=spec["batch"], shuffle=False)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.start = self.end = 0.0
            self.t = 0.0

        def on_train_batch_start(self, trainer: Any, m: Any, batch: Any, idx: int) -> None:
            sync()
            if idx == spec["warmup"]:  # every process warm: start the timed window together
                (barrier / f"ready{spec['rank']}").touch()
                deadline = time.time() + 1800
                while not (barrier / "go").exists():
                    if time.time() > deadline:
                        raise TimeoutError("no go signal")
                    time.sleep(0.01)
                self.start = time.time()
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, m: Any, outputs: Any, batch: Any, idx: int) -> None:
            sync()
            if idx >= spec["warmup"]:
                self.steps.append(time.perf_counter() - self.t)
                self.end = time.time()

    clock = Clock()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = make_trainer(cfg, [clock], gpu)
    trainer.fit(module, loader)
    res: dict[str, Any] = {
        "rank": spec["rank"],
        "build_s": build_s,
        "steps_s": clock.steps,
        "start": clock.start,
        "end": clock.end,
        "tokens": len(clock.steps) * spec["batch"] * spec["seq"],
        "trainable_params": trainable_parameters(model),
        "total_params": sum(p.numel() for p in model.parameters()),
        "peak_rss_mb": peak_rss_mb(),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
    }
    if gpu:
        free, total = torch.cuda.mem_get_info()
        res.update(
            max_allocated_gb=torch.cuda.max_memory_allocated() / 2**30,
            max_reserved_gb=torch.cuda.max_memory_reserved() / 2**30,
            device_used_gb_at_end=(total - free) / 2**30,
            device_total_gb=total / 2**30,
        )
    out.write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def run_shared(spec: dict[str, Any], k: int, smoke: bool, timeout: float) -> dict[str, Any]:
    """k trial processes on one GPU, timed together."""
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        threads = max(1, (os.cpu_count() or 1) // k)
        procs = []
        for rank in range(k):
            s = json.dumps({**spec, "rank": rank})
            cmd = [sys.executable, __file__, "--worker", s, "--barrier", tmp, "--worker-out", f"{tmp}/w{rank}.json"]
            cmd += ["--threads", str(threads)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.time() + timeout
        try:
            while sum((tmpd / f"ready{i}").exists() for i in range(k)) < k:
                dead = [p for p in procs if p.poll() is not None and p.returncode != 0]
                if dead or time.time() > deadline:
                    raise RuntimeError(dead[0].communicate()[0][-3000:] if dead else "timed out before the barrier")
                time.sleep(0.05)
            (tmpd / "go").touch()
            logs = [p.communicate(timeout=max(1.0, deadline - time.time()))[0] for p in procs]
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            return {"trials": k, "error": str(e)[-3000:]}
        if any(p.returncode != 0 for p in procs):
            bad = next(i for i, p in enumerate(procs) if p.returncode != 0)
            return {"trials": k, "error": logs[bad][-3000:]}
        workers = [json.loads((tmpd / f"w{i}.json").read_text()) for i in range(k)]
    span = max(w["end"] for w in workers) - min(w["start"] for w in workers)
    tokens = sum(w["tokens"] for w in workers)
    fpt = flops_per_token(spec["shape"], spec["seq"], spec["last_n"], 16, ["q_proj", "k_proj", "v_proj", "o_proj"])
    agg = tokens / span
    row: dict[str, Any] = {
        "trials": k,
        "aggregate_tok_s": agg,
        "per_trial_tok_s": [w["tokens"] / (w["end"] - w["start"]) for w in workers],
        "step_median_s": [sorted(w["steps_s"])[len(w["steps_s"]) // 2] for w in workers],
        "model_tflops": agg * fpt / 1e12,
        "flops_per_token": fpt,
        "workers": workers,
    }
    peak = spec.get("peak_tflops") or peak_tflops(workers[0]["device"])
    row["mfu"] = agg * fpt / (peak * 1e12) if peak else None
    row["peak_tflops"] = peak
    if "max_reserved_gb" in workers[0]:
        row["per_trial_max_reserved_gb"] = max(w["max_reserved_gb"] for w in workers)
        row["per_trial_max_allocated_gb"] = max(w["max_allocated_gb"] for w in workers)
        row["sum_max_reserved_gb"] = sum(w["max_reserved_gb"] for w in workers)
    row["per_trial_peak_rss_mb"] = max(w["peak_rss_mb"] for w in workers)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 1 and 2 processes: plumbing check")
    p.add_argument("--trials", type=int, nargs="+", default=None, help="trials sharing the GPU (default 1 2 4)")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (MFU)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--out", type=Path, default=None, help="results dir (default docs/benchmarks/gpu_throughput)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--barrier", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker), args.barrier, args.worker_out, args.threads)
        return 0

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --smoke for the CPU plumbing check", file=sys.stderr)
        return 2
    base = dict(SMOKE if args.smoke else FULL)
    for key in ("trials", "seq", "batch", "steps", "peak_tflops"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    spec = {k: v for k, v in base.items() if k != "trials"}
    out = (args.out or DOCS_DIR / "gpu_throughput").resolve()
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"machine": machine(), "smoke": args.smoke, "spec": spec, "rows": []}
    t0 = time.perf_counter()
    for k in base["trials"]:
        row = run_shared(spec, k, args.smoke, args.timeout)
        res["rows"].append(row)
        if "error" in row:
            print(f"[gpu] {k} trial(s): FAILED {row['error'][-500:]}", flush=True)
        else:
            mfu = "n/a (no peak known)" if row["mfu"] is None else f"{row['mfu']:.3f}"
            print(
                f"[gpu] {k} trial(s): {row['aggregate_tok_s']:.0f} tok/s together, "
                f"{row['model_tflops']:.1f} model TFLOP/s, MFU {mfu}",
                flush=True,
            )
    res["wall_s"] = time.perf_counter() - t0
    write_json(out / "results.json", res)
    table = md_table(
        ["trials on the GPU", "tokens/s (all)", "tokens/s per trial", "model TFLOP/s", "MFU", "peak GB per trial"],
        [
            [
                r["trials"],
                r.get("aggregate_tok_s", "failed"),
                sum(r["per_trial_tok_s"]) / len(r["per_trial_tok_s"]) if "per_trial_tok_s" in r else "-",
                r.get("model_tflops", "-"),
                r["mfu"] if r.get("mfu") is not None else "-",
                r.get("per_trial_max_reserved_gb", f"{r.get('per_trial_peak_rss_mb', 0):.0f} MB RSS (CPU)"),
            ]
            for r in res["rows"]
        ],
    )
    (out / "table.md").write_text(table)
    print(table)
    return 0 if all("error" not in r for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
