"""The persistent XLA compile cache: a second process compiling the same shapes reads the executables from disk.

`jaxlora.load` turns it on by default (the CLI too), in $XDG_CACHE_HOME/jaxlora/xla; JAXLORA_COMPILE_CACHE=off
(or `load(..., compile_cache=False)`, or the CLI's --no-compile-cache) keeps it off, JAXLORA_COMPILE_CACHE=FOLDER
moves it, and a cache folder the program chose itself (jax_compilation_cache_dir) is left as it is.
"""

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


OFF = {"0", "off", "false", "no"}


def enable_by_default() -> Path | None:
    """What `jaxlora.load` does: turn the cache on unless JAXLORA_COMPILE_CACHE says off or the process already
    has a cache folder of its own. Returns the folder in use (None: off)."""
    setting = os.environ.get("JAXLORA_COMPILE_CACHE", "").strip()
    if setting.lower() in OFF:
        return None
    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return Path(chosen)
    return enable(setting or None)
