"""Screenshots of the MLflow UI on a search's database, taken the way a user looks at it.

    python -m leadtune.analysis.screenshots --storage-path runs/demo --out runs/demo/screenshots

Starts ``mlflow server`` on the search's SQLite database (127.0.0.1, a free port), opens three
pages in headless Chromium and saves them as PNG: the experiment (its runs table), the best trial's
child run, and the registered model. The server stops when the script ends.

Chromium is not a Python package: install it with the system's package manager (Debian/Ubuntu:
``apt-get install chromium``) or point ``--chromium`` at any Chrome/Chromium binary.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium(given: str | None) -> str:
    for name in (given,) if given else CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(
        f"no Chromium found ({given or ', '.join(CHROMIUM_NAMES)}); install it "
        "(Debian/Ubuntu: apt-get install chromium) or pass --chromium PATH"
    )


def screenshot(chromium: str, url: str, path: Path, size: str, wait_ms: int) -> Path:
    """One page as PNG; ``wait_ms`` of virtual time lets the single-page app fetch and render."""
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        f"--window-size={size}", f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not path.is_file():
        raise RuntimeError(f"chromium failed on {url}: {done.stderr.strip()[-300:]}")
    return path


def pages(client, state: dict, base: str) -> dict[str, str]:
    """name -> URL: the experiment, the best trial's child run, the registered model."""
    from leadtune.search.tracking import ui_url

    experiment = client.get_experiment(state["experiment_id"])
    urls = {"experiment": ui_url(base, experiment.experiment_id)}
    parent = state.get("parent_run_id")
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
        order_by=[f"metrics.{state['objective']} {'ASC' if state['mode'] == 'min' else 'DESC'}"],
        max_results=1,
    )
    if children:
        run = children[0].info.run_id
        urls["child_run"] = ui_url(base, experiment.experiment_id, run)
    name = state.get("register_name")
    if name and client.search_model_versions(f"name = '{name}'"):
        urls["model"] = ui_url(base, model=name)
    return urls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m leadtune.analysis.screenshots",
        description="PNG screenshots of the MLflow UI (experiment, best child run, model) on the "
        "SQLite database a search started its own server on.",
    )
    parser.add_argument("--storage-path", default="runs/demo", help="the search's --storage-path")
    parser.add_argument("--study", default=None, help="study (default: the only one there)")
    parser.add_argument("--out", default=None, help="folder (default: STORAGE/screenshots)")
    parser.add_argument("--chromium", default=None, help="Chromium binary (default: on PATH)")
    parser.add_argument("--size", default="1600,1000", help="window width,height in pixels")
    parser.add_argument("--wait-ms", type=int, default=20000, help="render time per page")
    args = parser.parse_args(argv)

    from leadtune.search.state import find_search, read_state
    from leadtune.search.tracking import MlflowServer, mlflow_client

    try:
        chromium = find_chromium(args.chromium)
        storage = Path(args.storage_path)
        db = storage / "mlflow.db"
        if not db.is_file():
            raise FileNotFoundError(
                f"{db} does not exist: pass the --storage-path of a search that started its "
                "own MLflow server"
            )
        state = read_state(find_search(storage, args.study))
    except (FileNotFoundError, ValueError) as exc:
        print(f"screenshots: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else storage / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(db_path=db, artifacts=storage / "mlartifacts").start()
    try:
        urls = pages(mlflow_client(server.uri), state, server.uri)
        for name, url in urls.items():
            path = screenshot(chromium, url, out / f"{name}.png", args.size, args.wait_ms)
            print(f"{name}: {url} -> {path}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
