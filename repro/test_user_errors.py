"""README, Command line: "Exit code 0 on success; 2 with one line on stderr for a user error, before any training:
... wrong types, NaN or infinity anywhere in a config ...". Each test below feeds one user mistake to the CLI's main
(in process, --dry-run, the tiny model) and asserts that promise; a failing test is a confirmed defect."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .conftest import assert_one_line_user_error, dry_run, write_jsonl


# ---- config files and overrides -----------------------------------------------------------------------------------


def test_a_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    """load_config reads the file with Path.read_text(): a UnicodeDecodeError escapes (only yaml.YAMLError is caught)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"seed: 1\n\xff\xfe garbage\n")
    assert_one_line_user_error(dry_run(tmp_path, f"--config={cfg}"), str(cfg))


def test_a_deeply_nested_config_file(tmp_path: Path) -> None:
    """PyYAML's composer recurses: a deeply nested value raises RecursionError, which load_config does not catch."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: " + "[" * 20000 + "]" * 20000 + "\n")
    assert_one_line_user_error(dry_run(tmp_path, f"--config={cfg}"), str(cfg))


def test_a_deeply_nested_override(tmp_path: Path) -> None:
    """parse_overrides catches yaml.YAMLError only; a nested KEY=VALUE raises RecursionError."""
    assert_one_line_user_error(dry_run(tmp_path, "sweep.points_to_evaluate=" + "[" * 5000 + "]" * 5000))


def test_points_to_evaluate_with_keys_of_two_types(tmp_path: Path) -> None:
    """ExperimentConfig.__post_init__ sorts the point's unknown keys: 1 and 'a' do not compare (TypeError)."""
    assert_one_line_user_error(dry_run(tmp_path, "sweep.points_to_evaluate=[{1: 2, a: 3}]"), "points_to_evaluate")


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """A 10^9-leaf alias bomb (a ~1 KB file) in a categorical choice list: yaml.safe_load shares the nodes, but
    schema._coerce/_finite walk every leaf, so the dry run does not end (stopped here after 60 s)."""
    lines = ["    - &b0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"    - &b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]" for i in range(1, 9)]
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("search:\n  lora.dropout:\n    type: categorical\n    choices:\n" + "\n".join(lines) + "\n")
    assert cfg.stat().st_size < 2000
    assert_one_line_user_error(dry_run(tmp_path, f"--config={cfg}", timeout=60))


def test_a_huge_final_seeds_is_refused_or_planned_quickly(tmp_path: Path) -> None:
    """--dry-run describes the final evaluation even with final.seeds > 0 off --final; final.final_seeds checks
    `seed not in seeds` on a list (quadratic): 100,000 seeds took 241 s on this machine, 10^8 never ends."""
    rc, err, exc = dry_run(tmp_path, "final.seeds=100000000", timeout=60)
    assert exc is None, f"{type(exc).__name__}: {exc}"


def test_a_seed_beyond_32_bits_names_the_seed(tmp_path: Path) -> None:
    """seed=2**32 passes validation ('a non-negative integer') and then fails in the split with a line that blames
    data.split, not the seed."""
    assert_one_line_user_error(dry_run(tmp_path, "seed=4294967296"), "seed")


def test_negative_weight_decay_is_refused_before_training(tmp_path: Path) -> None:
    """torch.optim.AdamW raises 'Invalid weight_decay value: -0.1' inside every trial (repro/test_late_failures.py
    runs it: exit 1 after Ray started); the config accepts it and --dry-run exits 0."""
    assert_one_line_user_error(dry_run(tmp_path, "train.weight_decay=-0.1"), "weight_decay")


def test_negative_num_threads_is_refused_before_training(tmp_path: Path) -> None:
    """torch.set_num_threads(-1) raises in the prefix-cache build task and in every trial; the config accepts it."""
    assert_one_line_user_error(dry_run(tmp_path, "train.num_threads=-1"), "num_threads")


# ---- data files -----------------------------------------------------------------------------------------------------


def test_jsonl_labels_that_are_lists(tmp_path: Path, texts: list[str]) -> None:
    """label_map calls labels.unique(): a list (or dict) label is unhashable, TypeError escapes."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": [i % 2]} for i, t in enumerate(texts)])
    assert_one_line_user_error(dry_run(tmp_path, f"data.path={data}", "data.positive_label=null"), "label")


def test_jsonl_labels_that_are_objects(tmp_path: Path, texts: list[str]) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": {"y": i % 2}} for i, t in enumerate(texts)])
    assert_one_line_user_error(dry_run(tmp_path, f"data.path={data}", "data.positive_label=null"), "label")


def test_a_class_named_None_is_a_label(tmp_path: Path, texts: list[str]) -> None:
    """pd.read_csv turns 'None', 'NA', 'null', 'N/A', ... into NaN (keep_default_na; the bundled reader turns it off):
    a valid file whose classes are 'None' and 'spam' is refused with '30 rows ... have no label'."""
    data = tmp_path / "d.csv"
    pd.DataFrame({"text": texts, "label": ["None", "spam"] * 30}).to_csv(data, index=False)
    rc, err, exc = dry_run(tmp_path, f"data.path={data}")
    assert exc is None and rc == 0, err[-400:]


def test_a_text_NA_is_a_text(tmp_path: Path, texts: list[str]) -> None:
    """The same: the SMS 'NA' (or 'null', 'None') is rejected as 'an empty or missing text'."""
    data = tmp_path / "d.csv"
    pd.DataFrame({"text": texts[:-1] + ["NA"], "label": ["ham", "spam"] * 30}).to_csv(data, index=False)
    rc, err, exc = dry_run(tmp_path, f"data.path={data}")
    assert exc is None and rc == 0, err[-400:]
