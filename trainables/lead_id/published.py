"""Published lead-ID weights as leadtune model packages: ``leadtune import thesis-siglabv2 SRC``.

The reference paper's released model (Nateml/bachelors_thesis ``models/siglabv2``, MIT) is
leadtune's reference architecture at D = 64 under other tensor names, with its classes in the
order V1-V6, I, II, III, aVR, aVL, aVF. Importing it:

1. reads ``config.yaml`` and refuses a release whose architecture is not the one mapped here
   (a different D, depth, heads, GRU or inception width would load wrongly, not fail);
2. reads ``state_dict.pth`` with ``torch.load(weights_only=True)`` (tensors only: a file from
   elsewhere cannot run code), renames every tensor the forward pass uses, permutes the last
   layer's rows into leadtune's class order (I ... V6), and drops and lists the tensors the
   released code holds but never uses (``init_head``, ``encoder.cnn_post_layers``,
   ``encoder.merge_norm``, ``encoder.alpha``);
3. loads the result into leadtune's model with ``strict=True`` (every tensor accounted for);
4. writes a model package (``leadtune-model.json`` + ``weights.pt``, float32) with the release's
   training recipe as the config, its preprocessing (100 Hz, 4th-order 0.5 Hz high-pass), its
   licence file, and where it came from.

Input order does not matter to a set model (leads are shuffled in training), so only the output
classes are permuted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from leadtune.trainables.data.leads import LEADS

RELEASE_CLASS_ORDER = ("V1", "V2", "V3", "V4", "V5", "V6", "I", "II", "III", "aVR", "aVL", "aVF")
RELEASE_UNUSED_PREFIXES = ("init_head.", "encoder.cnn_post_layers.", "encoder.merge_norm.",
                           "encoder.alpha")  # fmt: skip
# What the mapping below assumes of the release's config.yaml (key path -> value).
RELEASE_ARCHITECTURE = {
    ("model", "feature_dim"): 64,
    ("model", "num_belief_updates"): 5,
    ("model", "num_classes"): 12,
    ("model", "sab", "num_heads"): 8,
    ("model", "sab", "ffn_expansion"): 4,
    ("model", "encoder", "name"): "cnngru",
    ("model", "encoder", "gru", "hidden_dim"): 128,
    ("model", "encoder", "gru", "num_layers"): 2,
    ("model", "encoder", "gru", "bidirectional"): False,
    ("model", "encoder", "num_inception_blocks"): 2,
    ("model", "encoder", "inception_block", "bottleneck_channels"): 64,
    ("dataset", "sampling_rate"): 100,
}
# Ordered (pattern, replacement) rules from the release's names to leadtune's.
RENAMES: tuple[tuple[str, str], ...] = (
    (r"^encoder\.cnn_encoder\.(\d+)\.branch1\.(\d)\.", r"encoder.features.\1.pointwise.\2."),
    (r"^encoder\.cnn_encoder\.(\d+)\.branch2\.([01])\.", r"encoder.features.\1.kernel5.0.\2."),
    (r"^encoder\.cnn_encoder\.(\d+)\.branch2\.3\.", r"encoder.features.\1.kernel5.1.0."),
    (r"^encoder\.cnn_encoder\.(\d+)\.branch2\.4\.", r"encoder.features.\1.kernel5.1.1."),
    (r"^encoder\.cnn_encoder\.(\d+)\.branch3\.([01])\.", r"encoder.features.\1.kernel11.0.\2."),
    (r"^encoder\.cnn_encoder\.(\d+)\.branch3\.3\.", r"encoder.features.\1.kernel11.1.0."),
    (r"^encoder\.cnn_encoder\.(\d+)\.branch3\.4\.", r"encoder.features.\1.kernel11.1.1."),
    (r"^encoder\.cnn_encoder\.(\d+)\.branch4\.1\.", r"encoder.features.\1.pooled.1.0."),
    (r"^encoder\.cnn_encoder\.(\d+)\.branch4\.2\.", r"encoder.features.\1.pooled.1.1."),
    (r"^encoder\.gru\.", "encoder.summary.gru."),
    (r"^encoder\.attn_proj\.", "encoder.summary.pooling.projection."),
    (r"^encoder\.attn_vec\.", "encoder.summary.pooling.score."),
    (r"^encoder\.fc\.0\.", "encoder.projection.0."),
    (r"^attention_blocks\.(\d+)\.mha\.", r"context.blocks.\1.attention."),
    (r"^attention_blocks\.(\d+)\.layernorm1\.", r"context.blocks.\1.attention_norm."),
    (r"^attention_blocks\.(\d+)\.ffn\.0\.", r"context.blocks.\1.feed_forward.0."),
    (r"^attention_blocks\.(\d+)\.ffn\.2\.", r"context.blocks.\1.feed_forward.3."),
    (r"^attention_blocks\.(\d+)\.layernorm2\.", r"context.blocks.\1.feed_forward_norm."),
    (r"^classifier\.classifier\.(\d)\.", r"head.layers.\1."),
)
LAST_LAYER = ("head.layers.4.weight", "head.layers.4.bias")
SOURCE_REPOSITORY = "Nateml/bachelors_thesis, commit ec461e8, models/siglabv2"


class ReleaseError(ValueError):
    """A release that cannot be imported; the message says why and what to check."""


def leadtune_name(name: str) -> str | None:
    """leadtune's name of a released tensor (None: not used by the forward pass)."""
    if name.startswith(RELEASE_UNUSED_PREFIXES):
        return None
    for pattern, replacement in RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    raise ReleaseError(f"released tensor {name!r} has no mapping; is this the siglabv2 release?")


def class_permutation() -> list[int]:
    """Row i of leadtune's last layer is row ``perm[i]`` of the release's."""
    return [RELEASE_CLASS_ORDER.index(lead) for lead in LEADS]


def _config_value(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = config
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def read_release_config(folder: Path) -> dict[str, Any]:
    import yaml

    file = folder / "config.yaml"
    try:
        config = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ReleaseError(f"{file}: unreadable ({' '.join(str(exc).split())[:150]})") from None
    if not isinstance(config, dict):
        raise ReleaseError(f"{file}: not a run configuration")
    wrong = [
        f"{'.'.join(path)} = {_config_value(config, path)!r} (expected {expected!r})"
        for path, expected in RELEASE_ARCHITECTURE.items()
        if _config_value(config, path) != expected
    ]
    if wrong:
        raise ReleaseError(
            f"{file}: not the siglabv2 architecture this importer maps: {'; '.join(wrong)}"
        )
    return config


def recipe(config: dict[str, Any]) -> dict[str, Any]:
    """leadtune's config of the released run: the architecture and its training recipe."""
    optimizer = config.get("optimizer") or {}
    noise = _config_value(config, ("augment", "augment_types", "noise")) or {}
    return {
        "encoder": "inception_gru",
        "context": "sab",
        "d_model": 64,
        "depth": 5,
        "heads": 8,
        "ffn_mult": 4,
        "lr": float(optimizer.get("lr", 7e-4)),
        "weight_decay": float(optimizer.get("weight_decay", 1e-4)),
        "batch_size": int(_config_value(config, ("run", "batch_size")) or 38),
        "epochs": int(_config_value(config, ("run", "epochs")) or 30),
        "jitter_prob": float(_config_value(config, ("augment", "augment_chance")) or 0.5),
        "jitter_sigma_min": float(noise.get("noise_std_low", 0.001)),
        "jitter_sigma_max": float(noise.get("noise_std_high", 0.015)),
        "seed": int(_config_value(config, ("run", "seed")) or 0),
    }


def map_state_dict(released: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(leadtune state dict, names of the dropped unused tensors)."""
    import torch

    mapped, dropped = {}, []
    for name, tensor in released.items():
        if not isinstance(tensor, torch.Tensor):
            raise ReleaseError(f"released entry {name!r} is not a tensor")
        target = leadtune_name(name)
        if target is None:
            dropped.append(name)
            continue
        mapped[target] = tensor.detach().to("cpu").clone()
    perm = torch.tensor(class_permutation())
    for name in LAST_LAYER:
        if name not in mapped:
            raise ReleaseError(f"the release has no classifier output layer ({name})")
        mapped[name] = mapped[name][perm].contiguous()
    return mapped, dropped


def import_siglabv2(source: Path, out: Path) -> dict[str, Any]:
    """Write the release at ``source`` as a leadtune model package in ``out``; returns its
    manifest."""
    import torch

    from leadtune.trainables.lead_id.config import LeadIdConfig
    from leadtune.trainables.lead_id.models import create_model
    from leadtune.trainables.model_package import write_package

    source = Path(source)
    weights_file = source / "state_dict.pth"
    if not weights_file.is_file():
        raise ReleaseError(f"{source}: no state_dict.pth; pass the release's folder")
    release_config = read_release_config(source)
    try:
        released = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        from leadtune.trainables.training import load_refusal

        reason = load_refusal(exc)[:150]
        raise ReleaseError(
            f"{weights_file}: not loaded as plain tensors ({reason}); leadtune only imports "
            "weights that load with weights_only=True"
        ) from None
    if not isinstance(released, dict):
        raise ReleaseError(f"{weights_file}: not a state dict")
    mapped, dropped = map_state_dict(released)
    config = LeadIdConfig.from_dict(recipe(release_config))
    model = create_model(config.model_config())
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[:2]
        raise ReleaseError(
            f"{source}: mapped weights do not fit leadtune's model: {first}"
        ) from None
    used = sum(p.numel() for p in model.parameters())
    unused = sum(released[n].numel() for n in dropped)
    manifest_facts = {
        "data": {"fs": 100, "fingerprint": "released", "source": "PTB-XL 1.0.3 folds 1-8"},
        "preprocessing": {
            "fs": 100,
            "highpass_hz": 0.5,
            "highpass_order": 4,
            "zero_phase": False,
            "clip_mv": None,
        },  # fmt: skip
        "licence": "MIT (copyright Nathan Macdonald 2025; LICENSE in this folder)",
        "provenance": {
            "release": "thesis-siglabv2",
            "repository": SOURCE_REPOSITORY,
            "imported_from": source.name,
            "state_dict_sha256": hashlib.sha256(weights_file.read_bytes()).hexdigest(),
            "release_class_order": list(RELEASE_CLASS_ORDER),
            "dropped_unused_tensors": dropped,
            "used_parameters": used,
            "dropped_parameters": unused,
            "trained_with": "30 epochs on PTB-XL folds 1-8 (about 17,000 ECGs), float16 "
            "autocast, batch 38, Adam lr 7e-4 cosine to 1e-7, Gaussian noise 0.001-0.015 mV",
        },
        "validation_metrics": {},
        "test_metrics": {},
    }
    out = Path(out)
    write_package(out, "lead_id", config.to_dict(), model.state_dict(), manifest_facts)
    if (source / "LICENSE").is_file():
        shutil.copyfile(source / "LICENSE", out / "LICENSE")
    (out / "MODEL_CARD.md").write_text(_card(manifest_facts, config.to_dict()))
    return json.loads((out / "leadtune-model.json").read_text())


def _modules(names: list[str]) -> list[str]:
    """Tensor names shortened to their module (``x.weight`` -> ``x``; ``encoder.alpha`` kept)."""
    parts = [n.rsplit(".", 1) for n in names]
    return sorted(
        {p[0] if len(p) == 2 and p[1] in ("weight", "bias") else ".".join(p) for p in parts}
    )


def _card(facts: dict[str, Any], config: dict[str, Any]) -> str:
    provenance = facts["provenance"]
    return "\n".join(
        [
            "# thesis-siglabv2: the reference paper's released lead-ID model, in leadtune's format",
            "",
            f"Source: {provenance['repository']} (MIT licence, `LICENSE` here; keep it with any "
            "copy or derivative of these weights). Trained by its authors on PTB-XL 1.0.3 "
            "(Wagner et al., Scientific Data 7, 154, 2020; CC BY 4.0), folds 1-8.",
            "",
            f"Architecture: leadtune's reference at D = {config['d_model']} (inception_gru "
            f"encoder, {config['depth']} set attention blocks, {config['heads']} heads), "
            f"{provenance['used_parameters']:,} parameters used. Imported by "
            "`leadtune import thesis-siglabv2` (weights read as tensors only, names mapped, "
            "last layer permuted from the release's class order V1-V6, I, II, III, aVR, aVL, "
            "aVF to leadtune's I ... V6).",
            "",
            f"Dropped (held by the release, never used by its forward pass): "
            f"{provenance['dropped_parameters']:,} parameters in "
            f"{', '.join(_modules(provenance['dropped_unused_tensors']))}.",
            "",
            "Input: 10 s at 100 Hz in mV, 4th-order 0.5 Hz Butterworth high-pass (causal).",
            f"state_dict.pth sha256: {provenance['state_dict_sha256']}",
            "",
        ]
    )


# -- the command -----------------------------------------------------------------------------------

IMPORTERS = {"thesis-siglabv2": import_siglabv2}


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "import",
        help="turn published weights into a leadtune model package",
        description=(
            "Convert a published model into a leadtune model package (weights read as tensors "
            "only, names and class order mapped, unused tensors dropped and listed, licence and "
            "provenance kept). The package works wherever a model is taken: label --model, "
            "evaluate, export, train --init-from, and a search's init_from."
        ),
    )
    parser.add_argument("release", choices=sorted(IMPORTERS), help="which published model")
    parser.add_argument(
        "source", type=Path, help="the release's folder (state_dict.pth, config.yaml)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the package folder to write")
    parser.add_argument("--json", action="store_true", help="print the package manifest as JSON")
    parser.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    if not Path(args.source).is_dir():
        raise ValueError(f"{args.source}: not a folder; pass the release's folder")
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise FileExistsError(f"--out {args.out} exists and is not empty; choose a new folder")
    manifest = IMPORTERS[args.release](Path(args.source), Path(args.out))
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    provenance = manifest["provenance"]
    print(
        f"imported {args.release}: {provenance['used_parameters']:,} parameters, "
        f"{len(provenance['dropped_unused_tensors'])} unused tensors dropped "
        f"({provenance['dropped_parameters']:,} parameters) -> {args.out}",
        file=sys.stderr,
    )
    print(str(args.out))
    return 0
