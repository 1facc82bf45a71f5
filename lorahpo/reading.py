"""Reading the data: a user's table (CSV, TSV, JSONL, Parquet) or a bundled data set, as `text` and `label` columns
with its provenance. Nothing read here can run code (`read_parquet`)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lorahpo.config import DataConfig
from lorahpo.errors import UserError

# Data sets shipped inside the package, reachable as `data.path=bundled:<name>`: name -> sha256 of its file
# lorahpo/resources/<name>.tsv (`label<TAB>text`, no header, no quoting), verified at every load. Sources, selection and
# licences (all CC BY 4.0): lorahpo/resources/NOTICE.md.
BUNDLED: dict[str, str] = {
    # SMS Spam Collection v.1 (Almeida and Gomez Hidalgo 2011, UCI): 4,862 messages, ham 4,220 / spam 642.
    "sms_spam_collection": "883079d805cda90c823827a5237496f114d1eb823d95fe909dbea2038707180d",
    # Banking77 (PolyAI, Casanueva et al. 2020): its 25 card-payment, top-up and transfer intents, 100 queries each.
    "banking77_payments": "9b3de8e5f572d6a84b0b53287bc36abf068dcf9386cedcbcc1371a0c4ebe248d",
    # HWU64 (Liu et al. 2019): 25 home-assistant intents (alarm, audio, calendar, email, iot, lists, play), 100 each.
    "hwu64_assistant": "02f98a9bc6d41f6c4350fe56e9fe040023f3b6feb9ba4c150ed0ff0334ffdc0b",
}
BUNDLED_PREFIX = "bundled:"
DEFAULT_BUNDLED = "sms_spam_collection"  # what `data.path: null` reads
RESOURCES = Path(__file__).parent / "resources"
BUNDLED_PATH = RESOURCES / f"{DEFAULT_BUNDLED}.tsv"
BUNDLED_SHA256 = BUNDLED[DEFAULT_BUNDLED]
READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def bundled_name(path: str | None) -> str | None:
    """The bundled data set `data.path` names (null: the default one), or None for a user's file."""
    if path is None:
        return DEFAULT_BUNDLED
    if not path.startswith(BUNDLED_PREFIX):
        return None
    name = path.removeprefix(BUNDLED_PREFIX)
    if name not in BUNDLED:
        raise UserError(
            f"data.path={path}: there is no bundled data set {name!r}; choose one of "
            f"{', '.join(BUNDLED_PREFIX + n for n in sorted(BUNDLED))}, or give a CSV, TSV, JSONL or Parquet file"
        )
    return name


def read_bundled(name: str) -> tuple[pd.DataFrame, str]:
    """A bundled data set (checksum verified) as `text` and `label` columns, and its sha256."""
    path = RESOURCES / f"{name}.tsv"
    digest = file_sha256(path)
    if digest != BUNDLED[name]:
        raise RuntimeError(f"bundled data {path} is corrupt (sha256 {digest}); reinstall lorahpo")
    df = pd.read_csv(
        path, sep="\t", header=None, names=["label", "text"], quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False
    )
    return df[["text", "label"]], digest


def read_table(cfg: DataConfig) -> tuple[pd.DataFrame, str]:
    """Return a DataFrame with `text` and `label` columns (and `split`, train/val/test, with data.split_column), and
    the sha256 of the source file."""
    name = bundled_name(cfg.path)
    if name is not None and cfg.split_column is not None:
        raise UserError(f"data.split_column={cfg.split_column}: bundled:{name} has no split column; drop it")
    if name is not None:
        return read_bundled(name)
    path = Path(cfg.path)
    if not path.is_file():
        raise UserError(f"data.path={cfg.path} does not exist (give a CSV, TSV, JSONL or Parquet file)")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"data.path={cfg.path}: unrecognised format {path.suffix!r}; use one of {sorted(READERS)}")
    if path.stat().st_size == 0:
        raise UserError(f"data.path={cfg.path} is empty")
    try:
        if kind in ("csv", "tsv"):
            # only an empty cell is missing: a class or a text "None", "NA" or "null" is a string (as in read_bundled)
            df = pd.read_csv(
                path, sep="," if kind == "csv" else "\t", encoding="utf-8", keep_default_na=False, na_values=[""]
            )
        elif kind == "jsonl":
            df = pd.read_json(path, lines=True, encoding="utf-8")
        else:
            df = read_parquet(path, f"data.path={cfg.path}")
    except UnicodeDecodeError as e:
        raise UserError(
            f"data.path={cfg.path} is not valid UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8"
        ) from None
    except (ValueError, pd.errors.ParserError, OSError) as e:
        raise UserError(f"data.path={cfg.path} could not be read as {kind}: {str(e).splitlines()[0]}") from None
    df = select_columns(df, cfg, list(map(str, df.columns)), cfg.path)
    if df.empty:
        raise UserError(f"data.path={cfg.path} has no rows (only a header); add data")
    return df, file_sha256(path)


def select_columns(df: pd.DataFrame, cfg: DataConfig, columns: list[str], where: str) -> pd.DataFrame:
    """`text`, `label` (and `split`) from the configured columns, each text present and a string."""
    keys = {"data.text_column": cfg.text_column, "data.label_column": cfg.label_column}
    keys.update({"data.split_column": cfg.split_column} if cfg.split_column else {})
    for key, col in keys.items():
        if col not in columns:
            raise UserError(f"{key}={col!r} is not a column of {where}; its columns are {columns}")
    df = df[list(keys.values())].set_axis(["text", "label", "split"][: len(keys)], axis=1)
    missing = df["text"].isna() | (df["text"].astype(str).str.strip() == "")
    if missing.any():
        raise UserError(
            f"{int(missing.sum())} of {len(df)} rows of {where} have an empty or missing text "
            f"(column {cfg.text_column!r}); they were rejected, not dropped: remove them or fill them in"
        )
    if "split" in df:
        df["split"] = split_names(df["split"], f"data.split_column={cfg.split_column!r} of {where}")
    return df.assign(text=df["text"].astype(str))


# How given splits may be named (case-insensitive) -> lorahpo's name for them.
SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "dev": "val", "test": "test"}


def split_names(values: pd.Series, where: str) -> pd.Series:
    """Given split names as train/val/test; an unknown name, or no train or test row, is one line."""
    named = values.astype(str).str.strip().str.lower().map(SPLIT_NAMES)
    unknown = sorted(set(values[named.isna()].astype(str)))
    if unknown:
        raise UserError(f"{where} holds split names {unknown[:5]}; use train, validation (or val, dev) and test")
    for name in ("train", "test"):
        if not (named == name).any():
            raise UserError(f"{where} has no {name} rows; a given split needs train and test rows (val is optional)")
    return named


def read_data(cfg: DataConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The data as `text`, `label` (and with given splits `split`) columns, each row indexed by its 0-based position
    in its source (the file, or the file or dataset split it was given in), and its provenance: `source`, `sha256`
    and, for given splits, each split's source, size and content hash (`splits`)."""
    if cfg.files:
        tables = {n: read_table(dataclasses.replace(cfg, path=p, files={})) for n, p in cfg.files.items()}
        df = pd.concat([t.assign(split=n) for n, (t, _) in tables.items()])
        sources = {n: source(cfg.files[n]) for n in tables}
        digest = hashlib.sha256(" ".join(h for _, h in tables.values()).encode()).hexdigest()
        where = "data.files"
    elif cfg.path is not None and (cfg.path.startswith(HUB_PREFIX) or Path(cfg.path).is_dir()):
        df, where, sources = read_dataset(cfg)
        digest = content_sha256(df)
    else:
        df, digest = read_table(cfg)
        where = source(cfg.path)
        sources = {n: f"{where} ({cfg.split_column}={n})" for n in ("train", "val", "test")}
    check_labels(df, cfg, where, sources)
    info: dict[str, Any] = {"source": where, "sha256": digest}
    if "split" in df:
        parts = {n: df[df["split"] == n] for n in ("train", "val", "test")}
        info["splits"] = {
            n: {"source": sources[n], "rows": len(part), "sha256": content_sha256(part)}
            for n, part in parts.items()
            if len(part)
        }
    return df, info


def check_labels(df: pd.DataFrame, cfg: DataConfig, where: str, sources: dict[str, str]) -> None:
    """Every row has a label. An unlabelled test split (SST-2's official test: label -1) cannot be scored."""
    missing = df["label"].isna()
    if "split" in df and (missing & (df["split"] == "test")).any():
        raise UserError(
            f"{int((missing & (df['split'] == 'test')).sum())} rows of the test split ({sources['test']}) have no "
            "label: it cannot be scored. Use the validation split as test (e.g. data.hf_splits={train: train, test: "
            "validation}, or data.files with the validation file as test)"
        )
    if missing.any():
        raise UserError(
            f"{int(missing.sum())} rows of {where} have no label (column {cfg.label_column!r}); "
            "remove them or label them"
        )
    nested = df["label"].map(lambda v: isinstance(v, (list, dict)))
    if nested.any():
        raise UserError(f"{int(nested.sum())} labels of {where} are lists or objects; a label is one string or number")


def content_sha256(df: pd.DataFrame) -> str:
    """A split by content (its texts and labels, in order): what --resume and --final compare."""
    return hashlib.sha256(json.dumps([df["text"].tolist(), df["label"].astype(str).tolist()]).encode()).hexdigest()


def read_parquet(source: str | Path | bytes, what: str) -> pd.DataFrame:
    """A parquet file (a path, or its bytes) as a DataFrame, unable to run code whatever is imported: importing
    ray.tune imports ray.data, which registers with pyarrow an extension type whose values are pickles, and converting
    such a column to pandas unpickles them (so does a pandas extension dtype named in the file's pandas metadata). A
    column of any Arrow extension type is refused with one line, and the pandas metadata is not read (lorahpo's own
    tables need neither). `what` names the file in the error."""
    return plain_pandas(pq.read_table(pa.BufferReader(source) if isinstance(source, bytes) else source), what)


def plain_pandas(table: pa.Table, what: str) -> pd.DataFrame:
    """An Arrow table as a DataFrame, refused (one line) if any column holds an extension type (`read_parquet`)."""
    unsafe = [f.name for f in table.schema if _extension_inside(f.type)]
    if unsafe:
        raise UserError(
            f"{what}: columns {unsafe} hold an Arrow extension type (e.g. Ray's pickled Python objects), which could "
            "run code when read; refused. Store plain columns (strings, numbers, lists of them)"
        )
    return table.to_pandas(ignore_metadata=True)


def _extension_inside(dtype: pa.DataType) -> bool:
    if isinstance(dtype, pa.ExtensionType):
        return True
    if pa.types.is_dictionary(dtype):  # reports no fields of its own
        return _extension_inside(dtype.value_type)
    return any(_extension_inside(dtype.field(i).type) for i in range(dtype.num_fields))


def source(path: str | None) -> str:
    """What the manifest records as the data's origin: `bundled:<name>`, or the file's absolute path."""
    name = bundled_name(path)
    return BUNDLED_PREFIX + name if name is not None else str(Path(path).resolve())


HUB_PREFIX = "hf:"


def read_dataset(cfg: DataConfig) -> tuple[pd.DataFrame, str, dict[str, str]]:
    """A `datasets` DatasetDict, saved with `save_to_disk` (data.path: DIR) or on the Hugging Face hub (data.path:
    hf:ID, data.hf_config, data.revision; the token from the environment, as for models; a dataset's own code never
    runs: `datasets` no longer runs loading scripts at all). Its splits are kept as given; integer labels of a
    `ClassLabel` keep their names (-1, its "no label", is missing). Returns the rows (`split` column), the dataset's
    provenance (the hub commit it resolved to) and each split's."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"data.path={cfg.path} is a Hugging Face dataset, which needs the datasets package: "
            "pip install 'lorahpo[datasets]'"
        ) from None
    if cfg.path.startswith(HUB_PREFIX):
        repo = cfg.path.removeprefix(HUB_PREFIX)
        try:
            dd = datasets.load_dataset(repo, cfg.hf_config, revision=cfg.revision)
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:  # OSError: ConnectionError, not found
            raise UserError(
                f"data.path={cfg.path} (data.hf_config={cfg.hf_config}, data.revision={cfg.revision}) could not be "
                f"loaded: {str(e).strip().splitlines()[0]}; check the id, config and revision (offline: it must be in "
                "the Hugging Face datasets cache)"
            ) from None
        commit = Path(next(iter(dd.values())).cache_files[0]["filename"]).parent.name  # cached under its commit
        if cfg.revision is not None and datasets.config.HF_HUB_OFFLINE and not commit.startswith(cfg.revision):
            raise UserError(
                f"data.revision={cfg.revision} cannot be resolved offline: the cached {repo} is commit {commit}; "
                f"set data.revision={commit}, or load it once where the hub can be reached"
            )
        where = f"{cfg.path}{f' config {cfg.hf_config}' if cfg.hf_config else ''} commit {commit}"
    else:
        try:
            dd = datasets.load_from_disk(cfg.path)
        except FileNotFoundError as e:
            raise UserError(f"data.path={cfg.path} holds no dataset saved with save_to_disk ({e})") from None
        except ValueError as e:  # also a column of a type datasets does not know (e.g. pickled Python objects)
            raise UserError(
                f"data.path={cfg.path} could not be read as a saved dataset: {str(e).splitlines()[0]}"
            ) from None
        if not isinstance(dd, datasets.DatasetDict):
            raise UserError(f"data.path={cfg.path} is one Dataset, not a DatasetDict of train and test splits")
        where = str(Path(cfg.path).resolve())
    names = dict(cfg.hf_splits) or {SPLIT_NAMES[n.lower()]: n for n in dd if n.lower() in SPLIT_NAMES}
    for ours in ("train", "val", "test"):
        if (ours != "val" or ours in names) and names.get(ours) not in dd:
            raise UserError(
                f"{where} has no split {names.get(ours, ours)!r} for {ours} (its splits: {list(dd)}); name its "
                "splits with data.hf_splits={train: NAME, val: NAME, test: NAME}"
            )
    parts = []
    for ours, theirs in names.items():
        table = dd[theirs].with_format("arrow")[:]  # the rows as Arrow (any index mapping applied), not converted
        wanted = table.select([c for c in (cfg.text_column, cfg.label_column) if c in table.column_names])
        df = select_columns(plain_pandas(wanted, f"{where} split {theirs}"), cfg, table.column_names, where)
        feature = dd[theirs].features.get(cfg.label_column)
        if isinstance(feature, datasets.ClassLabel):
            df["label"] = [feature.names[v] if v >= 0 else None for v in df["label"]]
        parts.append(df.assign(split=ours))
    return pd.concat(parts), where, {ours: f"{where} split {theirs}" for ours, theirs in names.items()}
