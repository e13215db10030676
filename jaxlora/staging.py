"""Write outputs all-or-nothing: into a hidden folder or file beside the destination, renamed at the end."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jaxlora.errors import UsageError


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


@contextmanager
def staged(dst: str | Path, force: bool = False, folder: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `dst` to write into (a fresh folder, or a file path with `folder=False`);
    it becomes `dst` when the block ends without an error and is removed otherwise. An existing `dst` is
    replaced only with `force`."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise UsageError(f"{dst} already exists (pass --force to overwrite it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        if folder:
            staging.mkdir()
        yield staging
        if dst.exists():  # force: swap the new output in, then drop the old one
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            dst.rename(old)
            staging.rename(dst)
            _remove(old)
        else:
            staging.rename(dst)
    finally:
        _remove(staging)


@contextmanager
def staged_files(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """For a file that may come with sidecars (ONNX's `<name>.data`): yield a temporary folder beside `dst` to write
    `dst.name` and its sidecars into; at the end each moves next to `dst`, or all are removed on an error."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    folder = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        yield folder
        written = sorted(folder.iterdir())
        clashes = [dst.parent / f.name for f in written if (dst.parent / f.name).exists()]
        if clashes and not force:
            raise UsageError(f"{clashes[0]} already exists (pass --force to overwrite it)")
        for file in written:
            file.replace(dst.parent / file.name)
    finally:
        _remove(folder)
