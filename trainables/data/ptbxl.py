"""The PTB-XL tables of a PhysioNet-layout folder: records, folds, SCP codes and superclasses."""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

DATABASE_CSV = "ptbxl_database.csv"
STATEMENTS_CSV = "scp_statements.csv"
SUPERCLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")
SPLITS: tuple[str, ...] = ("train", "val", "test")

_DATABASE_COLUMNS = ("ecg_id", "strat_fold", "filename_lr", "filename_hr", "scp_codes")
_STATEMENT_COLUMNS = ("diagnostic", "diagnostic_class")


class DatasetError(ValueError):
    """A dataset folder or cache that cannot be used; the message names the path and the fix."""


@dataclass(frozen=True)
class SplitConfig:
    """Which PTB-XL strat_folds make up each split (the official one by default)."""

    train_folds: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    val_folds: tuple[int, ...] = (9,)
    test_folds: tuple[int, ...] = (10,)

    def __post_init__(self) -> None:
        for name in ("train_folds", "val_folds", "test_folds"):
            object.__setattr__(self, name, tuple(int(f) for f in getattr(self, name)))
        folds = [*self.train_folds, *self.val_folds, *self.test_folds]
        shared = sorted({f for f in folds if folds.count(f) > 1})
        if shared:
            raise ValueError(
                f"fold(s) {shared} are in more than one split; give each fold to one split only"
            )

    def split_of_fold(self) -> dict[int, str]:
        return {
            **{f: "train" for f in self.train_folds},
            **{f: "val" for f in self.val_folds},
            **{f: "test" for f in self.test_folds},
        }

    def to_dict(self) -> dict[str, Any]:
        return {name: list(folds) for name, folds in asdict(self).items()}


def database_files(source: Path) -> tuple[Path, Path]:
    """The two PTB-XL tables of `source`, checked to exist."""
    source = Path(source)
    if not source.is_dir():
        raise DatasetError(
            f"{source}: PTB-XL folder not found; pass the folder that holds {DATABASE_CSV}"
        )
    files = (source / DATABASE_CSV, source / STATEMENTS_CSV)
    for path in files:
        if not path.is_file():
            raise DatasetError(
                f"{path}: file not found; the source must be a PTB-XL folder as downloaded "
                f"from PhysioNet (with {DATABASE_CSV}, {STATEMENTS_CSV} and records100/)"
            )
    return files


def check_source(request: Any) -> None:
    """A DataRequest's source is a PTB-XL folder (the two tables present); its limit, if any,
    is positive. For the tasks' ``check_data``: one line before any search starts."""
    database_files(Path(request.source))
    if request.limit is not None and request.limit < 1:
        raise DatasetError(f"--limit must be at least 1 record, got {request.limit}")


def _read_csv(path: Path, required: tuple[str, ...], **kwargs: Any) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, **kwargs)
    except Exception as exc:  # pandas raises several parser error types
        raise DatasetError(f"{path}: not a readable CSV file ({exc})") from exc
    missing = [c for c in required if c not in table.columns and c != table.index.name]
    if missing:
        raise DatasetError(
            f"{path}: required column(s) {', '.join(missing)} missing; "
            "is this the PTB-XL file (version 1.0.x)?"
        )
    return table


def _parse_scp_codes(text: Any, path: Path, ecg_id: int) -> dict[str, float]:
    if not isinstance(text, str) or not text.strip():
        return {}
    try:
        codes = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise DatasetError(
            f"{path}: scp_codes of ecg_id {ecg_id} is not a dict literal ({text!r})"
        ) from exc
    if not isinstance(codes, dict):
        raise DatasetError(f"{path}: scp_codes of ecg_id {ecg_id} is not a dict ({text!r})")
    return {str(k): float(v) for k, v in codes.items()}


def diagnostic_superclass_map(statements: pd.DataFrame) -> dict[str, str]:
    """SCP code -> diagnostic superclass, for the codes with diagnostic == 1."""
    diagnostic = statements[statements["diagnostic"] == 1]
    return {
        str(code): str(cls)
        for code, cls in diagnostic["diagnostic_class"].items()
        if str(cls) in SUPERCLASSES
    }


def load_database(source: Path) -> pd.DataFrame:
    """ptbxl_database.csv indexed by ecg_id, with parsed `scp_codes`, `superclasses`, `labelled`.

    `superclasses` lists the diagnostic superclasses (in SUPERCLASSES order) of the record's
    SCP codes; `labelled` is True where the record has any SCP code at all.
    """
    database_csv, statements_csv = database_files(source)
    database = _read_csv(database_csv, _DATABASE_COLUMNS)
    statements = _read_csv(statements_csv, _STATEMENT_COLUMNS, index_col=0)

    try:
        database["ecg_id"] = database["ecg_id"].astype(int)
        database["strat_fold"] = database["strat_fold"].astype(int)
    except (ValueError, TypeError) as exc:
        raise DatasetError(
            f"{database_csv}: ecg_id and strat_fold must be whole numbers ({exc})"
        ) from exc
    if database["ecg_id"].duplicated().any():
        dupes = database.loc[database["ecg_id"].duplicated(), "ecg_id"].tolist()[:5]
        raise DatasetError(f"{database_csv}: ecg_id(s) {dupes} appear more than once")
    database = database.set_index("ecg_id").sort_index()
    for column in ("filename_lr", "filename_hr"):
        database[column] = database[column].fillna("").astype(str)

    superclass_of = diagnostic_superclass_map(statements)
    database["scp_codes"] = [
        _parse_scp_codes(text, database_csv, ecg_id)
        for ecg_id, text in database["scp_codes"].items()
    ]
    database["superclasses"] = [
        [c for c in SUPERCLASSES if c in {superclass_of.get(code) for code in codes}]
        for codes in database["scp_codes"]
    ]
    database["labelled"] = database["scp_codes"].map(bool)
    return database


def record_file(source: Path, filename_lr: str, filename_hr: str, fs: int) -> Path | None:
    """The WFDB header to read for a record at target rate `fs`, or None if neither exists.

    The 100 Hz file is used when it needs no upsampling (fs <= 100); otherwise the 500 Hz
    file, resampled. Upsampling 100 Hz data would invent content, so it is never done.
    """
    source = Path(source)
    if filename_lr and fs <= 100:
        header = source / f"{filename_lr}.hea"
        if header.is_file():
            return header
    if filename_hr:
        header = source / f"{filename_hr}.hea"
        if header.is_file():
            return header
    return None
