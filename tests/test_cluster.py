"""The cluster sweep, for real: a two-node Ray cluster on this machine (`ray start --head` + `ray start --address`,
token auth), a real S3 server (moto's, tests/s3_server.py), sweeps through the CLI with --address, and the faults a
cluster sweep must survive: a lost worker node, a lost S3 server, a killed driver; plus cluster.yaml against Ray's
own validation and the storage preflight. Every process started here is stopped by process (group) id when its
fixture or test ends, pass or fail."""

from __future__ import annotations

import copy
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import boto3
import botocore.config
import pandas as pd
import pytest
import yaml

from .conftest import (
    DET_SWEEP,
    ROOT,
    cli,
    cli_background,
    kill_group,
    snapshot_trials,
    sweep_record,
    tiny_args,
    wait_for,
)
from .test_sweep import OUTPUTS

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BUCKET = "lorahpo-test"
PREFIX = "lorahpo"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-profile lookups on a machine that is not EC2
}
RAY = str(Path(sys.executable).parent / "ray")
TAG = "LORAHPO_TEST_PROCESS"  # set in the environment of every process this file starts (see kill_tagged)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def popen(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """A process in its own process group (killed with it), output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment carries TAG=tag: Ray starts each worker process in a process group of
    its own, so killing a node's group can leave them behind. Matched by pid; nothing else is touched."""
    needle = f"{TAG}={tag}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def unshare_works() -> bool:
    """Can a node be started in a private mount namespace (root, or CAP_SYS_ADMIN)?"""
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# ---------------------------------------------------------------------------------------------------------------------
# A real S3 server


class S3Server:
    """moto's S3 server on a free port; durable across stop()/start() (see tests/s3_server.py)."""

    def __init__(self, tmp: Path):
        self.tmp, self.port, self.proc = tmp, free_port(), None
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.tag = secrets.token_hex(6)

    def start(self) -> None:
        env = {**os.environ, **AWS_ENV, TAG: self.tag}
        cmd = [sys.executable, str(ROOT / "tests" / "s3_server.py"), "--port", str(self.port)]
        self.proc = popen([*cmd, "--state", str(self.tmp / "state")], self.tmp / "s3.log", env)
        wait_for(self.ready, 60, f"S3 server on {self.endpoint}")

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"S3 server exited: {(self.tmp / 's3.log').read_text()[-2000:]}")
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def stop(self) -> None:
        """SIGTERM: stop serving, save every object, exit (like stopping a server whose disk survives)."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=120)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc)
        kill_tagged(self.tag)

    def client(self):  # noqa: ANN201 (generated boto3 types)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
            config=botocore.config.Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}),
        )

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def csv(self, key: str) -> pd.DataFrame:
        return pd.read_csv(io.BytesIO(self.read(key)))

    def enable_auth(self) -> None:
        """From now on every request must be signed by a known IAM user (moto's IAM auth); none exists."""
        req = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        urllib.request.urlopen(req, timeout=10).read()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        server.start()
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.kill()


# ---------------------------------------------------------------------------------------------------------------------
# A real two-node Ray cluster on this machine


class Cluster:
    """`ray start --head` + `ray start --address` (one CPU each; the worker node has the custom resource
    `worker_node`), token auth with a private token, a private temp dir, a free port. With `node_local`, the worker
    node runs in a mount namespace of its own with a tmpfs over that directory: a path the driver and the worker node
    both call `node_local` but that is not the same directory, as on two machines."""

    def __init__(self, node_local: bool = False):
        # A short temp dir: Ray's unix socket paths live under it and must stay under 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="lhc-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tag = secrets.token_hex(6)
        self.node_local = self.dir / "node-local" if node_local else None
        token = self.dir / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {
            **os.environ,
            **AWS_ENV,
            "RAY_AUTH_MODE": "token",  # every node and driver of this cluster: token auth, with this private token
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
            # A killed node is declared dead after ~3 s instead of ~30 s, so its trials are retried sooner.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            TAG: self.tag,
        }
        self.head: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.head_id = self.worker_id = ""

    def start(self) -> None:
        common = ["--block", "--num-cpus", "1", "--disable-usage-stats"]
        head = ["--head", "--port", str(self.port), "--temp-dir", str(self.dir / "ray"), "--include-dashboard", "false"]
        self.head = popen(
            [RAY, "start", *head, *common],
            self.dir / "head.log",
            self.env,
        )
        wait_for(self._gcs_up, 60, "the head node's GCS port")
        cmd = [RAY, "start", "--address", self.address, "--resources", '{"worker_node": 1}', *common]
        if self.node_local is not None:
            self.node_local.mkdir()
            mount = 'mount -t tmpfs node-local "$0" && exec "$@"'
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(self.node_local), *cmd]
        self.worker = popen(cmd, self.dir / "worker.log", self.env)
        nodes = self.wait_nodes(2)
        self.head_id = next(n for n, r in nodes.items() if "worker_node" not in r)
        self.worker_id = next(n for n, r in nodes.items() if "worker_node" in r)

    def _gcs_up(self) -> bool:
        for proc, name in ((self.head, "head"), (self.worker, "worker")):
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"ray {name} exited: {(self.dir / f'{name}.log').read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def wait_nodes(self, n: int, timeout: float = 120) -> dict[str, dict[str, float]]:
        """Poll (in a real driver) until n nodes are alive; their ids and resources."""
        code = (
            "import json, sys, time, ray\n"
            f"ray.init(address='{self.address}', logging_level='ERROR')\n"
            f"deadline = time.monotonic() + {timeout}\n"
            "while True:\n"
            "    alive = {x['NodeID']: x['Resources'] for x in ray.nodes() if x['Alive']}\n"
            f"    if len(alive) >= {n} or time.monotonic() > deadline: break\n"
            "    time.sleep(0.3)\n"
            "print(json.dumps(alive))\n"
        )
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=self.env, timeout=timeout + 60
        )
        assert run.returncode == 0, run.stderr[-3000:]
        alive = json.loads(run.stdout.strip().splitlines()[-1])
        logs = "\n".join((self.dir / f"{x}.log").read_text()[-1500:] for x in ("head", "worker"))
        assert len(alive) >= n, f"{len(alive)} of {n} nodes alive: {alive}\n{logs}"
        return alive

    def kill_worker(self) -> None:
        """The worker node dies at once: raylet, agents, trial processes (SIGKILL, no goodbye to the head)."""
        kill_group(self.worker)

    def staging_progress(self, name: str) -> list[Path]:
        """progress.csv files the driver writes as results arrive (its local staging copy, before the sync to S3)."""
        return sorted((self.dir / "ray").glob(f"session_*/artifacts/*/{name}/driver_artifacts/trial_*/progress.csv"))

    def stop(self) -> None:
        for proc in (self.worker, self.head):
            if proc is not None and proc.poll() is None:
                kill_group(proc)
        kill_tagged(self.tag)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(node_local=unshare_works())
    try:
        c.start()
        yield c
    finally:
        c.stop()


# ---------------------------------------------------------------------------------------------------------------------
# Helpers for sweeps on the cluster


def sweep_args(s3: S3Server, name: str, **overrides: object) -> list[str]:
    """A tiny sweep into s3://BUCKET/PREFIX/name, one CPU per trial so both one-CPU nodes get a trial."""
    base = {
        "sweep.s3_endpoint": s3.endpoint,
        "sweep.name": name,
        "sweep.cpus_per_trial": 1,
        "sweep.max_concurrent_trials": 2,
    }
    return tiny_args(f"s3://{BUCKET}/{PREFIX}", **{**base, **overrides})  # type: ignore[arg-type]


def checkpointed_trials(s3: S3Server, name: str) -> set[str]:
    """Trials with at least one checkpoint in the bucket."""
    return {k.split("/")[2] for k in s3.keys(f"{PREFIX}/{name}/trial_") if "/checkpoint_" in k}


def recorded_trials(s3: S3Server, name: str) -> set[str]:
    """Trials in the newest experiment-state snapshot in the bucket: the driver's persisted view, what --resume
    restores. A trial started after that snapshot can already have a checkpoint there (workers upload their own)."""
    states = sorted(s3.keys(f"{PREFIX}/{name}/experiment_state-"))
    return snapshot_trials(s3.read(states[-1])) if states else set()


def history(s3: S3Server, name: str, trial_id: str) -> pd.DataFrame:
    return s3.csv(f"{PREFIX}/{name}/{trial_id}/progress.csv")


def one_line_error(run: subprocess.CompletedProcess) -> str:
    err = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith("error: "), run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    return err[0]


# ---------------------------------------------------------------------------------------------------------------------
# cluster.yaml


def test_cluster_yaml_passes_ray_validation() -> None:
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))  # what `ray up` runs, before any cloud call
    validate_config(config)

    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    workers = [t for k, t in config["available_node_types"].items() if k != config["head_node_type"]]
    assert (
        "GPU" not in head["resources"] and workers and all(w["max_workers"] >= w["min_workers"] >= 1 for w in workers)
    )
    assert all(w["node_config"]["InstanceType"].startswith(("g5.", "g6.", "g6e.")) for w in workers)
    assert all("IamInstanceProfile" in t["node_config"] for t in config["available_node_types"].values())
    assert config["file_mounts"]["/home/ubuntu/lorahpo"] == "."  # the project ships to every node
    setup = " ".join(config["worker_setup_commands"])
    assert "-e ~/lorahpo" in setup and "requirements-lock.txt" in setup
    assert f'"torch=={version("torch").split("+")[0]}"' in setup  # the tested torch, as the CUDA build
    assert config["head_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start  # dashboard only through the SSH tunnel
    assert start.count("RAY_AUTH_MODE=token") == 2
    text = (ROOT / "cluster.yaml").read_text()
    for secret in ("hf_", "AKIA", "aws_secret_access_key", "HF_TOKEN:", "HF_TOKEN="):  # no secret in the file
        assert secret not in text.replace("HF_TOKEN=$HF_TOKEN", ""), secret

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "four"
    with pytest.raises(ValidationError):
        validate_config(prepare_config(broken))
    broken = copy.deepcopy(raw)
    broken["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))


# ---------------------------------------------------------------------------------------------------------------------
# Storage preflight


def test_storage_preflight_one_line_errors(s3: S3Server, cluster: Cluster, tmp_path: Path) -> None:
    """A wrong bucket, wrong credentials, an unreachable endpoint: one line on stderr, exit 2, before any trial; and
    a path that is not the same directory on every node (when a node can be given one of its own)."""
    locked = S3Server(tmp_path / "locked")  # a second server that accepts no credentials at all
    (tmp_path / "locked").mkdir()
    try:
        locked.start()
        locked.client().create_bucket(Bucket=BUCKET)
        locked.enable_auth()
        cases = {
            "bucket": (sweep_args(s3, "pre", **{"sweep.storage_path": "s3://no-such-bucket/lorahpo"}), {}),
            "credentials": (
                sweep_args(locked, "pre"),
                {"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY": "wrong"},
            ),
            "endpoint": (sweep_args(s3, "pre", **{"sweep.s3_endpoint": f"http://127.0.0.1:{free_port()}"}), {}),
        }
        start = time.monotonic()
        procs = {  # all at once: each is mostly interpreter start-up
            case: subprocess.Popen(
                [sys.executable, str(ROOT / "tune_lora.py"), "--address", cluster.address, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**cluster.env, **env},
                cwd=ROOT,
                start_new_session=True,
            )
            for case, (args, env) in cases.items()
        }
        try:
            runs = {}
            for case, p in procs.items():
                out, err = p.communicate(timeout=300)
                runs[case] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    kill_group(p)
        elapsed = time.monotonic() - start
    finally:
        locked.kill()

    msg = one_line_error(runs["bucket"])
    assert "s3://no-such-bucket/lorahpo" in msg and "bucket 'no-such-bucket' does not exist" in msg
    msg = one_line_error(runs["credentials"])
    assert f"s3://{BUCKET}/{PREFIX}" in msg and "bad credentials" in msg and "AWS_ACCESS_KEY_ID" in msg
    msg = one_line_error(runs["endpoint"])
    assert f"s3://{BUCKET}/{PREFIX}" in msg and "is unreachable" in msg
    assert elapsed < 150, f"preflight errors took {elapsed:.0f} s"  # seconds each, not pyarrow's minutes of retries
    assert not s3.keys(f"{PREFIX}/pre"), "nothing may be written before the error"


def test_storage_not_shared_across_nodes_is_one_line(cluster: Cluster) -> None:
    """A path that is not the same directory on every node: the driver writes its marker, the task on the worker node
    finds nothing there; caught before anything is written."""
    if cluster.node_local is None:
        pytest.skip("needs `unshare --mount` (root or CAP_SYS_ADMIN) to give a node a directory of its own")
    not_shared = cluster.node_local / "results"
    run = cli(["--address", cluster.address, *tiny_args(not_shared, **{"sweep.cpus_per_trial": 1})], env=cluster.env)
    last = run.stderr.strip().splitlines()[-1]  # stderr also has Ray's connection log lines; the error is the last
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert last.startswith(f"error: storage {not_shared} is not shared across nodes: node "), last
    assert cluster.worker_id[:8] in last and "s3://" in last
    assert not not_shared.exists(), "the check cleans up after itself, and nothing else is written"


# ---------------------------------------------------------------------------------------------------------------------
# Sweeps on the cluster


def test_sweep_on_two_nodes_into_s3(s3: S3Server, cluster: Cluster, tmp_path: Path, det_reference: dict) -> None:
    name = "two_nodes"
    # Meanwhile, a driver with the wrong token: token auth is on, and it is refused (Ray retries ~20 s before that).
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    intruder = subprocess.Popen(
        [sys.executable, "-c", f"import ray; ray.init(address='{cluster.address}'); print('CONNECTED')"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**cluster.env, "RAY_AUTH_TOKEN_PATH": str(wrong)},
        start_new_session=True,
    )
    try:
        start = time.monotonic()
        # The deterministic sweep of tests/conftest.py (its first four trials), two at once on two one-CPU nodes: one
        # per node. A fresh worker per trial: with reused workers, a tiny trial can finish on one node before the
        # other node's worker has started, and the next trial reuses it.
        overrides = {**DET_SWEEP, "sweep.num_samples": 4, "sweep.cpus_per_trial": 1, "sweep.reuse_actors": False}
        run = cli(["--address", cluster.address, *sweep_args(s3, name, **overrides)], env=cluster.env)
        assert run.returncode == 0, run.stderr[-3000:]
        elapsed = time.monotonic() - start
        out, err = intruder.communicate(timeout=120)
    finally:
        if intruder.poll() is None:
            kill_group(intruder)
    assert intruder.returncode != 0 and "CONNECTED" not in out and "InvalidAuthToken" in err, err[-2000:]
    exp = f"{PREFIX}/{name}"
    keys = set(s3.keys(exp + "/"))
    for output in OUTPUTS:  # everything the sweep writes is in the bucket
        assert f"{exp}/{output}" in keys, output
    df = pd.read_parquet(io.BytesIO(s3.read(f"{exp}/results.parquet")))
    assert len(df) == 4 and df["trial_id"].is_unique
    for trial in df["trial_id"]:
        assert f"{exp}/trials/{trial}/metrics.csv" in keys
        assert any(k.startswith(f"{exp}/{trial}/checkpoint_") for k in keys)

    # The same trials as on one node, one at a time: the reference sweep's first four (a deterministic sweep's first
    # trials do not depend on how many follow), and the best of them chosen.
    record = sweep_record(lambda rel: s3.read(f"{exp}/{rel}"))
    reference = det_reference["record"]
    assert record["trials"] == reference["trials"][:4] and record["study"] == reference["study"][:4]
    best = max(reference["trials"][:4], key=lambda t: t["best_val_fbeta"])  # the first of equals, as best_row
    assert record["best"][0] == best["n"]

    # Placement: every epoch row says where it ran; trials ran on both nodes, one of them the worker node.
    rows = pd.concat([history(s3, name, t) for t in df["trial_id"]])
    assert set(rows["node_id"]) == {cluster.head_id, cluster.worker_id}, rows[["trial_id", "node_id"]]

    # A fresh process that has only the bucket path (another directory, another HOME) reads it all back.
    reader = (
        "import json, sys\n"
        "from lorahpo.results import load_experiment\n"
        "grid, df = load_experiment(sys.argv[1], s3_endpoint=sys.argv[2])\n"
        "best = grid.get_best_result('best_val_fbeta', 'max')\n"
        "print(json.dumps({'rows': len(df), 'ids': sorted(df['trial_id']), 'grid': len(grid),\n"
        "                  'paths': [r.path for r in grid], 'curve': len(best.metrics_dataframe)}))\n"
    )
    home = tmp_path / "elsewhere"
    home.mkdir()
    read = subprocess.run(
        [sys.executable, "-c", reader, f"s3://{BUCKET}/{exp}", s3.endpoint],
        capture_output=True,
        text=True,
        cwd=home,
        env={**os.environ, **AWS_ENV, "HOME": str(home)},
        timeout=300,
    )
    assert read.returncode == 0, read.stderr[-3000:]
    got = json.loads(read.stdout.strip().splitlines()[-1])
    assert got["rows"] == got["grid"] == 4 and got["ids"] == sorted(df["trial_id"])
    assert all(p.startswith(f"{BUCKET}/{exp}/") for p in got["paths"]) and got["curve"] >= 1
    print(f"\n[two nodes] 4 trials on 2 nodes in {elapsed:.0f} s")


def test_driver_killed_then_resume_from_bucket(s3: S3Server, cluster: Cluster, tmp_path: Path, procs: list) -> None:
    name = "driver_kill"
    overrides = {
        "sweep.num_samples": 3,
        "sweep.scheduler": "fifo",
        "data.max_examples": 1500,
        "sweep.deterministic": False,  # the asynchronous path's resume (the deterministic one: tests/test_sweep.py)
    }
    args = ["--address", cluster.address, *sweep_args(s3, name, **overrides)]
    proc = cli_background(args, tmp_path / "driver.log", env=cluster.env)
    procs.append(proc)
    wait_for(
        lambda: len(recorded_trials(s3, name) & checkpointed_trials(s3, name)) >= 2,
        300,
        "two trials recorded in the bucket's experiment state, each with a checkpoint there",
    )
    os.killpg(proc.pid, signal.SIGKILL)  # the driver only: the cluster (and its trials' checkpoints) stay
    proc.wait(timeout=30)
    before = recorded_trials(s3, name)
    unrecorded = checkpointed_trials(s3, name) - before  # started after the last snapshot: rerun from scratch
    assert f"{PREFIX}/{name}/results.parquet" not in s3.keys(f"{PREFIX}/{name}/")

    start = time.monotonic()
    run = cli(["--resume", *args], env=cluster.env)  # a new driver with nothing but the bucket path
    resume_s = time.monotonic() - start
    assert run.returncode == 0, run.stderr[-3000:]
    df = pd.read_parquet(io.BytesIO(s3.read(f"{PREFIX}/{name}/results.parquet")))
    assert len(df) == 3 and df["trial_id"].is_unique and before <= set(df["trial_id"])
    assert not df[[c for c in df if c.startswith("param.")]].duplicated().any()
    assert (df["epochs"] == 2).all() and (df["stop_reason"] == "max_epochs").all()
    rows = {t: history(s3, name, t) for t in df["trial_id"]}
    assert all(set(h["epoch"]) == {1, 2} for h in rows.values())
    rerun = sum(len(h) - h["epoch"].nunique() for h in rows.values())
    print(
        f"\n[driver killed] {len(before)} trials recorded, {len(unrecorded)} checkpointed after the last snapshot; "
        f"--resume finished in {resume_s:.0f} s; {rerun} epochs ran twice"
    )


def test_storage_lost_mid_sweep_then_resume(cluster: Cluster, tmp_path: Path, procs: list) -> None:
    """S3 goes away mid-sweep (the server stops; like real S3, it keeps what it held): the sweep stops within
    seconds with one clear line instead of burning every trial's retries, and --resume completes it from the bucket
    once S3 is back."""
    store = S3Server(tmp_path)
    try:
        store.start()
        store.client().create_bucket(Bucket=BUCKET)
        name = "storage_loss"
        # Epochs take ~1 s: with 3 the sweep could end (and be uploading its results) before the test saw the first
        # checkpoint; with 12 and no early stop, S3 goes down while trials still train.
        epochs = 12
        overrides = {
            "sweep.num_samples": 3,
            "sweep.scheduler": "fifo",
            "data.max_examples": 1500,
            "train.max_epochs": epochs,
            "train.patience": epochs,
        }
        args = ["--address", cluster.address, *sweep_args(store, name, **overrides)]
        proc = cli_background(args, tmp_path / "driver.log", env=cluster.env)
        procs.append(proc)
        wait_for(lambda: checkpointed_trials(store, name), 300, "a checkpoint in the bucket")
        store.stop()
        down = time.monotonic()
        wait_for(lambda: proc.poll() is not None, 300, "the sweep to stop")
        stopped_s = time.monotonic() - down
        last = (tmp_path / "driver.log").read_text().strip().splitlines()[-1]
        assert proc.returncode == 2, last
        assert last.startswith(f"error: storage s3://{BUCKET}/{PREFIX} (endpoint {store.endpoint}) is not usable: ")
        assert "is unreachable" in last and "--resume" in last

        store.start()  # back, with everything it held
        start = time.monotonic()
        run = cli(["--resume", *args], env=cluster.env)
        resume_s = time.monotonic() - start
        assert run.returncode == 0, run.stderr[-3000:]
        df = pd.read_parquet(io.BytesIO(store.read(f"{PREFIX}/{name}/results.parquet")))
        assert len(df) == 3 and df["trial_id"].is_unique
        assert (df["epochs"] == epochs).all() and (df["stop_reason"] == "max_epochs").all()
        rows = {t: history(store, name, t) for t in df["trial_id"]}
        assert all(set(h["epoch"]) == set(range(1, epochs + 1)) for h in rows.values())
        rerun = sum(len(h) - h["epoch"].nunique() for h in rows.values())
    finally:
        store.kill()
    print(
        f"\n[storage lost] the sweep stopped {stopped_s:.0f} s after S3 went down; --resume finished in "
        f"{resume_s:.0f} s; {rerun} epochs ran twice"
    )


def test_node_lost_mid_sweep(s3: S3Server, tmp_path: Path, procs: list) -> None:
    """The worker node dies (SIGKILL of its whole process group) while its trial trains: the trial is retried on
    the head node from its last checkpoint in the bucket, and the sweep ends with every trial finished."""
    # Epochs take ~1 s and the driver sees a result seconds after the worker sends it: the trial needs epochs
    # left after the first ones seen (with 3 epochs one once finished before the kill landed).
    epochs = 10
    c = Cluster()  # a cluster of its own: this one loses a node
    try:
        c.start()
        name = "node_loss"
        overrides = {
            "sweep.num_samples": 3,
            "sweep.scheduler": "fifo",
            "sweep.max_failures": 2,
            "data.max_examples": 1500,
            "train.max_epochs": epochs,
            "train.patience": epochs,  # no early stop: every trial runs its epochs
        }
        proc = cli_background(["--address", c.address, *sweep_args(s3, name, **overrides)], tmp_path / "d.log", c.env)
        procs.append(proc)

        def trial_on_worker() -> str | None:
            """The trial on the worker node, once it has reported an epoch and is still training."""
            for path in c.staging_progress(name):
                try:
                    h = pd.read_csv(path)
                except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError):
                    continue
                if "node_id" in h and (h["node_id"] == c.worker_id).any() and h["epoch"].max() < 3:
                    return path.parent.name
            return None

        trial = wait_for(trial_on_worker, 300, "the worker node's trial to report an epoch")
        c.kill_worker()
        assert proc.wait(timeout=600) == 0, (tmp_path / "d.log").read_text()[-3000:]
    finally:
        c.stop()

    df = pd.read_parquet(io.BytesIO(s3.read(f"{PREFIX}/{name}/results.parquet")))
    assert len(df) == 3 and df["trial_id"].is_unique and trial in set(df["trial_id"])
    assert (df["epochs"] == epochs).all() and (df["stop_reason"] == "max_epochs").all() and df["error"].isna().all()
    h = history(s3, name, trial)
    assert h["epoch"].tolist() == list(range(1, epochs + 1)), h[["epoch", "node_id", "pid"]]  # none lost, none repeated
    on_worker = h[h["node_id"] == c.worker_id]
    assert len(on_worker) >= 1 and (h.iloc[len(on_worker) :]["node_id"] == c.head_id).all()
    assert len(on_worker) < epochs, "the node was killed before its trial finished"
    gap = h["timestamp"].iloc[len(on_worker)] - h["timestamp"].iloc[len(on_worker) - 1]
    print(
        f"\n[node lost] trial {trial}: epochs {on_worker['epoch'].tolist()} on the lost node, the rest on the head "
        f"from its checkpoint; {gap:.0f} s between the last epoch there and the next one here"
    )
