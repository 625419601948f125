"""leadtune's fused CPU kernels (``csrc/cpu_kernels.cpp``), compiled on first use.

The kernels are built with PyTorch's C++ extension tooling (a C++ compiler and ninja) the first
time a process needs them, and cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); later processes load the cached library in well under a second.
The first build takes about 35 s on two cores.

Where they cannot be built (no compiler, say), leadtune warns once and uses the PyTorch code paths
that compute the same functions, only slower. ``LEADTUNE_KERNELS=0`` skips them on purpose.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cpp"
DISABLE_VARIABLE = "LEADTUNE_KERNELS"
# IEEE semantics: no -ffast-math. Under it GCC assumes no NaN or infinity ever occurs and calls
# glibc's finite-only vector exp, which returned NaN for the GRU gates of a 30 mV electrode
# artefact. -fno-math-errno and -fno-trapping-math change no value: errno and floating-point
# traps are never read here.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
if platform.machine() in ("x86_64", "AMD64"):  # use 512-bit vectors where AVX-512 exists
    FLAGS.insert(2, "-mprefer-vector-width=512")

_lock = threading.Lock()
_loaded: ModuleType | None = None
_failed: str | None = None


def enabled() -> bool:
    """Whether the kernels may be used (``LEADTUNE_KERNELS=0`` turns them off)."""
    return os.environ.get(DISABLE_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def load() -> ModuleType | None:
    """The compiled kernels, building them if needed; ``None`` if disabled or unbuildable."""
    global _loaded, _failed
    if not enabled():
        return None
    if _loaded is not None or _failed is not None:
        return _loaded
    with _lock:
        if _loaded is None and _failed is None:
            try:
                _loaded = _build()
            except Exception as exc:  # no compiler, no ninja, a failed build: fall back
                last_line = (str(exc).strip().splitlines() or [""])[-1]
                _failed = f"{type(exc).__name__}: {last_line}"
                warnings.warn(
                    f"leadtune: the fused CPU kernels could not be built ({_failed}); using the "
                    f"slower PyTorch code path. Install a C++ compiler (g++) to get them, or set "
                    f"{DISABLE_VARIABLE}=0 to silence this.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _loaded


def for_tensor(tensor: torch.Tensor) -> ModuleType | None:
    """The kernels if they apply to ``tensor`` (a float32 or float64 CPU tensor) and are built."""
    if tensor.device.type != "cpu" or tensor.dtype not in (torch.float32, torch.float64):
        return None
    return load()


def failure() -> str | None:
    """Why the last build failed, if it did."""
    return _failed


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    return cpp_extension.load(
        # -march=native: a build is only valid on this kind of CPU, so the name carries it (a
        # home folder shared by different machines keeps one build per kind).
        name=f"leadtune_cpu_kernels_{cpu_fingerprint()}",
        sources=[str(SOURCE)],
        extra_cflags=FLAGS,
        extra_ldflags=["-fopenmp"],
        verbose=os.environ.get("LEADTUNE_KERNELS_VERBOSE") == "1",
    )


def cpu_fingerprint() -> str:
    """A short hash of this CPU's model and instruction-set flags."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        text += platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    """PyTorch runs ``ninja`` from PATH; a virtual environment's own is not there unless the
    environment is activated, so add the ninja package's folder and the interpreter's."""
    folders = [str(Path(sys.executable).parent)]
    try:
        import ninja

        folders.insert(0, str(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "")
    missing = [folder for folder in folders if folder not in path.split(os.pathsep)]
    if missing:
        os.environ["PATH"] = os.pathsep.join([*missing, path])
