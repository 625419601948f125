"""A static import path for a development checkout: ``python -m leadtune.static_path``.

The repository's top-level folders install as sub-packages of ``leadtune`` through setuptools'
``package-dir`` mapping (``search/`` is ``leadtune.search``, ...). An editable install serves
that mapping through an import hook, which Python runs but static tools (pyright, Pylance, mypy,
import-graph tools) do not: to them ``leadtune.search`` does not exist.

This writes ``build/static-path/leadtune/``, a folder of symbolic links laid out the way the
installed package is (``leadtune/cli.py`` → ``leadtune/cli.py``, ``leadtune/search`` →
``search/``, ``leadtune/bundled`` → ``data/``, ...), and a ``.pth`` file in the environment's
site-packages that puts ``build/static-path`` on ``sys.path``. Python then imports the checkout
through ordinary paths ahead of the hook, and a static tool pointed at the environment resolves
every ``leadtune.*`` import to the files you edit. The path holds only ``leadtune``: no
top-level ``search`` or ``data`` leaks into the import namespace. ``make setup`` runs it; run it
again after adding a file directly under ``leadtune/``.
"""

from __future__ import annotations

import shutil
import site
import sys
import sysconfig
from pathlib import Path

import tomllib

PTH_FILE = "leadtune-static-path.pth"


def package_dirs(root: Path) -> dict[str, str]:
    """The ``package-dir`` mapping of pyproject.toml (``{"leadtune.search": "search", ...}``)."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    return pyproject["tool"]["setuptools"]["package-dir"]


def build(root: Path) -> Path:
    """Write ``root/build/static-path/leadtune`` as links into the checkout; returns the path
    entry (``root/build/static-path``)."""
    entry = root / "build" / "static-path"
    if entry.exists():
        shutil.rmtree(entry)
    package = entry / "leadtune"
    package.mkdir(parents=True)
    mapping = package_dirs(root)
    for item in sorted((root / mapping["leadtune"]).iterdir()):
        if item.name != "__pycache__":
            (package / item.name).symlink_to(item.resolve())
    for name, folder in sorted(mapping.items()):
        if name == "leadtune":
            continue
        parts = name.split(".")[1:]
        if len(parts) != 1:
            raise ValueError(f"package-dir {name!r}: only direct sub-packages of leadtune map")
        link = package / parts[0]
        if link.exists() or link.is_symlink():
            raise ValueError(f"leadtune/{parts[0]} exists and is also mapped to {folder}/")
        link.symlink_to((root / folder).resolve(), target_is_directory=True)
    return entry


def site_packages() -> Path:
    """The running environment's site-packages (the venv's, under ``make setup``)."""
    found = sysconfig.get_paths().get("purelib") or site.getsitepackages()[0]
    return Path(found)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]).resolve() if args else Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        print(f"static_path: error: {root} holds no pyproject.toml", file=sys.stderr)
        return 2
    entry = build(root)
    pth = site_packages() / PTH_FILE
    pth.write_text(f"{entry}\n")
    print(f"static import path: {entry} (listed in {pth})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
