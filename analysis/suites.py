"""What the delivery commands' suites share: where a suite writes, the PTB-XL data it reads with
the model's preprocessing, and how it writes a result (see :mod:`leadtune.analysis.delivery`)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any


def slug(text: str) -> str:
    """A folder name for a model argument (``models:/lead-id@champion`` -> ``lead-id@champion``)."""
    return re.sub(r"[^A-Za-z0-9@._-]+", "_", text.replace("models:/", "")).strip("_") or "model"


def evaluation_out(args: argparse.Namespace, default_name: str, suffix: str = "") -> Path:
    """``--out``, else ``runs/evaluate/<model>-<split>[-suffix]``."""
    if args.out:
        return Path(args.out)
    name = f"{slug(str(args.model or default_name))}-{args.split}"
    return Path("runs/evaluate") / (f"{name}-{suffix}" if suffix else name)


def prepared_ptbxl(args: argparse.Namespace, loaded: Any) -> Any:
    """The PTB-XL folder a suite evaluates on (``--source``, else the model's training data when
    it is here, else the bundled sample), read with the model's own preprocessing."""
    from leadtune.trainables.commands import default_source
    from leadtune.trainables.data.ptbxl import database_files

    trained_on = loaded.card.get("data", {}).get("source") or ""
    source = args.source or (
        trained_on if trained_on and (Path(trained_on) / "ptbxl_database.csv").is_file()
        else default_source()
    )  # fmt: skip
    database_files(Path(source))  # a wrong folder is one line, before any other output
    print(
        f"[leadtune] evaluating {loaded.source} on the {args.split} split of {source}",
        file=sys.stderr,
    )
    return ptbxl_for_model(source, args.cache_dir, args.limit, loaded)


def ptbxl_for_model(source: str, cache_dir: str | None, limit: int | None, loaded: Any) -> Any:
    """A PTB-XL folder prepared (cached) with the model's own preprocessing."""
    from leadtune.trainables.data.cache import prepare_dataset
    from leadtune.trainables.data.preprocess import PreprocessConfig

    return prepare_dataset(
        Path(source),
        cache_root=Path(cache_dir) if cache_dir else None,
        preprocess=PreprocessConfig(**loaded.preprocess),
        limit=limit,
        progress=sys.stderr.isatty(),
    )


def write_result(out: Path, stem: str, result: dict[str, Any], markdown: str) -> dict[str, Path]:
    """A suite's result as ``<stem>.json`` (every number) and ``<stem>.md`` (readable)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    files["json"].write_text(json.dumps(result, indent=2) + "\n")
    files["markdown"].write_text(markdown)
    return files
