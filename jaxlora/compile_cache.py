"""The persistent XLA compile cache: a second process compiling the same shapes reads the executables from disk.

`jaxlora.load` turns it on (in $XDG_CACHE_HOME/jaxlora/xla) unless told not to: `load(..., compile_cache=False)`,
JAXLORA_COMPILE_CACHE=off (or =FOLDER for another folder), the CLI's --no-compile-cache, or a cache folder the
program chose itself, which stays (without jaxlora's store of whole executables, `jaxlora.executables`, which
`enable` puts in its folder). Every program is written, however fast it compiled: the dozen small ones
around generation (keys, casts, the empty cache) cost a second process 0.2 s to compile again.

One caution, measured here once: in a test session that compiled hundreds of programs in one process, JAX's CPU
executable serialization aborted the process while writing an entry. The test suite runs with the cache off
(JAXLORA_COMPILE_CACHE=off), but for the processes that check the cache itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from jaxlora import executables

# Compilations faster than this are not written (at 0.5 s, every program but prefill and decode was compiled
# again by each new process).
MIN_COMPILE_SECONDS = 0.0


def default_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxlora" / "xla"


def enable(folder: str | os.PathLike | None = None, min_compile_seconds: float = MIN_COMPILE_SECONDS) -> Path:
    """Turn the cache on for this process (default folder: $XDG_CACHE_HOME/jaxlora/xla): executables that took
    at least `min_compile_seconds` to compile are written there and read back by later processes. Returns the
    folder."""
    folder = Path(folder) if folder is not None else default_folder()
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    executables.use(folder / executables.SUBFOLDER)
    return folder


ON = {"1", "on", "true", "yes"}
OFF = {"0", "off", "false", "no"}


def enable_by_default() -> Path | None:
    """What `jaxlora.load` does unless told: the cache on in the default folder; JAXLORA_COMPILE_CACHE=off leaves
    the process as it is, =FOLDER puts it there. Returns the folder in use (None: none)."""
    setting = os.environ.get("JAXLORA_COMPILE_CACHE", "").strip()
    if setting.lower() in OFF:
        return None
    return enable_unless_chosen(None if not setting or setting.lower() in ON else setting)


def enable_unless_chosen(folder: str | os.PathLike | None = None) -> Path:
    """`enable`, unless the program already chose a cache folder itself (that one stays). Returns the folder."""
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)  # the program's own folder: jaxlora adds no store to it
    return enable(folder)
