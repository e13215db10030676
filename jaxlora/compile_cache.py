"""The persistent XLA compile cache: a second process compiling the same shapes reads the executables from disk."""

from __future__ import annotations

import os
from pathlib import Path

import jax

# Compilations faster than this are not worth a disk write.
MIN_COMPILE_SECONDS = 0.5


def default_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxlora" / "xla"


def enable(folder: str | os.PathLike | None = None) -> Path:
    """Turn the cache on for this process (default folder: $XDG_CACHE_HOME/jaxlora/xla); returns the folder."""
    folder = Path(folder) if folder is not None else default_folder()
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return folder
