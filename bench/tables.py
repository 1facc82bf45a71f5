"""The tables a replay searches (bench/tabulate.py's output), by name or by path, and what a replay reads of them.

A table is `<stem>.parquet` (one row per config and epoch, trained with the grid config's root seed) plus any
`<stem>_train<S>.parquet` next to it: the same configs trained again with training seed S on the same split
(`bench/tabulate.py --train-seed S`). Rows without a `train_seed` column are the root seed's.

Training noise. When a table holds several training seeds, the replay with seed s sees, for each config, the curve
of ONE training seed, drawn by `numpy.random.default_rng([s, config_id]).integers(k)` over the config's k training
seeds in increasing order: a pure function of (s, config), so every method replayed with seed s sees the same draw
(a paired comparison), and a config tried twice in one sweep gives the same curve twice (a real sweep trains every
trial with its root seed). A table with one training seed is replayed as it is.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import BENCH_DIR, DOCS_DIR, REPO_ROOT
from trials import Curves, Epoch, native

from lorahpo.config import load_config
from lorahpo.errors import UserError


@dataclass(frozen=True)
class Bundled:
    table: Path
    """The root seed's table; `<stem>_train<S>.parquet` next to it are other training seeds."""
    grid: Path
    """The grid config it was tabulated from (bench/<task>_grid.yaml)."""
    config: Path
    """The task config: the metric, epochs, patience and start points replayed, and its sweep settings are the
    `default` method."""


TABLES = {
    "intents": Bundled(DOCS_DIR / "tabulate" / "intents_grid.parquet", BENCH_DIR / "intents_grid.yaml",
                       REPO_ROOT / "configs" / "intents.yaml"),
    "assistant": Bundled(DOCS_DIR / "tabulate_assistant" / "assistant_grid.parquet", BENCH_DIR / "assistant_grid.yaml",
                         REPO_ROOT / "configs" / "assistant.yaml"),
}  # fmt: skip


def resolve(table: str) -> tuple[Path, Bundled | None]:
    """A `--table` argument: a bundled table's name, or a path to a parquet file."""
    if table in TABLES:
        return TABLES[table].table, TABLES[table]
    if not table.endswith(".parquet"):
        raise UserError(f"--table {table!r} is neither a table name ({', '.join(TABLES)}) nor a .parquet path")
    return Path(table), None


def available() -> list[str]:
    """The bundled tables whose files are present."""
    return [name for name, b in TABLES.items() if b.table.is_file()]


def table_files(path: Path) -> list[Path]:
    """`path` and its other training seeds' files (`<stem>_train<S>.parquet` next to it), the root's first."""
    pattern = re.compile(re.escape(path.stem) + r"_train\d+\.parquet")
    return [path, *sorted(p for p in path.parent.glob(f"{path.stem}_train*.parquet") if pattern.fullmatch(p.name))]


def load_table(path: Path, metric: str, root_seed: int | None = None) -> pd.DataFrame:
    """Every file of the table at `path`, one DataFrame with a `train_seed` column (rows without one: `root_seed`,
    the grid config's seed). Every config must have every training seed, each with the same params."""
    if not path.is_file():
        raise UserError(
            f"no table at {path}: make it with python bench/tabulate.py (~1.8 h alone on 2 cores), pass --table "
            "NAME or PATH, or --synthetic for a plumbing check"
        )
    frames = []
    for f in table_files(path):
        df = pd.read_parquet(f)
        missing = [c for c in ("config_id", "epoch", metric, "iter_s") if c not in df]
        if missing or not any(c.startswith("param.") for c in df):
            raise UserError(f"{f} is not a bench/tabulate.py table: it lacks {missing or 'param.* columns'}")
        if "train_seed" not in df:
            df = df.assign(train_seed=root_seed if root_seed is not None else 0)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    check_seeds(df, path)
    return df


def check_seeds(df: pd.DataFrame, path: Path) -> None:
    seeds = sorted(int(s) for s in df["train_seed"].unique())
    params = [c for c in df if c.startswith("param.")]
    for cid, g in df.groupby("config_id"):
        lacking = sorted(set(seeds) - {int(s) for s in g["train_seed"]})
        if lacking:
            raise UserError(
                f"config {cid} of {path} lacks training seed(s) {lacking}: complete that tabulation "
                f"(bench/tabulate.py --resume --train-seed S) or move its file away"
            )
        if len(g[params].drop_duplicates()) != 1:
            raise UserError(f"config {cid} of {path} has different params in different files")


def train_seeds(df: pd.DataFrame) -> list[int]:
    return [int(s) for s in sorted(df["train_seed"].unique())] if "train_seed" in df else [0]


def grid_of(df: pd.DataFrame) -> dict[str, tuple[Any, ...]]:
    """Each `param.<key>` column's sorted values: the categorical space the replay searches."""
    return {c[len("param.") :]: tuple(native(v) for v in sorted(df[c].unique())) for c in df if c.startswith("param.")}


@dataclass(frozen=True)
class Table:
    """A table as replays use it: each config's curve per training seed."""

    by_seed: dict[tuple, dict[int, list[Epoch]]]
    """Grid values -> training seed -> epochs 1..max_epochs."""
    ids: dict[tuple, int]
    """Grid values -> config_id (what the noise draw is seeded with)."""

    def train_seed(self, key: tuple, seed: int | None) -> int:
        """The training seed whose curve of config `key` replay seed `seed` sees (see the module docstring); None, or
        a config with one training seed: the lowest."""
        seeds = sorted(self.by_seed[key])
        if seed is None or len(seeds) == 1:
            return seeds[0]
        return seeds[int(np.random.default_rng([seed, self.ids[key]]).integers(len(seeds)))]

    def curves(self, seed: int | None = None) -> Curves:
        """What replay seed `seed` sees: every config's curve of its drawn training seed."""
        return {key: runs[self.train_seed(key, seed)] for key, runs in self.by_seed.items()}


def table_of(df: pd.DataFrame, metric: str, max_epochs: int) -> Table:
    keys = [c for c in df if c.startswith("param.")]
    cost = "epoch_time_s" if "epoch_time_s" in df else "iter_s"
    df = df if "train_seed" in df else df.assign(train_seed=0)
    by_seed: dict[tuple, dict[int, list[Epoch]]] = {}
    ids = {}
    for (cid, seed), g in df.sort_values(["config_id", "train_seed", "epoch"]).groupby(["config_id", "train_seed"]):
        if g["epoch"].tolist()[:max_epochs] != list(range(1, max_epochs + 1)):
            raise UserError(f"config {cid} (training seed {seed}) of the table lacks epochs 1..{max_epochs}")
        key = tuple(native(g[k].iloc[0]) for k in keys)
        rows = g.iloc[:max_epochs]
        by_seed.setdefault(key, {})[int(seed)] = [
            Epoch(float(v), float(t), float(c)) for v, t, c in zip(rows[metric], rows["iter_s"], rows[cost])
        ]
        ids[key] = int(cid)
    return Table(by_seed, ids)


def lookup(df: pd.DataFrame, metric: str, max_epochs: int, seed: int | None = None) -> Curves:
    """params (in grid key order) -> one Epoch per epoch, 1..max_epochs, as replay seed `seed` sees them."""
    return table_of(df, metric, max_epochs).curves(seed)


def synthetic_table(grid_config: Path = TABLES["intents"].grid, seed: int = 0, train_seeds: int = 1) -> pd.DataFrame:
    """A table of the grid's size and columns (every grid config x max_epochs, `train_seeds` training seeds) with
    invented curves: val macro-F1 that rises with the epochs, peaks at a learning rate near 2e-3, shifts a little with
    the other keys and carries noise; seconds per epoch by LoRA layers and batch size. For timing and plumbing only:
    it says nothing about the task."""
    cfg = load_config(grid_config)
    keys = list(cfg.search)
    rng = np.random.default_rng(seed)
    rows = []
    for i, values in enumerate(itertools.product(*(cfg.search[k].choices for k in keys))):
        p = dict(zip(keys, values))
        peak = 0.85 - 0.12 * abs(np.log10(p["train.lr"] / 2e-3)) ** 1.5 + 0.02 * rng.standard_normal()
        peak += 0.01 * (p.get("lora.last_n", 2) - 2) + 0.005 * np.log2(p.get("lora.alpha", 16) / p.get("lora.r", 8))
        rate = 0.4 + 2.0 * min(1.0, p["train.lr"] / 1e-3)
        secs = 6.0 + 2.5 * p.get("lora.last_n", 2) * (1.1 if p.get("train.batch_size", 16) == 16 else 1.0)
        for t, e in itertools.product(range(train_seeds), range(1, cfg.train.max_epochs + 1)):
            val = float(np.clip(peak * (1 - np.exp(-rate * e)) + 0.01 * rng.standard_normal(), 0.0, 1.0))
            rows.append({"config_id": i, **{f"param.{k}": v for k, v in p.items()}, "train_seed": cfg.seed + t,
                         "epoch": e, "val_f1": val, "epoch_time_s": secs,
                         "iter_s": secs + (4.0 if e == 1 else 0.0)})  # fmt: skip
    return pd.DataFrame(rows)
