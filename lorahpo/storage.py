"""Where a sweep's files live and how to reach them: local disk, an NFS path shared by all nodes, or S3 (AWS or any
S3-compatible endpoint). Paths, filesystems, small read/write helpers, and the storage checks every node runs before
the first trial (and the driver again when a trial fails mid-sweep), with one-line causes for each failure.

Imports nothing of lorahpo's above the config: every step of the flow may use it."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import socket
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lorahpo.config import ExperimentConfig
from lorahpo.errors import UserError

# pyarrow's S3 defaults wait and retry an unreachable endpoint for minutes; these make a dead endpoint an error within
# seconds. The timeouts travel with the filesystem to the trials (pickled); the retry strategy does not (pyarrow's
# default there, 3 attempts).
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 60.0  # per request (socket read): a 10 MB multipart chunk on a slow link still fits
S3_MAX_ATTEMPTS = 3


@functools.lru_cache(maxsize=16)
def _bucket_region(bucket: str) -> str:
    """AWS: the bucket's region (one request, remembered; storage paths are resolved many times per run)."""
    return pyarrow.fs.resolve_s3_region(bucket)


def _inner(path: str) -> str:
    """The path inside its filesystem: `bucket/prefix` for s3://, an absolute path otherwise."""
    if path.startswith("s3://"):
        return path.removeprefix("s3://").split("?")[0].rstrip("/")
    if "://" in path:
        raise UserError(f"sweep.storage_path={path}: use a local/NFS path or s3://bucket/prefix")
    return str(Path(path).expanduser().resolve())


def filesystem(path: str, s3_endpoint: str | None = None) -> tuple[str, pyarrow.fs.FileSystem]:
    """(path inside the filesystem, filesystem) for a local/NFS path or s3://bucket/prefix (optionally on an
    S3-compatible endpoint such as http://127.0.0.1:9000). S3 credentials come from the standard AWS chain:
    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the instance profile on EC2."""
    inner = _inner(path)
    if not path.startswith("s3://"):
        return inner, pyarrow.fs.LocalFileSystem()
    options: dict[str, Any] = {
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "request_timeout": S3_REQUEST_TIMEOUT_S,
        "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    }
    if s3_endpoint:
        scheme, _, host = s3_endpoint.rpartition("://")
        return inner, pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme or "https", **options)
    return inner, pyarrow.fs.S3FileSystem(region=_bucket_region(inner.split("/")[0]), **options)


def storage(cfg: ExperimentConfig) -> tuple[str, pyarrow.fs.FileSystem]:
    """(path inside the filesystem, filesystem) of `sweep.storage_path`; local paths made absolute (Tune changes
    the working directory of trials)."""
    return filesystem(cfg.sweep.storage_path, cfg.sweep.s3_endpoint)


def experiment_dir(cfg: ExperimentConfig) -> tuple[str, pyarrow.fs.FileSystem]:
    root, fs = storage(cfg)
    return f"{root}/{cfg.sweep.name}", fs


def location(cfg: ExperimentConfig, experiment: bool = False) -> str:
    """sweep.storage_path (or the experiment directory in it) as a user writes it: s3://bucket/prefix/... or an
    absolute local path. The one way every message and summary names a place in storage."""
    path = _inner(cfg.sweep.storage_path) + (f"/{cfg.sweep.name}" if experiment else "")
    return f"s3://{path}" if cfg.sweep.storage_path.startswith("s3://") else path


def display(cfg: ExperimentConfig, experiment: bool = False) -> str:
    """`location` plus the S3 endpoint when one is set (for messages)."""
    return location(cfg, experiment) + (f" (endpoint {cfg.sweep.s3_endpoint})" if cfg.sweep.s3_endpoint else "")


def tag_number(trial: Any) -> int:
    """The searcher's counter in a Tune trial's experiment tag (`<n>_<params>`, 1-based, restored on resume)."""
    return int(str(trial.experiment_tag).split("_")[0] or 0)


def trial_dirname(trial: Any) -> str:
    """A sweep trial's name and directory, `trial_<n>_<id>`: n is the searcher's suggestion order (`tag_number`), so
    directory names sort in creation order; the params are in params.json and results.parquet."""
    return f"trial_{tag_number(trial):03d}_{trial.trial_id}"


def trial_name(trial: Any) -> str:
    """The name of a Tune Trial or Result (its directory's: `trial_<n>_<id>`, see `trial_dirname`): its id in every
    table, study and tracker."""
    return Path(trial.path).name


def trial_number(name: str) -> int:
    """n of a trial's name `trial_<n>_<id>` (zero-padded to three digits, so from trial 1,000 on names no longer sort
    as numbers do: compare numbers, never names)."""
    return int(name.split("_")[1])


def is_local(fs: pyarrow.fs.FileSystem) -> bool:
    """Local disk or NFS (a mounted path), where paths, links and atomic renames are the operating system's."""
    return isinstance(fs, pyarrow.fs.LocalFileSystem)


def exists(fs: pyarrow.fs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_bytes(fs: pyarrow.fs.FileSystem, path: str) -> bytes | None:
    """The file's bytes, or None where it does not exist."""
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(fs: pyarrow.fs.FileSystem, path: str) -> str | None:
    data = read_bytes(fs, path)
    return None if data is None else data.decode()


def read_json(fs: pyarrow.fs.FileSystem, path: str) -> dict[str, Any]:
    """A JSON object written by the sweep (manifest.json, summary.json); {} where there is none."""
    return json.loads(read_text(fs, path) or "{}")


def write_bytes(fs: pyarrow.fs.FileSystem, path: str, payload: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(payload)


def upload(files: dict[str, bytes | str], dest: str, fs: pyarrow.fs.FileSystem) -> None:
    """Write {relative path: content} under `dest` (staged locally, then copied: one code path for disk and S3)."""
    with tempfile.TemporaryDirectory() as tmp:
        for rel, content in files.items():
            p = Path(tmp, rel)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content.encode() if isinstance(content, str) else content)
        upload_dir(Path(tmp), dest, fs)


def upload_dir(local: Path, dest: str, fs: pyarrow.fs.FileSystem) -> None:
    """Copy a local directory's contents under `dest`."""
    fs.create_dir(dest, recursive=True)
    pyarrow.fs.copy_files(str(local), dest, destination_filesystem=fs)


# ---------------------------------------------------------------------------------------------------------------------
# Storage checks: every node writes, reads and deletes under sweep.storage_path before the first trial starts. Without
# this a path that is local to the head node fails at a worker's first checkpoint, and a typo in a bucket name after
# the first epoch of every trial.

MARKER = ".lorahpo-storage-check"
SHARED_CHECK_TIMEOUT_S = 120.0  # a node's first task starts a Python worker there (seconds, more on a busy node)


def _aws_detail(message: str) -> str:
    """`AWS Error CODE during OP operation: TEXT (Request ID: ...)` -> `CODE: TEXT`; else the first line."""
    m = re.search(r"AWS Error (\w+) during \w+ operation: ?(.*?)(?: \(Request ID:.*)?$", message, re.S)
    text = f"{m.group(1)}: {m.group(2)}" if m else message
    return " ".join(text.split())[:300].rstrip(": ")


def _reachable(endpoint: str) -> str | None:
    """None if a TCP connection to the endpoint opens, else why not."""
    url = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout=5).close()
        return None
    except OSError as e:
        return e.strerror or str(e)


# Each cause's marks in an error message, as matched: lower-case without underscores, so that one mark covers both
# spellings of an error code (pyarrow's NO_SUCH_BUCKET, S3's NoSuchBucket).
_S3_CAUSES: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("nosuchbucket", "bucket does not exist", "resourcenotfound during headbucket"),
        "bucket {bucket!r} does not exist ({detail})",
    ),
    (
        (
            "invalidaccesskeyid",
            "signaturedoesnotmatch",
            "expiredtoken",
            "invalidclienttokenid",
            "unrecognizedclient",
            "missingauthenticationtoken",
            "no credentials",
            "unable to locate credentials",
        ),
        "bad credentials ({detail}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance "
        "profile",
    ),
    (
        ("accessdenied",),
        "access denied ({detail}); the credentials need s3:PutObject, s3:GetObject, s3:DeleteObject and "
        "s3:ListBucket there",
    ),
    (
        (
            "networkconnection",
            "curlcode",
            "could not connect",
            "couldn't connect",
            "couldn't resolve",
            "timeout was reached",
            "timed out",
            "connection refused",
        ),
        "{endpoint} is unreachable ({detail}); check sweep.s3_endpoint and the network",
    ),
)


def storage_cause(cfg: ExperimentConfig, error: BaseException) -> str:
    """One line: why storage failed (missing bucket, bad credentials, unreachable endpoint, not writable)."""
    message = str(error)
    if not cfg.sweep.storage_path.startswith("s3://"):
        if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):
            return f"path not writable ({os.strerror(error.errno).lower()})"
        return f"path not writable ({' '.join(message.split())[:300]})"
    bucket = cfg.sweep.storage_path.removeprefix("s3://").split("/")[0]
    endpoint = f"endpoint {cfg.sweep.s3_endpoint}" if cfg.sweep.s3_endpoint else "AWS S3"
    detail = _aws_detail(message)
    marks = message.lower().replace("_", "")
    for needles, cause in _S3_CAUSES:
        if any(n in marks for n in needles):
            return cause.format(bucket=bucket, endpoint=endpoint, detail=detail)
    if cfg.sweep.s3_endpoint and (why := _reachable(cfg.sweep.s3_endpoint)) is not None:
        return f"{endpoint} is unreachable ({why}); check sweep.s3_endpoint and the network"
    return f"cannot write there ({detail})"


def _delete_quietly(fs: pyarrow.fs.FileSystem, paths: list[str]) -> None:
    for path in paths:
        try:
            fs.delete_file(path)
        except OSError:
            pass


@contextlib.contextmanager
def _local_dirs(fs: pyarrow.fs.FileSystem, root: str) -> Iterator[None]:
    """A local root is created for the check and, where it did not exist, removed afterwards (a dry run leaves no
    trace). Object stores need no directories."""
    if not is_local(fs):
        yield
        return
    missing = []
    path = Path(root)
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    fs.create_dir(root, recursive=True)
    try:
        yield
    finally:
        for d in missing:  # deepest first; only if still empty
            try:
                d.rmdir()
            except OSError:
                break


def check_storage(cfg: ExperimentConfig) -> None:
    """From this process (the driver): write, read back and delete a marker under sweep.storage_path, with the same
    filesystem the sweep uses. Raises a one-line UserError naming the path and the cause."""
    where = display(cfg)
    try:
        root, fs = storage(cfg)
        payload = uuid.uuid4().hex.encode()
        marker = f"{root}/{MARKER}-{payload[:12].decode()}"
        with _local_dirs(fs, root):
            write_bytes(fs, marker, payload)
            try:
                seen = read_bytes(fs, marker)
            finally:
                fs.delete_file(marker)
        if seen != payload:
            raise UserError(f"storage {where} is not usable: a marker written there reads back differently")
    except OSError as e:
        raise UserError(f"storage {where} is not usable: {storage_cause(cfg, e)}") from None


def storage_failure(cfg: ExperimentConfig) -> UserError | None:
    """Mid-sweep: None while storage works, else the one-line error that stops the sweep. Nothing that reached
    storage is lost (S3 and NFS keep it through an outage), so the sweep continues from there with --resume."""
    try:
        check_storage(cfg)
    except UserError as e:
        return UserError(
            f"{e}; it failed during the sweep, which stopped: when it is back, run the same command with --resume "
            "(finished trials and the last checkpoint of each unfinished one are kept there)"
        )
    return None


def _probe_node(fs: pyarrow.fs.FileSystem, marker: str, payload: bytes) -> tuple[str, str]:
    """Runs as a Ray task ON another node: read the driver's marker, write a reply next to it.
    Returns ("ok", reply path) | ("missing", "") | ("error", message)."""
    try:
        if read_bytes(fs, marker) != payload:
            return "missing", ""
        reply = f"{marker}-{ray.get_runtime_context().get_node_id()[:12]}"
        write_bytes(fs, reply, payload)
        return "ok", reply
    except OSError as e:
        return "error", str(e)


def check_storage_shared(cfg: ExperimentConfig, timeout_s: float = SHARED_CHECK_TIMEOUT_S) -> None:
    """On a connected multi-node Ray cluster: the driver writes a marker, a task pinned to every other alive node
    reads it and writes a reply, the driver reads the replies. Catches a path that is local to each node (the
    driver's file is not there) and nodes whose credentials or network differ. No-op on a single node."""
    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return
    where = display(cfg)
    root, fs = storage(cfg)
    payload = uuid.uuid4().hex.encode()
    marker = f"{root}/{MARKER}-{payload[:12].decode()}"
    written = [marker]
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_node)

    def label(node: dict[str, Any]) -> str:
        return f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"

    try:
        with _local_dirs(fs, root):
            try:
                write_bytes(fs, marker, payload)
                refs = {
                    probe.options(
                        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                        name="lorahpo_storage_check",
                    ).remote(fs, marker, payload): n
                    for n in others
                }
                _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
                if pending:
                    raise UserError(
                        f"storage {where}: node {label(refs[pending[0]])} did not run the storage check within "
                        f"{timeout_s:.0f} s; check that the node is healthy (`ray status`)"
                    )
                for ref, node in refs.items():
                    try:
                        status, detail = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                        raise UserError(f"storage {where}: the check failed on node {label(node)}: {first}") from None
                    if status == "error":
                        raise UserError(
                            f"storage {where} is not usable from node {label(node)}: "
                            f"{storage_cause(cfg, OSError(detail))}"
                        )
                    if status == "ok":
                        written.append(detail)
                    if status == "missing" or read_bytes(fs, detail) != payload:
                        raise UserError(
                            f"storage {where} is not shared across nodes: node {label(node)} and the driver see "
                            "different files there; use s3://bucket/prefix or a shared (NFS) path mounted at the "
                            "same place on every node"
                        )
            finally:
                _delete_quietly(fs, written)
    except OSError as e:
        raise UserError(f"storage {where} is not usable: {storage_cause(cfg, e)}") from None
