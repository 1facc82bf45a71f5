"""Helpers for the review's reproductions. Each test asserts what the README or a docstring promises, so a FAILING
test here is a confirmed defect (see repro/README.md). Run pinned to one core:

    PYTHONPATH=$PWD taskset -c 0 /work/main/.venv/bin/python -m pytest -q -p no:cacheprovider repro/<file>.py
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, procs, word  # noqa: F401  (procs: a fixture that kills what a test starts)

ROOT = Path(__file__).resolve().parent.parent
TINY_ARGS = [f"{k}={v}" for k, v in TINY.items()]


class Hung(Exception):
    pass


def main_in_process(args: list[str], timeout: int = 90) -> tuple[int | None, str, BaseException | None]:
    """tune_lora.main(args) in this process (imports paid once): (exit code, stderr, the exception that escaped
    main, if any). An escaping exception is what a user sees as a traceback. `timeout`: seconds before Hung."""
    sys.path.insert(0, str(ROOT))
    import tune_lora

    err = io.StringIO()

    def alarm(*_: object) -> None:
        raise Hung(f"still running after {timeout} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return tune_lora.main(args), err.getvalue(), None
    except BaseException as e:  # noqa: BLE001 (exactly what escapes main)
        return None, err.getvalue(), e
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def dry_run(tmp_path: Path, *extra: str, timeout: int = 90) -> tuple[int | None, str, BaseException | None]:
    return main_in_process([*TINY_ARGS, f"sweep.storage_path={tmp_path / 'store'}", *extra, "--dry-run"], timeout)


def assert_one_line_user_error(result: tuple[int | None, str, BaseException | None], *needles: str) -> None:
    """The README's promise for a user error: exit 2, one `error: ...` line, no traceback."""
    rc, err, exc = result
    assert exc is None, f"escaped main as a traceback: {type(exc).__name__}: {str(exc)[:300]}"
    assert rc == 2, f"exit code {rc}, stderr tail: {err[-500:]}"
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-1000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def texts() -> list[str]:
    """60 distinct texts, no two near-duplicates (numbers spelt in letters)."""
    return [f"message {word(i)} says hello" for i in range(60)]
