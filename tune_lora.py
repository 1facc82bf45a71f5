"""Tune LoRA adapters of a Llama-family sequence classifier: seeded TPE (Optuna) + ASHA on Ray Tune.

    python tune_lora.py [--config PATH] [--resume | --overwrite | --final | --extend] [--dry-run] [--address ADDR]
                        [KEY=VALUE ...]

parse -> load_config -> sweep.prepare -> [--dry-run: print the plan] -> sweep.run -> print the summary.
--final: parse -> load_config -> sweep.prepare_final -> [--dry-run: print its plan] -> sweep.run_final -> summary.
Exit 0 on success; one line on stderr and 2 for a user error (before any training), 130 for an interrupted sweep
(Ctrl-C; continue it with --resume, or a final evaluation with --final), 1 when every trial (or a final run) failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

import optuna
import yaml

from lorahpo import sweep
from lorahpo.config import load_config
from lorahpo.errors import Interrupted, SweepFailed, UserError
from lorahpo.summary import print_summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of the same name and storage")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier sweep of the same name (deletes it)")
    p.add_argument(
        "--final",
        action="store_true",
        help="the final evaluation of the finished sweep of the same name and storage: its best config and baseline "
        "re-trained with final.seeds fresh seeds each, scored on the test split (only final.* may differ)",
    )
    p.add_argument(
        "--extend",
        action="store_true",
        help="more trials for the finished sweep of the same name and storage: its config with a larger "
        "sweep.num_samples; its trials stand, the new ones run with the search's state, then results are written anew",
    )
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; train nothing")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else start locally)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.lr=3e-4")
    return p.parse_intermixed_args(argv)  # flags may sit between KEY=VALUE overrides


def console() -> None:
    """The driver's console: lorahpo's own notices, Ray's table, one line per trial start/stop, the summary. The
    libraries' INFO chatter (a new Optuna study per study object; Lightning's accelerator banner and tips when the
    best trial is scored) stays out; their warnings stay in. Trials log into their own trial.log files."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("lorahpo").setLevel(logging.INFO)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its own level when first imported
    # Lightning 2.6 calls a torch pytree API that torch deprecated (no fix on our side), once per evaluation
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.resume and args.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one of them")
        if args.final and (args.resume or args.overwrite or args.extend):
            raise UserError("--final evaluates a finished sweep; it takes neither --resume, --overwrite nor --extend")
        if args.extend and (args.resume or args.overwrite):
            raise UserError(
                "--extend continues a finished sweep; it takes neither --resume (an unfinished sweep or extension: "
                "--resume alone) nor --overwrite"
            )
        address = args.address or os.environ.get("RAY_ADDRESS")
        if args.final:
            data, plan = sweep.prepare_final(cfg, address, dry_run=args.dry_run)
        else:
            data, plan = sweep.prepare(cfg, args.resume, args.overwrite, address, args.dry_run, args.extend)
        if args.dry_run:
            print(yaml.safe_dump(plan, sort_keys=False, default_flow_style=None, width=120))
            return 0
        if args.final:
            summary = sweep.run_final(cfg, data, plan, address)
        else:
            summary = sweep.run(cfg, data, plan, address, args.resume, args.overwrite, args.extend)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130  # the shell's code for a Ctrl-C
    except SweepFailed as e:
        print(f"failed: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
