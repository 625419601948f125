"""The model that ships with leadtune: it loads without running code, labels a record of the
bundled sample in a fresh checkout with no search and no MLflow, whatever its channel names, and
its card states where its figures come from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb

from leadtune.analysis.model_source import bundled_model_dir
from leadtune.cli import main
from leadtune.trainables.data.leads import LEADS

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "data" / "ptbxl-sample" / "records100" / "00000" / "00001_lr"


def _label(capsys, *args) -> tuple[int, dict]:
    code = main(["label", *map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_the_bundled_model_is_a_small_package_of_tensors_and_json() -> None:
    folder = bundled_model_dir()
    meta = json.loads((folder / "leadtune-model.json").read_text())
    assert meta["task"] == "lead_id"
    weights = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 5_000_000, size
    card = (folder / "MODEL_CARD.md").read_text()
    assert "CC BY 4.0" in card and "PTB-XL" in card


def test_label_works_out_of_the_box_with_any_channel_names(tmp_path, capsys) -> None:
    code, plain = _label(capsys, RECORD)
    assert code == 0, plain["verdict"]
    assert plain["verdict"]["status"] == "agrees"
    assert [c["assigned_lead"] for c in plain["channels"]] == list(LEADS)

    record = wfdb.rdrecord(str(RECORD))
    wfdb.wrsamp(
        "neutral", fs=record.fs, units=["mV"] * 12, sig_name=[f"ch{i}" for i in range(12)],
        p_signal=record.p_signal, fmt=["16"] * 12, write_dir=str(tmp_path),
    )  # fmt: skip
    code, neutral = _label(capsys, tmp_path / "neutral")
    assert code == 0 and neutral["verdict"]["status"] == "no_header_leads"
    assert [c["assigned_lead"] for c in neutral["channels"]] == list(LEADS)
    assert [c["header_name"] for c in neutral["channels"]] == [f"ch{i}" for i in range(12)]


def test_a_swap_in_a_sample_record_is_named(tmp_path, capsys) -> None:
    """LA/RA reversal built from the real record: I inverted, II and III exchanged, aVR and
    aVL exchanged, under the original header names."""
    record = wfdb.rdrecord(str(RECORD))
    x = record.p_signal.copy()
    i = {lead: LEADS.index(lead) for lead in LEADS}
    swapped = x.copy()
    swapped[:, i["I"]] = -x[:, i["I"]]
    swapped[:, i["II"]], swapped[:, i["III"]] = x[:, i["III"]], x[:, i["II"]]
    swapped[:, i["aVR"]], swapped[:, i["aVL"]] = x[:, i["aVL"]], x[:, i["aVR"]]
    wfdb.wrsamp(
        "lara", fs=record.fs, units=["mV"] * 12, sig_name=list(LEADS), p_signal=swapped,
        fmt=["16"] * 12, write_dir=str(tmp_path),
    )  # fmt: skip
    code, result = _label(capsys, tmp_path / "lara")
    assert code == 1 and result["verdict"]["status"] == "swap_suspected"
    assert result["verdict"]["reversal"] == "LA-RA", result["verdict"]


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_help_names_the_bundled_model_as_the_default(command, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "bundled model" in capsys.readouterr().out


def test_the_labelling_studys_batched_verdicts_are_labels_own(ptbxl_sample) -> None:
    """The study judges records in batches; `leadtune label` judges one record at a time. On
    real records, untouched and under each named reversal, both give the same verdicts."""
    from leadtune.analysis import load_model
    from leadtune.trainables.data.records import read_record
    from leadtune.trainables.lead_id import metrics
    from leadtune.trainables.lead_id.delivery.label import judge, log_probabilities, swap_thresholds
    from leadtune.trainables.lead_id.delivery.labelling_study import _verdicts
    from leadtune.trainables.lead_id.reversals import REVERSALS

    loaded = load_model()
    signals = np.stack(
        [
            read_record(ptbxl_sample / "records100" / "00000" / f"{i:05d}_lr.hea").signal
            for i in range(1, 4)
        ]
    )
    named = []
    for thresholds in (3.0, swap_thresholds(loaded)):  # one for all; the model's, per hypothesis
        for reversal in (None, *(r for r in REVERSALS if r.key in ("LA-RA", "RA-LL", "V2-V3"))):
            recorded = (
                signals if reversal is None else np.stack([reversal.apply(s) for s in signals])
            )
            batched = _verdicts(loaded, recorded.astype(np.float32), thresholds)
            for signal, verdict in zip(recorded, batched):
                table = log_probabilities(loaded, signal)
                assigned = metrics.hungarian_assign(table)
                single = judge(loaded, signal, list(LEADS), table, assigned, thresholds)
                assert (single.status, single.reversal) == (verdict.status, verdict.reversal)
                assert set(single.flagged_by) == set(verdict.flagged_by)
                assert single.margin_nats == pytest.approx(verdict.margin_nats, abs=1e-3)
            named += [v.reversal for v in batched]
    assert "V2-V3" in named  # the batched path names reversals too


@pytest.mark.parametrize(
    "exchange, reversal",
    [((6, 7), "V1-V2"), ((1, 9), None)],  # V1<->V2; II<->V4 (no name)
)
def test_exchanged_channels_of_a_sample_record_are_flagged(exchange, reversal, tmp_path, capsys):
    """The shipped model's own thresholds (per hypothesis, from its card) on a real record:
    a neighbour-precordial reversal is named, an exchange no reversal names is listed."""
    record = wfdb.rdrecord(str(RECORD))
    x = record.p_signal.copy()
    i, j = exchange
    x[:, [i, j]] = x[:, [j, i]]
    wfdb.wrsamp(
        "exchanged", fs=record.fs, units=["mV"] * 12, sig_name=list(LEADS), p_signal=x,
        fmt=["16"] * 12, write_dir=str(tmp_path),
    )  # fmt: skip
    code, result = _label(capsys, tmp_path / "exchanged")
    verdict = result["verdict"]
    assert code == 1 and verdict["status"] == "swap_suspected", verdict
    assert verdict["reversal"] == reversal
    assert verdict["margin_nats"] > 0 and verdict["flagged_by"]
    if reversal is None:
        assert sorted(map(tuple, verdict["exchanged"])) == sorted(
            [(LEADS[i], LEADS[j]), (LEADS[j], LEADS[i])]
        )
