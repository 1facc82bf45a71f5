"""Checks before the first trial, called directly (fast): resources against nodes, half precision against hardware,
the model against the config, storage failures classified into one-line causes. The CLI-level tests of the same
errors (exit code 2, one line) are in test_errors.py."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from lorahpo.checks import check_dtype, check_model_fit, check_resources, check_same_config
from lorahpo.config import config_yaml
from lorahpo.errors import UserError
from lorahpo.sources import load_model_config
from lorahpo.storage import check_storage, display, location, storage_cause

from .conftest import tiny_config


def test_resources_must_fit_one_node() -> None:
    cfg = tiny_config(**{"sweep.cpus_per_trial": 4, "sweep.gpus_per_trial": 1})
    check_resources(cfg, [{"CPU": 2, "GPU": 0}, {"CPU": 8, "GPU": 1}])
    with pytest.raises(UserError) as e:
        check_resources(cfg, [{"CPU": 2, "GPU": 0}, {"CPU": 8, "GPU": 0}])
    assert str(e.value) == (
        "no node can run a trial of sweep.cpus_per_trial=4 and sweep.gpus_per_trial=1; the cluster has node 1: "
        "2 CPU, 0 GPU; node 2: 8 CPU, 0 GPU; lower them (or add nodes with --address)"
    )


def test_half_precision_against_hardware() -> None:
    bf16_gpu = tiny_config(**{"model.dtype": "bfloat16", "sweep.gpus_per_trial": 1})
    check_dtype(bf16_gpu, cpu_bf16=False, cuda_bf16=[True])
    check_dtype(bf16_gpu, cpu_bf16=False, cuda_bf16=[])  # a CPU head: the trial checks its own GPU
    with pytest.raises(UserError, match="this GPU has no bf16 support"):
        check_dtype(bf16_gpu, cpu_bf16=False, cuda_bf16=[False])
    with pytest.raises(UserError, match="float16 needs a GPU"):
        check_dtype(tiny_config(**{"model.dtype": "float16"}), cpu_bf16=True, cuda_bf16=[])


def test_model_fit_checks_config_and_space() -> None:
    cfg = tiny_config()  # 4 layers; the default space asks for last_n up to 4
    check_model_fit(cfg, load_model_config(cfg.model))
    small = tiny_config(**{"model.num_layers": 3})
    with pytest.raises(UserError, match=r"lora.last_n=4 \(config or search space\) exceeds the 3 layers"):
        check_model_fit(small, load_model_config(small.model))
    with pytest.raises(UserError, match="data.max_length=600 exceeds what tiny-random-llama supports"):
        long = tiny_config(**{"data.max_length": 600})
        check_model_fit(long, load_model_config(long.model))


def test_resume_config_diff_lists_each_change_except_where_it_lives() -> None:
    old = tiny_config()
    check_same_config(tiny_config(**{"sweep.storage_path": "/elsewhere"}), config_yaml(old), "X")
    with pytest.raises(UserError) as e:
        check_same_config(tiny_config(**{"train.lr": 1e-3, "lora.r": 4}), config_yaml(old), "X")
    assert "(lora.r: 8 -> 4; train.lr: 0.002 -> 0.001)" in str(e.value)


def test_resume_may_change_concurrency_only_of_a_deterministic_sweep() -> None:
    """A deterministic sweep's results do not depend on how many trials run at once; an asynchronous sweep's do."""
    check_same_config(tiny_config(**{"sweep.max_concurrent_trials": 3}), config_yaml(tiny_config()), "X")
    old = tiny_config(**{"sweep.deterministic": False})
    with pytest.raises(UserError, match=r"\(sweep.max_concurrent_trials: 1 -> 3\)"):
        check_same_config(
            tiny_config(**{"sweep.deterministic": False, "sweep.max_concurrent_trials": 3}), config_yaml(old), "X"
        )
    with pytest.raises(UserError, match=r"\(sweep.deterministic: False -> True\)"):
        check_same_config(tiny_config(), config_yaml(old), "X")


def test_storage_causes_are_one_line_each() -> None:
    s3 = tiny_config(**{"sweep.storage_path": "s3://bkt/p", "sweep.s3_endpoint": "http://127.0.0.1:9"})
    aws = "AWS Error NO_SUCH_BUCKET during HeadBucket operation: The bucket does not exist (Request ID: 1)"
    assert storage_cause(s3, OSError(aws)) == "bucket 'bkt' does not exist (NO_SUCH_BUCKET: The bucket does not exist)"
    denied = storage_cause(s3, OSError("AWS Error ACCESS_DENIED during PutObject operation: Access Denied"))
    assert denied.startswith("access denied (ACCESS_DENIED: Access Denied); the credentials need s3:PutObject")
    creds = storage_cause(s3, OSError("AWS Error INVALID_ACCESS_KEY_ID during PutObject operation: bad key"))
    assert creds.startswith("bad credentials (INVALID_ACCESS_KEY_ID: bad key); check AWS_ACCESS_KEY_ID")
    down = storage_cause(s3, OSError("weird failure"))  # nothing listens on port 9: the endpoint is probed
    assert down.startswith("endpoint http://127.0.0.1:9 is unreachable (")
    local = tiny_config(**{"sweep.storage_path": "/x"})
    assert storage_cause(local, OSError(errno.EROFS, "ro")) == "path not writable (read-only file system)"
    assert location(s3, experiment=True) == "s3://bkt/p/lora_sweep"
    assert display(s3) == "s3://bkt/p (endpoint http://127.0.0.1:9)"


def test_storage_check_on_an_unwritable_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file where a directory should be")  # unwritable even for root
    cfg = tiny_config(**{"sweep.storage_path": str(tmp_path / "file" / "results")})
    with pytest.raises(UserError, match=f"^storage {tmp_path}/file/results is not usable: path not writable"):
        check_storage(cfg)
    check_storage(tiny_config(**{"sweep.storage_path": str(tmp_path / "ok" / "results")}))
    assert not (tmp_path / "ok").exists()  # the check leaves no trace
