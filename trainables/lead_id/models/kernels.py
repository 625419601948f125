"""leadtune's fused CPU kernels (``cpu_kernels.cpp``), compiled on first use.

The kernels are built with PyTorch's C++ extension tooling (a C++ compiler and ninja) the first
time a process needs them, into a folder named by the CPU kind and a hash of the source, the
flags, torch and Python (under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
Later processes import the built library directly, without any lock, in well under a second. The
first build takes about 35 s on two cores. Builds are serialised by an ``flock`` (released by the
kernel when its process dies, so a killed build never blocks the next one); a process waiting for
another's build says so and gives up after ``BUILD_WAIT_S``, using the PyTorch code path.

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

SOURCE = Path(__file__).resolve().parent / "cpu_kernels.cpp"
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


BUILD_WAIT_S = 600.0


def build_name() -> str:
    """The library's name: CPU kind (the build uses -march=native) and a hash of everything that
    decides its content, so a changed source, flag, torch or Python gets a build of its own."""
    recipe = "\n".join(
        [SOURCE.read_text(), *FLAGS, torch.__version__, sys.version, platform.machine()]
    )
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    return f"leadtune_cpu_kernels_{cpu_fingerprint()}_{digest}"


def build_dir(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "leadtune" / name


def _import_library(name: str, library: Path) -> ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    from leadtune.trainables.runtime import LockBusy, file_lock

    name = build_name()
    folder = build_dir(name)
    library = folder / f"{name}.so"
    if library.is_file():  # built before: import it, no lock involved
        return _import_library(name, library)
    try:
        with file_lock(
            folder / "leadtune-build.lock",
            "another process building leadtune's CPU kernels",
            timeout=BUILD_WAIT_S,
        ):
            if library.is_file():  # built while this process waited
                return _import_library(name, library)
            # PyTorch's own lock file, left by a build that was killed: no process holds the
            # flock above, so nobody is building; it would make cpp_extension wait forever.
            (folder / "lock").unlink(missing_ok=True)
            _put_ninja_on_path()
            return cpp_extension.load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=FLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
                verbose=os.environ.get("LEADTUNE_KERNELS_VERBOSE") == "1",
            )
    except LockBusy as exc:
        raise RuntimeError(f"gave up waiting after {BUILD_WAIT_S:.0f} s: {exc}") from None


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
