"""One model variant in its own process: the JSON-lines protocol between `leadtune bench` and
its workers, and the worker's peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# --- worker: one model variant in its own process ---------------------------------------------


def worker_main() -> None:
    """Serve JSON requests on stdin, one per line; answer each with one JSON line on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything printed by libraries must not break the protocol
    state: dict[str, Any] = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = _serve(request, state)
        except Exception as exc:  # the parent reports it; the worker stays usable
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            out.write(json.dumps(reply) + "\n")
            out.flush()
        except BrokenPipeError:  # the parent is gone: nothing left to serve
            break
        if request.get("op") == "quit":
            break


def _serve(request: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    op = request["op"]
    if op == "init":
        if request.get("threads"):
            torch.set_num_threads(int(request["threads"]))
        from leadtune.trainables.lead_id.models import ModelConfig, count_parameters, create_model
        from leadtune.trainables.lead_id.models.plain_reference import create_plain_model
        from leadtune.trainables.runtime import allocator_settings_active

        torch.manual_seed(0)
        config = ModelConfig(**request["model"])
        model = create_model(config) if request["variant"] == "fast" else create_plain_model(config)
        if request.get("batch_file"):
            batch = torch.from_numpy(np.load(request["batch_file"]))
        else:
            generator = torch.Generator().manual_seed(1)
            shape = (request["batch_size"], request["leads"], request["samples"])
            batch = 0.3 * torch.randn(shape, generator=generator)
        state.update(
            model=model,
            batch=batch,
            labels=torch.arange(batch.shape[1]).expand(batch.shape[0], -1).reshape(-1),
            optimizer=torch.optim.AdamW(model.parameters(), lr=7e-4, weight_decay=1e-4),
        )
        return {
            "parameters": count_parameters(model),
            "threads": torch.get_num_threads(),
            "allocator_settings": allocator_settings_active(),
            "pid": os.getpid(),
        }
    if op in ("train", "infer"):
        model, batch = state["model"], state["batch"]
        wall, cpu = [], []
        for _ in range(int(request["steps"])):
            started, started_cpu = time.perf_counter(), time.process_time()
            if op == "train":
                model.train()
                logits = model(batch)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), state["labels"])
                state["optimizer"].zero_grad(set_to_none=True)
                loss.backward()
                state["optimizer"].step()
            else:
                model.eval()
                with torch.no_grad():
                    model(batch)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        return {"wall": wall, "cpu": cpu}
    if op == "reset_peak":
        try:  # Linux: resets VmHWM, the peak resident set size
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return {"reset": False}
        return {"reset": True}
    if op == "peak":
        return {"peak_bytes": peak_resident_bytes()}
    if op == "quit":
        return {}
    raise ValueError(f"unknown request {op!r}")


def peak_resident_bytes() -> int | None:
    """This process's peak resident set size (VmHWM), or None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, variant: str, allocator: str) -> None:
        from leadtune.trainables import runtime

        self.variant, self.allocator = variant, allocator
        if allocator == "tuned":
            environ = runtime.environment_with_allocator_settings()
        else:
            environ = runtime.environment_without_allocator_settings()
        environ[runtime.NO_REEXEC_ENV] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from leadtune.bench.worker import worker_main; worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=environ,
            text=True,
        )

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"bench worker ({self.variant}, {self.allocator} malloc) exited with code "
                f"{self.process.wait()}; run with fewer --rounds or a smaller --batch-size"
            )
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"bench worker ({self.variant}): {reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.ask({"op": "quit"})
            except (RuntimeError, OSError, ValueError):
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
