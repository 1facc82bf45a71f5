"""Every user mistake: one line on stderr naming the problem (and the fix), exit code 2, no traceback, nothing trained
or written. Most cases run `tune_lora.main` in-process (the same code path as the CLI); those that involve the
process boundary (exit status, environment, a real HTTP endpoint) run the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

import tune_lora
from lorahpo.checks import check_dtype
from lorahpo.config import load_config, to_dict

from .conftest import cli, tiny_args, tiny_config, word
from .fake_hub import FakeHub

FAKE_TOKEN = "hf_lorahpoTESTtoken0123456789abcdefXYZ"


def fails(args: list[str], capsys: pytest.CaptureFixture, storage: Path) -> str:
    """Run the CLI in-process; assert exit 2, one stderr line, and no experiment written; return the message."""
    code = tune_lora.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not storage.exists() or not any(storage.rglob("*")), "nothing may be written before the error"
    return err[0]


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture):
    storage = tmp_path / "store"

    def _run(*overrides: str, config: Path | None = None, flags: tuple[str, ...] = ()) -> str:
        base = tiny_args(storage)
        args = ([] if config is None else ["--config", str(config)]) + list(flags) + base + list(overrides)
        return fails(args, capsys, storage)

    return _run


def csv_file(tmp_path: Path, rows: dict[str, list], name: str = "d.csv") -> str:
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


SPAM = ["win cash now", "free prize", "call now to claim"]
HAM = ["see you at 5", "ok thanks", "on my way home", "what time is dinner"]


def good_rows(n: int = 40) -> dict[str, list]:
    texts = [(SPAM if i % 4 == 0 else HAM)[i % 3] + f" {word(i)}" for i in range(n)]
    return {"text": texts, "label": ["spam" if i % 4 == 0 else "ham" for i in range(n)]}


# ---------------------------------------------------------------------------------------------------------------- data


def test_data_file_missing(run, tmp_path: Path) -> None:
    msg = run(f"data.path={tmp_path / 'nope.csv'}")
    assert "nope.csv does not exist" in msg and "CSV, TSV, JSONL or Parquet" in msg


def test_data_file_empty(run, tmp_path: Path) -> None:
    (tmp_path / "e.csv").write_text("")
    assert re.search(r"data.path=.*e.csv is empty", run(f"data.path={tmp_path / 'e.csv'}"))
    (tmp_path / "h.csv").write_text("text,label\n")
    assert "has no rows" in run(f"data.path={tmp_path / 'h.csv'}")


def test_data_format_unrecognised(run, tmp_path: Path) -> None:
    (tmp_path / "d.xlsx").write_text("x")
    assert "unrecognised format '.xlsx'; use one of ['.csv', '.jsonl', '.parquet', '.tsv']" in run(
        f"data.path={tmp_path / 'd.xlsx'}"
    )


def test_data_column_missing_names_existing(run, tmp_path: Path) -> None:
    path = csv_file(tmp_path, good_rows())
    msg = run(f"data.path={path}", "data.text_column=body")
    assert "data.text_column='body' is not a column" in msg and "its columns are ['text', 'label']" in msg
    assert "data.label_column='y' is not a column" in run(f"data.path={path}", "data.label_column=y")


def test_data_empty_texts_counted_and_rejected(run, tmp_path: Path) -> None:
    rows = good_rows()
    rows["text"][3] = ""
    rows["text"][7] = "   "
    msg = run(f"data.path={csv_file(tmp_path, rows)}")
    assert "2 of 40 rows" in msg and "empty or missing text" in msg and "rejected" in msg


def test_data_single_class(run, tmp_path: Path) -> None:
    path = csv_file(tmp_path, {"text": [f"t {word(i)}" for i in range(20)], "label": ["ham"] * 20})
    assert "only one class (['ham'])" in run(f"data.path={path}", "data.positive_label=null")


def test_data_positive_label_missing(run, tmp_path: Path) -> None:
    rows = good_rows()
    rows["label"] = ["a" if x == "spam" else "b" for x in rows["label"]]
    msg = run(f"data.path={csv_file(tmp_path, rows)}", "data.positive_label=spam")
    assert (
        "data.positive_label='spam' is not among the labels ['a', 'b']; set data.positive_label to one of them "
        "(the class F-beta is reported for), or null (the second in sorted order)"
    ) in msg


def test_data_split_too_small_to_stratify(run, tmp_path: Path) -> None:
    rows = {"text": [f"t {word(i)}" for i in range(30)], "label": ["spam"] * 2 + ["ham"] * 28}
    msg = run(f"data.path={csv_file(tmp_path, rows)}")
    assert "the smallest class has 2 distinct texts: too few for a stratified val split of 0.15" in msg


def test_data_split_fractions(run) -> None:
    assert "must be three non-negative train/val/test fractions that add up to 1" in run("data.split=[0.7,0.2,0.2]")


@pytest.mark.parametrize("shape", [[1], {"y": 1}], ids=["list", "object"])
def test_data_jsonl_labels_that_are_not_scalars(run, tmp_path: Path, shape: object) -> None:
    rows = good_rows()
    lines = [
        json.dumps({"text": t, "label": shape if i % 2 else label}) for i, (t, label) in enumerate(zip(*rows.values()))
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    msg = run(f"data.path={tmp_path / 'd.jsonl'}", "data.positive_label=null")
    assert f"20 labels of {tmp_path / 'd.jsonl'} are lists or objects; a label is one string or number" in msg


def test_data_undecodable_bytes(run, tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\xe9 ouvert,ham\nwin,spam\n".encode("latin-1"))
    assert "is not valid UTF-8" in run(f"data.path={path}") and "re-save it as UTF-8" in run(f"data.path={path}")


# -------------------------------------------------------------------------------------------------------------- config


def test_config_unknown_key(run) -> None:
    assert "unknown config key 'train.lrr': did you mean 'train.lr'?" in run("train.lrr=0.1")


def test_config_wrong_type(run) -> None:
    assert "train.batch_size='big' must be an integer" in run("train.batch_size=big")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"type": "float", "low": 1e-2, "high": 1e-4, "log": True}, "low=0.01 is above high=0.0001; swap them"),
        ({"type": "float", "low": 0.0, "high": 1e-3, "log": True}, "a log scale needs low > 0 (got low=0.0)"),
        ({"type": "categorical", "choices": []}, "categorical with an empty choice list"),
    ],
)
def test_config_bad_search_space(run, tmp_path: Path, spec: dict, expected: str) -> None:
    import yaml

    from lorahpo.config import to_dict

    raw = to_dict(tiny_config())
    raw["search"]["train.lr"] = spec
    raw["sweep"]["points_to_evaluate"] = []
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    msg = run(config=tmp_path / "c.yaml")
    assert "search.train.lr" in msg and expected in msg


def test_config_last_n_out_of_range(run) -> None:
    assert "lora.last_n=5 (config or search space) exceeds the 4 layers of tiny-random-llama" in run("lora.last_n=5")
    assert "lora.last_n=0 must be >= 1" in run("lora.last_n=0")


def test_config_r_below_one(run) -> None:
    assert "lora.r=0 must be >= 1" in run("lora.r=0")


def test_config_max_length_beyond_model(run) -> None:
    assert "data.max_length=4096 exceeds what tiny-random-llama supports (512 positions)" in run("data.max_length=4096")


def test_config_half_precision_without_hardware(run) -> None:
    assert "model.dtype=float16 needs a GPU but sweep.gpus_per_trial=0" in run("model.dtype=float16")


def test_bf16_on_cpu_without_native_bf16(caplog: pytest.LogCaptureFixture) -> None:
    """Emulated bf16 is slow, not wrong: a warning, not a refusal (the end-to-end bf16 sweep runs this path)."""
    from lorahpo.errors import UserError

    cfg = tiny_config(**{"model.dtype": "bfloat16"})
    check_dtype(cfg, cpu_bf16=True, cuda_bf16=[])
    assert not caplog.records
    check_dtype(cfg, cpu_bf16=False, cuda_bf16=[])
    assert [r.getMessage() for r in caplog.records] == [
        "model.dtype=bfloat16 on a CPU without native bf16 (AVX512-BF16/AMX): torch emulates it, correctly but "
        "slowly; model.dtype=float32 is faster here"
    ]
    gpu = tiny_config(**{"model.dtype": "bfloat16", "sweep.gpus_per_trial": 1})
    with pytest.raises(UserError, match="this GPU has no bf16 support"):
        check_dtype(gpu, cpu_bf16=True, cuda_bf16=[False])


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a b", "../x"])
def test_config_sweep_name_is_a_plain_name(run, name: str) -> None:
    assert f"sweep.name={name!r} must be a plain name: letters, digits, '.', '_' or '-'" in run(f"sweep.name={name}")
    assert "sweep.name=None must be a string" in run("sweep.name=")


def test_overwrite_never_deletes_what_is_not_a_sweep(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "store" / "thesis"
    other.mkdir(parents=True)
    (other / "chapter1.tex").write_text("years of work")
    (other / "config.yaml").write_text("lr: 0.1\n")  # a config.yaml, but not a lorahpo one
    code = tune_lora.main([*tiny_args(tmp_path / "store"), "sweep.name=thesis", "--overwrite"])
    assert code == 2 and "is not a lorahpo sweep" in capsys.readouterr().err
    assert (other / "chapter1.tex").read_text() == "years of work"


def test_dotdot_name_with_overwrite_deletes_nothing(run, tmp_path: Path) -> None:
    parent = tmp_path / "a" / "b"
    parent.mkdir(parents=True)
    (tmp_path / "a" / "keep.txt").write_text("x")
    assert "must be a plain name" in run(f"sweep.storage_path={parent}", "sweep.name=..", flags=("--overwrite",))
    assert (tmp_path / "a" / "keep.txt").exists()


def test_overwrite_refusal_names_the_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "store" / "thesis"
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    assert tune_lora.main([*tiny_args(tmp_path / "store"), "sweep.name=thesis", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: --overwrite: {other} exists but is not a lorahpo sweep (no .lorahpo-sweep marker); it is never "
        "deleted: choose another sweep.name or sweep.storage_path"
    ]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan"])
def test_config_non_finite_numbers(run, value: str) -> None:
    assert "is not a finite number" in run(f"train.lr={value}")


@pytest.mark.parametrize(
    ("key", "spec", "expected"),
    [
        ("lora.last_n", {"type": "int", "low": 0, "high": 4},
         "search.lora.last_n allows 0, which a trial cannot run: lora.last_n=0 must be >= 1"),
        ("lora.last_n", {"type": "categorical", "choices": [1, 2, 6]},
         "lora.last_n=6 (config or search space) exceeds the 4 layers of tiny-random-llama"),
        ("train.batch_size", {"type": "categorical", "choices": [16, 0]},
         "search.train.batch_size allows 0, which a trial cannot run: train.batch_size, train.max_epochs and"),
        ("lora.dropout", {"type": "float", "low": 0.0, "high": 1.0},
         "search.lora.dropout allows 1.0, which a trial cannot run: lora.dropout=1.0 must be in [0, 1)"),
        ("lora.target_modules", {"type": "categorical", "choices": [["q_proj", "v_proj"], ["q_proj", "qkv_proj"]]},
         "lora.target_modules (config or search space) names ['qkv_proj'], which tiny-random-llama does not have"),
    ],
)  # fmt: skip
def test_config_every_value_a_trial_can_draw_is_checked(run, tmp_path: Path, key: str, spec: dict, expected: str):
    """Both ends of a searched range and every choice, against the config's rules and the model, before any trial:
    a trial that draws `lora.last_n=0` used to fail mid-sweep."""
    import yaml

    raw = to_dict(tiny_config())
    raw["search"] = {key: spec}
    raw["sweep"]["points_to_evaluate"] = []
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert expected in run(config=tmp_path / "c.yaml", flags=("--dry-run",))


def test_config_non_finite_in_the_search_space(run, tmp_path: Path) -> None:
    import yaml

    raw = to_dict(tiny_config())
    raw["search"]["lora.dropout"] = {"type": "float", "low": 0.0, "high": float("inf")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert "search.lora.dropout.high: inf is not a finite number" in run(config=tmp_path / "c.yaml")


def test_config_search_space_names_what_a_trial_cannot_change(run, tmp_path: Path) -> None:
    import yaml

    for key, spec in (
        ("data.max_length", {"type": "int", "low": 32, "high": 64}),
        ("model.num_layers", {"type": "int", "low": 1, "high": 4}),
        ("train.metric", {"type": "categorical", "choices": ["val_f1"]}),
    ):
        raw = to_dict(tiny_config())
        raw["search"] = {key: spec}
        raw["sweep"]["points_to_evaluate"] = []
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
        msg = run(config=tmp_path / "c.yaml")
        assert f"search.{key}: a trial cannot change {key} (it is fixed for the whole sweep)" in msg, msg


def test_config_points_to_evaluate_partial_or_out_of_range(run) -> None:
    assert (
        "sweep.points_to_evaluate[0] lacks train.weight_decay, lora.dropout, lora.r, lora.last_n, train.class_weight; "
        "give a value for every key of the search space"
    ) in run("sweep.points_to_evaluate=[{train.lr: 0.001}]", flags=("--dry-run",))
    point = "{train.lr: 0.5, train.weight_decay: 0.001, lora.dropout: 0.1, lora.r: 8, lora.last_n: 1, "
    point += "train.class_weight: 3}"
    assert "sweep.points_to_evaluate[0]: train.lr=0.5 is outside search.train.lr [0.0003, 0.005]" in run(
        f"sweep.points_to_evaluate=[{point}]"
    )
    assert "lora.r=5 is outside search.lora.r (4, 8, 16)" in run(
        "sweep.points_to_evaluate=[" + point.replace("0.5", "0.001").replace("r: 8", "r: 5") + "]"
    )


def test_config_metric_and_mode(run) -> None:
    assert "train.metric='val_auc' is not a metric; choose one of" in run("train.metric=val_auc")
    assert "train.mode='maximize' is not allowed; choose one of ['min', 'max']" in run("train.mode=maximize")
    assert "contradicts val_loss (set train.mode=min)" in run("train.metric=val_loss")


def test_config_point_outside_space(run) -> None:
    assert "names ['train.batch_size'], which are not in the search space" in run(
        "sweep.points_to_evaluate=[{train.batch_size: 8}]"
    )
    assert "sweep.trials_per_batch=0 must be >= 1" in run("sweep.trials_per_batch=0")


def test_config_file_missing_and_invalid(run, tmp_path: Path) -> None:
    assert "does not exist (pass --config PATH" in run(config=tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    assert "is not valid YAML" in run(config=tmp_path / "bad.yaml")


@contextlib.contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`."""

    def alarm(*_: object) -> None:
        raise AssertionError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_config_file_not_utf8(run, tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_bytes(b"seed: 1\n\xff\xfe garbage\n")
    msg = run(config=tmp_path / "c.yaml")
    assert f"config file {tmp_path / 'c.yaml'} is not UTF-8 text (invalid start byte at byte 8)" in msg


def test_config_nested_too_deeply(run, tmp_path: Path) -> None:
    """The YAML parser recurses per level (RecursionError near 300); a config walks its values recursively too."""
    (tmp_path / "c.yaml").write_text("seed: " + "[" * 20000 + "]" * 20000 + "\n")
    assert f"config file {tmp_path / 'c.yaml'} is nested more than 50 levels deep" in run(config=tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("seed: " + "[" * 60 + "]" * 60 + "\n")  # parsed, then refused by the walk
    assert f"config file {tmp_path / 'c.yaml'} is nested more than 50 levels deep" in run(config=tmp_path / "c.yaml")
    deep = "sweep.points_to_evaluate=" + "[" * 5000 + "]" * 5000
    assert "override sweep.points_to_evaluate is nested more than 50 levels deep" in run(deep)


@pytest.mark.parametrize(
    ("choices", "expected"),
    [
        # 10^9 leaves in about 1 KB: safe_load shares the aliased lists, every walk over the config visits them all
        (
            ["    - &b0 [x, x, x, x, x, x, x, x, x, x]"]
            + [f"    - &b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]" for i in range(1, 9)],
            "holds more than 100000 values once its YAML aliases are expanded",
        ),
        (["    - &a [x, *a]"], "is nested more than 50 levels deep"),  # a list that holds itself: endless
    ],
    ids=["alias-bomb", "self-reference"],
)
def test_config_alias_bomb_refused_quickly(run, tmp_path: Path, choices: list[str], expected: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("search:\n  lora.dropout:\n    type: categorical\n    choices:\n" + "\n".join(choices) + "\n")
    with within(60):
        msg = run(config=cfg)
    assert f"config file {cfg} {expected}" in msg


def test_config_point_keys_of_two_types(run) -> None:
    msg = run("sweep.points_to_evaluate=[{1: 2, a: 3}]")
    assert "sweep.points_to_evaluate: the key 1 is not a name; keys are dotted config keys such as train.lr" in msg


def test_config_huge_final_seeds_refused_quickly(run) -> None:
    with within(60):
        assert "final.seeds=100000000 must be >= 0 (0 turns the final evaluation off) and <= 1000" in run(
            "final.seeds=100000000"
        )


def test_config_seed_beyond_32_bits(run) -> None:
    assert "seed=4294967296 must be an integer from 0 to 2**32 - 1 (e.g. seed=42)" in run("seed=4294967296")
    assert "seed=-1 must be an integer from 0 to 2**32 - 1" in run("seed=-1")


def test_config_values_the_training_would_refuse(run) -> None:
    """torch's AdamW and set_num_threads raise only inside each trial, after Ray started."""
    assert "train.weight_decay=-0.1 must be >= 0" in run("train.weight_decay=-0.1")
    assert "train.num_threads=-1 must be >= 1 (or null: the trial's CPU share)" in run("train.num_threads=-1")
    assert "train.num_threads=0 must be >= 1" in run("train.num_threads=0")


def test_training_values_refused_before_ray_starts(tmp_path: Path) -> None:
    """The real CLI without --dry-run: the same line, exit 2, and no Ray (it used to fail in every trial, exit 1)."""
    run = cli([*tiny_args(tmp_path / "store"), "sweep.num_samples=1", "train.weight_decay=-0.1"], timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == ["error: train.weight_decay=-0.1 must be >= 0"]
    assert "Ray" not in run.stdout + run.stderr and not (tmp_path / "store").exists()


# --------------------------------------------------------------------------------------------------------------- model


def test_model_local_dir_missing(run) -> None:
    assert "local model directory" in run("model.name=./no-such-model-dir") and "does not exist" in run(
        "model.name=./no-such-model-dir"
    )


def _cli_error(tmp_path: Path, overrides: list[str], env: dict[str, str]) -> str:
    proc = cli(tiny_args(tmp_path / "store") + overrides + ["--dry-run"], env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


def test_model_unknown_hub_id_and_gated_without_token(tmp_path: Path) -> None:
    with FakeHub() as url:
        env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""}
        msg = _cli_error(tmp_path, ["model.name=someone/no-such-model"], env)
        assert "model.name=someone/no-such-model is not a model on the Hugging Face hub" in msg
        msg = _cli_error(tmp_path, ["model.name=gated-org/llama-gated"], env)
        assert "model.name=gated-org/llama-gated is gated" in msg and "HF_TOKEN" in msg


def test_model_offline_and_not_cached(tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    msg = _cli_error(tmp_path, ["model.name=meta-llama/Llama-3.2-3B-Instruct"], env)
    assert "is not in the local Hugging Face cache and the hub cannot be reached" in msg


# ----------------------------------------------------------------------------------------------- resources and storage


def test_more_cpus_or_gpus_than_any_node(run) -> None:
    msg = run("sweep.cpus_per_trial=64")
    assert "no node can run a trial of sweep.cpus_per_trial=64" in msg and f"{os.cpu_count()} CPU, 0 GPU" in msg
    assert "sweep.gpus_per_trial=1" in run("sweep.gpus_per_trial=1")


def test_storage_not_writable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    args = tiny_args(blocker / "store")
    msg = fails(args, capsys, tmp_path / "none")
    assert str(blocker / "store") in msg


def test_resume_and_overwrite_together(run) -> None:
    assert "--resume and --overwrite contradict each other" in run(flags=("--resume", "--overwrite"))


def test_resume_without_experiment(run) -> None:
    assert "--resume: no experiment named 'lora_sweep'" in run(flags=("--resume",))


@pytest.mark.slow
def test_existing_sweep_refused_resume_config_checked_token_never_written(tmp_path: Path) -> None:
    """One real sweep (with a planted fake HF token), then the mistakes that need an existing experiment."""
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    (hf_home / "token").write_text(FAKE_TOKEN)
    env = {"HF_TOKEN": FAKE_TOKEN, "HUGGING_FACE_HUB_TOKEN": FAKE_TOKEN, "HF_HOME": str(hf_home)}
    args = tiny_args(tmp_path / "store", **{"sweep.num_samples": 2, "train.max_epochs": 1})
    first = cli(args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    exp = tmp_path / "store" / "lora_sweep"
    files = [p for p in exp.rglob("*") if p.is_file()]
    assert len(files) > 20
    leaked = [str(p) for p in files if FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaked, f"token written into {leaked}"
    assert FAKE_TOKEN not in first.stdout + first.stderr
    before = sorted(str(p) for p in files)

    again = cli(args)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1] == (
        f"error: a sweep named 'lora_sweep' already exists at {exp}; pass --resume to continue it, --overwrite to "
        "replace it, or choose a new sweep.name (earlier results are never deleted silently)"
    )
    changed = cli([*args, "--resume", "train.lr=0.5"])
    assert changed.returncode == 2
    assert "--resume with a config that differs from the interrupted sweep's (train.lr: 0.002 -> 0.5)" in (
        changed.stderr
    )
    assert sorted(str(p) for p in exp.rglob("*") if p.is_file()) == before  # nothing touched
    assert load_config(exp / "config.yaml").train.lr == 0.002

    # links planted in the sweep (to a folder and a file of the user's) are removed, never followed
    mine = tmp_path / "mine"
    (mine / "thesis").mkdir(parents=True)
    (mine / "thesis" / "chapter1.tex").write_text("years of work")
    (exp / "thesis").symlink_to(mine / "thesis")
    next(exp.glob("trial_*")).joinpath("notes").symlink_to(mine / "thesis" / "chapter1.tex")
    replaced = cli([*args, "--overwrite", "seed=3"])  # explicit: deleted, and said so
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert f"--overwrite: deleting the earlier experiment at {exp}" in replaced.stderr
    assert load_config(exp / "config.yaml").seed == 3
    assert (mine / "thesis" / "chapter1.tex").read_text() == "years of work" and not (exp / "thesis").exists()
