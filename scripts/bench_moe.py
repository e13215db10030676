"""Mixture-of-experts dispatch: prefill and decode speed of each `jaxlora.moe` implementation on two tiny-width
random mixtures (transformers' Mixtral class, converted by jaxlora):

- mixtral-shaped: 8 experts, 2 per token (Mixtral 8x7B's routing at 1/8 of its width: hidden 512, expert MLP 1792)
- 64x8: 64 experts, 8 per token (Qwen3-MoE / OLMoE-style routing; hidden 512, expert MLP 256)

Each (model, implementation) runs in its own fresh process. Prefill: one jitted forward of 1 x --prefill-len
tokens; decode: greedy generate at batch 1 and 8 after a 16-token prompt, decode tok/s = batch x (new - 1) / (time
of the whole call - time to the first token); medians of --repeat calls after a warm-up (which compiles).
Dense computes every expert on every token (experts / k times the FLOPs); the sparse ones compute only the picked.

    python scripts/bench_moe.py [--prefill-len 512] [--new-tokens 33] [--repeat 3] [--impls dense,blocked,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import decode_tok_s, in_fresh_process, markdown_table, matmul_gflops, median_of  # noqa: E402

SHAPES = {
    "mixtral-shaped (8 experts, top 2)": dict(intermediate_size=1792, num_local_experts=8, num_experts_per_tok=2),
    "64 experts, top 8": dict(intermediate_size=256, num_local_experts=64, num_experts_per_tok=8),
}
COMMON = dict(
    model_type="mixtral",
    vocab_size=4096,
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    router_jitter_noise=0.0,
)
IMPLS = ("dense", "gathered", "blocked", "ragged", "auto")  # auto: blocked off TPU
PROMPT = 16


def build(shape: dict, folder: Path) -> Path:
    """A random-weight mixture in transformers' class, converted to a jaxlora checkpoint under `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import jaxlora

    config = AutoConfig.for_model(**{**COMMON, **shape})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # a router with spread-out logits, so routing differs token to token
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.ndim == 2 and p.shape[0] == shape["num_local_experts"]:
                p.mul_(50.0)
    model.save_pretrained(folder / "hf")
    return jaxlora.convert(str(folder / "hf"), folder / "jax")


def measure(checkpoint: str, impl: str, prefill_len: int, new_tokens: int, repeat: int) -> dict:
    import jax
    import numpy as np

    import jaxlora

    model = jaxlora.load(checkpoint, moe=impl)
    params, config = model.params, model.config
    rng = np.random.default_rng(0)
    out = {}
    ids = rng.integers(0, config.vocab_size, (1, prefill_len)).astype(np.int32)
    forward = jax.jit(jaxlora.forward, static_argnums=1)
    forward(params, config, ids).block_until_ready()
    out["prefill_tok_s"] = prefill_len / median_of(lambda: forward(params, config, ids).block_until_ready(), repeat)
    for batch in (1, 8):
        ids = rng.integers(0, config.vocab_size, (batch, PROMPT)).astype(np.int32)
        out[f"decode_b{batch}_tok_s"] = decode_tok_s(params, config, ids, new_tokens, repeat)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--worker", nargs=2, metavar=("CHECKPOINT", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        checkpoint, impl = args.worker
        print(json.dumps(measure(checkpoint, impl, args.prefill_len, args.new_tokens, args.repeat)))
        return
    impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        sys.exit(f"error: unknown implementation(s) {', '.join(unknown)}; choose from {', '.join(IMPLS)}")
    start = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="jaxlora-bench-moe-") as folder:
        for i, (name, shape) in enumerate(SHAPES.items()):
            checkpoint = build(shape, Path(folder) / str(i))
            for impl in impls:
                argv = [
                    "--worker", str(checkpoint), impl, "--prefill-len", str(args.prefill_len),
                    "--new-tokens", str(args.new_tokens), "--repeat", str(args.repeat),
                ]  # fmt: skip
                results.setdefault(name, {})[impl] = in_fresh_process(__file__, argv, f"{name} / {impl}")
    print(f"machine: jitted float32 matmul {matmul_gflops(512, 512, 1792):.0f} GFLOP/s (512x512x1792)")
    for name, by_impl in results.items():
        dense = by_impl.get("dense")
        rows = [("dispatch", "prefill tok/s", "decode tok/s, batch 1", "decode tok/s, batch 8")]
        for impl, r in by_impl.items():
            cells = [impl]
            for key in ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s"):
                ratio = f" ({r[key] / dense[key]:.2f}x)" if dense and impl != "dense" else ""
                cells.append(f"{r[key]:.0f}{ratio}")
            rows.append(tuple(cells))
        print(f"\n{name}, float32, 4 layers, hidden 512 (ratios: to dense)\n")
        print(markdown_table(rows))
    if args.json:
        print(json.dumps(results))
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
