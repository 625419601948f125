"""`leadtune explain`: attributions that add up (Integrated Gradients' completeness) on the real
bundled lead-ID model and on a trained diagnosis network, GradientShap reproducible with a seed,
any number of channels, the R-peak detector on known peaks and on a real record, figures and
arrays for both tasks, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from leadtune.analysis import explain
from leadtune.analysis.model_source import load_model
from leadtune.cli import main
from leadtune.trainables.data.preprocess import PreprocessConfig
from leadtune.trainables.data.records import read_record
from leadtune.trainables.diagnosis.delivery import explain as diagnosis_explain
from leadtune.trainables.lead_id.delivery import explain as lead_explain

pytest.importorskip("captum")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "ptbxl-sample"
RECORD = SAMPLE / "records100" / "00000" / "00001_lr"


@pytest.fixture(scope="module")
def bundled():
    loaded = load_model("bundled")
    for parameter in loaded.model.parameters():
        parameter.requires_grad_(False)
    return loaded


@pytest.fixture(scope="module")
def signal(bundled) -> np.ndarray:
    record = read_record(RECORD, PreprocessConfig(**bundled.preprocess))
    return np.ascontiguousarray(record.signal, dtype=np.float32)  # (12, 1000), standard order


# -- attributions --------------------------------------------------------------------------------


def test_integrated_gradients_add_up_to_the_logit_difference_on_the_bundled_model(
    bundled, signal
) -> None:
    """Completeness on the bundled model, fed two channels (V2, aVL) of a sample record: the
    attributions of V2's logit sum to logit(x) - logit(flat line) within 2 % of that difference
    (128 Gauss-Legendre steps; measured 0.6 %, and 2.8 % with 64 steps: the logit climbs
    steeply over the first 5 % of the path from the flat line, where few nodes fall)."""
    settings = explain.Settings(method="integrated_gradients", steps=128)
    two = np.ascontiguousarray(signal[[bundled.leads.index("V2"), bundled.leads.index("aVL")]])
    v2 = bundled.leads.index("V2")
    forward = lead_explain.LeadIdOutputs(bundled.model)
    found = explain.attribute(forward, two[None], [0 * 12 + v2], settings)
    assert found.shape == (1, 2, 1000)
    difference = float(
        lead_explain.lead_id_logits(bundled.model, two)[0, v2]
        - lead_explain.lead_id_logits(bundled.model, np.zeros_like(two))[0, v2]
    )
    assert abs(difference) > 1.0  # a real difference to account for
    assert float(found.sum()) == pytest.approx(difference, rel=0.02)
    # ... and V2's own trace carries more of it than the limb lead's
    by_trace = np.abs(found[0]).sum(axis=1)
    assert by_trace[0] > by_trace[1]


def test_gradient_shap_is_reproducible_with_a_seed_and_differs_with_another(
    bundled, signal
) -> None:
    three = signal[None, [0, 1, 7]]  # I, II, V2: K = 3; the logit of channel II for II
    forward = lead_explain.LeadIdOutputs(bundled.model)

    def shap(seed: int) -> np.ndarray:
        settings = explain.Settings(n_samples=3, baseline="noise", seed=seed)
        return explain.attribute(forward, three, [1 * 12 + 1], settings)

    first, again, other = shap(3), shap(3), shap(4)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


@pytest.mark.parametrize("channels", [(7,), (0, 1, 7)])
def test_attributions_have_one_map_per_channel_for_k_below_12(bundled, signal, channels) -> None:
    subset = np.ascontiguousarray(signal[list(channels)])
    found = lead_explain.explain_lead_id(bundled.model, subset, explain.Settings(method="saliency"))
    k = len(channels)
    assert found["attributions"].shape == (k, k, 1000)
    assert found["logits"].shape == (k, 12) and found["predicted"].shape == (k,)
    assert np.isfinite(found["attributions"]).all() and np.abs(found["attributions"]).sum() > 0


def test_unknown_method_and_grad_cam_for_lead_id_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown method 'shap'"):
        explain.Settings(method="shap").check("lead_id")
    with pytest.raises(ValueError, match="grad_cam is not offered for lead_id models"):
        explain.Settings(method="grad_cam").check("lead_id")


def test_missing_captum_is_one_line_naming_the_install(monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "captum", None)
    monkeypatch.setitem(__import__("sys").modules, "captum.attr", None)
    with pytest.raises(ValueError, match="pip install captum") as caught:
        explain.require_captum()
    assert "\n" not in str(caught.value)


# -- heartbeats ----------------------------------------------------------------------------------


def synthetic_ecg(fs: int, peaks_s: list[float], seconds: float = 10.0, seed: int = 0):
    """12 leads of Gaussian P, QRS and T waves around known R times, with lead-dependent gains
    and polarities, baseline wander and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * fs)) / fs
    gains = rng.uniform(0.4, 1.5, 12) * rng.choice([-1, 1], 12)
    beat = np.zeros_like(t)
    for r in peaks_s:
        beat += 1.0 * np.exp(-0.5 * ((t - r) / 0.012) ** 2)  # R
        beat -= 0.25 * np.exp(-0.5 * ((t - r - 0.03) / 0.01) ** 2)  # S
        beat += 0.15 * np.exp(-0.5 * ((t - r + 0.17) / 0.025) ** 2)  # P
        beat += 0.35 * np.exp(-0.5 * ((t - r - 0.3) / 0.05) ** 2)  # T
    wander = 0.2 * np.sin(2 * np.pi * 0.3 * t)
    return gains[:, None] * beat[None] + wander + 0.02 * rng.standard_normal((12, len(t)))


@pytest.mark.parametrize("fs", [100, 500])
def test_r_peaks_are_found_where_they_were_put(fs: int) -> None:
    rng = np.random.default_rng(1)
    intervals = rng.uniform(0.55, 1.2, 20)  # irregular rhythm, 50 to 109 bpm
    peaks_s = [float(x) for x in 0.4 + np.cumsum(np.concatenate([[0], intervals]))]
    peaks_s = [p for p in peaks_s if p < 9.7]
    found = explain.detect_r_peaks(synthetic_ecg(fs, peaks_s), fs)
    expected = np.round(np.array(peaks_s) * fs).astype(int)
    assert len(found) == len(expected)
    assert np.max(np.abs(found - expected)) <= max(1, round(0.01 * fs))  # within 10 ms


def test_r_peaks_of_a_real_record_give_a_plausible_regular_heart_rate(signal) -> None:
    peaks = explain.detect_r_peaks(signal, 100)
    rr = np.diff(peaks) / 100
    assert 8 <= len(peaks) <= 16  # 10 s of sinus rhythm
    assert 45 <= 60 / np.median(rr) <= 110
    assert rr.min() > 0.3 and rr.std() / rr.mean() < 0.15
    # each peak sits on the QRS: the largest |lead II| deflection within 100 ms is near it
    lead_ii = np.abs(signal[1] - np.median(signal[1]))
    for p in peaks:
        lo = max(0, p - 10)
        assert abs(lo + int(np.argmax(lead_ii[lo : p + 11])) - p) <= 4


def test_beat_windows_are_centred_on_the_peaks_and_drop_cut_beats() -> None:
    array = np.tile(np.arange(100.0), (2, 1))  # (2, T): value = time index
    windows, kept = explain.beat_windows(array, np.array([3, 40, 70, 98]), 5, 10)
    np.testing.assert_array_equal(kept, [40, 70])
    assert windows.shape == (2, 2, 16)
    np.testing.assert_array_equal(windows[:, 0, 5], [40, 70])
    shares = explain.region_shares(np.ones((1, 100)), np.array([50]), 100)
    assert shares["qrs"]["chance"] == pytest.approx(11 / 100)
    assert shares["qrs"]["share"] == pytest.approx(11 / 100)


def test_neighbours_are_symmetric_and_trace_shares_group_them() -> None:
    leads = list(lead_explain.NEIGHBOURS)
    for lead, near in lead_explain.NEIGHBOURS.items():
        assert all(lead in lead_explain.NEIGHBOURS[n] for n in near)
    shares = np.full((1, 12, 12), 0.05)
    for i in range(12):
        shares[0, i, i] = 0.5
    found = lead_explain.trace_shares(shares, leads)
    assert found["own_trace_share"] == pytest.approx(0.5)
    assert found["per_neighbour_share"] == pytest.approx(0.05)
    assert found["own_trace_first"] == 1.0


# -- the command, both tasks ---------------------------------------------------------------------


def test_explain_a_record_with_fewer_channels_writes_figures_and_arrays(tmp_path, capsys) -> None:
    out = tmp_path / "lead"
    excluded = [a for name in ("III", "aVR", "aVL", "aVF", "V1", "V3", "V4", "V5", "V6")
                for a in ("--exclude", name)]  # fmt: skip
    code = main(["explain", str(RECORD), "--method", "saliency", "--out", str(out), *excluded])
    assert code == 0
    assert "predicted: I II V2" in capsys.readouterr().out
    with np.load(out / "attributions.npz") as saved:
        assert saved["attributions"].shape == (3, 3, 1000)
        assert str(saved["method"]) == "saliency" and int(saved["seed"]) == 0
        assert list(saved["channels"]) == ["I", "II", "V2"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["method"] == "saliency" and summary["predicted"] == ["I", "II", "V2"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["overview.png", "target_00_I_as_I.png", "target_01_II_as_II.png",
                    "target_02_V2_as_V2.png"]  # fmt: skip
    assert all((out / p).stat().st_size > 20_000 for p in pngs)


@pytest.fixture(scope="module")
def sample_dataset(tmp_path_factory):
    from leadtune.trainables.data.cache import prepare_dataset

    cache = tmp_path_factory.mktemp("cache")
    return prepare_dataset(SAMPLE, cache_root=cache, progress=False), cache


@pytest.fixture(scope="module")
def diagnosis_checkpoint(sample_dataset, tmp_path_factory) -> Path:
    """A small diagnosis network trained for one epoch on the bundled sample (tests only)."""
    from leadtune.trainables.diagnosis.train import DiagnosisData, train_diagnosis
    from leadtune.trainables.training import LocalReporter

    folder = tmp_path_factory.mktemp("dx")
    config = {"model": "resnet1d_wang", "width": 0.25, "epochs": 1, "batch_size": 32,
              "max_train_records": 96, "max_val_records": 32, "device": "cpu"}  # fmt: skip
    train_diagnosis(config, DiagnosisData.from_prepared(sample_dataset[0]), LocalReporter(folder))
    return folder / "epoch_001"


def test_integrated_gradients_add_up_on_a_trained_diagnosis_network(diagnosis_checkpoint):
    loaded = load_model(str(diagnosis_checkpoint))
    record = read_record(RECORD, PreprocessConfig(**loaded.preprocess))
    x = np.ascontiguousarray(record.signal, dtype=np.float32)
    settings = explain.Settings(method="integrated_gradients", steps=64)
    found = diagnosis_explain.explain_diagnosis(loaded.model, x, settings)
    base = diagnosis_explain.explain_diagnosis(
        loaded.model, np.zeros_like(x), explain.Settings("saliency")
    )
    difference = found["logits"] - base["logits"]
    sums = found["attributions"].reshape(5, -1).sum(axis=1)
    np.testing.assert_allclose(sums, difference, rtol=0.03, atol=0.02)


def test_explain_a_diagnosis_record_writes_class_figures_lead_importance_and_arrays(
    diagnosis_checkpoint, tmp_path, capsys
) -> None:
    out = tmp_path / "dx"
    code = main(["explain", str(RECORD), "--model", str(diagnosis_checkpoint), "--method",
                 "integrated_gradients", "--steps", "8", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert "probabilities: NORM" in capsys.readouterr().out
    for name in ("NORM", "MI", "STTC", "CD", "HYP"):
        assert (out / f"class_{name}.png").stat().st_size > 20_000
    assert (out / "lead_importance.png").is_file()
    with np.load(out / "attributions.npz") as saved:
        assert saved["attributions"].shape == (5, 12, 1000)
        assert str(saved["method"]) == "integrated_gradients" and int(saved["steps"]) == 8
        assert saved["baselines"].shape == (1, 12, 1000) and not saved["baselines"].any()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completeness"]["largest_relative_gap"] >= 0  # recorded for IG
    for row in summary["lead_importance"].values():
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-3)
    # Grad-CAM on the last convolution: one map over time per class
    cam_out = tmp_path / "cam"
    assert main(["explain", str(RECORD), "--model", str(diagnosis_checkpoint), "--method",
                 "grad_cam", "--out", str(cam_out)]) == 0  # fmt: skip
    with np.load(cam_out / "attributions.npz") as saved:
        assert saved["attributions"].shape == (5, 1000) and (saved["attributions"] >= 0).all()


def test_explain_splits_of_both_tasks(sample_dataset, diagnosis_checkpoint, tmp_path) -> None:
    _, cache = sample_dataset
    lead = tmp_path / "lead-split"
    assert main(["explain", "--source", str(SAMPLE), "--split", "val", "--limit", "2",
                 "--method", "saliency", "--cache-dir", str(cache), "--out", str(lead)]) == 0  # fmt: skip
    for name in ("global_maps.png", "local_maps.png", "pca_blocks.png"):
        assert (lead / name).stat().st_size > 20_000
    with np.load(lead / "global_maps.npz") as saved:
        assert saved["global_maps"].shape == (12, 12, 81)  # -300 .. +500 ms at 100 Hz
        assert saved["pca"].shape == (6, 2, 12, 2)  # encoder output + 5 blocks
    measured = json.loads((lead / "summary.json").read_text())["measured"]
    assert measured["records"] == 2 and 15 < measured["beats"] < 40
    for region in measured["r_peak_regions"]["attribution"].values():
        assert 0 < region["mean_chance"] < 1 and 0 < region["mean_share"] < 1
    assert 0 < measured["traces"]["local"]["own_trace_share"] < 1
    dx = tmp_path / "dx-split"
    assert main(["explain", "--source", str(SAMPLE), "--split", "val", "--limit", "2",
                 "--model", str(diagnosis_checkpoint), "--method", "saliency",
                 "--cache-dir", str(cache), "--out", str(dx)]) == 0  # fmt: skip
    with np.load(dx / "lead_importance.npz") as saved:
        assert saved["importance"].shape == (2, 5, 12)
    assert (dx / "lead_importance.png").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain", str(RECORD), "--model", "/no/such/model"], "unknown model '/no/such/model'"),
        (["explain", "no/such/record"], "no such record: no/such/record"),
        (["explain"], "pass one RECORD, or --source DIR"),
        (["explain", "--source", "/no/such/folder"], "/no/such/folder"),
    ],
)
def test_bad_input_is_one_line_before_any_work(argv, message, capsys, tmp_path) -> None:
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_unknown_method_is_one_line_from_the_parser(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["explain", str(RECORD), "--method", "shap"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'shap'" in err and err.count("\n") == 1


def test_label_explain_names_the_swapped_channels_as_the_evidence(tmp_path, capsys) -> None:
    """V1 and V5 exchanged on a real record: the swap is flagged; leaving either exchanged
    channel out takes away far more of the margin than leaving out any other; the Integrated
    Gradients of the margin add up to it (measured: aVF, V6 and V5 carry most of those, the
    exchanged V1 trace even counts against: in a set model every lead is context)."""
    from delivery_fixtures import write_wfdb_copy

    swapped = write_wfdb_copy(RECORD.with_suffix(".hea"), tmp_path, "swapped", {"V1": "V5"})
    code = main(["label", str(swapped), "--json", "--explain"])
    assert code == 1  # a swap suspected
    found = json.loads(capsys.readouterr().out)
    lost = found["explanation"]["nats_lost_without_channel"]
    ranked = sorted(lost, key=lambda name: -lost[name])
    assert set(ranked[:2]) == {"V1", "V5"}  # the exchanged channels carry the verdict
    assert min(lost["V1"], lost["V5"]) > 1.5 * max(lost[n] for n in ranked[2:])  # 14.3 vs 8.0
    evidence = found["explanation"]["nats_by_channel"]
    total = sum(evidence.values())
    expected = (
        found["explanation"]["margin_nats"] - found["explanation"]["margin_at_flat_line_nats"]
    )
    assert total == pytest.approx(expected, rel=0.15)  # completeness at 16 steps
