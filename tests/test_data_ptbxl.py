"""PTB-XL tables: labels recomputed independently, bad folders, and the 100/500 Hz file choice."""

import ast
import csv
import shutil
from pathlib import Path

import pytest

from leadtune.trainables.data.ptbxl import (
    SUPERCLASSES,
    DatasetError,
    SplitConfig,
    load_database,
    record_file,
)


def _superclasses_by_hand(folder: Path) -> dict[int, set[str]]:
    with open(folder / "scp_statements.csv", newline="") as f:
        superclass = {
            row[""]: row["diagnostic_class"]
            for row in csv.DictReader(f)
            if row["diagnostic"] == "1.0"
        }
    result = {}
    with open(folder / "ptbxl_database.csv", newline="") as f:
        for row in csv.DictReader(f):
            codes = ast.literal_eval(row["scp_codes"])
            result[int(row["ecg_id"])] = {superclass[c] for c in codes if c in superclass}
    return result


def test_load_database_sample(ptbxl_sample):
    database = load_database(ptbxl_sample)
    assert len(database) == 500 and database.index.name == "ecg_id"
    assert list(database.index) == list(range(1, 501))
    assert database.loc[1, "scp_codes"] == {"NORM": 100.0, "LVOLT": 0.0, "SR": 0.0}
    assert database.loc[1, "superclasses"] == ["NORM"]
    assert database.loc[1, "filename_lr"] == "records100/00000/00001_lr"
    assert database["labelled"].all()
    by_hand = _superclasses_by_hand(ptbxl_sample)
    for ecg_id, classes in database["superclasses"].items():
        assert set(classes) == by_hand[ecg_id]
        assert classes == [c for c in SUPERCLASSES if c in classes]  # canonical order


def test_load_database_subset_labels(ptbxl_subset):
    database = load_database(ptbxl_subset)
    assert len(database) == 2992
    assert database["labelled"].sum() == 1536  # README: official codes known for 1,536
    assert database.loc[database["strat_fold"] >= 9, "labelled"].all()


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="folder not found") as info:
        load_database(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


@pytest.mark.parametrize("missing", ["ptbxl_database.csv", "scp_statements.csv"])
def test_missing_csv(ptbxl_sample, tmp_path, missing):
    for name in ("ptbxl_database.csv", "scp_statements.csv"):
        if name != missing:
            shutil.copy(ptbxl_sample / name, tmp_path / name)
    with pytest.raises(DatasetError, match="file not found") as info:
        load_database(tmp_path)
    assert str(tmp_path / missing) in str(info.value)


def test_missing_column(ptbxl_sample, tmp_path):
    shutil.copy(ptbxl_sample / "scp_statements.csv", tmp_path)
    text = (ptbxl_sample / "ptbxl_database.csv").read_text()
    (tmp_path / "ptbxl_database.csv").write_text(text.replace("strat_fold,", "fold,", 1))
    with pytest.raises(DatasetError, match="strat_fold") as info:
        load_database(tmp_path)
    assert str(tmp_path / "ptbxl_database.csv") in str(info.value)


def test_split_config():
    assert SplitConfig().split_of_fold()[8] == "train"
    assert SplitConfig().split_of_fold()[10] == "test"
    with pytest.raises(ValueError, match=r"\[9\]"):
        SplitConfig(val_folds=(9,), test_folds=(9, 10))


def test_record_file_choice(tmp_path):
    (tmp_path / "records100").mkdir()
    (tmp_path / "records500").mkdir()
    (tmp_path / "records100" / "1_lr.hea").touch()
    (tmp_path / "records500" / "1_hr.hea").touch()
    (tmp_path / "records500" / "2_hr.hea").touch()
    lr, hr = "records100/1_lr", "records500/1_hr"
    assert record_file(tmp_path, lr, hr, 100) == tmp_path / f"{lr}.hea"
    assert record_file(tmp_path, lr, hr, 50) == tmp_path / f"{lr}.hea"
    assert record_file(tmp_path, lr, hr, 500) == tmp_path / f"{hr}.hea"
    assert record_file(tmp_path, lr, hr, 250) == tmp_path / f"{hr}.hea"
    # no 100 Hz file: the 500 Hz one is resampled
    assert record_file(tmp_path, "records100/2_lr", "records500/2_hr", 100).name == "2_hr.hea"
    # only a 100 Hz file and a higher target rate: never upsampled, so missing
    assert record_file(tmp_path, lr, "", 500) is None
    assert record_file(tmp_path, "records100/3_lr", "records500/3_hr", 100) is None
