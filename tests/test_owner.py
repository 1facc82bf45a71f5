"""Who may touch a sweep. --overwrite deletes only a directory lorahpo marked as a sweep, never through a link, never
one a live driver holds; --resume and --final of a held sweep are refused; a dead driver's sweep is free again.
Hostile layouts and files end in exit 2 with one line and delete nothing. The drivers are real CLI processes; refusals
that need no second process of their own run the CLI in-process (`tune_lora.main`, the same code path, without the
~10 s of imports a process start costs here)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import tune_lora
from lorahpo import owner
from lorahpo.config import config_yaml

from .conftest import DELAYS_ENV, cli, cli_background, hooked, tiny_args, tiny_config, wait_for

MARKER = json.dumps({"name": "s", "created": "2026-01-01T00:00:00+00:00", "host": "h", "pid": 1})
SMALL = {"sweep.num_samples": 1, "train.max_epochs": 1, "data.max_examples": 200}


def tree(root: Path) -> dict[str, str]:
    """Everything under `root`, links not followed: a file's hash, a link's target, 'dir', or 'other' (a FIFO)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"-> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"
    return out


def refused(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """The CLI in-process: exit 2 and exactly one stderr line `error: ...`; returns it."""
    code = tune_lora.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


def home_with_thesis(tmp: Path) -> Path:
    """A user's own files (what an attacker would like lorahpo to delete)."""
    home = tmp / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "chapter1.tex").write_text("years of work")
    (home / "thesis" / "config.yaml").write_text("seed: 42\n")  # parses as a lorahpo config
    (home / "notes.txt").write_text("mine")
    (home / "marker").write_text(MARKER)
    return home


def sweep_dir(path: Path, marker: bytes | None = MARKER.encode()) -> Path:
    path.mkdir(parents=True)
    (path / "results.parquet").write_bytes(b"earlier results")
    if marker is not None:
        (path / ".lorahpo-sweep").write_bytes(marker)
    return path


def marker_is(kind: str):  # noqa: ANN201
    """A layout whose sweep directory has a marker of `kind`."""

    def make(tmp: Path, home: Path) -> None:
        exp = sweep_dir(tmp / "store" / "s", marker=None)
        m = exp / ".lorahpo-sweep"
        if kind == "dir":
            m.mkdir()
        elif kind == "link":
            m.symlink_to(home / "marker")
        elif kind == "dangling link":
            m.symlink_to(home / "missing")
        elif kind == "fifo":
            os.mkfifo(m)
        else:
            m.write_bytes(kind.encode("latin-1"))

    return make


def plain(tmp: Path, home: Path) -> None:
    (tmp / "store" / "s").mkdir(parents=True)
    (tmp / "store" / "s" / "config.yaml").write_text("seed: 42\n")
    (tmp / "store" / "s" / "notes.txt").write_text("mine")


def a_file(tmp: Path, home: Path) -> None:
    (tmp / "store").mkdir()
    (tmp / "store" / "s").write_text("a file, not a directory")


def link_to(target: str):  # noqa: ANN201
    def make(tmp: Path, home: Path) -> None:
        sweep_dir(home / "real_sweep")
        (tmp / "store").mkdir()
        (tmp / "store" / "s").symlink_to(home / target)

    return make


NOT_A_SWEEP = "no .lorahpo-sweep marker"
NOT_OURS = "its .lorahpo-sweep marker is not one lorahpo wrote: "


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (plain, NOT_A_SWEEP),  # the old rule took a config.yaml that parses (seed: 42) for a sweep
        (marker_is(""), NOT_OURS + "not JSON"),
        (marker_is("garbage"), NOT_OURS + "not JSON"),
        (marker_is(bytes(range(256)).decode("latin-1")), NOT_OURS + "not JSON"),
        (marker_is("{" + " " * 5_000_000 + "}"), NOT_OURS + "not a file of at most 4096 bytes"),
        (marker_is("[1, 2]"), NOT_OURS + "not a JSON object"),
        (marker_is('{"seed": 42}'), NOT_OURS + "fields"),
        # a copy of another sweep's marker (e.g. `cp -a` of a sweep's files into a folder of one's own)
        (
            marker_is(MARKER.replace('"s"', '"lora_sweep"')),
            "its .lorahpo-sweep marker is that of the sweep 'lora_sweep'",
        ),
        (marker_is("dir"), NOT_OURS + "not a file of at most 4096 bytes"),
        (marker_is("link"), NOT_OURS + "a link"),
        (marker_is("dangling link"), NOT_OURS + "a link"),
        (marker_is("fifo"), NOT_OURS + "not a file of at most 4096 bytes"),
        (a_file, "it is not a directory"),
        (link_to("real_sweep"), "it is a link (to {home}/real_sweep), and --overwrite never deletes through a link"),
        (link_to("."), "it is a link (to {home}), and --overwrite never deletes through a link"),
        (link_to("missing"), "it is a link (to {home}/missing), and --overwrite never deletes through a link"),
    ],
    ids=[
        "user-folder-with-config-yaml",
        "marker-empty",
        "marker-garbage",
        "marker-binary",
        "marker-huge",
        "marker-list",
        "marker-other-fields",
        "marker-of-another-sweep",
        "marker-directory",
        "marker-link",
        "marker-dangling-link",
        "marker-fifo",
        "sweep-path-is-a-file",
        "sweep-path-links-to-a-sweep",
        "sweep-path-links-to-home",
        "sweep-path-dangling-link",
    ],
)
def test_overwrite_deletes_only_a_marked_sweep_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture, make, why: str
) -> None:
    home = home_with_thesis(tmp_path)
    make(tmp_path, home)
    before = tree(tmp_path)
    line = refused(["--overwrite", *tiny_args(tmp_path / "store", **SMALL, **{"sweep.name": "s"})], capsys)
    assert line == (
        f"error: --overwrite: {tmp_path}/store/s exists but is not a lorahpo sweep ({why.format(home=home)}); it is "
        "never deleted: choose another sweep.name or sweep.storage_path"
    )
    assert tree(tmp_path) == before


def test_overwrite_through_a_storage_path_that_links_to_home(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """sweep.storage_path is a link to the user's home and sweep.name one of its folders: no marker, nothing deleted."""
    home = home_with_thesis(tmp_path)
    (tmp_path / "results").symlink_to(home)
    before = tree(tmp_path)
    line = refused(["--overwrite", *tiny_args(tmp_path / "results", **SMALL, **{"sweep.name": "thesis"})], capsys)
    assert f"--overwrite: {home}/thesis exists but is not a lorahpo sweep (no .lorahpo-sweep marker)" in line
    assert tree(tmp_path) == before


def finished_sweep(tmp: Path, **files: bytes) -> tuple[Path, list[str]]:
    """What --resume and --final look for (a marker, tuner.pkl, the config, a summary), with `files` replacing them;
    and the CLI arguments that address it."""
    args = tiny_args(tmp / "store", **SMALL, **{"sweep.name": "s"})
    exp = sweep_dir(tmp / "store" / "s")
    cfg = tiny_config(**SMALL, **{"sweep.storage_path": str(tmp / "store"), "sweep.name": "s"})
    contents = {
        "tuner.pkl": b"",  # its presence is what Tune's can_restore checks; nothing here reaches the unpickling
        "config.yaml": config_yaml(cfg).encode(),
        "summary.json": json.dumps(
            {"best_trial": "trial_000_x", "best_params": cfg.sweep.points_to_evaluate[0]}
        ).encode(),
        "manifest.json": b"{}",
    }
    for name, data in {**contents, **files}.items():
        (exp / name).write_bytes(data)
    return exp, args


# a 1 KB config.yaml of 10^9 values (aliases of aliases) in a choice list: every walk over it would visit them all
BOMB = "search:\n  lora.dropout:\n    type: categorical\n    choices:\n    - &b0 [x, x, x, x, x, x, x, x, x, x]\n"
BOMB = (BOMB + "".join(f"    - &b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]\n" for i in range(1, 9))).encode()


# best_params that would make the final runs load a model directory from the same storage with its remote code
PLANTED = json.dumps(
    {"best_trial": "t", "best_params": {"train.lr": 1e-3, "model.name": "/x", "model.trust_remote_code": True}}
).encode()


@pytest.mark.parametrize(
    ("flag", "name", "data", "why"),
    [
        ("--resume", "config.yaml", b"[1, 2]", "is not a lorahpo config (config section <top> must be a mapping"),
        (
            "--resume",
            "config.yaml",
            b"train: [unclosed",
            "is not a lorahpo config (it is not valid YAML: while parsing a flow",
        ),
        ("--resume", "config.yaml", b"\xff\xfe\x00\x01", "is not a lorahpo config ("),
        ("--resume", "config.yaml", BOMB, "is not a lorahpo config (it holds more than 100000 values once its YAML"),
        ("--final", "config.yaml", b"- a\n- b\n", "is not a lorahpo config (config section <top> must be a mapping"),
        ("--final", "config.yaml", bytes(range(256)), "is not a lorahpo config ("),
        ("--final", "summary.json", b"{not json", "is not a summary lorahpo wrote"),
        ("--final", "summary.json", b"[]", "is not a summary lorahpo wrote"),
        ("--final", "summary.json", b'{"best_trial": "t"}', "is not a summary lorahpo wrote"),
        ("--final", "summary.json", b"[" * 100_000 + b"]" * 100_000, "is not a summary lorahpo wrote"),
        ("--final", "summary.json", PLANTED, "is not a summary lorahpo wrote: its best_params do not fit the search"),
        ("--resume", "manifest.json", b"[" * 100_000, "is not a manifest lorahpo wrote"),
        ("--resume", "manifest.json", b"\x00\xffgarbage", "is not a manifest lorahpo wrote"),
        ("--final", "manifest.json", b'{"data": 5}', "is not a manifest lorahpo wrote"),
        ("--resume", ".lorahpo-owner.1", b"garbage", "is not an owner record lorahpo wrote (not JSON)"),
        ("--final", ".lorahpo-owner.1", b"[" * 2000 + b"]" * 2000, "is not an owner record lorahpo wrote (not JSON)"),
        ("--final", ".lorahpo-owner.3", b'{"host": "h", "pid": "x"}', "is not an owner record lorahpo wrote (fields)"),
        ("--overwrite", ".lorahpo-owner.2", b"\x00" * 9000, "is not an owner record lorahpo wrote (not a file of"),
    ],
)
def test_malformed_sweep_files_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, name: str, data: bytes, why: str
) -> None:
    """A sweep's own files, edited, cut short or planted: --resume and --final stop with one line naming the file."""
    exp, args = finished_sweep(tmp_path, **{name: data})
    before = tree(tmp_path)
    line = refused([flag, *args, "final.seeds=1"], capsys) if flag == "--final" else refused([flag, *args], capsys)
    assert line.startswith(f"error: {flag}: {exp}/{name} {why}"), line
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------------
# Owner records: who counts as alive


def owner_record(**fields: object) -> dict:
    from lorahpo.owner import _machine, _started

    now = time.time()
    fields = {"heartbeat": now - fields.pop("age"), **fields} if "age" in fields else fields
    me = {"host": socket.gethostname(), "machine": _machine(), "pid": os.getpid(), "token": "t"}
    return {**me, "pid_start": _started(os.getpid()), "started": now, "heartbeat": now, "flag": None, **fields}


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


ELSEWHERE = {"host": "node-7", "machine": "another machine", "pid": 4242}


@pytest.mark.parametrize(
    ("fields", "alive"),
    [
        ({}, True),  # this very process
        ({"pid_start": 1.0e9}, False),  # its pid, but another process's start time: a recycled pid
        ({"pid": -1}, None),  # not a record lorahpo writes
        ({"released": 1.0e9}, False),
        ({**ELSEWHERE, "age": 60}, True),  # another machine, heartbeat fresh
        ({**ELSEWHERE, "age": 301}, False),  # another machine, silent for longer than STALE_S
        ({**ELSEWHERE, "released": 1.0e9}, False),
    ],
)
def test_who_counts_as_a_live_owner(tmp_path: Path, fields: dict, alive: bool | None) -> None:
    from lorahpo.errors import UserError
    from lorahpo.owner import check_free

    cfg = tiny_config(**{"sweep.storage_path": str(tmp_path), "sweep.name": "s"})
    (tmp_path / "s").mkdir()
    record = owner_record(**fields)
    (tmp_path / "s" / ".lorahpo-owner.7").write_text(json.dumps(record))
    if alive is False:
        assert check_free(cfg, "--resume") == 7
        return
    with pytest.raises(UserError) as e:
        check_free(cfg, "--resume")
    if alive is None:
        assert str(e.value).startswith(f"--resume: {tmp_path}/s/.lorahpo-owner.7 is not an owner record lorahpo wrote")
        return
    beat = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record["heartbeat"]))
    assert re.fullmatch(
        rf"--resume: the sweep at {tmp_path}/s is in use by a running driver \(host {record['host']}, pid "
        rf"{record['pid']}, last heartbeat {beat}, \d+ s ago\); let it finish, or stop it and run this again \(a "
        r"driver that died counts as gone at once on its own machine, elsewhere 300 s after its last heartbeat\)",
        str(e.value),
    ), str(e.value)


def test_a_dead_pid_frees_the_sweep_at_once(tmp_path: Path) -> None:
    from lorahpo.owner import check_free

    cfg = tiny_config(**{"sweep.storage_path": str(tmp_path), "sweep.name": "s"})
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / ".lorahpo-owner.1").write_text(json.dumps(owner_record(pid=dead_pid())))  # fresh heartbeat
    assert check_free(cfg, "--overwrite") == 1


def test_hold_beats_releases_and_admits_one_of_many(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The heartbeat advances while a driver holds the sweep; the record is released when the body ends, by an
    exception too; of eight drivers taking a free sweep at once exactly one gets it (an atomic create)."""
    from lorahpo import owner
    from lorahpo.errors import UserError

    monkeypatch.setattr(owner, "HEARTBEAT_S", 0.05)
    cfg = tiny_config(**{"sweep.storage_path": str(tmp_path), "sweep.name": "s"})
    read = lambda name: json.loads((tmp_path / "s" / name).read_text())  # noqa: E731
    with owner.hold(cfg, None) as name:
        assert name == ".lorahpo-owner.1"
        first = read(name)["heartbeat"]
        wait_for(lambda: read(name)["heartbeat"] > first, 10, "a heartbeat")
        with pytest.raises(UserError, match="is in use by a running driver"):
            owner.check_free(cfg, "--final")
    assert read(name)["released"] >= read(name)["heartbeat"] > first
    with pytest.raises(KeyboardInterrupt), owner.hold(cfg, "--resume") as name:
        raise KeyboardInterrupt
    assert name == ".lorahpo-owner.2" and read(name)["released"] and read(name)["flag"] == "--resume"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".lorahpo-owner.2"]  # generation 1 superseded

    barrier, won, lost = threading.Barrier(8), [], []

    def take() -> None:
        barrier.wait()
        try:
            won.append(owner._acquire(cfg, "--resume")[0])
        except UserError as e:
            lost.append(str(e))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won == [f"{tmp_path}/s/.lorahpo-owner.3"] and len(lost) == 7, (won, lost)
    assert all("is in use by a running driver" in e or "at the same time" in e for e in lost), lost


def test_wipe_removes_links_never_their_targets(tmp_path: Path) -> None:
    from lorahpo.owner import wipe

    home = home_with_thesis(tmp_path)
    exp = sweep_dir(tmp_path / "store" / "s")
    (exp / "trial_000").mkdir()
    (exp / "trial_000" / "thesis").symlink_to(home / "thesis")
    (exp / "thesis").symlink_to(home / "thesis")
    (exp / "notes.txt").symlink_to(home / "notes.txt")
    (exp / ".lorahpo-owner.2").write_text("{}")
    before = tree(home)
    wipe(tiny_config(**{"sweep.storage_path": str(tmp_path / "store"), "sweep.name": "s"}), ".lorahpo-owner.2")
    assert tree(home) == before
    assert [p.name for p in exp.iterdir()] == [".lorahpo-owner.2"]


@pytest.mark.slow
def test_s3_wipe_keeps_its_owner_record_past_a_key_with_an_empty_segment(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key with an empty segment (`s//x`, legal in S3) lists as an entry whose path is the sweep directory itself;
    deleting that entry deleted the whole directory, this driver's owner record included (another driver could then
    take the sweep), and the wipe then failed on the entries already gone. pyarrow cannot address such a key: it is
    left, everything else but the owner record goes."""
    from lorahpo import owner

    from .test_cluster import AWS_ENV, BUCKET

    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    cfg = tiny_config(
        **{"sweep.storage_path": f"s3://{BUCKET}/odd", "sweep.name": "s", "sweep.s3_endpoint": s3.endpoint}
    )
    for key, body in ((".lorahpo-sweep", MARKER.encode()), ("results.parquet", b"x"), ("/x", b"x")):
        s3.client().put_object(Bucket=BUCKET, Key=f"odd/s/{key}", Body=body)
    with owner.hold(cfg, "--overwrite") as held:
        owner.wipe(cfg, keep=held)
        assert {k for k in s3.keys("odd/s/") if not k.endswith("/")} == {"odd/s//x", f"odd/s/{held}"}


# ---------------------------------------------------------------------------------------------------------------------
# Real drivers

# RAY_DEDUP_LOGS=0: the test waits for a worker's line; TUNE_GLOBAL_CHECKPOINT_S=0: Tune saves its state at every step
HELD_ENV = {"RAY_DEDUP_LOGS": "0", "TUNE_GLOBAL_CHECKPOINT_S": "0"}


def waiting(exp: Path, log: Path) -> bool:
    """Trial 1 (the first: Tune counts from 1) waits for its gate, and what --resume restores is in storage."""
    stored = (exp / "tuner.pkl").exists() and any(exp.glob("experiment_state-*.json"))
    return stored and "test delay: trial_001" in log.read_text()


@pytest.mark.slow
def test_a_live_driver_keeps_its_sweep(tmp_path: Path, procs: list, capsys: pytest.CaptureFixture) -> None:
    """A second driver (a real process for --overwrite; this test's own process for --resume and --final) against a
    running one: each refused with one line naming it; the first finishes normally, its results intact."""
    gate = tmp_path / "go"
    args = tiny_args(tmp_path, **SMALL, **{"sweep.name": "live"})
    env = hooked(**{DELAYS_ENV: json.dumps({"1": [str(gate), 0]})}, **HELD_ENV)
    log = tmp_path / "driver.log"
    proc = cli_background(args, log, env=env)
    procs.append(proc)
    exp = tmp_path / "live"
    wait_for(lambda: waiting(exp, log), 300, "trial 1 waiting, the sweep's state in storage")
    created = json.loads((exp / "manifest.json").read_text())["created"]
    held = rf"the sweep at {re.escape(str(exp))} is in use by a running driver \(host "
    held += rf"{re.escape(socket.gethostname())}, pid {proc.pid}, last heartbeat \S+Z, \d+ s ago\); let it finish, "
    held += r"or stop it and run this again"

    second = cli(["--overwrite", *args])
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert re.match(rf"error: --overwrite: {held}", second.stderr.strip().splitlines()[-1]), second.stderr[-2000:]
    assert re.match(rf"error: --resume: {held}", refused(["--resume", *args], capsys))
    assert re.match(rf"error: --final: {held}", refused(["--final", *args, "final.seeds=1"], capsys))

    gate.touch()
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert len(pd.read_parquet(exp / "results.parquet")) == 1 and (exp / "summary.json").is_file()
    assert json.loads((exp / "manifest.json").read_text())["created"] == created
    record = json.loads((exp / ".lorahpo-owner.1").read_text())
    assert record["pid"] == proc.pid and record["released"] >= record["heartbeat"]


@pytest.mark.slow
def test_a_killed_drivers_sweep_resumes(tmp_path: Path, procs: list) -> None:
    """SIGKILL leaves an owner record that was never released; on its machine the dead pid frees the sweep at once."""
    args = tiny_args(tmp_path, **SMALL, **{"sweep.name": "dead"})
    env = hooked(**{DELAYS_ENV: json.dumps({"1": [str(tmp_path / "never"), 0]})}, **HELD_ENV)
    log = tmp_path / "driver.log"
    proc = cli_background(args, log, env=env)
    procs.append(proc)
    exp = tmp_path / "dead"
    wait_for(lambda: waiting(exp, log), 300, "trial 1 waiting, the sweep's state in storage")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert "released" not in json.loads((exp / ".lorahpo-owner.1").read_text())

    run = cli(["--resume", *args])
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(pd.read_parquet(exp / "results.parquet")) == 1
    assert not (exp / ".lorahpo-owner.1").exists()
    assert json.loads((exp / ".lorahpo-owner.2").read_text())["flag"] == "--resume"


@pytest.mark.slow
def test_a_sweep_taken_over_mid_run_stops_as_on_ctrl_c(tmp_path: Path, procs: list, monkeypatch) -> None:
    """The real CLI mid-sweep (trial 1 running, its state in storage), stopped (SIGSTOP) past the stale time and taken
    over by a driver elsewhere: on SIGCONT its heartbeat stops the sweep through Tune's own Ctrl-C handling; it exits
    130 with one line saying another driver took the sweep, and what it wrote stays. Stand-ins as in HOLDER."""
    args = tiny_args(tmp_path, **SMALL, **{"sweep.name": "woke"})
    driver = "import sys; from lorahpo import owner; owner._machine = lambda: 'another machine'; "
    driver += "owner.HEARTBEAT_S = 0.5; import tune_lora; sys.exit(tune_lora.main(sys.argv[1:]))"
    log = tmp_path / "driver.log"
    env = {**os.environ, **hooked(**{DELAYS_ENV: json.dumps({"1": [str(tmp_path / "never"), 0]})}), **HELD_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-c", driver, *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
        start_new_session=True, env=env, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    procs.append(proc)
    exp = tmp_path / "woke"
    wait_for(lambda: waiting(exp, log), 300, "trial 1 waiting, the sweep's state in storage")
    os.kill(proc.pid, signal.SIGSTOP)
    monkeypatch.setattr(owner, "STALE_S", 3.0)
    first = exp / ".lorahpo-owner.1"
    wait_for(lambda: time.time() - json.loads(first.read_text())["heartbeat"] > 3.5, 30, "a stale heartbeat")
    with owner.hold(tiny_config(**{"sweep.storage_path": str(tmp_path), "sweep.name": "woke"}), "--resume") as held:
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
        last = log.read_text().strip().splitlines()[-1]
        assert last.startswith(f"interrupted: another driver took over the sweep at {exp}: "), last
        assert "released" not in json.loads((exp / held).read_text())
    assert (exp / "tuner.pkl").exists() and (exp / "manifest.json").exists()  # kept, for the driver that took over


def test_a_silent_owner_elsewhere_is_gone_after_the_stale_time(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An owner record from another machine: refused while its heartbeat is fresh, free once it is stale."""
    exp = sweep_dir(tmp_path / "store" / "s")
    args = ["--overwrite", *tiny_args(tmp_path / "store", **SMALL, **{"sweep.name": "s"})]
    record = owner_record(**ELSEWHERE, heartbeat=time.time() - 120)
    (exp / ".lorahpo-owner.4").write_text(json.dumps(record))
    before = tree(tmp_path)
    line = refused(args, capsys)
    assert "is in use by a running driver (host node-7, pid 4242, last heartbeat " in line
    assert tree(tmp_path) == before
    (exp / ".lorahpo-owner.4").write_text(json.dumps({**record, "heartbeat": time.time() - 301}))
    assert tune_lora.main([*args, "--dry-run"]) == 0


# A driver that holds a sweep and works until it is stopped, ending as tune_lora.main ends an Interrupted sweep.
# Named stand-ins: "another machine" (owner._machine) so that a driver here judges it by its heartbeat alone, and a
# heartbeat every 0.5 s instead of 30 s.
HOLDER = """
import sys, time
from lorahpo import owner
from lorahpo.config import load_config
from lorahpo.errors import Interrupted
owner._machine = lambda: "another machine"
owner.HEARTBEAT_S = 0.5
cfg = load_config(None, {"sweep.storage_path": sys.argv[1], "sweep.name": "s"})
try:
    with owner.hold(cfg, None):
        print("holding", flush=True)
        while True:  # the sweep's work
            print("working", time.time(), flush=True)
            time.sleep(0.2)
except Interrupted as e:
    print(f"interrupted: {e}", file=sys.stderr, flush=True)
    sys.exit(130)
"""


def test_a_driver_that_wakes_after_a_takeover_stops(tmp_path: Path, procs: list, monkeypatch) -> None:
    """A holder silent for longer than STALE_S (SIGSTOP: a laptop that slept) is taken over by a driver elsewhere;
    when it wakes (SIGCONT), its heartbeat finds the newer owner and it stops at once (its own SIGINT), exits 130
    with one line saying so, and leaves the new holder's record alone."""
    store, out, err = tmp_path / "store", tmp_path / "holder.out", tmp_path / "holder.err"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store)],
        stdout=open(out, "w"),
        stderr=open(err, "w"),
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    procs.append(holder)
    wait_for(lambda: "holding" in out.read_text(), 180, "the first driver to hold the sweep")
    os.kill(holder.pid, signal.SIGSTOP)
    monkeypatch.setattr(owner, "STALE_S", 3.0)  # stand-in for 300 s
    first = store / "s" / ".lorahpo-owner.1"
    wait_for(lambda: time.time() - json.loads(first.read_text())["heartbeat"] > 3.5, 30, "a stale heartbeat")
    cfg = tiny_config(**{"sweep.storage_path": str(store), "sweep.name": "s"})
    with owner.hold(cfg, "--resume") as held:  # this driver takes the sweep over
        assert held == ".lorahpo-owner.2" and not first.exists()
        token = json.loads((store / "s" / held).read_text())["token"]
        woke = time.time()
        os.kill(holder.pid, signal.SIGCONT)
        assert holder.wait(timeout=60) == 130, err.read_text()[-2000:]
        ticks = [float(line.split()[1]) for line in out.read_text().splitlines() if line.startswith("working")]
        assert len([t for t in ticks if t > woke]) <= 3  # stopped at its first heartbeat after waking
        assert err.read_text().strip().splitlines()[-1] == (
            f"interrupted: another driver took over the sweep at {store / 's'}: this driver's heartbeat was older "
            "than 300 s (a machine that slept, a stopped process), so it counted as gone; this driver stopped, "
            "keeping what its trials wrote, and the other one runs the sweep now"
        )
        record = json.loads((store / "s" / held).read_text())
        assert record["token"] == token and "released" not in record  # the first driver left it alone


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 (the S3Server of tests/test_cluster.py)
    from .test_cluster import BUCKET, S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        server.start()
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.kill()


@pytest.mark.slow
def test_heartbeat_and_refusals_on_s3(s3, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """On a real S3 server (moto): the heartbeat advances in the bucket and is what another machine goes by; a fresh
    one from another machine refuses --overwrite, a stale one lets it proceed; the wipe keeps only the holder."""
    from lorahpo import owner
    from lorahpo.errors import UserError

    from .test_cluster import AWS_ENV, BUCKET

    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    store, where = f"s3://{BUCKET}/owner", {"sweep.name": "s", "sweep.s3_endpoint": s3.endpoint}
    cfg, args = tiny_config(**SMALL, **where, **{"sweep.storage_path": store}), tiny_args(store, **SMALL, **where)
    read = lambda key: json.loads(s3.read(f"owner/s/{key}"))  # noqa: E731
    put = lambda key, body: s3.client().put_object(Bucket=BUCKET, Key=f"owner/s/{key}", Body=body)  # noqa: E731
    with monkeypatch.context() as m:
        m.setattr(owner, "HEARTBEAT_S", 0.2)
        with owner.hold(cfg, None) as name:
            first = read(name)["heartbeat"]
            wait_for(lambda: read(name)["heartbeat"] > first, 30, "a heartbeat in the bucket")
            m.setattr(owner, "_machine", lambda: "another machine")  # seen from elsewhere: the heartbeat decides
            with pytest.raises(UserError, match="is in use by a running driver"):
                owner.check_free(cfg, "--resume")
    assert name == ".lorahpo-owner.1" and read(name)["released"]

    put(".lorahpo-sweep", MARKER.encode())
    put("trial_000/checkpoint", b"x")
    record = owner_record(**ELSEWHERE, heartbeat=time.time() - 120)
    put(".lorahpo-owner.2", json.dumps(record).encode())
    assert "is in use by a running driver (host node-7, pid 4242," in refused(["--overwrite", *args], capsys)
    put(".lorahpo-owner.2", json.dumps({**record, "heartbeat": time.time() - 301}).encode())
    assert tune_lora.main(["--overwrite", *args, "--dry-run"]) == 0
    owner.wipe(cfg, ".lorahpo-owner.2")
    assert [k for k in s3.keys("owner/s/") if not k.endswith("/")] == ["owner/s/.lorahpo-owner.2"]  # "/": dir keys
