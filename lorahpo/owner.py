"""Who may touch a sweep's directory: the marker that makes a directory a lorahpo sweep, the owner record of the driver
running it (kept fresh by a heartbeat), and the one way a sweep is deleted (--overwrite).

A directory is a sweep only if it carries the marker `claim` wrote before anything else of the sweep. A driver that
runs a sweep (new, --resume, --final) holds it with an owner record `.lorahpo-owner.<n>`, the next generation n,
created only if absent (atomic on local disk and NFS; check-then-write on S3), so of two drivers at most one holds it
(on S3: but for a narrow race). The highest generation is never deleted (a release marks it released), so n only
grows and a driver that listed the directory long ago cannot take a generation someone else holds. Another driver
counts the holder as alive while, on the holder's own machine, its process lives (pid and start time), or, seen from
elsewhere, while its heartbeat is fresh."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pyarrow.fs

from lorahpo.config import ExperimentConfig
from lorahpo.errors import Interrupted, UserError
from lorahpo.storage import display, exists, experiment_dir, is_local, read_bytes, write_bytes

log = logging.getLogger(__name__)

SWEEP_MARKER = ".lorahpo-sweep"
OWNER = ".lorahpo-owner"
MAX_RECORD_BYTES = 4096  # a marker or owner record is ~300 bytes; a bigger file is not one lorahpo wrote (never read)
HEARTBEAT_S = 30.0  # how often a running driver rewrites its owner record
# When a holder on another machine counts as dead: one beat may spend all of S3's attempts at its request timeout on
# a struggling endpoint (3 x 60 s, storage.py), and two machines' clocks differ a little; four missed beats on top.
STALE_S = 300.0


def _record(fs: pyarrow.fs.FileSystem, path: str) -> dict[str, Any] | str | None:
    """The small JSON object at `path`; None where there is nothing; else why it is not one lorahpo wrote (a link
    is not followed, a directory, FIFO or big file not read)."""
    if is_local(fs) and os.path.islink(path):
        return "a link"
    info = fs.get_file_info(path)
    if info.type == pyarrow.fs.FileType.NotFound:
        return None
    if info.type != pyarrow.fs.FileType.File or info.size > MAX_RECORD_BYTES:
        return f"not a file of at most {MAX_RECORD_BYTES} bytes"
    try:
        data = read_bytes(fs, path)
        if data is None:  # superseded by a newer generation between listing and reading it
            return None
        value = json.loads(data)
    except (ValueError, RecursionError):  # also what is not UTF-8, and nesting deeper than Python's stack
        return "not JSON"
    except FileNotFoundError:  # superseded by a newer generation between listing and reading it
        return None
    except OSError as e:  # e.g. another user's file, not readable
        return f"unreadable: {e}"
    return value if isinstance(value, dict) else "not a JSON object"


def _write(fs: pyarrow.fs.FileSystem, path: str, payload: str, exclusive: bool) -> bool:
    """Write `path` whole (no reader sees half of it); `exclusive`: only if it does not exist. True if written.
    Local disk and NFS: a temporary file hard-linked (atomic create-if-absent) or renamed into place. S3 has no
    create-if-absent through pyarrow: check, write, read back; two writers within one round trip can both win."""
    if not is_local(fs):
        if exclusive and exists(fs, path):
            return False
        write_bytes(fs, path, payload.encode())
        return read_bytes(fs, path) == payload.encode()
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    Path(tmp).write_text(payload)
    try:
        (os.link if exclusive else os.replace)(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):  # os.replace moved it
            os.unlink(tmp)


def claim(fs: pyarrow.fs.FileSystem, exp: str, payload: str) -> bool:
    """Create the experiment directory's marker, unless it exists; True if this process created it."""
    return _write(fs, f"{exp}/{SWEEP_MARKER}", payload, exclusive=True)


def occupied(cfg: ExperimentConfig) -> bool:
    """Is there anything at the experiment path (a link included, even a dangling one)?"""
    exp, fs = experiment_dir(cfg)
    return os.path.lexists(exp) if is_local(fs) else exists(fs, exp)


def check_sweep(cfg: ExperimentConfig) -> None:
    """--overwrite deletes only a sweep: a real directory (not a link to one) holding the marker lorahpo wrote."""
    exp, fs = experiment_dir(cfg)
    marker = _record(fs, f"{exp}/{SWEEP_MARKER}")
    if is_local(fs) and os.path.islink(exp):
        why = f"it is a link (to {os.readlink(exp)}), and --overwrite never deletes through a link"
    elif fs.get_file_info(exp).type != pyarrow.fs.FileType.Directory:
        why = "it is not a directory"
    elif marker is None:
        why = f"no {SWEEP_MARKER} marker"
    elif isinstance(marker, str) or not all(isinstance(marker.get(k), str) for k in ("name", "created")):
        why = f"its {SWEEP_MARKER} marker is not one lorahpo wrote: {marker if isinstance(marker, str) else 'fields'}"
    elif marker["name"] != cfg.sweep.name:  # a sweep's marker copied elsewhere (the directory is named after it)
        why = f"its {SWEEP_MARKER} marker is that of the sweep {marker['name']!r}"
    else:
        return
    raise UserError(
        f"--overwrite: {display(cfg, experiment=True)} exists but is not a lorahpo sweep ({why}); it is never "
        "deleted: choose another sweep.name or sweep.storage_path"
    )


def _machine() -> str:
    """Where a pid names the same process: this kernel boot and pid namespace (two containers, or two hosts of one
    name, are told apart); the host name where /proc has neither."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def _started(pid: int) -> float | None:
    """When the process `pid` started (a recycled pid has another start time); None if there is none."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _valid(r: dict[str, Any]) -> bool:
    """The fields every check reads, of the types lorahpo writes (finite times: a message prints them)."""
    return (
        all(isinstance(r.get(k), str) and r[k].isprintable() for k in ("host", "machine"))
        and type(r.get("pid")) is int
        and 0 < r["pid"] < 2**31
        and all(type(r.get(k)) is float and 0 < r[k] < 1e11 for k in ("pid_start", "heartbeat"))
    )


def _alive(r: dict[str, Any]) -> bool:
    if r.get("released") is not None:
        return False
    if r["machine"] == _machine():  # a pid here is this machine's: its process decides, at once
        started = _started(r["pid"])
        return started is not None and abs(started - r["pid_start"]) < 1.0
    return time.time() - r["heartbeat"] < STALE_S


def _generations(fs: pyarrow.fs.FileSystem, exp: str) -> list[int]:
    if fs.get_file_info(exp).type != pyarrow.fs.FileType.Directory:
        return []
    names = (
        re.fullmatch(rf"{re.escape(OWNER)}\.(\d{{1,12}})", i.base_name)
        for i in fs.get_file_info(pyarrow.fs.FileSelector(exp))
    )
    return sorted(int(m.group(1)) for m in names if m)


def check_free(cfg: ExperimentConfig, flag: str | None) -> int:
    """Refuse a sweep a live driver holds (one line naming it and what to do); else its highest owner generation
    (0: none)."""
    exp, fs = experiment_dir(cfg)
    gens = _generations(fs, exp)
    path = f"{exp}/{OWNER}.{gens[-1]}" if gens else None
    r = _record(fs, path) if path else None
    what = f"{flag}: " if flag else ""
    if isinstance(r, str) or (r is not None and not _valid(r)):
        raise UserError(
            f"{what}{path} is not an owner record lorahpo wrote ({r if isinstance(r, str) else 'fields'}); if no "
            "driver runs this sweep, delete that file and run this again"
        )
    if r is not None and _alive(r):
        beat = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["heartbeat"]))
        raise UserError(
            f"{what}the sweep at {display(cfg, experiment=True)} is in use by a running driver (host {r['host']}, "
            f"pid {r['pid']}, last heartbeat {beat}, {time.time() - r['heartbeat']:.0f} s ago); let it finish, or "
            "stop it and run this again (a driver that died counts as gone at once on its own machine, elsewhere "
            f"{STALE_S:.0f} s after its last heartbeat)"
        )
    return gens[-1] if gens else 0


def _acquire(cfg: ExperimentConfig, flag: str | None) -> tuple[str, dict[str, Any]]:
    """This driver's owner record, in the next generation; a live holder is refused."""
    exp, fs = experiment_dir(cfg)
    if is_local(fs):
        Path(exp).mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a generation taken under us: look again (its holder may have died too)
        top, now = check_free(cfg, flag), time.time()
        record = {"host": socket.gethostname(), "machine": _machine(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        record |= {"pid_start": _started(os.getpid()), "started": now, "heartbeat": now, "flag": flag}
        path = f"{exp}/{OWNER}.{top + 1}"
        if _write(fs, path, json.dumps(record), exclusive=True):
            for old in (g for g in _generations(fs, exp) if g <= top):  # superseded
                with contextlib.suppress(OSError):
                    fs.delete_file(f"{exp}/{OWNER}.{old}")
            return path, record
    raise UserError(
        f"{flag + ': ' if flag else ''}another driver took the sweep at {display(cfg, experiment=True)} at the same "
        "time; let it run, or choose a new sweep.name"
    )


@contextlib.contextmanager
def hold(cfg: ExperimentConfig, flag: str | None) -> Iterator[str]:
    """Hold the experiment directory while the body runs (a sweep, a resumed one, a final evaluation): an owner record
    whose heartbeat a daemon thread refreshes every HEARTBEAT_S, marked released when the body ends (returns, raises,
    Ctrl-C). Yields the record's file name. A killed driver releases nothing: its own machine sees its pid gone.
    A holder silent for longer than STALE_S (a machine that slept, a driver stopped with Ctrl-Z) counts as gone
    elsewhere, and another driver may take the sweep over: when its heartbeat then finds a newer owner generation, it
    stops the body as Ctrl-C does (one SIGINT: Tune stops the trials and keeps what they wrote) and ends in
    Interrupted, so two drivers never go on running one sweep."""
    exp, fs = experiment_dir(cfg)
    try:
        path, record = _acquire(cfg, flag)
    except OSError as e:  # a directory this user cannot write (S3: a request refused)
        raise UserError(f"cannot hold the sweep at {display(cfg, experiment=True)}: {e}") from None
    lock, stop, taken = threading.Lock(), threading.Event(), threading.Event()
    generation = int(path.rsplit(".", 1)[1])

    def refresh(**changes: float) -> None:
        """Rewrite the record while it is there and ours (a failed start deletes the directory: not written again)."""
        try:
            now = _record(fs, path)
            if isinstance(now, dict) and now.get("token") == record["token"]:
                _write(fs, path, json.dumps({**record, **changes}), exclusive=False)
            elif "released" not in changes and any(g > generation for g in _generations(fs, exp)):
                taken.set()
                log.error("another driver took this sweep over (%s is gone); stopping this driver", path)
                os.kill(os.getpid(), signal.SIGINT)  # once: a second Ctrl-C makes Tune quit without saving
        except OSError as e:  # storage down: the sweep's own storage checks stop it if it stays down
            log.warning("could not update the owner record %s: %s", path, e)

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S) and not taken.is_set():
            with lock:
                if not stop.is_set():
                    refresh(heartbeat=time.time())

    threading.Thread(target=beat, name="lorahpo-heartbeat", daemon=True).start()
    lost = Interrupted(
        f"another driver took over the sweep at {display(cfg, experiment=True)}: this driver's heartbeat was older "
        f"than {STALE_S:.0f} s (a machine that slept, a stopped process), so it counted as gone; this driver stopped, "
        "keeping what its trials wrote, and the other one runs the sweep now"
    )
    try:
        yield path.rsplit("/", 1)[1]
    except BaseException:  # KeyboardInterrupt included: the SIGINT above, where Tune does not handle it
        if not taken.is_set():
            raise
    finally:
        with lock:
            stop.set()
            refresh(heartbeat=time.time(), released=time.time())
    if taken.is_set():
        raise lost from None


def wipe(cfg: ExperimentConfig, keep: str) -> None:
    """--overwrite, once this driver holds the directory: delete the earlier sweep in it, all but `keep` (this
    driver's owner record), after checking again, now that no other driver can change it, that it is a marked sweep
    not reached through a link. Local disk and NFS: through a descriptor of the directory opened without following a
    link; a link inside is removed, never its target (shutil.rmtree with dir_fd works on descriptors, never follows
    a link)."""
    exp, fs = experiment_dir(cfg)
    if all(i.base_name == keep for i in fs.get_file_info(pyarrow.fs.FileSelector(exp))):
        return  # nothing earlier: a new sweep
    check_sweep(cfg)
    log.warning("--overwrite: deleting the earlier experiment at %s", display(cfg, experiment=True))
    try:
        if not is_local(fs):
            for info in fs.get_file_info(pyarrow.fs.FileSelector(exp)):
                if info.path.rstrip("/") == exp.rstrip("/"):  # keys with an empty segment (`s//x`) list as `exp`
                    log.warning("--overwrite: keys under %s// are left (pyarrow cannot address them)", exp)
                elif info.base_name != keep:
                    (fs.delete_dir if info.type == pyarrow.fs.FileType.Directory else fs.delete_file)(info.path)
            return
        fd = os.open(exp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for entry in os.scandir(fd):
                if entry.name != keep:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.name, dir_fd=fd)
                    else:
                        os.unlink(entry.name, dir_fd=fd)
        finally:
            os.close(fd)
    except OSError as e:  # e.g. an entry swapped for a link meanwhile: refused, not followed
        raise UserError(
            f"--overwrite: could not delete the earlier sweep at {display(cfg, experiment=True)}: {e}"
        ) from None
