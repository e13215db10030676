"""The persistent compile cache's folder is kept under a size (`jaxlora.compile_cache.prune`): the least recently
used entries go first, JAX's and the stored executables alike, and nothing else in the folder is ever deleted.
Which folder the cache uses is tested in tests/test_generate.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from jaxlora import compile_cache, executables
from jaxlora.errors import UsageError

KB = 1024
NOW = time.time()
DAY = 86400.0


def jax_entry(folder, name: str, size: int, days_ago: float, recorded_days_ago: float | None = None):
    """A JAX cache entry (`KEY-cache`) last read and written `days_ago`; with JAX's own access record (`KEY-atime`,
    nanoseconds) when its eviction is on."""
    key = f"jit_{name}-{name * 64}"[:70]
    path = folder / f"{key}-cache"
    path.write_bytes(b"x" * size)
    os.utime(path, (NOW - days_ago * DAY, NOW - days_ago * DAY))
    if recorded_days_ago is not None:
        (folder / f"{key}-atime").write_bytes(int((NOW - recorded_days_ago * DAY) * 1e9).to_bytes(8, "little"))
    return path


def store_entry(folder, name: str, size: int, days_ago: float):
    store = folder / executables.SUBFOLDER
    store.mkdir(exist_ok=True)
    path = store / f"{name}-{'ab' * 20}.bin"
    path.write_bytes(b"y" * size)
    os.utime(path, (NOW - days_ago * DAY, NOW - days_ago * DAY))
    return path


def not_the_caches(folder):
    """Files in the cache folder that are not cache entries: pruning must leave every one of them."""
    store = folder / executables.SUBFOLDER
    store.mkdir(exist_ok=True)
    (folder / "mine-cache").mkdir()  # a folder named like an entry
    kept = [
        folder / "notes.txt",
        folder / "jit_f-cache.txt",
        folder / "mine-cache" / "inside-cache",
        store / "readme.bin",
        store / f"decode-{'ab' * 20}.bin.txt",
        store / f".decode-{'ab' * 20}.bin.partial",  # not the staging name (no random part)
    ]
    for path in kept:
        path.write_bytes(b"z" * 300 * KB)
        os.utime(path, (NOW - 400 * DAY, NOW - 400 * DAY))
    return kept


def test_pruning_deletes_the_least_recently_used_entries_first_and_nothing_else(tmp_path):
    kept = not_the_caches(tmp_path)
    oldest = jax_entry(tmp_path, "a", 100 * KB, days_ago=30)
    old_store = store_entry(tmp_path, "decode", 100 * KB, days_ago=20)
    read_lately = jax_entry(tmp_path, "b", 100 * KB, days_ago=25, recorded_days_ago=1)  # JAX's record says: read
    middle = jax_entry(tmp_path, "c", 100 * KB, days_ago=10, recorded_days_ago=10)
    newer_store = store_entry(tmp_path, "prefill", 100 * KB, days_ago=5)
    newest = jax_entry(tmp_path, "d", 100 * KB, days_ago=0)
    assert sum(entry.size for entry in compile_cache.entries(tmp_path)) == 600 * KB

    # Over 500 KB: down to 0.75 x 500 = 375 KB, oldest use first: three entries go, three stay.
    assert compile_cache.prune(tmp_path, 500 * KB, now=NOW) == 300 * KB
    assert not oldest.exists() and not old_store.exists() and not middle.exists()
    assert not middle.with_name(middle.name.replace("-cache", "-atime")).exists()  # its record went with it
    assert read_lately.exists() and read_lately.with_name(read_lately.name.replace("-cache", "-atime")).exists()
    assert newer_store.exists() and newest.exists()
    assert all(path.exists() and path.stat().st_size == 300 * KB for path in kept)
    assert compile_cache.prune(tmp_path, 500 * KB, now=NOW) == 0


def test_a_folder_within_its_limit_keeps_even_its_oldest_entries(tmp_path):
    entries = [jax_entry(tmp_path, "a", 100 * KB, days_ago=900), store_entry(tmp_path, "decode", 100 * KB, 900)]
    assert compile_cache.prune(tmp_path, 200 * KB, now=NOW) == 0
    assert all(path.exists() for path in entries)
    assert compile_cache.prune(tmp_path / "not-there", 1, now=NOW) == 0


def test_staged_files_a_dead_writer_left_go_after_an_hour(tmp_path):
    store = tmp_path / executables.SUBFOLDER
    store.mkdir()
    name = f"decode-{'ab' * 20}.bin"
    left, writing = store / f".{name}.k2x9_q1.partial", store / f".{name}.p0m3zz8.partial"
    for path, seconds_ago in ((left, 2 * 3600), (writing, 60)):
        path.write_bytes(b"w" * KB)
        os.utime(path, (NOW - seconds_ago, NOW - seconds_ago))
    assert compile_cache.prune(tmp_path, 1 << 30, now=NOW) == KB
    assert not left.exists() and writing.exists()


def test_the_size_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(compile_cache.MAX_MB_VARIABLE, raising=False)
    assert compile_cache.size_limit() == compile_cache.MAX_BYTES
    for setting, limit in (("512", 512 << 20), (" 1.5 ", int(1.5 * 2**20)), ("none", None), ("None", None)):
        monkeypatch.setenv(compile_cache.MAX_MB_VARIABLE, setting)
        assert compile_cache.size_limit() == limit
    for bad in ("lots", "0", "-3", "nan"):
        monkeypatch.setenv(compile_cache.MAX_MB_VARIABLE, bad)
        with pytest.raises(UsageError, match=compile_cache.MAX_MB_VARIABLE):
            compile_cache.size_limit()


TURN_ON = """
import sys, jax
from jaxlora import compile_cache
if sys.argv[2] == "own":
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    print(compile_cache.enable_unless_chosen())
else:
    print(compile_cache.enable(sys.argv[1]))
"""


@pytest.mark.parametrize("whose", ["jaxlora's", "own"])
def test_turning_the_cache_on_prunes_jaxloras_folder_but_never_the_programs_own(tmp_path, whose):
    entries = [jax_entry(tmp_path, name, 400 * KB, days_ago=days) for name, days in (("a", 9), ("b", 5), ("c", 1))]
    env = {**os.environ, compile_cache.MAX_MB_VARIABLE: "1", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    mode = "own" if whose == "own" else "jaxlora"
    result = subprocess.run(
        [sys.executable, "-c", TURN_ON, str(tmp_path), mode], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(tmp_path)
    # 1200 KB over a 1 MB limit: pruned to 768 KB, the two older entries gone; the program's own folder untouched.
    assert [path.exists() for path in entries] == ([True] * 3 if whose == "own" else [False, False, True])


def test_a_bad_size_limit_is_one_error_line_from_the_cli(tiny, tmp_path):
    env = {**os.environ, compile_cache.MAX_MB_VARIABLE: "lots", "XDG_CACHE_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "jaxlora", "generate", str(tiny("llama-gqa").jax_dir), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {compile_cache.MAX_MB_VARIABLE}='lots': give a size in MB, such as 2048, or 'none' for no limit"
    ]
    assert not (tmp_path / "jaxlora").exists()
