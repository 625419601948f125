"""Signal preprocessing shared by training and labelling: resampling and the baseline high-pass.

Signals stay in mV and are never normalised, because amplitude is itself a cue to the lead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw signals become model input; the defaults reproduce the reference model."""

    fs: int = 100
    highpass_hz: float | None = 0.5  # None disables the high-pass
    highpass_order: int = 4
    zero_phase: bool = False  # the reference filters causally (lfilter)
    # Clip the filtered signal to +-clip_mv (None: no clipping, as the reference). An option
    # for data whose artefacts (pacemaker spikes, electrode pops) should not reach the model.
    clip_mv: float | None = None

    def __post_init__(self) -> None:
        if self.highpass_hz == 0:
            # 0 is how the CLI says "no high-pass"; store it as None so both spell one cache key
            object.__setattr__(self, "highpass_hz", None)
        if self.fs <= 0:
            raise ValueError(f"sampling rate must be positive, got fs={self.fs}")
        if self.clip_mv == 0:
            object.__setattr__(self, "clip_mv", None)  # 0 is the CLI's "no clipping"
        if self.clip_mv is not None and self.clip_mv < 0:
            raise ValueError(f"clip_mv must be a positive amplitude in mV, got {self.clip_mv}")
        if self.highpass_hz is not None and not 0 < self.highpass_hz < self.fs / 2:
            raise ValueError(
                f"high-pass cut-off {self.highpass_hz} Hz must lie between 0 and the Nyquist "
                f"frequency {self.fs / 2} Hz (use None or 0 to disable it)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def highpass(
    signal: np.ndarray,
    fs: float,
    cutoff_hz: float = 0.5,
    order: int = 4,
    zero_phase: bool = False,
) -> np.ndarray:
    """Butterworth high-pass along the last axis, designed at `fs`; returns float32.

    Causal (sosfilt) by default like the reference; `zero_phase` runs it forwards and backwards.
    """
    from scipy import signal as sps  # here, not at the top: ~1 CPU s a search's driver skips

    sos = sps.butter(order, cutoff_hz, btype="highpass", fs=fs, output="sos")
    x = np.asarray(signal, dtype=np.float64)
    filtered = sps.sosfiltfilt(sos, x, axis=-1) if zero_phase else sps.sosfilt(sos, x, axis=-1)
    return filtered.astype(np.float32)


def _rate_ratio(fs_in: float, fs_out: float) -> tuple[int, int]:
    """Integer (up, down) with up/down == fs_out/fs_in, reduced by their gcd."""
    ratio = Fraction(fs_out).limit_denominator(10_000) / Fraction(fs_in).limit_denominator(10_000)
    return ratio.numerator, ratio.denominator


def resample(signal: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Polyphase resampling along the last axis (float64 in, same dtype out)."""
    up, down = _rate_ratio(fs_in, fs_out)
    if up == down:
        return np.asarray(signal)
    from scipy import signal as sps

    # padtype="line" extends the signal linearly at the edges: zero padding would turn an
    # ECG's DC offset into edge ringing.
    return sps.resample_poly(signal, up, down, axis=-1, padtype="line")


PREPROCESS_KEYS = ("fs", "highpass_hz", "highpass_order", "zero_phase", "clip_mv")


def preprocess_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The :class:`PreprocessConfig` fields of a dict (a manifest, a model card)."""
    return {key: values[key] for key in PREPROCESS_KEYS if key in values}


def preprocess(signal: np.ndarray, fs_in: float, config: PreprocessConfig) -> np.ndarray:
    """Resample to config.fs, high-pass, clip if asked; (..., T) mV -> (..., T') float32 mV."""
    x = resample(np.asarray(signal, dtype=np.float64), fs_in, config.fs)
    if config.highpass_hz is not None:
        x = highpass(x, config.fs, config.highpass_hz, config.highpass_order, config.zero_phase)
    if config.clip_mv is not None:
        x = np.clip(x, -config.clip_mv, config.clip_mv)
    return np.asarray(x, dtype=np.float32)
