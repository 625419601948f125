"""leadtune installs under one name: the wheel holds ``leadtune`` only (with the kernels' C++
source and the bundled sample), the package list matches the folders, bare names do not
import, and the import graph runs one way."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {
    "leadtune": "leadtune",
    "leadtune.search": "search",
    "leadtune.trainables": "trainables",
    "leadtune.spaces": "spaces",
    "leadtune.analysis": "analysis",
    "leadtune.bundled": "data",
}


def test_the_package_list_matches_the_folders() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == FOLDERS
    found = set()
    for package, folder in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((package, *relative)))
    # folders of data only: listed so that setuptools does not warn it would ignore them
    data_only = {"leadtune.bundled.models"}
    assert set(config["packages"]) == found | data_only


@pytest.mark.parametrize("bare", ["search", "spaces", "analysis", "trainables"])
def test_bare_top_level_names_do_not_import(bare: str, tmp_path: Path) -> None:
    for cwd in (tmp_path, REPO):  # not installed, and not even from the checkout
        done = subprocess.run(
            [sys.executable, "-c", f"import {bare}"], cwd=cwd, capture_output=True, text=True
        )
        assert done.returncode != 0
        assert "ModuleNotFoundError" in done.stderr or f"import leadtune.{bare}" in done.stderr


def test_the_wheel_holds_leadtune_only_with_its_data(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("leadtune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"leadtune", wheel.name.split("-")[0]
            + "-" + wheel.name.split("-")[1] + ".dist-info"}  # fmt: skip
    assert "leadtune/trainables/lead_id/models/cpu_kernels.cpp" in names
    assert "leadtune/bundled/ptbxl-sample/records100/00000/00001_lr.dat" in names
    assert "leadtune/bundled/ptbxl-sample/LICENSE.txt" in names
    for part in ("leadtune-model.json", "weights.pt", "MODEL_CARD.md"):  # the shipped model
        assert f"leadtune/bundled/models/lead-id/{part}" in names
    assert not [n for n in names if "__pycache__" in n]


LAYERS = ["trainables", "spaces", "search", "analysis"]  # imports may only point left


def _leadtune_imports(path: Path, modules: frozenset[str] = frozenset()) -> set[str]:
    """The leadtune modules a file imports (``from package import submodule`` as the
    submodule)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("leadtune."):
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
            found.update(submodules or {node.module})
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("leadtune."))
    return found


def _delivery(path: Path) -> bool:
    """A task's delivery package (trainables/<task>/delivery/): on top, beside the CLI."""
    return "delivery" in path.relative_to(REPO).parts[2:3]


def test_imports_run_one_way_and_search_names_no_task() -> None:
    """data and tasks -> spaces -> search -> analysis; the tasks' delivery packages, the CLI and
    benchmarks on top, and nothing below imports a delivery package."""
    for layer in LAYERS:
        allowed = set(LAYERS[: LAYERS.index(layer) + 1]) | {"bundled"}
        for path in (REPO / layer).rglob("*.py"):
            if _delivery(path):
                continue
            for module in _leadtune_imports(path):
                target = module.split(".")[1]
                assert target in allowed, f"{path.relative_to(REPO)} imports {module}"
                assert ".delivery" not in module or module == "leadtune.analysis.delivery", (
                    f"{path.relative_to(REPO)} imports {module}: only the CLI imports a task's "
                    "delivery"
                )
    for path in (REPO / "search").rglob("*.py"):
        text = path.read_text()
        for word in ("lead_id", "LeadId", "lead-id"):
            assert word not in text, f"{path.relative_to(REPO)} names the task ({word})"
    for path in (REPO / "analysis").rglob("*.py"):
        code = _code_without_docstrings(path)
        for word in ("lead_id", "diagnosis"):
            found = [line for line in code.splitlines() if word in line]
            assert not found, f"{path.relative_to(REPO)} names a task: {found[0].strip()}"
    for path in (REPO / "trainables").rglob("*.py"):
        if "lead_id" in path.parts:
            continue  # a task may use the task-neutral modules, not the other way round
        for module in _leadtune_imports(path):
            assert ".lead_id" not in module or path.name == "tasks.py", (path, module)


def _code_without_docstrings(path: Path) -> str:
    """The file's text with its docstrings blanked (the issue's rule: docstrings may name tasks)."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                for number in range(body[0].lineno - 1, body[0].end_lineno or body[0].lineno):
                    lines[number] = ""
    return "\n".join(lines)


def test_the_import_graph_has_no_cycles() -> None:
    """Every leadtune import, module-level or inside a function, as an edge between modules."""
    modules: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    names = frozenset(modules)
    graph = {
        name: {m for m in _leadtune_imports(path, names) if m in modules and m != name}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_the_static_path_lays_the_checkout_out_as_the_installed_package(tmp_path):
    """build/static-path/leadtune links every mapped folder where the package has it, so
    static tools (pyright) resolve leadtune.* imports; the path holds only leadtune."""
    import importlib.machinery

    from leadtune.static_path import build, package_dirs

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "pyproject.toml").write_text((repo / "pyproject.toml").read_text())
    mapping = package_dirs(root)
    for folder in set(mapping.values()):
        (root / folder).mkdir()
        (root / folder / "__init__.py").write_text("")
    (root / "search" / "tuner.py").write_text("X = 1\n")
    entry = build(root)
    assert [p.name for p in entry.iterdir()] == ["leadtune"]
    spec = importlib.machinery.PathFinder.find_spec("tuner", [str(entry / "leadtune" / "search")])
    assert spec is not None and Path(spec.origin).resolve() == root / "search" / "tuner.py"
    for name, folder in mapping.items():
        if name != "leadtune":
            link = entry / "leadtune" / name.split(".")[1]
            assert link.is_symlink() and link.resolve() == (root / folder).resolve()
