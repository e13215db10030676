"""The persistent XLA compile cache: a second process compiling the same shapes reads the executables from disk."""

from __future__ import annotations

import os
from pathlib import Path

import jax

# Compilations faster than this are not worth a disk write.
MIN_COMPILE_SECONDS = 0.5


def default_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxlora" / "xla"


def enable(folder: str | os.PathLike | None = None, min_compile_seconds: float = MIN_COMPILE_SECONDS) -> Path:
    """Turn the cache on for this process (default folder: $XDG_CACHE_HOME/jaxlora/xla): executables that took
    at least `min_compile_seconds` to compile are written there and read back by later processes. Returns the
    folder."""
    folder = Path(folder) if folder is not None else default_folder()
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return folder
