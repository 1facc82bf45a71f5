"""Files from storage others can write, read as an attacker would write them: nothing lorahpo reads from a parquet file
(a sweep's results.parquet, a user's data file) can run code, whatever else is imported in the process. Each attack
is first shown to work on a naive reader (pandas' read_parquet in a process that imported ray.tune), so the tests
below would fail on such a reader."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.tune  # noqa: F401  (imports ray.data, which registers the pickled-object extension type: the attack's lever)
from ray.data.extensions import ArrowPythonObjectType

from lorahpo.errors import UserError
from lorahpo.results import load_experiment, read_tables

from .conftest import DET_SWEEP, ROOT, cli, tiny_args, word


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def poison(table: pd.DataFrame, path: Path, marker: Path) -> None:
    """`table` written to `path` as parquet with one more column, of Ray's pickled-object type, whose cells run the
    payload when converted to pandas."""
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    cells = pa.array([pickle.dumps(Payload(marker))] * len(table), type=pa.large_binary())
    pq.write_table(arrow.append_column("note", pa.ExtensionArray.from_storage(ArrowPythonObjectType(), cells)), path)


def test_the_attack_works_on_a_naive_reader(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    poison(pd.DataFrame({"trial_id": ["t0"]}), tmp_path / "results.parquet", marker)
    pd.read_parquet(tmp_path / "results.parquet")
    assert marker.exists()


@pytest.fixture
def poisoned_sweep(det_reference: dict, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a finished sweep whose results.parquet carries the payload; and the payload's marker."""
    exp = tmp_path / "store" / "ref"
    shutil.copytree(det_reference["path"], exp)
    marker = tmp_path / "pwned"
    poison(pd.read_parquet(det_reference["path"] / "results.parquet"), exp / "results.parquet", marker)
    return exp, marker


def test_read_tables_and_load_experiment_refuse_a_poisoned_results_file(poisoned_sweep: tuple[Path, Path]) -> None:
    exp, marker = poisoned_sweep
    for read in (read_tables, load_experiment):
        with pytest.raises(UserError, match=r"results.parquet: columns \['note'\] hold an Arrow extension type"):
            read(str(exp))
    assert not marker.exists()


def test_final_refuses_a_poisoned_results_file(poisoned_sweep: tuple[Path, Path]) -> None:
    exp, marker = poisoned_sweep
    run = cli([*tiny_args(exp.parent, **DET_SWEEP, **{"sweep.name": "ref"}), "final.seeds=1", "--final", "--dry-run"])
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in run.stderr
    assert "results.parquet: columns ['note'] hold an Arrow extension type" in run.stderr
    assert not marker.exists()


def test_a_poisoned_data_file_is_refused_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    rows = pd.DataFrame({"text": [f"message {word(i)}" for i in range(40)], "label": ["ham", "spam"] * 20})
    poison(rows, tmp_path / "data.parquet", marker)
    run = cli([*tiny_args(tmp_path / "store"), f"data.path={tmp_path / 'data.parquet'}", "--dry-run"])
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == (
        f"error: data.path={tmp_path / 'data.parquet'}: columns ['note'] hold an Arrow extension type (e.g. Ray's "
        "pickled Python objects), which could run code when read; refused. Store plain columns (strings, numbers, "
        "lists of them)"
    )
    assert not marker.exists()
    # the same rows as plain columns are a valid data file
    rows.to_parquet(tmp_path / "plain.parquet")
    ok = cli([*tiny_args(tmp_path / "store"), f"data.path={tmp_path / 'plain.parquet'}", "--dry-run"])
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_a_poisoned_extension_nested_in_a_list_is_refused(tmp_path: Path) -> None:
    """The type can hide inside a list or a dictionary column: the check looks inside every nested type."""
    from lorahpo.reading import read_parquet

    marker = tmp_path / "pwned"
    cells = pa.array([pickle.dumps(Payload(marker))], type=pa.large_binary())
    inner = pa.ExtensionArray.from_storage(ArrowPythonObjectType(), cells)
    nested = pa.ListArray.from_arrays(pa.array([0, 1], type=pa.int32()), inner)
    pq.write_table(pa.table({"trial_id": ["t0"], "deep": nested}), tmp_path / "nested.parquet")
    with pytest.raises(UserError, match=r"columns \['deep'\]"):
        read_parquet(tmp_path / "nested.parquet", "nested.parquet")
    assert not marker.exists()


def test_payload_unpickles_in_a_fresh_process(tmp_path: Path) -> None:
    """The naive reader's attack does not depend on this test process's imports: a fresh process that imports
    lorahpo.results (hence ray.tune) and calls pandas directly runs the payload too."""
    marker = tmp_path / "pwned"
    poison(pd.DataFrame({"trial_id": ["t0"]}), tmp_path / "r.parquet", marker)
    code = "import lorahpo.results, pandas, sys; pandas.read_parquet(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.parquet")], cwd=ROOT, check=True, timeout=120)
    assert marker.exists()
