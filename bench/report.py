"""What a replay writes besides results.json: table.md (the headline measures per method) and anytime_regret.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from common import matplotlib_pyplot, md_table
from measures import NEVER


def markdown(res: dict[str, Any]) -> str:
    rows = []
    for name, m in res["methods"].items():
        f, s, r = m["epochs_to_reach_random_fifo_best"], m["seconds_to_reach_random_fifo_best"], m["final_regret"]
        lo, hi = m["median_ci95"]["epochs_to_reach_random_fifo_best"]
        at = m["anytime_regret_at"]
        label = f"**{name}** (default)" if name == res["default"] else name
        rows.append([label, m["source"], f["median"], f"{lo:.3f}-{hi:.3f}", f"{f['q25']:.3f}-{f['q75']:.3f}",
                     s["median"], f"{m['reached']}/{len(res['seeds'])}",
                     *(at[p]["median"] for p in ("B/8", "B/4", "B/2")), r["median"], r["mean"]])  # fmt: skip
    head = ["method", "source", "E/B median", "median 95% CI", "E/B q25-q75", "seconds/B_s median", "reached b_s",
            "regret B/8", "regret B/4", "regret B/2", "final regret median", "final regret mean"]  # fmt: skip
    b = res["budget"]
    slots = f"{res['slots']} slot(s) for every method" if res["slots"] else "each method on its listed slots"
    noise = f"; training seeds {res['train_seeds']} drawn per seed and config" if len(res["train_seeds"]) > 1 else ""
    left = "".join(f"\n- left out: {k}: {v}" for k, v in res["left_out"].items())
    return (
        f"{res['table'] or 'synthetic table'}: {len(res['seeds'])} seeds; {slots}; budget B = {b['trials']} trials "
        f"x {b['max_epochs']} epochs = {b['trial_epochs']} trial-epochs{noise}; E/B = {NEVER} when b_s is never "
        f"reached; table best {res['metric']} {res['table_best']:.4f}\n\n" + md_table(head, rows) + left + "\n"
    )


def plot(res: dict[str, Any], path: Path) -> None:
    plt = matplotlib_pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    budget = res["budget"]["trial_epochs"]
    x = np.arange(1, budget + 1) / budget
    for name, m in res["methods"].items():
        a = m["anytime_regret"]
        (line,) = ax.plot(x, a["median"], label=name, lw=2.5 if name == res["default"] else 1.2)
        ax.fill_between(x, a["q25"], a["q75"], color=line.get_color(), alpha=0.12)
    ax.axvline(0.25, color="grey", ls=":", lw=1)
    ax.set_xlabel(f"trial-epochs consumed / B (B = {budget})")
    ax.set_ylabel(f"regret: best reachable - running best {res['metric']}")
    ax.set_title(f"Anytime regret, median and quartiles over {len(res['seeds'])} seeds")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
