"""Lead names, resampling and the high-pass, checked against independent scipy computations."""

import numpy as np
import pytest
from scipy import signal as sps

from leadtune.trainables.data.leads import LEADS, canonical_lead, lead_index
from leadtune.trainables.data.preprocess import PreprocessConfig, highpass, preprocess, resample


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("AVR", "aVR"),
        ("aVR", "aVR"),
        ("avr", "aVR"),
        (" aVL ", "aVL"),
        ("a VF", "aVF"),
        ("i", "I"),
        ("III", "III"),
        ("v6", "V6"),
        ("VX", None),
        ("V7", None),
        ("MLII", None),
        ("", None),
    ],
)
def test_canonical_lead(name, expected):
    assert canonical_lead(name) == expected


def test_lead_index():
    assert [lead_index(n.upper()) for n in LEADS] == list(range(12))
    assert lead_index("avf") == 5
    with pytest.raises(ValueError, match="VX"):
        lead_index("VX")


def test_highpass_matches_transfer_function_filtering():
    # The reference applies butter(4, 0.5 Hz) with lfilter; sos form must give the same output.
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.normal(size=(3, 1000)), axis=-1) + 2.0
    b, a = sps.butter(4, 0.5 / 50.0, btype="highpass")
    np.testing.assert_allclose(highpass(x, 100), sps.lfilter(b, a, x, axis=-1), atol=1e-5)
    np.testing.assert_allclose(
        highpass(x, 100, zero_phase=True), sps.filtfilt(b, a, x, axis=-1, padtype="odd"), atol=1e-3
    )
    assert highpass(x, 100).dtype == np.float32


def test_highpass_removes_offset_and_keeps_qrs_band():
    t = np.arange(3000) / 100
    offset = highpass(np.full(3000, 1.5), 100)
    # causal filtering: the offset is still there at the start and gone 30 s later
    assert offset[0] > 1.0 and abs(offset[-1]) < 1e-3
    tone = highpass(np.sin(2 * np.pi * 10 * t), 100)
    amplitude = np.sqrt(2 * np.mean(tone[-500:] ** 2))
    assert abs(amplitude - 1.0) < 0.01


def test_resample_500_to_100_keeps_a_slow_tone():
    t500 = np.arange(5000) / 500
    t100 = np.arange(1000) / 100
    y = resample(np.sin(2 * np.pi * 3 * t500)[None], 500, 100)
    assert y.shape == (1, 1000)
    np.testing.assert_allclose(y[0, 20:-20], np.sin(2 * np.pi * 3 * t100)[20:-20], atol=1e-3)
    assert resample(np.zeros((2, 3600)), 360, 100).shape == (2, 1000)
    assert resample(np.zeros((2, 2570)), 257, 100).shape == (2, 1000)


def test_preprocess_resamples_then_filters():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 5000))
    config = PreprocessConfig()
    expected = highpass(sps.resample_poly(x, 1, 5, axis=-1, padtype="line"), 100)
    out = preprocess(x, 500, config)
    assert out.shape == (12, 1000) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    raw = preprocess(x[:, :1000], 100, PreprocessConfig(highpass_hz=None))
    np.testing.assert_allclose(raw, x[:, :1000].astype(np.float32))


def test_preprocess_config():
    assert PreprocessConfig(highpass_hz=0).highpass_hz is None
    assert PreprocessConfig().to_dict() == {
        "fs": 100,
        "highpass_hz": 0.5,
        "highpass_order": 4,
        "zero_phase": False,
        "clip_mv": None,
    }
    assert PreprocessConfig(clip_mv=0).clip_mv is None
    with pytest.raises(ValueError, match="clip_mv"):
        PreprocessConfig(clip_mv=-1)
    with pytest.raises(ValueError, match="Nyquist"):
        PreprocessConfig(fs=100, highpass_hz=60)
