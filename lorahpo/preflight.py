"""Everything that can be checked before the first trial starts (and by --dry-run): model, data, search space
against the model, existing experiments. Errors are `UserError`s: one line naming the problem and the fix."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs
import torch

from lorahpo.config import ExperimentConfig, UserError, config_from_yaml, to_dict
from lorahpo.data import TaskData, load_task
from lorahpo.model import load_model_config, load_tokenizer
from lorahpo.search import can_restore, describe, display_path, experiment_dir, storage

log = logging.getLogger(__name__)


def check_model_fit(cfg: ExperimentConfig, model_config: Any) -> None:
    """Config values (and search-space bounds) the model cannot satisfy."""
    layers = model_config.num_hidden_layers
    last_n = [cfg.lora.last_n]
    spec = cfg.search.get("lora.last_n")
    if spec is not None:
        last_n += [int(v) for v in (*(spec.choices or ()), spec.high) if v is not None]
    if max(last_n) > layers:
        raise UserError(
            f"lora.last_n={max(last_n)} (config or search space) exceeds the {layers} layers of "
            f"{cfg.model.name}"
            + (f" truncated by model.num_layers={cfg.model.num_layers}" if cfg.model.num_layers else "")
            + f"; use at most {layers}"
        )
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and cfg.data.max_length > context:
        raise UserError(
            f"data.max_length={cfg.data.max_length} exceeds what {cfg.model.name} supports ({context} "
            f"positions); set data.max_length<={context}"
        )


def check_experiment(cfg: ExperimentConfig, resume: bool, overwrite: bool = False) -> None:
    """Never overwrite an earlier sweep silently; never 'resume' nothing; never resume with another config."""
    path, fs = experiment_dir(cfg)
    where = display_path(cfg)
    if resume:
        if not can_restore(cfg):
            raise UserError(
                f"--resume: no experiment named {cfg.sweep.name!r} at {where}; check sweep.name and "
                "sweep.storage_path, or drop --resume to start a new sweep"
            )
        check_same_config(cfg, read_text(fs, f"{path}/config.yaml"), where)
        return
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound and not overwrite:
        raise UserError(
            f"a sweep named {cfg.sweep.name!r} already exists at {where}; pass --resume to continue it, "
            "--overwrite to replace it, or choose a new sweep.name (earlier results are never deleted silently)"
        )


def read_text(fs: pyarrow.fs.FileSystem, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


# Where an experiment lives may change between runs (a moved directory, another endpoint); nothing else may.
RELOCATABLE = {"sweep.storage_path", "sweep.s3_endpoint"}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "search" and not prefix.startswith("search"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_config(cfg: ExperimentConfig, stored_yaml: str | None, where: str) -> None:
    """Refuse to resume a sweep under a different config: its trials would not be comparable."""
    if stored_yaml is None:
        raise UserError(
            f"--resume: {where} has no config.yaml; it was not started by tune_lora.py and cannot be resumed"
        )
    old, new = flatten(to_dict(config_from_yaml(stored_yaml))), flatten(to_dict(cfg))
    diff = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k not in RELOCATABLE and old.get(k) != new.get(k)
    ]
    if diff:
        raise UserError(
            f"--resume with a config that differs from the interrupted sweep's ({'; '.join(diff)}); resume with "
            f"the same config (saved as {where}/config.yaml) or start a new sweep.name"
        )


def cpu_has_bf16() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 or AMX); elsewhere torch emulates bf16, very slowly."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return platform.machine().lower() in ("arm64", "aarch64")  # Apple silicon / Graviton have bf16 paths
    return " avx512_bf16" in flags or " amx_bf16" in flags


def check_dtype(cfg: ExperimentConfig, cpu_bf16: bool, cuda_bf16: list[bool]) -> None:
    """Half precision the trials' hardware can't do. `cuda_bf16`: bf16 support of the GPUs this process sees (on a
    cluster the driver may have none; the trial checks its own GPU again when it starts)."""
    dtype = cfg.model.dtype
    if dtype == "float32":
        return
    if cfg.sweep.gpus_per_trial == 0:
        if dtype == "float16":
            raise UserError(
                "model.dtype=float16 needs a GPU but sweep.gpus_per_trial=0; use model.dtype=float32 on CPU "
                "(or bfloat16 on a CPU with native bf16)"
            )
        if not cpu_bf16:
            raise UserError(
                "model.dtype=bfloat16 but trials run on CPU (sweep.gpus_per_trial=0) and this CPU has no native bf16 "
                "(AVX512-BF16/AMX); set model.dtype=float32"
            )
    elif dtype == "bfloat16" and cuda_bf16 and not all(cuda_bf16):
        raise UserError(
            "model.dtype=bfloat16 but this GPU has no bf16 support (it needs Ampere or newer); set "
            "model.dtype=float16 or float32"
        )


def local_nodes() -> list[dict[str, float]]:
    """What a local Ray will offer: all CPUs and GPUs of this machine."""
    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


def cluster_nodes() -> list[dict[str, float]]:
    """Resources of every alive node of the connected Ray cluster."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_cluster(cfg: ExperimentConfig, address: str) -> None:
    """--dry-run against a running cluster: connect, check what only the cluster can tell, disconnect."""
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        check_resources(cfg, cluster_nodes())
        check_storage_shared(cfg)
    finally:
        ray.shutdown()


def check_resources(cfg: ExperimentConfig, nodes: list[dict[str, float]]) -> None:
    """A trial no node can hold would wait forever in Tune's queue: fail fast and show what the cluster has."""
    cpus, gpus = cfg.sweep.cpus_per_trial, cfg.sweep.gpus_per_trial
    if any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        return
    have = "; ".join(f"node {i + 1}: {n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for i, n in enumerate(nodes))
    raise UserError(
        f"no node can run a trial of sweep.cpus_per_trial={cpus:g} and sweep.gpus_per_trial={gpus:g}; the cluster "
        f"has {have}; lower them (or add nodes with --address)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Storage: every node writes, reads and deletes under sweep.storage_path before the first trial starts. Without this a
# path that is local to the head node fails at a worker's first checkpoint, and a typo in a bucket name after the
# first epoch of every trial.

MARKER = ".lorahpo-storage-check"
SHARED_CHECK_TIMEOUT_S = 120.0  # a node's first task starts a Python worker there (seconds, more on a busy node)


def storage_display(cfg: ExperimentConfig) -> str:
    """sweep.storage_path as the user knows it (local paths absolute), plus the endpoint if one is set."""
    path = cfg.sweep.storage_path
    if not path.startswith("s3://"):
        path = str(Path(path).expanduser().resolve())
    return path.rstrip("/") + (f" (endpoint {cfg.sweep.s3_endpoint})" if cfg.sweep.s3_endpoint else "")


def _aws_detail(message: str) -> str:
    """`AWS Error CODE during OP operation: TEXT (Request ID: ...)` -> `CODE: TEXT`; else the first line."""
    m = re.search(r"AWS Error (\w+) during \w+ operation: ?(.*?)(?: \(Request ID:.*)?$", message, re.S)
    text = f"{m.group(1)}: {m.group(2)}" if m else message
    return " ".join(text.split())[:300].rstrip(": ")


def _reachable(endpoint: str) -> str | None:
    """None if a TCP connection to the endpoint opens, else why not."""
    scheme, _, hostport = endpoint.rpartition("://")
    host, _, port = hostport.partition("/")[0].rpartition(":")
    if not host:
        host, port = hostport.partition("/")[0], ""
    try:
        socket.create_connection((host, int(port or (80 if scheme == "http" else 443))), timeout=5).close()
        return None
    except OSError as e:
        return e.strerror or str(e)


_S3_CAUSES: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("NO_SUCH_BUCKET", "NoSuchBucket", "bucket does not exist", "RESOURCE_NOT_FOUND during HeadBucket"),
        "bucket {bucket!r} does not exist ({detail})",
    ),
    (
        (
            "INVALID_ACCESS_KEY_ID",
            "InvalidAccessKeyId",
            "SIGNATURE_DOES_NOT_MATCH",
            "SignatureDoesNotMatch",
            "EXPIRED_TOKEN",
            "ExpiredToken",
            "INVALID_CLIENT_TOKEN_ID",
            "UNRECOGNIZED_CLIENT",
            "MISSING_AUTHENTICATION_TOKEN",
            "No credentials",
            "Unable to locate credentials",
        ),
        "bad credentials ({detail}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance "
        "profile",
    ),
    (
        ("ACCESS_DENIED", "AccessDenied"),
        "access denied ({detail}); the credentials need s3:PutObject, s3:GetObject, s3:DeleteObject and "
        "s3:ListBucket there",
    ),
    (
        (
            "NETWORK_CONNECTION",
            "curlCode",
            "Could not connect",
            "Couldn't connect",
            "Couldn't resolve",
            "Timeout was reached",
            "timed out",
            "Connection refused",
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
    for needles, cause in _S3_CAUSES:
        if any(n in message for n in needles):
            return cause.format(bucket=bucket, endpoint=endpoint, detail=detail)
    if cfg.sweep.s3_endpoint and (why := _reachable(cfg.sweep.s3_endpoint)) is not None:
        return f"{endpoint} is unreachable ({why}); check sweep.s3_endpoint and the network"
    return f"cannot write there ({detail})"


def _write(fs: pyarrow.fs.FileSystem, path: str, payload: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(payload)


def _read(fs: pyarrow.fs.FileSystem, path: str) -> bytes | None:
    """The file's bytes, or None where it does not exist."""
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


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
    if not isinstance(fs, pyarrow.fs.LocalFileSystem):
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
    where = storage_display(cfg)
    try:
        root, fs = storage(cfg)
        payload = uuid.uuid4().hex.encode()
        marker = f"{root}/{MARKER}-{payload[:12].decode()}"
        with _local_dirs(fs, root):
            _write(fs, marker, payload)
            try:
                seen = _read(fs, marker)
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
    import ray

    try:
        if _read(fs, marker) != payload:
            return "missing", ""
        reply = f"{marker}-{ray.get_runtime_context().get_node_id()[:12]}"
        _write(fs, reply, payload)
        return "ok", reply
    except OSError as e:
        return "error", str(e)


def check_storage_shared(cfg: ExperimentConfig, timeout_s: float = SHARED_CHECK_TIMEOUT_S) -> None:
    """On a connected multi-node Ray cluster: the driver writes a marker, a task pinned to every other alive node
    reads it and writes a reply, the driver reads the replies. Catches a path that is local to each node (the
    driver's file is not there) and nodes whose credentials or network differ. No-op on a single node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return
    where = storage_display(cfg)
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
                _write(fs, marker, payload)
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
                    if status == "missing" or _read(fs, detail) != payload:
                        raise UserError(
                            f"storage {where} is not shared across nodes: node {label(node)} and the driver see "
                            "different files there; use s3://bucket/prefix or a shared (NFS) path mounted at the "
                            "same place on every node"
                        )
            finally:
                _delete_quietly(fs, written)
    except OSError as e:
        raise UserError(f"storage {where} is not usable: {storage_cause(cfg, e)}") from None


def prepare(
    cfg: ExperimentConfig, resume: bool = False, overwrite: bool = False, local: bool = True
) -> tuple[TaskData, dict[str, Any]]:
    """Validate everything and tokenize the data once; return the data and the plan --dry-run prints.
    `local`: the sweep will start its own Ray on this machine, so its resources can be checked now."""
    check_storage(cfg)  # first: everything after it reads the storage path
    check_experiment(cfg, resume, overwrite)
    if local:
        check_resources(cfg, local_nodes())
    cuda = [torch.cuda.get_device_capability(i)[0] >= 8 for i in range(torch.cuda.device_count())]
    check_dtype(cfg, cpu_has_bf16(), cuda)
    check_model_fit(cfg, load_model_config(cfg.model))
    data = load_task(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    plan = {"config": to_dict(cfg), **describe(cfg), "data": data.info, "resume": resume, "overwrite": overwrite}
    return data, plan
