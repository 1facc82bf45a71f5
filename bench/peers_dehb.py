"""The `dehb` package (Awad, Mallik and Hutter, "DEHB: Evolutionary Hyperband", IJCAI 2021) as a peer, through its
ask/tell interface, driven in simulated time by `trials.asktell`. It runs in .venv-peers (bench/peers_venv.py): dehb
0.1.2 requires numpy < 2.

As a user of the package would run it: `DEHB(cs, min_fidelity=1, max_fidelity=max_epochs, n_workers=1, seed=s)`,
package defaults otherwise (eta 3, mutation factor 0.5, crossover probability 0.5, rand1_bin); the space is a
ConfigSpace of one `Categorical` per grid key. A job at fidelity f trains a new trial from scratch for int(f) epochs
(DEHB's examples train `int(fidelity)` epochs; with max_epochs 4 its fidelities are 4/3 and 4, so 1 and 4 epochs),
ended sooner by `train.patience` as the trainable does, and is told fitness = the trial's last report (its running
best; negated when higher is better: DEHB minimises) and cost = the training seconds of its epochs. A config DEHB
promotes to a higher fidelity is a new job: it trains, and pays for, its first epochs again.

What is ours: the config's points_to_evaluate (the untuned baseline) replace the configs of the first jobs that are
new configs (not promotions), so that trial 0 is the baseline as in every other method; DEHB then records and
selects on the baseline as if it had proposed it (its config repository holds the baseline's vector: `tell` reads
the config from there). DEHB writes its log to a temporary folder, removed afterwards; `save_freq="end"` (only
`run()` saves, and the ask/tell loop never calls it).
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

import ConfigSpace
from dehb import DEHB
from trials import Curves, Problem, Run, asktell, native


def run(spec: dict[str, Any], p: Problem, curves: Curves, seed: int, slots: int) -> Run:
    keys, sign = list(p.space), 1.0 if p.mode == "max" else -1.0
    cs = ConfigSpace.ConfigurationSpace()
    cs.add([ConfigSpace.Categorical(k, list(v)) for k, v in p.space.items()])
    points, asked = list(p.points), set()
    folder = tempfile.mkdtemp(prefix="dehb_")
    try:
        opt = DEHB(cs=cs, min_fidelity=1, max_fidelity=p.max_epochs, n_workers=1, seed=seed, output_path=folder,
                   save_freq="end", log_level="ERROR")  # fmt: skip

        def start() -> tuple[Any, tuple]:
            job = opt.ask()
            if points and job["config_id"] not in asked:  # a new config, not a promotion of one already run
                config = ConfigSpace.Configuration(cs, values=points.pop(0))
                opt.config_repository.configs[job["config_id"]].config = opt.configspace_to_vector(config)
                job["config"] = config
            asked.add(job["config_id"])
            key = tuple(native(job["config"][k]) for k in keys)
            return (job, key, int(job["fidelity"])), key

        def report(handle: Any, epoch: int, value: float, last: bool) -> bool:
            job, key, epochs = handle
            if not last and epoch < epochs:
                return True
            opt.tell(job, {"fitness": -sign * value, "cost": sum(e.cost for e in curves[key][:epoch])})
            return False

        return asktell(start, report, curves, p, slots)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
