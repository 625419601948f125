"""``leadtune import thesis-siglabv2``: the reference paper's released model as a leadtune package.

Runs where ``../shared/models/thesis-siglabv2`` exists (the release is not redistributed in its
original form; its imported package ships in ``data/models/thesis-siglabv2``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from leadtune.cli import main
from leadtune.trainables.data.leads import LEADS
from leadtune.trainables.lead_id.published import RELEASE_CLASS_ORDER

REPO = Path(__file__).resolve().parents[1]
RELEASE = REPO.parent / "shared" / "models" / "thesis-siglabv2"
SUBSET = REPO.parent / "shared" / "data" / "ptbxl-subset"
BUNDLED = REPO / "data" / "models" / "thesis-siglabv2"

needs_release = pytest.mark.skipif(
    not (RELEASE / "state_dict.pth").is_file(), reason=f"no released model at {RELEASE}"
)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("import") / "siglabv2"
    assert main(["import", "thesis-siglabv2", str(RELEASE), "--out", str(out)]) == 0
    return out


@needs_release
def test_import_maps_every_used_tensor_and_keeps_licence_and_provenance(imported):
    manifest = json.loads((imported / "leadtune-model.json").read_text())
    provenance = manifest["provenance"]
    assert provenance["used_parameters"] == 582_996  # the release's README: used parameters
    assert provenance["dropped_parameters"] == 9_165
    dropped = provenance["dropped_unused_tensors"]
    assert {name.split(".")[0] for name in dropped} == {"init_head", "encoder"}
    assert all(
        n.startswith(("init_head.", "encoder.cnn_post_layers.", "encoder.merge_norm."))
        or n == "encoder.alpha"
        for n in dropped
    )
    assert manifest["config"]["d_model"] == 64 and manifest["preprocessing"]["highpass_hz"] == 0.5
    assert (imported / "LICENSE").read_text() == (RELEASE / "LICENSE").read_text()
    assert "MIT" in manifest["licence"] and "MIT" in (imported / "MODEL_CARD.md").read_text()

    # class order: leadtune's row for lead L is the release's row for L
    released = torch.load(RELEASE / "state_dict.pth", map_location="cpu", weights_only=True)
    ours = torch.load(imported / "weights.pt", map_location="cpu", weights_only=True)
    for lead in ("I", "V1", "aVF"):
        row = RELEASE_CLASS_ORDER.index(lead)
        assert torch.equal(
            ours["head.layers.4.weight"][LEADS.index(lead)],
            released["classifier.classifier.4.weight"][row],
        )
    # the package leadtune ships is exactly what the importer writes
    shipped = torch.load(BUNDLED / "weights.pt", map_location="cpu", weights_only=True)
    assert shipped.keys() == ours.keys()
    assert all(torch.equal(shipped[k], ours[k]) for k in ours)


@needs_release
def test_import_refuses_another_architecture_and_a_pickled_file(tmp_path, capsys):
    wider = tmp_path / "wider"
    shutil.copytree(RELEASE, wider)
    (wider / "config.yaml").chmod(0o644)
    text = (wider / "config.yaml").read_text().replace("feature_dim: 64", "feature_dim: 128")
    (wider / "config.yaml").write_text(text)
    assert main(["import", "thesis-siglabv2", str(wider), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.feature_dim = 128 (expected 64)" in err
    assert not (tmp_path / "a").exists()

    crafted = tmp_path / "crafted"
    shutil.copytree(RELEASE, crafted)
    marker = tmp_path / "ran"
    (crafted / "state_dict.pth").chmod(0o644)
    torch.save({"x": _RunsCode(str(marker))}, crafted / "state_dict.pth")
    assert main(["import", "thesis-siglabv2", str(crafted), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "weights_only=True" in err and err.count("\n") == 0
    assert not marker.exists()


class _RunsCode:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@needs_release
@pytest.mark.skipif(not SUBSET.is_dir(), reason=f"no shared PTB-XL subset at {SUBSET}")
def test_imported_release_reproduces_its_published_fold10_predictions(imported):
    """The 328 fold-10 ECGs of the subset: accuracy as the release's README measured it (98.60 %
    lead, 92.38 % set, argmax) within 0.2 points, and the release's own stored predictions for
    those ECGs agree lead for lead at >= 99.5 %."""
    import pandas as pd

    from leadtune.trainables.data.cache import prepare_dataset
    from leadtune.trainables.lead_id import metrics
    from leadtune.trainables.lead_id.train import predict_log_probs
    from leadtune.trainables.model_package import load_package

    dataset = prepare_dataset(SUBSET, progress=False)
    model, config, _ = load_package(imported)
    rows = dataset.indices("test")
    columns = [list(dataset.leads).index(lead) for lead in config.leads]
    signals = np.ascontiguousarray(dataset.signals[rows][:, columns])
    predicted = metrics.argmax_assign(predict_log_probs(model, signals, torch.device("cpu")))
    true = np.broadcast_to(np.arange(12), predicted.shape)
    assert metrics.lead_accuracy(predicted, true) == pytest.approx(0.9860, abs=0.002)
    assert metrics.set_accuracy(predicted, true) == pytest.approx(0.9238, abs=0.002)

    meta = pd.read_csv(RELEASE / "results" / "meta_test.csv", usecols=["ecg_id"])
    stored = np.load(RELEASE / "results" / "output_test.npy")  # (2198, 12), release order
    where = {int(e): i for i, e in enumerate(meta["ecg_id"])}
    ids = np.asarray(dataset.ecg_ids)[rows]
    assert all(int(e) in where for e in ids)
    # the release's input position p is lead RELEASE_CLASS_ORDER[p]; its class c likewise
    to_leads = np.array([LEADS.index(lead) for lead in RELEASE_CLASS_ORDER])
    release_by_lead = np.empty((len(ids), 12), dtype=int)
    for n, ecg in enumerate(ids):
        release_by_lead[n, to_leads] = to_leads[stored[where[int(ecg)]]]
    agreement = float((release_by_lead == predicted).mean())
    assert agreement >= 0.995, agreement
