"""`leadtune export`: the folder loads with torch alone and reproduces the model; the card is right."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from delivery_fixtures import delivery_env

from leadtune.analysis.export import ExportError, export_model
from leadtune.analysis.model_source import load_model
from leadtune.cli import main
from leadtune.trainables.tasks import load_trained_model

# Runs in a fresh interpreter that can import torch and numpy only: leadtune's packages are
# made unimportable, so a file that secretly needs them fails here.
TORCH_ONLY = """
import sys
for name in ("trainables", "analysis", "search", "spaces", "leadtune"):
    sys.modules[name] = None
import json
import numpy as np
import torch
folder, real = sys.argv[1], sys.argv[2]
model = torch.export.load(folder + "/model.pt2").module()
card = json.load(open(folder + "/model_card.json"))
x = torch.from_numpy(np.load(folder + "/sample_input.npy"))
with torch.no_grad():
    sample = (model(x).numpy() - np.load(folder + "/sample_output.npy")).__abs__().max()
    out = model(torch.from_numpy(np.load(real))).numpy()
np.save(real + ".out.npy", out)
print(json.dumps({"sample_diff": float(sample), "leads": card["leads"]}))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return delivery_env(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    code = main(
        ["export", str(env.checkpoint), "--out", str(out), "--cache-dir", str(env.cache_dir)]
    )
    assert code == 0
    return out


def test_exported_program_runs_with_torch_alone_and_matches(env, exported, tmp_path):
    rows = env.dataset.indices("test")[:5]
    real = np.ascontiguousarray(env.dataset.signals[rows][:, :7])  # 7 of 12 leads: K < M
    np.save(tmp_path / "real.npy", real)
    done = subprocess.run(
        [sys.executable, "-c", TORCH_ONLY, str(exported), str(tmp_path / "real.npy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["sample_diff"] <= 1e-4
    model, _, _ = load_trained_model(env.checkpoint)
    with torch.no_grad():
        expected = model(torch.from_numpy(real)).numpy()
    got = np.load(tmp_path / "real.npy.out.npy")
    assert got.shape == (5, 7, 12)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_model_card_records_data_preprocessing_and_verification(env, exported):
    card = json.loads((exported / "model_card.json").read_text())
    state = torch.load(env.checkpoint / "checkpoint.pt", weights_only=False)
    assert card["data"]["fingerprint"] == env.dataset.fingerprint == state["data"]["fingerprint"]
    assert card["leads"] == list(env.dataset.leads)
    assert card["sampling_rate_hz"] == 100
    assert card["config"]["d_model"] == 16 and card["config"]["encoder"] == "cnn"
    assert card["validation_metrics"]["val_loss"] == pytest.approx(state["metrics"]["val_loss"])
    pre = card["preprocessing"]
    manifest_pre = env.dataset.manifest["settings"]["preprocess"]
    assert {k: pre[k] for k in manifest_pre} == manifest_pre
    assert "manifest" in pre["origin"] and str(env.dataset.path) in pre["origin"]
    assert card["input"]["shape"] == ["B", "K", "T"] and card["input"]["units"] == "mV"
    verification = card["verification"]
    assert verification["passed"] is True
    program = verification["formats"]["torch_export"]
    assert program["max_abs_diff"] <= verification["tolerance"] == 1e-4
    assert [s["shape"][1] for s in program["shapes"]] == [12, 6]
    torchscript = verification["formats"]["torchscript"]  # an extra: verified where written
    if torchscript["file"]:
        assert torchscript["max_abs_diff"] <= 1e-4
    onnx = verification["formats"]["onnx"]
    if onnx["file"]:
        assert (exported / onnx["file"]).stat().st_size > 0
    else:
        assert onnx["skipped"]  # a clear reason, e.g. the onnx package missing
    markdown = (exported / "MODEL_CARD.md").read_text()
    assert "torch.export.load" in markdown and "mV" in markdown
    assert env.dataset.fingerprint in markdown


def test_exported_folder_loads_in_leadtune_from_its_package(env, exported):
    loaded = load_model(str(exported))
    assert loaded.kind == "export" and loaded.task == "lead_id"
    direct, _, _ = load_trained_model(env.checkpoint)
    x = torch.from_numpy(np.load(exported / "sample_input.npy"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), direct(x), rtol=0, atol=0)


def test_export_from_registry_carries_test_metrics(env, tmp_path):
    loaded = load_model(f"models:/lead-id/{env.version}", env.tracking_uri, env.cache_dir)
    card = export_model(loaded, tmp_path, onnx=False)
    assert card["origin"]["registered_model"] == "lead-id"
    assert card["test_metrics"]["test_lead_accuracy"] >= 0
    assert card["test_metrics"]["test_records"] == 66
    assert card["verification"]["formats"]["onnx"]["skipped"]
    reloaded = torch.export.load(str(tmp_path / "model.pt2")).module()
    x = torch.from_numpy(np.load(tmp_path / "sample_input.npy"))
    direct, _, _ = load_trained_model(env.checkpoint)
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(x).numpy(), direct(x).numpy(), atol=1e-4)


def test_export_fails_when_outputs_differ_beyond_tolerance(env, tmp_path):
    loaded = load_model(env.checkpoint)
    with pytest.raises(ExportError, match="differs from the original"):
        export_model(loaded, tmp_path, tolerance=-1.0, onnx=False)
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["verification"]["passed"] is False


def _pickled_globals(weights_file) -> set[str]:
    """The module.name globals a torch.save file's pickle refers to."""
    import pickletools

    with zipfile.ZipFile(weights_file) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    names, strings = set(), []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif opcode.name == "STACK_GLOBAL":
            names.add(f"{strings[-2]}.{strings[-1]}")
        elif opcode.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
    return names


def test_a_registered_version_names_no_python_class(env):
    """What the registry holds survives any refactoring of leadtune: a JSON file (task, config)
    and tensors; no pickled class. (The MLflow model around it names one module, the pyfunc
    loader; leadtune's own loaders read the package and do not need it.)"""
    from leadtune.analysis.model_source import _download
    from leadtune.search.tracking import mlflow_client
    from leadtune.trainables.pyfunc import LOADER_MODULE, package_folder

    version = mlflow_client(env.tracking_uri).get_model_version("lead-id", env.version)
    mlmodel = _download(version.source, env.tracking_uri)
    assert f"loader_module: {LOADER_MODULE}" in (mlmodel / "MLmodel").read_text()
    folder = package_folder(mlmodel)
    manifest = (folder / "leadtune-model.json").read_text()
    assert '"task": "lead_id"' in manifest and "leadtune.trainables" not in manifest
    used = _pickled_globals(folder / "weights.pt")
    assert used and all(name.startswith(("torch.", "collections.")) for name in used), used
    state = torch.load(folder / "weights.pt", weights_only=True)  # tensors only
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_exporting_a_gru_encoder_prints_no_torch_warning(tmp_path):
    """nn.GRU's _flat_weights make torch.export warn about attributes assigned during export;
    that noise is not for users (the export is checked against the eager outputs)."""
    import warnings

    from leadtune.trainables.lead_id.models import create_model
    from leadtune.trainables.model_package import export_program

    model = create_model(encoder="inception_gru", context="sab", d_model=16, depth=1, heads=2,
                         width=0.125).eval()  # fmt: skip
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        export_program(model, torch.zeros(2, 12, 1000), tmp_path / "model.pt2")
    assert (tmp_path / "model.pt2").stat().st_size > 0
    assert not [w for w in seen if "_flat_weights" in str(w.message)]


def test_cards_and_packages_carry_no_machine_paths(tmp_path, monkeypatch):
    from leadtune.trainables.model_package import portable_paths

    monkeypatch.chdir(tmp_path)
    here = str(tmp_path)
    card = {
        "init_from": f"{here}/data/models/thesis-siglabv2",
        "command": f"python -m leadtune.trainables.lead_id.delivery.bundle {here}/runs/a/checkpoint_000003 --x 1",
        "list": [here, "/elsewhere/file", 3],
    }
    assert portable_paths(card) == {
        "init_from": "data/models/thesis-siglabv2",
        "command": "python -m leadtune.trainables.lead_id.delivery.bundle runs/a/checkpoint_000003 --x 1",
        "list": [".", "/elsewhere/file", 3],
    }
