"""Reading one WFDB ECG record (header + .dat or .mat signal file) into preprocessed leads in mV.

This is the reader behind `leadtune label` and the PTB-XL cache: any sampling rate, any WFDB
sample format wfdb can decode, fewer than 12 leads allowed. The cache needs the header's lead
names (matched case-insensitively) to order the leads; labelling needs no names at all
(``require_leads=False``): any channel names, empty or repeated, are kept as the header has them.
Every problem with the input is a `RecordError` whose one-line message names the file, raised
before the signal is used: a header without a sampling frequency (wfdb would silently assume
250 Hz) or with frequency 0, a channel count that does not match the channel lines, and a
recording whose channels are all flat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leadtune.trainables.data.leads import canonical_lead
from leadtune.trainables.data.preprocess import PreprocessConfig
from leadtune.trainables.data.preprocess import preprocess as preprocess_signal

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
    fs_original: float
    channel_indices: list[int] = field(default_factory=list)  # rows' positions in the header
    flat: list[bool] = field(default_factory=list)  # constant channel (no signal at all)
    peak_mv: float = 0.0  # largest |sample| after preprocessing
    header_channels: int = 0  # channels the header lists (kept or not)


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


def check_header_text(header: Path) -> None:
    """What wfdb would read wrongly or crash on, said in one line: the record line's channel
    count, sampling frequency (absent: wfdb assumes 250 Hz) and the channel lines."""
    try:
        lines = [
            line.strip()
            for line in header.read_text(errors="replace").splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    except OSError as exc:
        raise RecordError(f"{header}: unreadable header ({exc.strerror or exc})") from None
    if not lines:
        raise RecordError(f"{header}: empty header; is it the right file?")
    fields = lines[0].split()
    if "/" in fields[0]:  # a multi-segment record line (NAME/SEGMENTS ...): checked by wfdb
        return
    if len(fields) < 2 or not fields[1].isdigit():
        raise RecordError(
            f"{header}: the record line {lines[0]!r} gives no channel count; expected "
            "'NAME CHANNELS FS SAMPLES'"
        )
    n_sig = int(fields[1])
    if len(fields) < 3:
        raise RecordError(
            f"{header}: the record line {lines[0]!r} gives no sampling frequency (wfdb would "
            f"assume 250 Hz); add it, e.g. '{fields[0]} {n_sig} 500 5000' for 10 s at 500 Hz"
        )
    try:
        fs = float(fields[2].split("/")[0].split("(")[0])
    except ValueError:
        fs = float("nan")
    if not fs > 0:
        raise RecordError(
            f"{header}: sampling frequency {fields[2]!r} on the record line; it must be a "
            "positive number of Hz"
        )
    if len(lines) - 1 < n_sig:
        raise RecordError(
            f"{header}: the record line says {n_sig} channel(s) but {len(lines) - 1} channel "
            "line(s) follow; fix the count or the channel lines"
        )


def _select_channels(
    header: Path,
    channel_names: list[str],
    leads: list[str | None],
    require_leads: bool,
    exclude: Sequence[str | int],
) -> list[int]:
    """Rows to keep: without ``require_leads`` every channel except those excluded (by name,
    case-insensitive, or 0-based index); with it the standard leads, each once."""
    folded = [name.casefold() for name in channel_names]
    dropped: set[int] = set()
    for item in exclude:
        if isinstance(item, int) or str(item).isdigit():
            index = int(item)
            if not 0 <= index < len(channel_names):
                raise RecordError(
                    f"{header}: --exclude {index}: the record has channels 0..{len(channel_names) - 1}"
                )
            dropped.add(index)
        else:
            matches = [i for i, name in enumerate(folded) if name == str(item).casefold()]
            if not matches:
                raise RecordError(
                    f"{header}: --exclude {item!r}: no such channel among {channel_names}"
                )
            dropped.update(matches)
    if not require_leads:
        keep = [i for i in range(len(channel_names)) if i not in dropped]
        if not keep:
            raise RecordError(f"{header}: every channel is excluded; nothing is left to label")
        return keep
    seen: dict[str, str] = {}
    for i, (name, lead) in enumerate(zip(channel_names, leads)):
        if lead is None or i in dropped:
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
    return [i for i, lead in enumerate(leads) if lead is not None and i not in dropped]


def read_record(
    path: str | Path,
    preprocess: PreprocessConfig = PreprocessConfig(),
    require_leads: bool = True,
    exclude: Sequence[str | int] = (),
) -> Record:
    """Read a WFDB record (path with or without .hea/.dat/.mat) as preprocessed signals in mV.

    With ``require_leads`` (the PTB-XL cache) the standard leads are kept, found by their header
    names, and other channels are dropped; without it (labelling) every channel is kept whatever
    its name, except those in ``exclude`` (names or 0-based indices). The signal is resampled to
    ``preprocess.fs`` and high-passed (and clipped) as configured.
    """
    import wfdb  # deferred: wfdb pulls in pandas and matplotlib

    header = header_path(path)
    if not header.is_file():
        raise RecordError(
            f"{header}: WFDB header not found; give the path of a record's .hea file "
            "(its .dat or .mat signal file must sit beside it)"
        )
    check_header_text(header)
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

    channel_names = ["" if name is None else str(name) for name in data.sig_name]
    leads = [canonical_lead(name) for name in channel_names]
    keep = _select_channels(header, channel_names, leads, require_leads, exclude)
    units = [data.units[i] for i in keep]
    kept_names = [channel_names[i] for i in keep]
    signal = np.asarray(data.p_signal, dtype=np.float64).T[keep]  # (K, T)
    signal = signal * _to_millivolts(header, units, kept_names)[:, None]

    missing = np.isnan(signal).sum(axis=1)
    if missing.any():
        bad = ", ".join(f"{kept_names[i]} ({n})" for i, n in enumerate(missing) if n)
        raise RecordError(
            f"{header}: missing samples (NaN, the WFDB invalid-sample value) in {bad}; "
            "interpolate or drop those channels before labelling"
        )
    flat = [bool(np.ptp(row) == 0) for row in signal]
    if all(flat):
        raise RecordError(
            f"{header}: all {len(flat)} channel(s) are flat (constant, e.g. all zero): an empty "
            "or disconnected recording, nothing to read from it"
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
        fs_original=fs_original,
        channel_indices=keep,
        header_channels=len(channel_names),
        flat=flat,
        peak_mv=float(np.abs(processed).max()) if processed.size else 0.0,
    )
