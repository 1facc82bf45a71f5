"""README, --overwrite: "only a directory lorahpo created: one that carries the .lorahpo-sweep marker a sweep writes
before anything else". owner.check_sweep accepts any marker whose `name` and `created` are strings: it never compares
the marker's `name` with the directory it sits in, so a marker copied into a folder that is not a sweep makes
--overwrite delete that folder's contents. Runs the CLI's own steps in process (prepare's check, then the driver's
hold + wipe, as sweep.run/start do), no Ray."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow.fs

from lorahpo.checks import check_experiment
from lorahpo.config import load_config
from lorahpo.errors import UserError
from lorahpo.owner import SWEEP_MARKER, hold, wipe
from lorahpo.storage import experiment_dir


def overwrite(overrides: dict) -> str | None:
    """What `tune_lora.py --overwrite` does to the experiment directory before its first trial; the error, if any."""
    cfg = load_config(None, overrides)
    try:
        check_experiment(cfg, resume=False, overwrite=True)
        with hold(cfg, "--overwrite") as held:
            wipe(cfg, keep=held)
    except UserError as e:
        return str(e)
    return None


def test_a_marker_copied_from_another_sweep_does_not_make_a_folder_a_sweep(tmp_path: Path) -> None:
    store = tmp_path / "results"
    (store / "lora_sweep").mkdir(parents=True)
    marker = {"name": "lora_sweep", "created": "2026-01-01T00:00:00+00:00", "host": "h", "pid": 1}
    (store / "lora_sweep" / SWEEP_MARKER).write_text(json.dumps(marker))  # what a real sweep's marker holds
    notes = store / "notes"  # the user's own folder; a copy of that marker landed in it (e.g. cp -a of a sweep's files)
    notes.mkdir()
    (notes / "thesis.tex").write_text("three years of work")
    (notes / SWEEP_MARKER).write_text((store / "lora_sweep" / SWEEP_MARKER).read_text())
    error = overwrite({"sweep.storage_path": str(store), "sweep.name": "notes"})
    assert (notes / "thesis.tex").exists(), f"--overwrite sweep.name=notes deleted thesis.tex (error: {error})"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_s3_wipe_keeps_its_own_owner_record_whatever_the_keys(tmp_path: Path, monkeypatch) -> None:
    """owner.wipe on S3 deletes every entry of the listing but this driver's owner record. A key with an empty
    segment (`prefix/s//x`, legal in S3) lists as an entry whose path is the sweep directory itself, so delete_dir
    removes the whole directory, this driver's owner record included, then the wipe fails on the entries already
    gone: --overwrite ends in an error with the sweep deleted and no owner record (another driver may take it)."""
    port = free_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        deadline = time.monotonic() + 60
        while True:
            try:
                s3.list_buckets()
                break
            except Exception:
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.2)
        s3.create_bucket(Bucket="bkt")
        s3.put_object(Bucket="bkt", Key=f"p/s/{SWEEP_MARKER}", Body=json.dumps({"name": "s", "created": "t"}))
        s3.put_object(Bucket="bkt", Key="p/s/results.parquet", Body=b"x")
        s3.put_object(Bucket="bkt", Key="p/s//x", Body=b"x")  # an odd but legal key inside the sweep
        overrides = {"sweep.storage_path": "s3://bkt/p", "sweep.s3_endpoint": f"http://127.0.0.1:{port}", "sweep.name": "s"}
        cfg = load_config(None, overrides)
        exp, fs = experiment_dir(cfg)
        check_experiment(cfg, resume=False, overwrite=True)
        error, records = None, []
        with hold(cfg, "--overwrite") as held:
            try:
                wipe(cfg, keep=held)
            except UserError as e:
                error = str(e)
            records = [i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(exp, allow_not_found=True))]
        assert error is None and held in records, f"wipe error: {error}; left in the sweep: {records}"
    finally:
        server.terminate()
        server.wait(timeout=30)
