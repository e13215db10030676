"""The persistent XLA compile cache: a second process compiling the same shapes reads the executables from disk.

`jaxlora.load` turns it on (in $XDG_CACHE_HOME/jaxlora/xla) unless told not to: `load(..., compile_cache=False)`,
JAXLORA_COMPILE_CACHE=off (or =FOLDER for another folder), the CLI's --no-compile-cache, or a cache folder the
program chose itself, which stays (without jaxlora's store of whole executables, `jaxlora.executables`, which
`enable` puts in its folder). Every program is written, however fast it compiled: the dozen small ones
around generation (keys, casts, the empty cache) cost a second process 0.2 s to compile again.

The folder is kept under a size (`MAX_BYTES`, or JAXLORA_COMPILE_CACHE_MAX_MB; `none` for no limit): each process
that turns the cache on (`enable`) deletes the least recently used entries, JAX's and the stored executables
alike, once they hold more, down to `PRUNED_TO` of it. Nothing else in the folder is touched, and a cache folder
the program chose itself is never pruned. The last use of JAX's entries is their access time (or JAX's own record
of it, where its eviction is on); a read of a stored executable marks its file.

One caution, measured here once: in a test session that compiled hundreds of programs in one process, JAX's CPU
executable serialization aborted the process while writing an entry. The test suite runs with the cache off
(JAXLORA_COMPILE_CACHE=off), but for the processes that check the cache itself.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

import jax

from jaxlora import executables
from jaxlora.errors import UsageError

# Compilations faster than this are not written (at 0.5 s, every program but prefill and decode was compiled
# again by each new process).
MIN_COMPILE_SECONDS = 0.0


# The size the folder is kept under, and what pruning brings it down to (not back to the brim: that would prune at
# every start). SmolLM2 generating at one batch size and prompt bucket writes about 2.7 MB (2.4 of it the store's).
MAX_BYTES = 1 << 30
PRUNED_TO = 0.75
# A staged file older than this was left by a writer that died before renaming it.
STAGED_FILE_SECONDS = 3600.0
MAX_MB_VARIABLE = "JAXLORA_COMPILE_CACHE_MAX_MB"


def default_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxlora" / "xla"


def size_limit() -> int | None:
    """The size the cache folder is kept under, in bytes: JAXLORA_COMPILE_CACHE_MAX_MB, else `MAX_BYTES` (None: no
    limit, from `none`)."""
    setting = os.environ.get(MAX_MB_VARIABLE, "").strip()
    if not setting:
        return MAX_BYTES
    if setting.lower() == "none":
        return None
    try:
        megabytes = float(setting)
    except ValueError:
        megabytes = -1.0
    if not megabytes > 0:
        raise UsageError(f"{MAX_MB_VARIABLE}={setting!r}: give a size in MB, such as 2048, or 'none' for no limit")
    return int(megabytes * 2**20)


def enable(folder: str | os.PathLike | None = None, min_compile_seconds: float = MIN_COMPILE_SECONDS) -> Path:
    """Turn the cache on for this process (default folder: $XDG_CACHE_HOME/jaxlora/xla): executables that took
    at least `min_compile_seconds` to compile are written there and read back by later processes. The folder's
    entries are first pruned to `size_limit()`. Returns the folder."""
    folder = Path(folder) if folder is not None else default_folder()
    limit = size_limit()
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    executables.use(folder / executables.SUBFOLDER)
    if limit is not None:
        try:
            prune(folder, limit)
        except OSError as e:  # a cache that cannot be pruned still works
            warnings.warn(f"jaxlora: the compile cache in {folder} was not pruned: {e}", stacklevel=2)
    return folder


@dataclass(frozen=True)
class Entry:
    """One cached program: its files (deleted together), their size, and when it was last used (seconds)."""

    files: tuple[Path, ...]
    size: int
    last_used: float


def entries(folder: str | os.PathLike) -> list[Entry]:
    """The cache's entries in `folder`: JAX's (`KEY-cache`, with its `KEY-atime` where JAX's eviction is on) and
    the stored executables. A file another process deletes meanwhile is left out."""
    folder = Path(folder)
    found = []
    for path in folder.glob("*-cache") if folder.is_dir() else []:
        access_record = path.with_name(path.name.removesuffix("-cache") + "-atime")
        try:
            stat = path.stat()
            if not S_ISREG(stat.st_mode):
                continue
            used = max(stat.st_atime, stat.st_mtime)
            files: tuple[Path, ...] = (path,)
            if access_record.is_file():
                used = max(used, int.from_bytes(access_record.read_bytes()[:8], "little") / 1e9)
                files += (access_record,)
        except FileNotFoundError:
            continue
        found.append(Entry(files, stat.st_size, used))
    for path in executables.own_files(folder / executables.SUBFOLDER)[0]:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        found.append(Entry((path,), stat.st_size, max(stat.st_atime, stat.st_mtime)))
    return found


def prune(folder: str | os.PathLike, max_bytes: int, now: float | None = None) -> int:
    """Delete the least recently used entries in `folder` until they hold at most `PRUNED_TO` of `max_bytes`, when
    they hold more than `max_bytes`, and the store's staged files older than `STAGED_FILE_SECONDS`. Only files named
    as the cache's own are deleted. Returns the bytes freed."""
    now = time.time() if now is None else now
    freed = 0
    for staged in executables.own_files(Path(folder) / executables.SUBFOLDER)[1]:
        try:
            stat = staged.stat()
            if now - stat.st_mtime > STAGED_FILE_SECONDS:
                staged.unlink()
                freed += stat.st_size
        except FileNotFoundError:
            continue
    cached = sorted(entries(folder), key=lambda entry: entry.last_used)
    total = sum(entry.size for entry in cached)
    if total <= max_bytes:
        return freed
    for entry in cached:
        if total <= PRUNED_TO * max_bytes:
            break
        for path in entry.files:
            path.unlink(missing_ok=True)
        total -= entry.size
        freed += entry.size
    return freed


ON = {"1", "on", "true", "yes"}
OFF = {"0", "off", "false", "no"}


def enable_by_default() -> Path | None:
    """What `jaxlora.load` does unless told: the cache on in the default folder; JAXLORA_COMPILE_CACHE=off leaves
    the process as it is, =FOLDER puts it there. Returns the folder in use (None: none)."""
    if os.environ.get("JAXLORA_COMPILE_CACHE", "").strip().lower() in OFF:
        return None
    return enable_unless_chosen()


def folder_setting() -> str | None:
    """The folder JAXLORA_COMPILE_CACHE names (None: it is unset, on or off)."""
    setting = os.environ.get("JAXLORA_COMPILE_CACHE", "").strip()
    return None if not setting or setting.lower() in ON | OFF else setting


def enable_unless_chosen(folder: str | os.PathLike | None = None) -> Path:
    """`enable` (in `folder`, else the folder JAXLORA_COMPILE_CACHE names, else the default), unless the program
    already chose a cache folder itself (that one stays). Returns the folder."""
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)  # the program's own folder: jaxlora adds no store to it
    return enable(folder if folder is not None else folder_setting())
