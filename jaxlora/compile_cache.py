"""The persistent XLA compile cache: a second process compiling the same shapes reads the executables from disk.

The CLI's generate and chat turn it on (in $XDG_CACHE_HOME/jaxlora/xla; --no-compile-cache keeps it off). In the
Python API it is opt-in: `jaxlora.load(..., compile_cache=True)`, `enable()`, or JAXLORA_COMPILE_CACHE=on|FOLDER.
Not on by default there: in a long test session (hundreds of programs in one process) JAX's CPU executable
serialization once aborted the whole process while writing an entry, so a library does not switch it on behind
a program's back.
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


ON = {"1", "on", "true", "yes"}
OFF = {"0", "off", "false", "no"}


def enable_from_environment() -> Path | None:
    """What `jaxlora.load` does by default: JAXLORA_COMPILE_CACHE=on turns the cache on in the default folder,
    =FOLDER in that folder; unset or off leaves the process as it is. Returns the folder turned on (None: none)."""
    setting = os.environ.get("JAXLORA_COMPILE_CACHE", "").strip()
    if not setting or setting.lower() in OFF:
        return None
    return enable_unless_chosen(None if setting.lower() in ON else setting)


def enable_unless_chosen(folder: str | os.PathLike | None = None) -> Path:
    """`enable`, unless the program already chose a cache folder itself (that one stays). Returns the folder."""
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    return enable(folder)
