"""Watching a sweep: ONE real sweep of the default model (SmolLM2, cached under ~/.cache/lorahpo) with every tracker
on, observed while it runs by a real optuna-dashboard server and a real headless Chromium, then read back with each
tracker's own client (Optuna, TensorBoard's EventAccumulator, MLflow on SQLite, W&B's offline run files). Plus the
console it printed (no library warnings) and a tracker package made unimportable (exit 2, one line)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from filelock import FileLock
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from lorahpo.results import JOURNAL, load_journal, study_differences
from lorahpo.tracking import MLflowSweep, log_summary

from .conftest import ROOT, TINY, cli_background, kill_group, tiny_config, wait_for

pytestmark = pytest.mark.slow
NAME = "watched"
SECRETS = {"WANDB_API_KEY": "wandbkey-5f3a9c0e1d7b4a2f8e6c", "MLFLOW_TRACKING_TOKEN": "mlflowtoken-93b1e7d2c4a6"}
ARTIFACTS = ROOT / "test-artifacts"  # kept after the run (gitignored): the dashboard's screenshot
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=15000", "--window-size=1400,1000"]  # fmt: skip
# A line of library output the console must not show: Python warnings, WARNING lines, transformers' load report and
# progress bars, Lightning's banners. lorahpo's own notices (`HH:MM:SS lorahpo.<module>: ...`) are not counted.
LIBRARY_NOISE = re.compile(
    r"Warning\b|WARNING|warnings\.warn|UNEXPECTED|MISSING|LOAD REPORT|Loading weights|it/s\]|GPU available|Tip:|wandb:"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def finished_trials(path: Path) -> list[optuna.trial.FrozenTrial]:
    """The journal as Optuna reads it, right now (it may not exist yet)."""
    if not path.is_file():
        return []
    storage = JournalStorage(JournalFileBackend(str(path)))
    if not storage.get_all_studies():
        return []
    study = optuna.load_study(study_name=NAME, storage=storage)
    return [t for t in study.trials if t.state.is_finished()]


def chromium(url: str, out: list[str], tmp: Path) -> subprocess.CompletedProcess:
    profile = tmp / f"chromium-{len(list(tmp.glob('chromium-*')))}"
    profile.mkdir()
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *out, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The watched sweep, run once per session: under pytest-xdist the first worker to get here runs it under a file
    lock and saves what it saw; a later setup (another worker, or this one again) reads that."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    saved = shared / "watched.pkl"
    with FileLock(str(shared / "watched.lock")):
        if not saved.exists():  # a fresh directory per attempt: a failed one leaves its sweep behind
            saved.write_bytes(pickle.dumps(watch_a_sweep(Path(tempfile.mkdtemp(prefix="watched", dir=shared)))))
    return pickle.loads(saved.read_bytes())  # this session's own file


def watch_a_sweep(tmp: Path) -> dict[str, Any]:
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp / "wandb"),
        "WANDB_PROJECT": "lorahpo-test",
        **SECRETS,
    }
    (tmp / "wandb").mkdir()
    args = [
        "data.max_examples=80",
        "train.max_epochs=2",
        "sweep.num_samples=4",
        "sweep.n_startup_trials=2",
        f"sweep.storage_path={tmp / 'store'}",
        f"sweep.name={NAME}",
        "sweep.loggers=[tensorboard,mlflow,wandb]",
    ]  # the default model and search space
    exp = tmp / "store" / NAME
    seen: dict[str, Any] = {"tmp": tmp, "exp": exp, "env": env}
    sweep = cli_background(args, tmp / "console.log", env)
    dashboard = None
    try:

        def first_finished() -> list[optuna.trial.FrozenTrial]:
            assert sweep.poll() is None, (tmp / "console.log").read_text()[-3000:]
            return finished_trials(exp / JOURNAL)

        live = wait_for(first_finished, 600, "a finished trial in the live journal", 0.5)
        seen["live"] = live
        seen["summary_before_dashboard"] = (exp / "summary.json").exists()
        port = free_port()
        dashboard = subprocess.Popen(
            [str(Path(sys.executable).parent / "optuna-dashboard"), "--port", str(port), "--quiet", str(exp / JOURNAL)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def answers() -> Any:
            try:
                return get_json(f"http://127.0.0.1:{port}/api/studies")
            except OSError:
                return None

        seen["studies"] = wait_for(answers, 60, "optuna-dashboard's API")
        seen["api"] = get_json(f"http://127.0.0.1:{port}/api/studies/0?after=0")
        if CHROMIUM:
            page = f"http://127.0.0.1:{port}/dashboard/studies/0/trials"
            seen["dom"] = chromium(page, ["--dump-dom"], tmp).stdout
            seen["summary_after_browser"] = (exp / "summary.json").exists()
            ARTIFACTS.mkdir(exist_ok=True)
            chromium(page, [f"--screenshot={ARTIFACTS / 'optuna-dashboard.png'}"], tmp)
        kill_group(dashboard)
        seen["returncode"] = sweep.wait(timeout=900)
    finally:
        for p in (dashboard, sweep):
            if p is not None and p.poll() is None:
                kill_group(p)
    seen["console"] = (tmp / "console.log").read_text()
    assert seen["returncode"] == 0, seen["console"][-3000:]
    return seen


def test_live_journal_and_dashboard_api_while_the_sweep_runs(watched: dict[str, Any]) -> None:
    assert watched["live"] and not watched["summary_before_dashboard"]
    first = watched["live"][0]
    assert first.user_attrs["trial_id"].startswith("trial_001_") and first.user_attrs["stop_reason"]
    assert first.intermediate_values and first.value == max(first.intermediate_values.values())
    assert [s["study_name"] for s in watched["studies"]["study_summaries"]] == [NAME]
    done = [t for t in watched["api"]["trials"] if t["state"] == "Complete"]
    assert len(done) >= 1
    attrs = {a["key"]: a["value"] for a in done[0]["user_attrs"]}
    assert set(attrs) == {"trial_id", "epochs", "stop_reason"}


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium; .ci/run does it)")
def test_dashboard_page_in_a_real_browser_lists_the_finished_trials(watched: dict[str, Any]) -> None:
    assert not watched["summary_after_browser"], "the sweep ended before the browser looked: make it longer"
    dom = watched["dom"]
    done = [t for t in watched["api"]["trials"] if t["state"] == "Complete"]
    for t in done:
        assert f"Trial {t['number']}" in dom
    assert "Complete" in dom and "stop_reason" in dom and done[0]["user_attrs"][0]["value"] in dom
    shot = ARTIFACTS / "optuna-dashboard.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_journal_is_the_pickled_study_and_was_written_live(watched: dict[str, Any]) -> None:
    exp = watched["exp"]
    journal, pickled = load_journal(exp / JOURNAL), pickle.load(open(exp / "optuna_res.pkl", "rb"))  # noqa: SIM115
    assert study_differences(journal, pickled) == []
    assert len(journal.trials) == 4 and journal.best_value == pickled.best_value
    # written as the sweep ran, not rebuilt at the end: one op per trial start, epoch and end, in that order
    ops = [json.loads(line)["op_code"] for line in (exp / JOURNAL).read_text().splitlines()]
    epochs = sum(len(t.intermediate_values) for t in journal.trials)
    assert ops.count(4) == 4 and ops.count(6) == 4 and ops.count(7) == epochs  # create trial, state, intermediate
    summary = json.loads((exp / "summary.json").read_text())
    assert {t.user_attrs["stop_reason"] for t in journal.trials} == set(summary["stop_reasons"])


def test_tensorboard_event_files_per_trial_with_hparams(watched: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    trials = sorted(watched["exp"].glob("trial_*"))
    assert len(trials) == 4
    for trial in trials:
        acc = EventAccumulator(str(trial))
        acc.Reload()
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        events = acc.Scalars("ray/tune/val_fbeta")
        assert [e.step for e in events] == [r["training_iteration"] for r in rows]
        assert [e.value for e in events] == pytest.approx([r["val_fbeta"] for r in rows], rel=1e-6)
        hparams = acc.PluginTagToContent("hparams")  # TensorBoard's HParams tab: params + final metrics per trial
        start = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
        assert set(start.hparams) == set(json.loads((trial / "params.json").read_text()))
        assert "_hparams_/session_end_info" in hparams


def test_mlflow_one_run_per_trial_nested_under_the_sweep_run(watched: dict[str, Any]) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=watched["env"]["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("lorahpo.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    summary = json.loads((watched["exp"] / "summary.json").read_text())
    assert parent.data.metrics["test_fbeta"] == pytest.approx(summary["test"]["test_fbeta"])
    assert parent.data.params["best_trial"] == summary["best_trial"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 == len(runs) - 1
    for run in children:
        trial = next(watched["exp"].glob(f"trial_*_{run.info.run_name.rsplit('_', 1)[1]}"))
        config = json.loads((trial / "params.json").read_text())
        assert {k: float(v) for k, v in run.data.params.items()} == {k: float(v) for k, v in config.items()}
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        history = client.get_metric_history(run.info.run_id, "val_fbeta")
        assert [(m.step, m.value) for m in history] == [(r["training_iteration"], r["val_fbeta"]) for r in rows]


def wandb_records(path: Path) -> list[Any]:
    """The records of an offline W&B run file (LevelDB-style log: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, buf, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        if left < 7 or kind == 0:  # block trailer / padding
            pos += left
            continue
        buf += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_wandb_offline_one_run_per_trial_grouped_by_sweep(watched: dict[str, Any]) -> None:
    files = sorted((watched["tmp"] / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    runs = {}
    for f in files:
        records = wandb_records(f)
        run = next(r.run for r in records if r.HasField("run"))
        runs[run.run_id] = (run, [r.history for r in records if r.HasField("history")])
    trial_ids = {p.name.rsplit("_", 1)[1] for p in watched["exp"].glob("trial_*")}
    trials = {k: v for k, v in runs.items() if v[0].job_type == "trial"}
    assert set(trials) == trial_ids and len(runs) == 5  # + the sweep's summary run
    for run, _ in runs.values():
        assert run.run_group == NAME and run.project == "lorahpo-test"
    for run_id, (_, history) in trials.items():
        trial = next(watched["exp"].glob(f"trial_*_{run_id}"))
        assert len(history) == len((trial / "result.json").read_text().splitlines())  # one row per epoch


def test_mlflow_and_wandb_after_extend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep level of --extend, through the callback and `log_summary` as the driver runs them (in-process, on a
    SQLite store and offline W&B). The finished sweep's MLflow run, restored into the next driver's callback (Tune's
    callback state, as on --resume): a --resume of the finished sweep (no new trial) opens no run; --extend's first new
    trial opens a new sweep run linked both ways (`lorahpo.extends` / `lorahpo.extended_by`) that takes the new summary,
    and the finished one keeps its numbers; a sweep run deleted in MLflow gets a new unlinked run. W&B gets a second
    `summary` run, for 3 trials."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for k, v in {"MLFLOW_TRACKING_URI": uri, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(k, v)
    where = {"sweep.name": "grown", "sweep.storage_path": str(tmp_path)}
    cfg = tiny_config(**where, **{"sweep.loggers": ["mlflow", "wandb"]})
    sizes = [
        {"best_trial": f"trial_00{n}_x", "best_params": {"train.lr": n * 1e-3}, "best_value": n / 10,
         "test": {"test_fbeta": n / 20}, "num_trials": n}
        for n in (2, 3)
    ]  # fmt: skip

    def trial(n: int) -> SimpleNamespace:
        return SimpleNamespace(path=f"{tmp_path}/grown/trial_00{n}_x", config={"train.lr": n * 1e-3})

    def restored(state: dict) -> MLflowSweep:  # the next driver's callback, as Tune restores it
        callback = MLflowSweep(cfg)
        callback.set_state(state)
        callback.setup()
        return callback

    first = MLflowSweep(cfg)
    first.setup()
    for n in (1, 2):
        first.log_trial_start(trial(n))
    log_summary(cfg, sizes[0])
    resumed = restored(first.get_state())  # --resume of the finished sweep: no trial starts
    assert resumed.parent == first.parent
    extension = restored(first.get_state())
    extension.log_trial_start(trial(3))  # --extend: the first new trial
    log_summary(cfg, sizes[1])

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("grown").experiment_id])
    old, new = sorted((r for r in runs if r.data.tags.get("lorahpo.role") == "sweep"), key=lambda r: r.info.start_time)
    assert (old.info.run_id, new.info.run_id) == (first.parent, extension.parent)
    assert old.data.tags["lorahpo.extended_by"] == new.info.run_id
    assert new.data.tags["lorahpo.extends"] == old.info.run_id
    for run, summary in (old, sizes[0]), (new, sizes[1]):
        assert run.info.status == "FINISHED" and run.data.params["best_trial"] == summary["best_trial"]
        assert run.data.metrics["test_fbeta"] == summary["test"]["test_fbeta"]
    nested = [r.data.tags["mlflow.parentRunId"] for r in runs if r.data.tags.get("lorahpo.role") != "sweep"]
    assert sorted(nested) == sorted([old.info.run_id] * 2 + [new.info.run_id])

    client.delete_run(new.info.run_id)  # deleted in MLflow's UI, then extended again
    again = restored(extension.get_state())
    again.log_trial_start(trial(4))
    assert again.parent != new.info.run_id and "lorahpo.extends" not in client.get_run(again.parent).data.tags

    summaries = []
    for f in sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")):
        run = next(r.run for r in wandb_records(f) if r.HasField("run"))
        summaries.append({item.key: json.loads(item.value_json) for item in run.config.update})
    assert sorted(c["num_trials"] for c in summaries) == [2, 3]


def test_no_secret_in_any_file_or_the_console(watched: dict[str, Any]) -> None:
    session = re.search(r"(/tmp/ray/session_[^/\s]+)/", watched["console"])
    roots = [watched["tmp"]] + ([Path(session.group(1))] if session else [])
    assert session, "the Ray session directory is named on the console"
    leaks = [
        str(p)
        for root in roots
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and any(s.encode() in p.read_bytes() for s in SECRETS.values())
    ]
    assert leaks == []


def test_console_shows_no_library_warnings(watched: dict[str, Any]) -> None:
    console = watched["console"]
    noise = [line for line in console.splitlines() if LIBRARY_NOISE.search(line) and " lorahpo." not in line]
    assert noise == []
    assert console.count(" started with configuration") == 4 and console.count(" completed after ") >= 1
    assert "Results: " in console and "test split (scored once):" in console
    # the full logs are kept: each trial's own trial.log holds what the console does not show
    for log in watched["exp"].glob("trial_*/trial.log"):
        assert "GPU available" in log.read_text()
    assert len(list(watched["exp"].glob("trial_*/trial.log"))) == 4


BLOCK_MLFLOW = textwrap.dedent(
    """
    import runpy, sys

    class Absent:  # mlflow is installed here; every import finder now answers for it as for a missing package
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name == "mlflow" or name.startswith("mlflow."):
                return None
            return self.finder.find_spec(name, path, target)

        def __getattr__(self, attr):  # find_distributions, invalidate_caches, ...
            return getattr(self.finder, attr)

    sys.meta_path[:] = [Absent(f) for f in sys.meta_path]
    sys.argv = ["tune_lora.py", *sys.argv[1:]]
    runpy.run_path("tune_lora.py", run_name="__main__")
    """
)


def test_missing_tracker_package_is_one_line_exit_2_at_dry_run(tmp_path: Path) -> None:
    args = [f"{k}={v}" for k, v in TINY.items()] + [f"sweep.storage_path={tmp_path}", "sweep.loggers=[mlflow]"]
    run = subprocess.run(
        [sys.executable, "-c", BLOCK_MLFLOW, "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        "error: sweep.loggers names mlflow, but its package 'mlflow' is not installed (No module named 'mlflow'); "
        "pip install 'lorahpo[mlflow]', or remove mlflow from sweep.loggers"
    ]
    assert not list(tmp_path.iterdir())  # nothing written
