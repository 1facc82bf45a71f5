"""--extend: more trials for a finished sweep. Bad input is one line and exit 2 before any training (checked on the
files --extend reads, written by lorahpo's own writers: no sweep is trained for them); the Tune hook it relies on; and
end to end: a deterministic sweep extended to the size of the reference sweep equals it, also when the extension is
killed and resumed."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import pandas as pd
import pytest
from ray.tune.search import ConcurrencyLimiter, SearchGenerator

import tune_lora
from lorahpo.compat import grown_search
from lorahpo.config import ExperimentConfig, config_yaml
from lorahpo.data import load_task
from lorahpo.ordered import BatchSearcher
from lorahpo.owner import hold
from lorahpo.reading import BUNDLED_PATH
from lorahpo.repro import manifest
from lorahpo.sources import load_tokenizer

from .conftest import (
    DELAYS_ENV,
    DET_SWEEP,
    cli,
    cli_background,
    hooked,
    sweep_record,
    tiny_args,
    tiny_config,
    wait_for,
)

NAME = "ext"


def refused(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """The CLI in-process: exit 2 and exactly one stderr line `error: ...`; returns it."""
    code = tune_lora.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


def det_args(store: Path, n: int, **overrides: object) -> list[str]:
    """CLI overrides of the deterministic test sweep (conftest DET_SWEEP) named `ext` with n trials, 2 at a time."""
    over = {"sweep.name": NAME, "sweep.max_concurrent_trials": 2, "sweep.num_samples": n, **overrides}
    return tiny_args(store, **{**DET_SWEEP, **over})


def det_cfg(store: Path, n: int, **overrides: object) -> ExperimentConfig:
    args = dict(a.split("=", 1) for a in det_args(store, n, **overrides))
    return tiny_config(**{k: None if v == "None" else v for k, v in args.items()})


def written_sweep(store: Path, n: int, ran: int | None, **overrides: object) -> Path:
    """What --extend reads of a sweep of `n` trials (config.yaml, manifest.json, summary.json with `ran` trials'
    results; None: no summary, an unfinished sweep), written by lorahpo's own writers; nothing is trained."""
    cfg = det_cfg(store, n, **overrides)
    exp = store / NAME
    exp.mkdir(parents=True)
    data = load_task(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    (exp / "config.yaml").write_text(config_yaml(cfg))
    (exp / "manifest.json").write_text(json.dumps(manifest(cfg, data.info), default=str))
    if ran is not None:
        summary = {"num_trials": ran, "best_trial": "trial_001_a", "best_params": {"train.lr": 1e-3}}
        (exp / "summary.json").write_text(json.dumps(summary))
    return exp


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_extend_refuses_too_few_trials(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = written_sweep(tmp_path, 4, 4)
    before = tree(exp)
    for m in (4, 3):
        assert refused(["--extend", *det_args(tmp_path, m)], capsys) == (
            f"error: --extend: sweep.num_samples={m} is not more than the 4 trials the sweep at {exp} has run; pass "
            "sweep.num_samples=5 or more"
        )
    assert tree(exp) == before


def test_extend_refuses_an_unfinished_sweep(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = written_sweep(tmp_path, 4, None)
    assert refused(["--extend", *det_args(tmp_path, 6)], capsys) == (
        f"error: --extend: the sweep at {exp} has not finished (no summary.json); finish it with --resume"
    )


def test_extend_and_final_refuse_an_unfinished_extension(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The stored config holds 6 trials (an extension started), the results are of 4 (it did not finish)."""
    exp = written_sweep(tmp_path, 6, 4)
    why = (
        f"the sweep at {exp} was extended to 6 trials and has results of 4; finish the extension first with "
        "--resume sweep.num_samples=6"
    )
    assert refused(["--extend", *det_args(tmp_path, 8)], capsys) == f"error: --extend: {why}"
    assert refused(["--final", *det_args(tmp_path, 6, **{"final.seeds": 2})], capsys) == f"error: --final: {why}"


def test_extend_refuses_a_changed_config_and_lists_the_differences(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    exp = written_sweep(tmp_path, 4, 4)
    changed = det_args(tmp_path, 6, **{"train.lr": 1e-3, "lora.dropout": 0.1, "final.seeds": 2})
    assert refused(["--extend", *changed], capsys) == (
        "error: --extend with a config that differs from the sweep's in more than sweep.num_samples and final.* "
        f"(lora.dropout: 0.05 -> 0.1; train.lr: 0.002 -> 0.001); pass the sweep's config (saved as {exp}/config.yaml) "
        "and a larger sweep.num_samples"
    )


def test_extend_refuses_changed_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = pd.read_csv(BUNDLED_PATH, sep="\t", header=None, names=["label", "text"], quoting=csv.QUOTE_NONE, dtype=str)
    path = tmp_path / "sms.csv"
    rows.iloc[:300][["text", "label"]].to_csv(path, index=False)
    over = {"data.path": str(path), "data.max_examples": None}
    exp = written_sweep(tmp_path, 4, 4, **over)
    path.write_text(path.read_text() + "one more message,ham\n")
    err = refused(["--extend", *det_args(tmp_path, 6, **over)], capsys)
    assert err.startswith(f"error: --extend: the data file differs from the one the sweep at {exp} started with "), err


@pytest.mark.parametrize("other", ["--resume", "--overwrite", "--final"])
def test_extend_takes_no_other_mode(tmp_path: Path, capsys: pytest.CaptureFixture, other: str) -> None:
    err = refused(["--extend", other, *det_args(tmp_path, 6)], capsys)
    assert err == (
        "error: --final evaluates a finished sweep; it takes neither --resume, --overwrite nor --extend"
        if other == "--final"
        else "error: --extend continues a finished sweep; it takes neither --resume (an unfinished sweep or "
        "extension: --resume alone) nor --overwrite"
    )


def test_extend_refuses_a_sweep_whose_driver_is_alive(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = written_sweep(tmp_path, 4, 4)
    with hold(det_cfg(tmp_path, 4), "--resume"):  # this process holds it, as a running driver would
        err = refused(["--extend", *det_args(tmp_path, 6)], capsys)
    assert err.startswith(f"error: --extend: the sweep at {exp} is in use by a running driver (host "), err


def test_extend_refuses_no_sweep(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert refused(["--extend", *det_args(tmp_path, 6)], capsys) == (
        f"error: --extend: no sweep named 'ext' at {tmp_path / NAME}; check sweep.name and sweep.storage_path"
    )


def test_extend_dry_run_prints_the_new_trials(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = written_sweep(tmp_path, 4, 4)
    before = tree(exp)
    assert tune_lora.main(["--extend", "--dry-run", *det_args(tmp_path, 6)]) == 0
    out = capsys.readouterr().out
    assert "\nextend:\n  from: 4\n  to: 6\n  new_trials: [5, 6]\n" in out, out
    assert "6 trials x up to 2 epochs" in out
    assert tree(exp) == before  # nothing written, not even an owner record


def test_grown_search_runs_on_past_a_restored_finished_state() -> None:
    """The compat hook (lorahpo.compat.grown_search): Tune restores a SearchGenerator's trial count and finished flag
    from its saved state (a finished experiment stays finished); the grown one takes the new size and goes on. Fails
    if Tune moves either attribute."""
    cfg = tiny_config()
    state = {"counter": 4, "total_samples": 4, "finished": True, "experiment": None}
    plain = SearchGenerator(ConcurrencyLimiter(BatchSearcher(cfg), max_concurrent=2))
    plain.set_state(dict(state))
    assert plain.is_finished() and plain.total_samples == 4
    grown = grown_search(BatchSearcher(cfg), 2, 6)
    grown.set_state(dict(state))
    assert not grown.is_finished() and grown.total_samples == 6
    assert isinstance(grown.searcher, ConcurrencyLimiter) and grown.searcher.max_concurrent == 2


# ---------------------------------------------------------------------------------------------------------------------
# End to end

# (A worker handed to the next trial waits for its last trial's thread as long as lorahpo.tuner.trial_with_env says.)
SLOW_HOST_ENV = {"RAY_DEDUP_LOGS": "0"}


def trial_files(exp: Path, first: int) -> dict[str, bytes]:
    """Each of the first `first` trials' per-epoch rows, as written."""
    return {
        p.parent.name: p.read_bytes() for n in range(1, first + 1) for p in exp.glob(f"trial_{n:03d}_*/progress.csv")
    }


@pytest.mark.slow
def test_extended_sweep_equals_the_sweep_of_that_size(det_reference: dict, tmp_path: Path, procs: list) -> None:
    """The deterministic reference sweep's first 4 trials at 2 slots, then --extend to its 6: the reference's study,
    per-epoch rows, stop reasons, best trial and test score; the first 4 trials untouched; the manifest records the
    extension and the summary says the test split was scored twice; the final evaluation (one run) after the sweep and
    again after the extension, each in its own directory. Then the same 4-trial sweep, extended again but
    its driver SIGKILLed after trial 5 has finished (trial 6 held back), continued with --resume sweep.num_samples=6:
    the reference again."""
    reference = det_reference["record"]
    final = {"final.seeds": 1, "final.baseline": False}  # one final run of the best, after the sweep and the extension
    run = cli(det_args(tmp_path, 4, **final), env=SLOW_HOST_ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    exp = tmp_path / NAME
    shutil.copytree(exp, tmp_path / "saved", symlinks=True)  # for the killed extension, at this same path
    first = trial_files(exp, 4)
    assert len(first) == 4

    run = cli(["--extend", *det_args(tmp_path, 6, **final)], env=SLOW_HOST_ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sweep_record(lambda rel: (exp / rel).read_bytes()) == reference
    # The final block follows the new best; its runs go beside the 4-trial sweep's, which stay
    summary = json.loads((exp / "summary.json").read_text())
    finals = [f["plan"] for f in json.loads((exp / "manifest.json").read_text())["finals"]]
    assert [f["experiment"] for f in finals] == ["final_seeds1_tuned_only", "final_seeds1_tuned_only_trials6"]
    assert finals[1]["tuned"] == summary["best_params"] == reference["best"][1]
    assert summary["final_run"]["experiment"] == f"{exp}/final_seeds1_tuned_only_trials6"
    assert (exp / "final_seeds1_tuned_only" / "plan.json").is_file()
    assert trial_files(exp, 4) == first  # earlier trials (and their stop decisions) stand, none re-run
    meta = json.loads((exp / "manifest.json").read_text())
    [entry] = meta["extensions"]
    assert (entry["from"], entry["to"], entry["flag"]) == (4, 6, "--extend") and {"at", "git", "versions"} <= set(entry)
    assert meta["summary"]["test_scored"] == 2 and "config" in meta  # the original record is kept
    assert "scored 2 times" in (exp / "summary.md").read_text()
    assert "num_samples: 6" in (exp / "config.yaml").read_text()  # a killed extension continues with --resume

    shutil.move(exp, tmp_path / "extended")
    shutil.move(tmp_path / "saved", exp)
    gate, log = tmp_path / "go6", tmp_path / "extend.log"
    env = hooked(**SLOW_HOST_ENV, **{DELAYS_ENV: json.dumps({"6": [str(gate), 0]})})
    proc = cli_background(["--extend", *det_args(tmp_path, 6)], log, env=env)
    procs.append(proc)

    def trial5_done() -> bool:
        text = log.read_text()
        done = any(f"{p.name} completed after" in text for p in exp.glob("trial_005_*"))
        return done and "test delay: trial_006" in text

    wait_for(trial5_done, timeout=600, what="trial 5 of the extension finished, trial 6 waiting")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert "num_samples: 6" in (exp / "config.yaml").read_text()
    stored = json.loads((exp / "summary.json").read_text())
    assert stored["num_trials"] == 4  # the results are still the 4-trial sweep's

    run = cli(["--resume", *det_args(tmp_path, 6)], env=SLOW_HOST_ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sweep_record(lambda rel: (exp / rel).read_bytes()) == reference
    meta = json.loads((exp / "manifest.json").read_text())
    assert [e["to"] for e in meta["extensions"]] == [6] and [r["flag"] for r in meta["resumes"]] == [
        "--extend",
        "--resume",
    ]
    assert meta["summary"]["test_scored"] == 2
