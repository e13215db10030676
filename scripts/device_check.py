"""One-shot check of jaxlora on a GPU or TPU machine: the platform-specific paths, then decode/prefill speed.

Runs as is where the project's dependencies are installed (JAX for the accelerator, flax, optax, orbax; torch and
transformers only for the sharded-load row, skipped without them), with no network and no downloads: every model
is random, built here. From the repository root:

    PYTHONPATH=. python3 scripts/device_check.py [--bench-model 1b|smollm2] [--json FILE] [--quick]

Checks (each PASS, FAIL or SKIP with its reason):
- each attention implementation this platform has (cudnn on GPU, splash on TPU, chunked everywhere) against the
  reference core, bfloat16, causal / windowed / soft-capped, GQA, left padding;
- a float32 forward on the accelerator (matmuls at "highest" precision) against the same forward on the CPU;
- bfloat16 greedy generation consistent with bfloat16 forwards over the tokens it produced (the cached decode
  loop against full recomputation; a differing token must be a near-tie);
- a checkpoint converted by jaxlora and loaded sharded over every local device (tensor=-1) against one device.

Benchmark (bfloat16, random weights, Llama-shaped): compile time and tok/s of prefill and of decode at batch 1
and 16, with decode as a fraction of the device's memory bandwidth (weights and the KV cache read once per step;
measured with a jitted reduction, and the device's nominal figure where known).

Prints one short table; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

# Nominal HBM bandwidth (GB/s) by JAX device_kind (substring match, lower case).
NOMINAL_BANDWIDTH_GBS = {
    "h200": 4800,
    "h100": 3350,
    "a100": 2039,
    "l4": 300,
    "tpu v4": 1200,
    "tpu v5 lite": 819,
    "tpu v5e": 819,
    "tpu v5p": 2765,
    "tpu v5": 2765,
    "tpu v6": 1640,
}

BENCH_MODELS = {
    # Llama 3.2 1B's shape (tied embeddings, 128k vocabulary): 1.24B params, 2.5 GB in bfloat16.
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    # SmolLM2-135M's shape (the demo model).
    "smollm2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    # A tiny one for --quick (CPU smoke runs).
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
    ),
}


def llama_config(sizes: dict, max_len: int = 4096):
    from jaxlora.config import ModelConfig, RopeConfig

    return ModelConfig(family="llama", max_position_embeddings=max_len, rope=RopeConfig(theta=500000.0), **sizes)


def random_params(config, dtype, seed: int = 0):
    """Random params on the default device, scaled so activations stay O(1) through the layers."""
    import jax

    from jaxlora.model import init_params

    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(seed))
    return jax.tree.map(lambda p: p.astype(dtype), params)


def timed(fn, repeat: int) -> tuple[float, float]:
    """(first call's seconds, median of `repeat` later calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


# ---- checks -------------------------------------------------------------------------------------------------------


def check_attention(platform: str) -> list[tuple[str, str, str]]:
    import jax.numpy as jnp

    from jaxlora.attention import attend

    impls = {"gpu": ["cudnn", "chunked"], "tpu": ["splash", "chunked"]}.get(platform, ["chunked"])
    rng = np.random.default_rng(0)
    b, t, h, kvh, d = 2, 1024, 16, 4, 128
    q, k, v = (
        jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.bfloat16) for n in (h, kvh, kvh)
    )  # fmt: skip
    valid = np.ones((b, t), bool)
    valid[1, :100] = False  # left padding
    slots = jnp.arange(t, dtype=jnp.int32)
    rows = []
    for impl in impls:
        for label, window, softcap in (("causal", None, None), ("window 256", 256, None), ("softcap 30", None, 30.0)):
            if impl == "cudnn" and softcap is not None:
                continue  # cudnn has no soft-cap (auto never picks it then)
            name = f"attention {impl}, {label}, GQA 16/4, bf16"
            try:
                kw = dict(window=window, scale=d**-0.5, softcap=softcap)
                out = attend(q, k, v, slots, jnp.asarray(valid), impl=impl, **kw).astype(jnp.float32)
                ref = attend(*(x.astype(jnp.float32) for x in (q, k, v)), slots, jnp.asarray(valid), impl="xla", **kw)
                err = float(jnp.abs(jnp.where(valid[:, :, None, None], out - ref, 0)).max())
                rows.append(
                    (name, "PASS" if err <= 3e-2 else "FAIL", f"max abs diff {err:.2e} vs float32 xla (<= 3e-2)")
                )
            except Exception as e:  # noqa: BLE001 (a report, not a crash)
                rows.append((name, "FAIL", f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"))
    return rows


def check_float32_against_cpu() -> tuple[str, str, str]:
    import jax

    import jaxlora

    name = "float32 forward, accelerator vs CPU"
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        return name, "SKIP", "no CPU backend in this JAX"
    config = llama_config(BENCH_MODELS["tiny"])
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 64)).astype(np.int32)
    with jax.default_matmul_precision("highest"):
        params = random_params(config, np.float32)
        here = np.asarray(jax.jit(jaxlora.forward, static_argnums=1)(params, config, ids))
        params_cpu = jax.device_put(params, cpu)
        there = np.asarray(jax.jit(jaxlora.forward, static_argnums=1)(params_cpu, config, jax.device_put(ids, cpu)))
    err = float(np.abs(here - there).max())
    return name, "PASS" if err <= 1e-4 else "FAIL", f"max abs diff {err:.2e} (<= 1e-4)"


def check_bf16_generate(config, params) -> tuple[str, str, str]:
    """Greedy bf16 generation against bf16 forwards over the prompt and what it generated."""
    import jax

    import jaxlora

    name = "bf16 greedy generate vs full forwards"
    ids = np.random.default_rng(2).integers(0, config.vocab_size, (4, 32)).astype(np.int32)
    new = 48
    tokens = np.asarray(jaxlora.generate(params, config, ids, max_new_tokens=new).tokens)
    sequence = np.concatenate([ids, tokens], axis=1)
    logits = np.asarray(jax.jit(jaxlora.forward, static_argnums=1)(params, config, sequence), np.float32)
    step_logits = logits[:, ids.shape[1] - 1 : -1]  # the prediction of each generated token
    best = step_logits.argmax(-1)
    chosen = np.take_along_axis(step_logits, tokens[..., None], -1)[..., 0]
    gap = step_logits.max(-1) - chosen  # 0 where generate took the forward's argmax
    differ = int((best != tokens).sum())
    ok = float(gap.max()) <= 0.125  # bfloat16 logits of magnitude ~10 are spaced 0.0625 apart
    return name, "PASS" if ok else "FAIL", f"{differ} of {tokens.size} tokens differ, largest logit gap {gap.max():.3f}"


def check_sharded_load() -> tuple[str, str, str]:
    import jax

    import jaxlora
    from jaxlora.sharding import make_mesh

    name = f"convert + load over {jax.local_device_count()} local device(s), tensor=-1"
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        return name, "SKIP", f"needs torch and transformers to build the source checkpoint ({e.name} missing)"
    with tempfile.TemporaryDirectory() as folder:
        hf = AutoConfig.for_model(
            "llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
        )  # fmt: skip
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(hf).save_pretrained(Path(folder) / "hf")
        path = jaxlora.convert(str(Path(folder) / "hf"), Path(folder) / "jax")
        ids = np.random.default_rng(3).integers(0, 256, (2, 16)).astype(np.int32)
        with jax.default_matmul_precision("highest"):
            one = jaxlora.load(path)
            want = np.asarray(jaxlora.forward(one.params, one.config, ids))
            sharded = jaxlora.load(path, mesh=make_mesh("tensor=-1", jax.local_devices()))
            got = np.asarray(jax.jit(jaxlora.forward, static_argnums=1)(sharded.params, sharded.config, ids))
    err = float(np.abs(got - want).max())
    return name, "PASS" if err <= 1e-5 else "FAIL", f"max abs diff {err:.2e} (<= 1e-5)"


# ---- benchmark ----------------------------------------------------------------------------------------------------


def read_bandwidth_gbs() -> float:
    """A jitted sum over 2 GiB (1 GiB on CPU): the device's read rate as XLA reaches it."""
    import jax
    import jax.numpy as jnp

    n = (1 << 28) if jax.default_backend() == "cpu" else (1 << 29)
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    _, seconds = timed(lambda: total(x).block_until_ready(), 5)
    return x.nbytes / seconds / 1e9


def nominal_bandwidth_gbs(kind: str) -> float | None:
    kind = kind.lower()
    return next((v for k, v in NOMINAL_BANDWIDTH_GBS.items() if k in kind), None)


def bench(config, params, repeat: int, prefill_len: int, prompt: int, new_tokens: int) -> dict:
    import jax

    import jaxlora
    from jaxlora.generate import stream

    out = {}
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    out["weight_gb"] = weight_bytes / 1e9
    ids = np.random.default_rng(4).integers(0, config.vocab_size, (1, prefill_len)).astype(np.int32)
    forward = jax.jit(jaxlora.forward, static_argnums=1)
    first, seconds = timed(lambda: forward(params, config, ids).block_until_ready(), repeat)
    out["prefill"] = {"tokens": prefill_len, "compile_s": first - seconds, "tok_s": prefill_len / seconds}
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2  # bf16 keys and values
    for batch in (1, 16):
        ids = np.random.default_rng(5).integers(0, config.vocab_size, (batch, prompt)).astype(np.int32)

        def first_token(ids=ids):
            next(stream(params, config, ids, max_new_tokens=new_tokens))

        def full(ids=ids):
            np.asarray(jaxlora.generate(params, config, ids, max_new_tokens=new_tokens).tokens)

        cold, warm_first = timed(first_token, repeat)
        full()
        _, total = timed(full, repeat)
        decode_s = total - warm_first
        steps_s = (new_tokens - 1) / decode_s
        cache_read = batch * kv_per_token * (prompt + new_tokens / 2)  # the average filled cache per step
        out[f"decode_b{batch}"] = {
            "first_token_cold_s": cold,
            "tok_s": batch * steps_s,
            "read_gbs": (weight_bytes + cache_read) * steps_s / 1e9,
        }
    return out


# ---- main ---------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-model", choices=sorted(BENCH_MODELS), default="1b")
    parser.add_argument("--quick", action="store_true", help="a tiny benchmark model and fewer repeats (CPU smoke)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    platform = jax.default_backend()
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", platform)
    print(f"jax {jax.__version__}, {platform}: {jax.device_count()} x {kind}", flush=True)
    rows = []

    def guarded(fn, *a):
        try:
            result = fn(*a)
            rows.extend(result if isinstance(result, list) else [result])
        except Exception as e:  # noqa: BLE001 (one failed check must not hide the others)
            rows.append((fn.__name__, "FAIL", f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"))
            traceback.print_exc()
        print(f"  {rows[-1][0]}: {rows[-1][1]}", flush=True)

    model_name = "tiny" if args.quick else args.bench_model
    config = llama_config(BENCH_MODELS[model_name])
    params = random_params(config, jnp.bfloat16)
    guarded(check_attention, platform)
    guarded(check_float32_against_cpu)
    guarded(check_bf16_generate, config, params)
    guarded(check_sharded_load)

    repeat = 2 if args.quick else 5
    measured_bw = read_bandwidth_gbs()
    nominal = nominal_bandwidth_gbs(kind)
    results = bench(config, params, repeat, prefill_len=256 if args.quick else 2048, prompt=128, new_tokens=65)
    limit = nominal or measured_bw

    print("\n| check | result | detail |\n| --- | --- | --- |")
    for name, status, detail in rows:
        print(f"| {name} | {status} | {detail} |")
    print(
        f"\nbenchmark: {model_name}-shaped random model, bfloat16, {results['weight_gb']:.2f} GB of weights; "
        f"read bandwidth measured {measured_bw:.0f} GB/s"
        + (f", nominal {nominal:.0f} GB/s" if nominal else " (no nominal figure for this device)")
    )
    print("\n| figure | value | compile / first token | % of bandwidth |\n| --- | --- | --- | --- |")
    p = results["prefill"]
    print(f"| prefill 1 x {p['tokens']} | {p['tok_s']:.0f} tok/s | {p['compile_s']:.1f} s compile | - |")
    for batch in (1, 16):
        r = results[f"decode_b{batch}"]
        share = 100 * r["read_gbs"] / limit
        print(
            f"| decode batch {batch} | {r['tok_s']:.0f} tok/s | {r['first_token_cold_s']:.1f} s cold first token "
            f"| {share:.0f}% ({r['read_gbs']:.0f} GB/s) |"
        )
    if args.json:
        report = {
            "platform": platform,
            "device_kind": kind,
            "devices": jax.device_count(),
            "jax": jax.__version__,
            "checks": [dict(zip(("name", "result", "detail"), row, strict=True)) for row in rows],
            "bench_model": model_name,
            "measured_read_gbs": measured_bw,
            "nominal_gbs": nominal,
            "bench": results,
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
    failed = [r for r in rows if r[1] == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
