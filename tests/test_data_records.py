"""read_record on real PTB-XL files, on WFDB files written from them, and on broken copies."""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import wfdb
from scipy.signal import resample_poly
from wfdb.io.convert.matlab import wfdb_to_mat

from leadtune.trainables.data.leads import LEADS
from leadtune.trainables.data.preprocess import PreprocessConfig, highpass
from leadtune.trainables.data.records import RecordError, read_record

RAW = PreprocessConfig(highpass_hz=None)
MIXED_CASE = ["i", "II", "iii", "avr", "AVL", "aVf", "v1", "V2", "v3", "V4", "v5", "V6"]


@pytest.fixture
def record_1(ptbxl_sample) -> Path:
    return ptbxl_sample / "records100" / "00000" / "00001_lr"


@pytest.fixture
def copied(record_1, tmp_path) -> Path:
    """A private copy of record 1 (header and .dat) to damage."""
    for suffix in (".hea", ".dat"):
        shutil.copy(record_1.with_suffix(suffix), tmp_path / f"00001_lr{suffix}")
    return tmp_path / "00001_lr"


def _edit_header(record: Path, old: str, new: str, count: int = 1) -> Path:
    header = record.with_suffix(".hea")
    text = header.read_text()
    assert old in text
    header.write_text(text.replace(old, new, count))
    return header


def _raises_naming(path: Path, match: str, **kwargs) -> str:
    with pytest.raises(RecordError, match=match) as info:
        read_record(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_real_record_matches_wfdb(record_1):
    expected, fields = wfdb.rdsamp(str(record_1))
    assert fields["units"] == ["mV"] * 12 and fields["fs"] == 100
    for path in (record_1, record_1.with_suffix(".hea"), record_1.with_suffix(".dat")):
        record = read_record(path, RAW)
        assert record.signal.shape == (12, 1000) and record.signal.dtype == np.float32
        np.testing.assert_allclose(record.signal, expected.T, atol=1e-6)
    assert record.leads == list(LEADS)
    assert record.channel_names == ["I", "II", "III", "AVR", "AVL", "AVF"] + list(LEADS[6:])
    assert (record.fs, record.fs_original, record.name) == (100, 100, "00001_lr")
    assert record.path == record_1.with_suffix(".hea")
    filtered = read_record(record_1)
    np.testing.assert_allclose(filtered.signal, highpass(expected.T, 100), atol=1e-6)


def test_shared_subset_resampled_record(ptbxl_subset):
    # ecg_id 21836 is one of the subset's records resampled from 500 Hz.
    path = ptbxl_subset / "records100" / "21000" / "21836_lr"
    expected, _ = wfdb.rdsamp(str(path))
    np.testing.assert_allclose(read_record(path, RAW).signal, expected.T, atol=1e-6)


@pytest.mark.parametrize("gain", ["1.0(0)/uV", "1000000.0(0)/V", "1000.0(0)"])
def test_units_are_converted_to_millivolts(copied, record_1, gain):
    # The same digital samples described in other units must read as the same millivolts.
    _edit_header(copied, "1000.0(0)/mV", gain, count=12)
    expected, _ = wfdb.rdsamp(str(record_1))
    np.testing.assert_allclose(read_record(copied, RAW).signal, expected.T, atol=1e-6)


def _write(path: Path, fs: int, names: list[str], signal: np.ndarray, fmt: str = "16") -> None:
    wfdb.wrsamp(
        path.name,
        fs=fs,
        units=["mV"] * len(names),
        sig_name=names,
        p_signal=signal,
        fmt=[fmt] * len(names),
        adc_gain=[1000.0] * len(names),
        baseline=[0] * len(names),
        write_dir=str(path.parent),
    )


def test_500hz_mat_record_with_mixed_case_names(record_1, tmp_path, monkeypatch):
    original, _ = wfdb.rdsamp(str(record_1))
    _write(tmp_path / "rec500", 500, MIXED_CASE, resample_poly(original, 5, 1, axis=0))
    monkeypatch.chdir(tmp_path)  # wfdb_to_mat writes into the working directory
    wfdb_to_mat("rec500")
    (tmp_path / "rec500.dat").unlink()  # so only the .mat can be read
    assert "rec500m.mat" in (tmp_path / "rec500m.hea").read_text()

    record = read_record(tmp_path / "rec500m.mat", RAW)
    assert record.leads == list(LEADS) and record.channel_names == MIXED_CASE
    assert (record.fs, record.fs_original) == (100, 500)
    error = np.abs(record.signal - original.T)
    assert error.max() < 0.02 and error.mean() < 0.001  # mV, after 100 -> 500 -> 100 Hz


def test_challenge_style_v4_mat(record_1, tmp_path):
    # PhysioNet Challenge files: a MATLAB v4 'val' int16 matrix, header format "16+24".
    from scipy.io import savemat

    original, _ = wfdb.rdsamp(str(record_1))
    savemat(
        tmp_path / "A0001.mat", {"val": np.round(original.T * 1000).astype(np.int16)}, format="4"
    )
    lines = ["A0001 12 100 1000"] + [
        f"A0001.mat 16+24 1000/mV 16 0 0 0 0 {name}" for name in MIXED_CASE
    ]
    (tmp_path / "A0001.hea").write_text("\n".join(lines) + "\n")
    record = read_record(tmp_path / "A0001", RAW)
    np.testing.assert_allclose(record.signal, original.T, atol=1e-6)


def test_nonstandard_channels_are_dropped_for_the_cache_and_kept_for_labelling(record_1, tmp_path):
    original, _ = wfdb.rdsamp(str(record_1))
    extra = np.column_stack([original, original[:, 0] * 0.5])
    _write(tmp_path / "extra", 100, list(LEADS) + ["VX"], extra)
    record = read_record(tmp_path / "extra", RAW)  # the cache orders leads by name
    assert record.signal.shape == (12, 1000) and record.leads == list(LEADS)
    np.testing.assert_allclose(record.signal, original.T, atol=1e-6)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = read_record(tmp_path / "extra", RAW, require_leads=False)
    assert kept.leads == list(LEADS) + [None] and kept.channel_names[-1] == "VX"
    np.testing.assert_allclose(kept.signal[-1], original[:, 0] * 0.5, atol=1e-3)
    fewer = read_record(tmp_path / "extra", RAW, require_leads=False, exclude=("vx", 0))
    assert fewer.channel_names == list(LEADS[1:]) and fewer.channel_indices == list(range(1, 12))


def test_channel_names_are_not_needed_for_labelling(record_1, tmp_path):
    original, _ = wfdb.rdsamp(str(record_1))
    for case, names in {
        "neutral": [f"ch{i}" for i in range(12)],
        "empty": [""] * 12,
        "repeated": ["II"] * 12,
    }.items():
        # wfdb writes unique names only: write neutral ones, then edit the header's name fields
        _write(tmp_path / case, 100, [f"ch{i}" for i in range(12)], original)
        header = (tmp_path / case).with_suffix(".hea")
        lines = header.read_text().splitlines()
        lines[1:13] = [
            line.rsplit(" ", 1)[0] + (f" {name}" if name else "")
            for line, name in zip(lines[1:13], names)
        ]
        header.write_text("\n".join(lines) + "\n")
        record = read_record(tmp_path / case, RAW, require_leads=False)
        assert record.signal.shape == (12, 1000) and record.channel_names == names
        np.testing.assert_allclose(record.signal, original.T, atol=1e-6)
    with pytest.raises(RecordError, match="no such channel"):
        read_record(tmp_path / "neutral", RAW, require_leads=False, exclude=("resp",))
    with pytest.raises(RecordError, match="channels 0..11"):
        read_record(tmp_path / "neutral", RAW, require_leads=False, exclude=(12,))


def test_fewer_than_12_leads(record_1, tmp_path):
    original, _ = wfdb.rdsamp(str(record_1))
    chosen = [1, 7, 3]  # II, V2, aVR, in that order
    _write(tmp_path / "three", 100, ["II", "V2", "AVR"], original[:, chosen])
    record = read_record(tmp_path / "three.hea", RAW)
    assert record.leads == ["II", "V2", "aVR"]
    np.testing.assert_allclose(record.signal, original[:, chosen].T, atol=1e-6)


def test_missing_header(tmp_path):
    message = _raises_naming(tmp_path / "nothing.dat", "header not found")
    assert str(tmp_path / "nothing.hea") in message


def test_missing_signal_file(copied):
    copied.with_suffix(".dat").unlink()
    message = _raises_naming(copied, "not found")
    assert str(copied.with_suffix(".dat")) in message


def test_truncated_signal_file(copied):
    dat = copied.with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[:10_000])
    message = _raises_naming(copied, "truncated")
    assert str(dat) in message and "10000" in message


def test_header_sample_count_mismatch(copied):
    _edit_header(copied, "00001_lr 12 100 1000", "00001_lr 12 100 800")
    assert str(copied.with_suffix(".dat")) in _raises_naming(copied, "mismatch")


def test_header_channel_count_mismatch(copied):
    header = copied.with_suffix(".hea")
    lines = header.read_text().splitlines()
    header.write_text("\n".join(["00001_lr 11 100 1000"] + lines[1:12]) + "\n")  # V6 dropped
    assert "11 channel(s)" in _raises_naming(copied, "mismatch")


def test_nan_samples(copied):
    # -32768 is WFDB's invalid-sample value in format 16; wfdb reads it as NaN.
    dat = copied.with_suffix(".dat")
    samples = np.fromfile(dat, dtype="<i2").reshape(1000, 12)
    samples[100:110, 8] = -32768
    samples.tofile(dat)
    message = _raises_naming(copied, "NaN")
    assert str(copied.with_suffix(".hea")) in message and "V3 (10)" in message


def test_duplicated_lead_names(copied):
    _edit_header(copied, " 0 AVL", " 0 avr")
    assert str(copied.with_suffix(".hea")) in _raises_naming(copied, "appears twice")


def test_unsupported_format(copied):
    _edit_header(copied, "00001_lr.dat 16 ", "00001_lr.dat 999 ", count=12)
    assert str(copied.with_suffix(".hea")) in _raises_naming(copied, "format '999'")


def test_unreadable_header(copied):
    copied.with_suffix(".hea").write_text("this is not a header\n")
    assert str(copied.with_suffix(".hea")) in _raises_naming(copied, "gives no channel count")


def test_no_standard_lead(copied):
    header = copied.with_suffix(".hea")
    lines = header.read_text().splitlines()
    renamed = [line.rsplit(" ", 1)[0] + f" X{i}" for i, line in enumerate(lines[1:13])]
    header.write_text("\n".join([lines[0], *renamed]) + "\n")
    assert str(header) in _raises_naming(copied, "no standard ECG lead")


def test_non_voltage_units(copied):
    _edit_header(copied, "1000.0(0)/mV", "1000.0(0)/mmHg", count=1)
    assert str(copied.with_suffix(".hea")) in _raises_naming(copied, "units 'mmHg'")
