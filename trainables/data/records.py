"""Reading one WFDB ECG record (header + .dat or .mat signal file) into preprocessed leads in mV.

This is the reader behind `leadtune label` and the PTB-XL cache: any sampling rate, any WFDB
sample format wfdb can decode, lead names matched case-insensitively, fewer than 12 leads
allowed. Every problem with the input is a `RecordError` whose one-line message names the file.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainables.data.leads import canonical_lead
from trainables.data.preprocess import PreprocessConfig
from trainables.data.preprocess import preprocess as preprocess_signal

RECORD_SUFFIXES = (".hea", ".dat", ".mat")

# Bytes per sample of the uncompressed WFDB formats (212 packs two 12-bit samples in 3 bytes,
# 310/311 three 10-bit samples in 4 bytes).
_BYTES_PER_SAMPLE = {
    "8": 1,
    "16": 2,
    "24": 3,
    "32": 4,
    "61": 2,
    "80": 1,
    "160": 2,
    "212": 1.5,
    "310": 4 / 3,
    "311": 4 / 3,
}
_FLAC_FORMATS = ("508", "516", "524")  # sizes unknown until decoded
# A MATLAB writer may pad the data element to a multiple of 8 bytes.
_PADDING_SLACK_BYTES = 8

_MV_PER_UNIT = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "nv": 1e-6, "v": 1e3}


class RecordError(ValueError):
    """A WFDB record that cannot be used; the message names the file and the fix."""


@dataclass
class Record:
    """One ECG record after reading and preprocessing."""

    name: str
    path: Path  # the .hea header file
    signal: np.ndarray  # (K, T) float32 mV, preprocessed
    channel_names: list[str]  # as in the header, one per row of signal
    leads: list[str | None]  # canonical lead names; None for kept non-standard channels
    fs: int  # after resampling
    fs_original: int


def header_path(path: str | Path) -> Path:
    """The .hea file of a record given as name, header, .dat or .mat path."""
    path = Path(path)
    if path.suffix.lower() in RECORD_SUFFIXES:
        path = path.with_suffix("")
    return path.with_name(path.name + ".hea")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no details"
    return f"{type(exc).__name__}: {text}"


def _read_header(header: Path):
    import wfdb

    try:
        meta = wfdb.rdheader(str(header.with_suffix("")))
    except Exception as exc:  # wfdb raises anything from KeyError to its own syntax errors
        raise RecordError(
            f"{header}: not a readable WFDB header ({_one_line(exc)}); check the file format"
        ) from exc
    if getattr(meta, "n_seg", None) is not None:
        raise RecordError(
            f"{header}: multi-segment WFDB records are not supported; "
            "write the record as a single segment (wfdb.wrsamp)"
        )
    return meta


def _check_signal_files(header: Path, meta) -> None:
    """Format, existence and size of every signal file, before wfdb reads (and misreads) them."""
    if not meta.n_sig:
        raise RecordError(f"{header}: the header lists no signals; is it the right file?")
    if meta.file_name is None:  # what wfdb leaves of a multi-segment record
        raise RecordError(
            f"{header}: multi-segment WFDB records are not supported; "
            "write the record as a single segment (wfdb.wrsamp)"
        )
    names = list(meta.sig_name)
    for fmt, name in zip(meta.fmt, names):
        if fmt not in _BYTES_PER_SAMPLE and fmt not in _FLAC_FORMATS:
            raise RecordError(
                f"{header}: channel {name!r} has WFDB sample format {fmt!r}, which is not "
                f"supported; re-write the record in format 16 or 212 (wfdb.wrsamp)"
            )
    if any(spf not in (None, 1) for spf in meta.samps_per_frame):
        raise RecordError(
            f"{header}: channels with several samples per frame are not supported; "
            "re-write the record with one sampling rate for all channels"
        )
    if meta.sig_len == 0:
        raise RecordError(f"{header}: the header says the record has 0 samples")

    # Channels that share a file are interleaved in it, so size checks go per file.
    files: dict[str, list[int]] = {}
    for channel, file_name in enumerate(meta.file_name):
        files.setdefault(file_name, []).append(channel)
    for file_name, channels in files.items():
        signal_file = header.parent / file_name
        if not signal_file.is_file():
            raise RecordError(
                f"{signal_file}: signal file named in {header.name} not found; "
                "copy it beside the header or fix the file name in the header"
            )
        fmt = meta.fmt[channels[0]]
        if fmt in _FLAC_FORMATS or meta.sig_len is None:
            continue
        offset = meta.byte_offset[channels[0]] or 0
        expected = offset + math.ceil(meta.sig_len * len(channels) * _BYTES_PER_SAMPLE[fmt])
        actual = signal_file.stat().st_size
        layout = (
            f"{header.name} says {len(channels)} channel(s) x {meta.sig_len} samples "
            f"in format {fmt} = {expected} bytes, the file has {actual}"
        )
        if actual < expected:
            raise RecordError(
                f"{signal_file}: signal file is truncated or does not match its header "
                f"({layout}); re-copy the record or fix the header"
            )
        if actual - expected >= _PADDING_SLACK_BYTES:
            raise RecordError(
                f"{signal_file}: header/signal mismatch ({layout}); fix the sample count "
                "or the channel list in the header"
            )


def _to_millivolts(header: Path, units: list[str], names: list[str]) -> np.ndarray:
    scale = np.empty(len(units))
    for i, (unit, name) in enumerate(zip(units, names)):
        key = (unit or "mV").strip().casefold()
        if key not in _MV_PER_UNIT:
            raise RecordError(
                f"{header}: channel {name!r} is in units {unit!r}; expected a voltage "
                "(uV, mV or V) in the header's gain field"
            )
        scale[i] = _MV_PER_UNIT[key]
    return scale


def read_record(
    path: str | Path,
    preprocess: PreprocessConfig = PreprocessConfig(),
    keep_nonstandard: bool = False,
) -> Record:
    """Read a WFDB record (path with or without .hea/.dat/.mat) as preprocessed leads in mV.

    Non-standard channels are dropped with a warning unless `keep_nonstandard`; the signal is
    resampled to `preprocess.fs` and high-passed as configured.
    """
    import wfdb  # deferred: wfdb pulls in pandas and matplotlib

    header = header_path(path)
    if not header.is_file():
        raise RecordError(
            f"{header}: WFDB header not found; give the path of a record's .hea file "
            "(its .dat or .mat signal file must sit beside it)"
        )
    # wfdb's header parser costs ~15 ms, most of a read, so the header is parsed only once on
    # the good path; on failure it is parsed again to say precisely what is wrong.
    try:
        data = wfdb.rdrecord(str(header.with_suffix("")), physical=True, return_res=64)
    except Exception as exc:  # wfdb raises anything from KeyError to its own syntax errors
        _check_signal_files(header, _read_header(header))
        raise RecordError(
            f"{header}: WFDB could not read the signal ({_one_line(exc)}); "
            "check that the signal file matches the header"
        ) from exc
    _check_signal_files(header, data)

    channel_names = [str(name) for name in data.sig_name]
    leads = [canonical_lead(name) for name in channel_names]
    seen: dict[str, str] = {}
    for name, lead in zip(channel_names, leads):
        if lead is None:
            continue
        if lead in seen:
            raise RecordError(
                f"{header}: lead {lead} appears twice (channels {seen[lead]!r} and {name!r}); "
                "rename or remove the duplicate channel in the header"
            )
        seen[lead] = name
    if not seen:
        raise RecordError(
            f"{header}: no standard ECG lead among channels {channel_names}; expected names "
            "like I, II, aVR, V1 (matched case-insensitively)"
        )
    signal = np.asarray(data.p_signal, dtype=np.float64).T  # (K, T)

    keep = [i for i, lead in enumerate(leads) if lead is not None or keep_nonstandard]
    dropped = [channel_names[i] for i, lead in enumerate(leads) if lead is None]
    if dropped and not keep_nonstandard:
        warnings.warn(
            f"{header}: ignoring non-standard channel(s) {', '.join(dropped)}; "
            "pass keep_nonstandard=True to keep them",
            stacklevel=2,
        )
    units = [data.units[i] for i in keep]
    kept_names = [channel_names[i] for i in keep]
    signal = signal[keep] * _to_millivolts(header, units, kept_names)[:, None]

    missing = np.isnan(signal).sum(axis=1)
    if missing.any():
        bad = ", ".join(f"{kept_names[i]} ({n})" for i, n in enumerate(missing) if n)
        raise RecordError(
            f"{header}: missing samples (NaN, the WFDB invalid-sample value) in {bad}; "
            "interpolate or drop those channels before labelling"
        )

    fs_original = float(data.fs)
    try:
        processed = preprocess_signal(signal, fs_original, preprocess)
    except ValueError as exc:  # e.g. a record too short for the zero-phase filter
        raise RecordError(f"{header}: cannot preprocess the signal ({_one_line(exc)})") from exc
    return Record(
        name=str(data.record_name),
        path=header,
        signal=processed,
        channel_names=kept_names,
        leads=[leads[i] for i in keep],
        fs=preprocess.fs,
        fs_original=int(round(fs_original)),
    )
