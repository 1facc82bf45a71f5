"""Peers whose packages this project's environment cannot hold (syne-tune 0.14.2 needs numpy < 1.27, dehb 0.1.2
numpy < 2; the project pins numpy 2.4.6) run in their own environment, `.venv-peers` (Python 3.11, the versions in
bench/peers-lock.txt; `make bench-peers` creates it), as a subprocess of the replay.

Both sides of that are here. The replay (`run_seeds`) writes the problem, the peer's spec, the slots and, per seed,
the curves that seed sees (each distinct set once) to a JSON file, starts `.venv-peers/bin/python bench/peers_venv.py
IN OUT` (one process per chunk of seeds, `jobs` at once) and reads back, per seed, the peer's epoch reports and the
configs of its trials as they started: the same `Run` that an in-process peer returns, from which the replay takes
values and costs from its own table as for every other method. The subprocess (`main`) imports only bench/trials.py
and the adapters (bench/peers_syne.py, bench/peers_dehb.py), never lorahpo. JSON keeps every grid value's type
(int, float, str, bool) and every float exactly (Python writes the shortest repr that reads back equal).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trials import Curves, Epoch, Problem, Run


class PeerCrashed(RuntimeError):
    """A peer raised inside its own package (e.g. Syne Tune 0.14's tabular simulator on a table of a few configs): the
    replay leaves it out and says why, instead of losing every other method's results."""


REPO_ROOT = Path(__file__).resolve().parent.parent
VENV = REPO_ROOT / ".venv-peers"
PYTHON = VENV / "bin" / "python"
CREATE = "make bench-peers"  # bench/peers_env.sh: 67-77 s here, downloads included


def version(package: str) -> str | None:
    """The version of `package` installed in .venv-peers; None without that environment (or one whose creation did
    not finish: bench/peers_env.sh writes `.installed` last) or without the package."""
    sites = sorted(VENV.glob("lib/python3*/site-packages"))
    if not (VENV / ".installed").exists() or not sites:
        return None
    want = package.lower().replace("_", "-")
    for dist in importlib.metadata.distributions(path=[str(s) for s in sites]):
        if dist.metadata["Name"].lower().replace("_", "-") == want:
            return dist.version
    return None


def encode(runner: str, spec: dict[str, Any], p: Problem, seed_curves: dict[int, Curves], slots: int) -> dict:
    """The subprocess's input: each distinct set of curves once (a table with one training seed: one set)."""
    keys = list(next(iter(seed_curves.values())))
    sets: list[list] = []
    index: dict[tuple, int] = {}
    seeds = []
    for seed, curves in seed_curves.items():
        signature = tuple(tuple(curves[k]) for k in keys)
        if signature not in index:
            index[signature] = len(sets)
            sets.append([[list(e) for e in curves[k]] for k in keys])
        seeds.append([seed, index[signature]])
    problem = {**dataclasses.asdict(p), "space": {k: list(v) for k, v in p.space.items()}}
    return {"runner": runner, "spec": spec, "problem": problem, "keys": [list(k) for k in keys], "sets": sets,
            "seeds": seeds, "slots": slots}  # fmt: skip


def run_seeds(
    runner: str, spec: dict[str, Any], p: Problem, seed_curves: dict[int, Curves], slots: int, jobs: int = 1
) -> dict[int, tuple[Run, float, float]]:
    """Per seed: the peer's Run in .venv-peers, and the wall and CPU seconds it took there (each process's start-up,
    imports included, shared equally by its seeds)."""
    seeds = list(seed_curves)
    chunks = [seeds[i::jobs] for i in range(min(jobs, len(seeds)))]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    out: dict[int, tuple[Run, float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="peers_venv_") as tmp:
        procs = []
        for i, chunk in enumerate(chunks):
            src, dst = Path(tmp) / f"in{i}.json", Path(tmp) / f"out{i}.json"
            src.write_text(json.dumps(encode(runner, spec, p, {s: seed_curves[s] for s in chunk}, slots)))
            cmd = [str(PYTHON), str(Path(__file__).resolve()), str(src), str(dst), repr(time.time())]
            procs.append((dst, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                text=True)))  # fmt: skip
        for dst, proc in procs:
            log, _ = proc.communicate()
            if proc.returncode != 0:
                last = log.strip().splitlines()[-1] if log.strip() else f"exit {proc.returncode}"
                raise PeerCrashed(f"crashed in {VENV.name} on this table: {last}")
            res = json.loads(dst.read_text())
            runs = res["runs"]
            extra_wall = (res["wall_s"] - sum(r["wall_s"] for r in runs)) / len(runs)
            extra_cpu = (res["cpu_s"] - sum(r["cpu_s"] for r in runs)) / len(runs)
            for r in runs:
                reports = [(n, tuple(k), e) for n, k, e in r["reports"]]
                run = (reports, [tuple(k) for k in r["started"]])
                out[r["seed"]] = (run, r["wall_s"] + extra_wall, r["cpu_s"] + extra_cpu)
    return {s: out[s] for s in seeds}


def main(argv: list[str]) -> int:
    """In .venv-peers: run the peer of the input file for each of its seeds and write their Runs, with the wall
    seconds since the replay started this process (`launched`, epoch seconds) and the process's CPU seconds."""
    src, dst, launched = argv
    job = json.loads(Path(src).read_text())
    problem = {**job["problem"], "space": {k: tuple(v) for k, v in job["problem"]["space"].items()}}
    p = Problem(**problem)
    keys = [tuple(k) for k in job["keys"]]
    sets = [{k: [Epoch(*e) for e in curve] for k, curve in zip(keys, s)} for s in job["sets"]]
    module, function = job["runner"].split(".")
    run = getattr(importlib.import_module(module), function)
    runs = []
    for seed, which in job["seeds"]:
        wall, cpu = time.perf_counter(), time.process_time()
        reports, started = run(job["spec"], p, sets[which], seed, job["slots"])
        runs.append({"seed": seed, "reports": [[n, list(k), e] for n, k, e in reports],
                     "started": [list(k) for k in started], "wall_s": time.perf_counter() - wall,
                     "cpu_s": time.process_time() - cpu})  # fmt: skip
    total = {"wall_s": time.time() - float(launched), "cpu_s": time.process_time()}
    Path(dst).write_text(json.dumps({"runs": runs, **total}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
