"""Process-level settings and helpers: the allocator settings that make CPU training fast,
applied where leadtune launches work, and the file locks that keep processes apart.

glibc's malloc returns every large block (> 128 KiB by default, raised dynamically up to 32 MiB)
to the kernel with ``munmap`` and maps it again on the next step. The reference model's
activations are 100-250 MB tensors, so every training step maps and page-faults gigabytes, and
about half the time goes to the kernel. Two variables stop that: ``MALLOC_MMAP_MAX_=0`` (never
serve an allocation by ``mmap``; use the heap) and a trim threshold of 64 GiB (never give heap
memory back). Peak memory stays the same; the process just keeps what it has used.

glibc reads these variables once, at process start, so the commands that train or evaluate
(``leadtune train``, ``search``, ``bench``, ``evaluate``) re-execute themselves with them set
(:func:`reexec_with_allocator_settings`), and Ray trial workers get them through
:func:`ray_runtime_env`. ``LEADTUNE_NO_REEXEC=1`` turns the re-execution off.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

ALLOCATOR_ENV: dict[str, str] = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
}
NO_REEXEC_ENV = "LEADTUNE_NO_REEXEC"
# A trial's share of its GPU's memory, set for trials that share one GPU (fractional GPUs).
GPU_MEMORY_FRACTION_ENV = "LEADTUNE_GPU_MEMORY_FRACTION"
# Commands whose work is dominated by large tensor allocations.
HEAVY_COMMANDS = frozenset({"train", "search", "bench", "evaluate"})


def allocator_settings_active(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``environ`` (default: this process's) already holds :data:`ALLOCATOR_ENV`."""
    environ = os.environ if environ is None else environ
    return all(environ.get(name) == value for name, value in ALLOCATOR_ENV.items())


def environment_with_allocator_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default: this process's) with :data:`ALLOCATOR_ENV` added."""
    return {**(os.environ if environ is None else environ), **ALLOCATOR_ENV}


def environment_without_allocator_settings(
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A copy of ``environ`` with the allocator variables removed (glibc's defaults)."""
    environ = os.environ if environ is None else environ
    return {name: value for name, value in environ.items() if name not in ALLOCATOR_ENV}


def should_reexec(command: str | None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``leadtune <command>`` should restart itself with the allocator settings."""
    environ = os.environ if environ is None else environ
    return (
        command in HEAVY_COMMANDS
        and environ.get(NO_REEXEC_ENV, "") not in ("1", "true", "yes")
        and not allocator_settings_active(environ)
        and sys.platform.startswith("linux")
    )


def reexec_with_allocator_settings(argv: Sequence[str], module: str = "leadtune") -> None:
    """Replace this process by ``python -m <module> <argv>`` with :data:`ALLOCATOR_ENV` set.

    Does not return. ``LEADTUNE_NO_REEXEC`` is set in the new process too, so it can never
    loop, even where glibc ignores the variables.
    """
    environ = environment_with_allocator_settings()
    environ[NO_REEXEC_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], environ)


# Python's third collection threshold while a command sets itself up (see defer_full_collections)
SETUP_FULL_COLLECTION_THRESHOLD = 1000


def defer_full_collections() -> None:
    """Few full garbage collections while a long command sets itself up. Importing Ray, Tune,
    Optuna, MLflow and pandas grows the heap to ~380,000 long-lived objects, and Python walks
    all of them again at each of its full collections as the heap grows: seven in a search's
    first seconds, 1.0 CPU s of the demo's driver. Young objects are still collected as
    usual; :func:`settle_heap` does the one full collection when the set-up is done."""
    import gc

    if _DEFERRED_THRESHOLDS:
        return
    young, middle, full = gc.get_threshold()
    _DEFERRED_THRESHOLDS.append((young, middle, full))
    gc.set_threshold(young, middle, SETUP_FULL_COLLECTION_THRESHOLD)


def settle_heap() -> None:
    """The end of a set-up that :func:`defer_full_collections` began: Python's thresholds
    back, one full collection, and what is left frozen (``gc.freeze``: later full collections
    skip it; it is the process's for good). Nothing happens where the set-up did not begin
    (a search run from Python, a test)."""
    import gc

    if not _DEFERRED_THRESHOLDS:
        return
    gc.set_threshold(*_DEFERRED_THRESHOLDS.pop())
    gc.collect()
    gc.freeze()


_DEFERRED_THRESHOLDS: list[tuple[int, int, int]] = []


def ray_runtime_env(gpus_per_trial: float = 0.0) -> dict[str, dict[str, str]]:
    """``runtime_env`` for ``ray.init``: trial worker processes start with the allocator settings.

    With a fractional ``gpus_per_trial`` (several trials on one GPU) each trial's CUDA caching
    allocator is also capped to that share of the GPU's memory (see
    :func:`apply_gpu_memory_fraction`), so one trial cannot take the memory another one needs.
    """
    env_vars = dict(ALLOCATOR_ENV)
    if 0 < gpus_per_trial < 1:
        env_vars[GPU_MEMORY_FRACTION_ENV] = str(gpus_per_trial)
    return {"env_vars": env_vars}


def apply_gpu_memory_fraction(device: object) -> float | None:
    """Cap this process's CUDA memory to ``$LEADTUNE_GPU_MEMORY_FRACTION`` of ``device``.

    Returns the fraction applied, or None when the variable is unset. A bad value is an error.
    """
    text = os.environ.get(GPU_MEMORY_FRACTION_ENV, "").strip()
    if not text:
        return None
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise ValueError(
            f"{GPU_MEMORY_FRACTION_ENV}={text!r} is not a fraction in (0, 1]; unset it or fix it"
        )
    import torch

    torch.cuda.set_per_process_memory_fraction(fraction, device)  # type: ignore[arg-type]
    return fraction


def describe_runtime() -> dict[str, object]:
    """What a benchmark should print about the process it ran in."""
    import platform

    import torch

    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                    flags = [flag for flag in wanted if flag in present]
                    break
    except OSError:
        pass
    model_name = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model_name = next(
                (
                    line.split(":", 1)[1].strip()
                    for line in cpuinfo
                    if line.startswith("model name")
                ),
                "",
            )
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": model_name or platform.processor(),
        "cpu_flags": flags,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "allocator_settings": allocator_settings_active(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# -- locks -------------------------------------------------------------------------------------


class LockBusy(RuntimeError):
    """A lock that another live process holds."""


@contextlib.contextmanager
def file_lock(path: Path, what: str, timeout: float = 600.0, quiet: bool = False) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    Waits up to ``timeout`` seconds, saying once what it waits for; raises :class:`LockBusy`
    after that (``timeout=0``: at once). The kernel drops the lock if this process dies.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 (closed below)
    try:
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(path)
                if time.monotonic() >= deadline:
                    raise LockBusy(
                        f"{what or path} is held by another process{holder} (lock {path})"
                    ) from None
                if not said and not quiet:
                    print(
                        f"[leadtune] waiting for {what}{holder} (lock {path}, up to "
                        f"{timeout:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                    said = True
                time.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def _holder(path: Path) -> str:
    try:
        pid = Path(path).read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def check_writable(path: Path, flag: str, file: bool = False) -> None:
    """That ``path`` (a folder, or with ``file`` a file to be written) can be written, checked
    before any work starts and without creating anything: a probe file goes into the nearest
    folder that already exists and is removed at once. One line naming the flag if not."""
    import uuid

    path = Path(path).absolute()
    target = path.parent if file else path
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    else:
        probe = existing / f".leadtune-write-test-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            problem = exc.strerror or str(exc)
    if file and path.is_dir():
        problem = "it is a folder"
    if problem:
        raise ValueError(
            f"{flag} {path} cannot be written ({problem}); pass a path you can write to"
        )
