"""Write outputs all-or-nothing, and never lose a user's data.

Every command that writes a folder or file goes through `staged` (or `staged_files`): the output is written beside
its destination under a hidden name (`.NAME.partial-XXXXXXXX`) and renamed into place at the end, so an error or
an interruption leaves nothing at the destination. An existing destination is refused without `force`; with
`force` it is replaced only when it is recognisably jaxlora's (or PEFT's) output, never a folder or file of the
user's. The current folder and its parents are refused outright. Staging leftovers of an interrupted run are ours:
the next write to the same destination removes them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from jaxlora.errors import UsageError

# Written into every folder jaxlora stages: what makes it recognisably ours later.
MARKER = ".jaxlora-output"
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"}

# Signals received inside `uninterrupted`, raised when it ends; and how deep in `uninterrupted` we are.
_held_signals: list[int] = []
_uninterrupted_depth = 0


def raise_interrupt(signum: int, _frame) -> None:
    """Signal handler for SIGINT and SIGTERM: end the run as Ctrl-C does (KeyboardInterrupt carrying the signal
    number), so staged outputs are removed on the way out; inside `uninterrupted` the signal waits for its end."""
    if _uninterrupted_depth:
        _held_signals.append(signum)
        return
    raise KeyboardInterrupt(signum)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (as handled by `raise_interrupt`) until the block ends, then raise the interrupt.

    For library writes that run background threads (orbax's commit and metadata threads): an interrupt that
    broke the main thread's wait would leave those threads writing into a staging folder being removed, and
    failing with tracebacks at interpreter shutdown.
    """
    global _uninterrupted_depth
    _uninterrupted_depth += 1
    try:
        yield
    finally:
        _uninterrupted_depth -= 1
    if not _uninterrupted_depth and _held_signals:
        signum = _held_signals[-1]
        _held_signals.clear()
        raise KeyboardInterrupt(signum)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _json_field(path: Path, key: str):
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def recognised_folder(path: Path) -> str | None:
    """What jaxlora (or PEFT) output the folder `path` is, or None if it is not recognisably one."""
    if (path / MARKER).is_file():
        return "jaxlora output"
    if _json_field(path / "config.json", "format") == "jaxlora":
        return "jaxlora checkpoint"
    if (path / "lora_config.json").is_file() and (path / "adapters").is_dir():
        return "jaxlora adapters"
    names = {p.name for p in path.iterdir()}
    if "adapter_config.json" in names and names <= PEFT_FILES:
        return "PEFT adapter"
    return None


def check_destination(dst: Path) -> None:
    """Refuse the current folder, a parent of it, or the filesystem root as a destination, and a destination
    whose nearest existing folder is a file or not writable (cheap: callers check before any heavy work)."""
    resolved, here = dst.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UsageError(f"refusing to write to {dst}: it is the current folder or one of its parents")
    existing = resolved.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write {dst}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {dst}: {existing} is not writable")


def clean_leftovers(dst: Path) -> None:
    """Remove what an interrupted write to `dst` left beside it (our hidden staging and swap names)."""
    if not dst.parent.is_dir():
        return
    pattern = re.compile(re.escape(f".{dst.name}.") + r"(partial|old)-[0-9a-f]{8}")
    for leftover in dst.parent.iterdir():
        if pattern.fullmatch(leftover.name):
            _remove(leftover)


def check_replaceable(dst: Path, force: bool, recognise: Callable[[Path], str | None] | None = None) -> None:
    """An existing `dst` may be replaced only with `force`, and only when it is recognisably our output."""
    if not (dst.exists() or dst.is_symlink()):
        return
    if not force:
        raise UsageError(f"{dst} already exists (pass --force to overwrite it)")
    if dst.is_symlink():
        raise UsageError(f"refusing to replace {dst}: it is a symbolic link")
    kind = recognised_folder(dst) if dst.is_dir() else (recognise(dst) if recognise else None)
    if kind is None:
        what = "folder" if dst.is_dir() else "file"
        raise UsageError(f"refusing to replace {dst}: that {what} is not jaxlora output (--force replaces only ours)")


@contextmanager
def staged(
    dst: str | Path,
    force: bool = False,
    folder: bool = True,
    recognise: Callable[[Path], str | None] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside `dst` to write into (a fresh folder, or a file path with `folder=False`);
    it becomes `dst` when the block ends without an error and is removed otherwise.

    An existing `dst` is replaced only with `force`, and only if it is our output: a folder we staged (it holds
    MARKER) or a jaxlora checkpoint / adapter folder / PEFT adapter; a file when `recognise(path)` names it.
    """
    dst = Path(dst)
    check_destination(dst)
    check_replaceable(dst, force, recognise)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(dst)
    staging = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        if folder:
            staging.mkdir()
            (staging / MARKER).write_text(json.dumps({"written_by": "jaxlora"}) + "\n")
        yield staging
        if dst.exists():  # force, on our own output: swap the new output in, then drop the old one
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            dst.rename(old)
            staging.rename(dst)
            _remove(old)
        else:
            staging.rename(dst)
    finally:
        _remove(staging)


@contextmanager
def staged_files(
    dst: str | Path, force: bool = False, recognise: Callable[[Path], str | None] | None = None
) -> Iterator[Path]:
    """For a file that may come with sidecars (ONNX's `<name>.data`): yield a temporary folder beside `dst` to write
    `dst.name` and its sidecars into; at the end each moves next to `dst`, or all are removed on an error. An
    existing `dst` is replaced only with `force` and when `recognise` names it; its sidecars go with it."""
    dst = Path(dst)
    check_destination(dst)
    check_replaceable(dst, force, recognise)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(dst)
    folder = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        yield folder
        written = sorted(folder.iterdir())
        for file in written:
            target = dst.parent / file.name
            if target != dst and target.exists():
                # A sidecar name taken by something that is not the output we replace: never overwrite it.
                if not (force and dst.exists() and target.name.startswith(dst.name + ".")):
                    raise UsageError(f"{target} already exists (pass --force to overwrite it)")
        for file in written:
            file.replace(dst.parent / file.name)
    finally:
        _remove(folder)
