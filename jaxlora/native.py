"""jaxlora's C++ kernels for the CPU (`jaxlora/kernels/*.cc`): built on first use and registered with XLA.

Each source is compiled with the machine's C++ compiler for its own vector width (-march=native) into
$XDG_CACHE_HOME/jaxlora/kernels (one file per source, jaxlib version and CPU), loaded, and its handler registered
as an XLA FFI target on the CPU. Where that cannot be done (no compiler, a JAX without `jax.ffi`, a failed build)
`register` warns once and returns False, and the caller computes the same thing with XLA. JAXLORA_CPU_KERNEL=off
switches every kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax

SWITCH = "JAXLORA_CPU_KERNEL"
SOURCES = Path(__file__).parent / "kernels"


def switched_off() -> bool:
    return os.environ.get(SWITCH, "").strip().lower() in ("0", "off", "false", "no")


def kernels_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxlora" / "kernels"


def cpu_signature() -> str:
    """What a built file depends on beyond its source: the CPU's instruction sets (it is built for them)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build(compiler: str, source: Path, include: str, target: Path) -> None:
    """Compile `source` into `target`, staged beside it and renamed at the end (processes may race here)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as staging:
        staged = Path(staging) / target.name
        command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}"]
        subprocess.run([*command, str(source), "-o", str(staged)], check=True, capture_output=True, timeout=300)
        os.replace(staged, target)


_REGISTERING = threading.Lock()
_DECLARED: dict[str, tuple] = {}  # target -> register's arguments, for `register_declared`


def register(source: str, symbol: str, target: str, what: str, fallback: str) -> bool:
    """Build `kernels/<source>.cc` (once per machine) and load it, and register its handler `symbol` as the FFI
    target `target`, once per process (threads wait for the first); False, with a warning naming `what` the kernel
    is and the `fallback` the caller uses, where it cannot be."""
    _DECLARED[target] = (source, symbol, target, what, fallback)
    with _REGISTERING:
        return _build_and_register(source, symbol, target, what, fallback)


def declare(source: str, symbol: str, target: str, what: str, fallback: str):
    """Name a kernel for `register_declared`; -> a function that registers it (`register`) and says whether it is."""
    _DECLARED[target] = (source, symbol, target, what, fallback)
    return functools.partial(register, source, symbol, target, what, fallback)


def register_declared() -> None:
    """Register every declared kernel that can be (a stored executable read from disk calls them by name, without
    the tracing that registers them otherwise)."""
    if switched_off() or jax.default_backend() != "cpu":
        return
    for arguments in list(_DECLARED.values()):
        register(*arguments)


@functools.cache
def _build_and_register(source: str, symbol: str, target: str, what: str, fallback: str) -> bool:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None or not hasattr(jax, "ffi") or not hasattr(jax.ffi, "include_dir"):
        missing = "no C++ compiler (c++, g++, clang++ or $CXX)" if compiler is None else "this JAX has no jax.ffi"
        warnings.warn(f"jaxlora: the {what} could not be built ({missing}); {fallback}", stacklevel=4)
        return False
    import jaxlib

    path = SOURCES / f"{source}.cc"
    key = hashlib.sha256(path.read_bytes() + jaxlib.__version__.encode() + cpu_signature().encode())
    built = kernels_folder() / f"{source}-{key.hexdigest()[:24]}.so"
    try:
        if not built.exists():
            _build(compiler, path, jax.ffi.include_dir(), built)
        library = ctypes.cdll.LoadLibrary(str(built))
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, subprocess.SubprocessError, AttributeError) as error:
        detail = getattr(error, "stderr", b"") or b""
        warnings.warn(
            f"jaxlora: the {what} could not be built or loaded ({error}"
            f"{': ' + detail.decode(errors='replace')[-400:] if detail else ''}); {fallback}",
            stacklevel=4,
        )
        return False
    return True
