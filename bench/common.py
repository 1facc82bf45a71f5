"""Shared helpers of the benchmark scripts: where results go, what machine they ran on, robust summaries of noisy
timings, and small writers (JSON, markdown tables). Imported as `common` by the scripts next to it."""

from __future__ import annotations

import datetime
import importlib.machinery
import importlib.util
import json
import os
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DOCS_DIR = REPO_ROOT / "docs" / "benchmarks"  # tables, JSON and plots that docs/benchmarks.md shows
WORK_DIR = BENCH_DIR / "out"  # raw Ray experiments and checkpoints (git-ignored)

if str(REPO_ROOT) not in sys.path:  # `python bench/x.py` from anywhere imports the project from this checkout
    sys.path.insert(0, str(REPO_ROOT))

# bench/tabulate.py bears the name of a PyPI package that torch imports when it can (torch._dynamo at exit, among
# others); with bench/ on sys.path (where `python bench/x.py` puts it) that import would run the script. Bind the name
# first: to the real package if it is installed, else to None, which makes torch's `import tabulate` the ImportError
# it falls back on.
_elsewhere = [p for p in sys.path if Path(os.path.realpath(p or ".")) != BENCH_DIR]
_spec = importlib.machinery.PathFinder.find_spec("tabulate", _elsewhere)
if "tabulate" not in sys.modules:
    sys.modules["tabulate"] = importlib.util.module_from_spec(_spec) if _spec is not None else None
    if _spec is not None:
        _spec.loader.exec_module(sys.modules["tabulate"])


def machine() -> dict[str, Any]:
    """What the numbers were measured on (lorahpo.repro's provenance: hardware, versions, git SHA + dirty flag), how
    busy the machine was when the run started, and the command."""
    from lorahpo.repro import git_state, hardware, versions

    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **hardware(),
        "memory_gb": round(mem_gb, 1),
        "versions": versions(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git": git_state(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary(values: list[float]) -> dict[str, float]:
    """Median and spread of repeated measurements (CPU timings here are noisy: other jobs share the cores)."""
    vals = sorted(float(v) for v in values)
    out = {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "n": len(vals)}
    if len(vals) > 1:
        q = statistics.quantiles(vals, n=4, method="inclusive")
        out["q1"], out["q3"] = q[0], q[2]
    return out


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_plain) + "\n")


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v)}")


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def quiet() -> None:
    """Keep library chatter (transformers load reports, Lightning tips, warnings) out of benchmark logs."""
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def matplotlib_pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
