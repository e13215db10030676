"""Compile time against depth, unrolled vs scanned layers (`jaxlora.stacking`), and what each layout decodes at.

1. Tiny-width Llamas (hidden 64, 4 heads, random weights) of 8, 32 and 96 layers: the seconds JAX and XLA spend
   tracing, lowering and compiling (jax.monitoring's compile events, summed per jitted function) for the prefill
   of a 16-token prompt, the decode loop (a chunk of 8 steps) and a LoRA train step (rank 8 on q/v, batch 2 x
   64), in each layout. Each (depth, layout) runs in its own fresh process with no persistent compile cache.
2. SmolLM2-135M (30 layers; float32) in each layout, each in its own fresh process: decode tok/s at batch 1 and 8
   (greedy, 16-token prompt, the whole call minus the time to the first token), prefill tok/s of 512 tokens, a
   LoRA train step (rank 8 on q/v, batch 4 x 256) and the compile seconds of the batch-1 prefill and decode;
   medians of --repeat calls after a warm-up.

    python scripts/bench_compile.py [--depths 8,32,96] [--repeat 3] [--new-tokens 33] [--checkpoint CKPT] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import decode_tok_s, in_fresh_process, markdown_table, median_of, model_sources  # noqa: E402

LAYOUTS = ("unrolled", "scanned")
PROMPT = 16
PHASES = ("prefill", "decode", "train_step")


class CompileClock:
    """Seconds of tracing, lowering and XLA compilation per jitted function name, from jax.monitoring."""

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self):
        import jax

        self.seconds: dict[str, float] = defaultdict(float)
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, fun_name: str = "", **_) -> None:
        if event in self.EVENTS:
            self.seconds[fun_name] += duration

    def phase(self, name: str) -> float:
        """Seconds for the jitted function `name` (its tracing is named `name`, its lowering and compile jit(name))."""
        return self.seconds.get(name, 0.0) + self.seconds.get(f"jit({name})", 0.0)


def tiny_config(depth: int, scanned: bool):
    from jaxlora.config import ModelConfig

    config = ModelConfig(
        family="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=depth,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    return config.with_scan(scanned)


def compile_times(depth: int, layout: str) -> dict:
    import jax
    import numpy as np
    import optax

    import jaxlora
    from jaxlora import lora
    from jaxlora.model import init_params
    from jaxlora.train import init_state, make_train_step

    clock = CompileClock()
    config = tiny_config(depth, layout == "scanned")
    params = init_params(config, jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, PROMPT)).astype(np.int32)
    start = time.perf_counter()
    np.asarray(jaxlora.generate(params, config, ids, max_new_tokens=9, chunk_size=8).tokens)
    first_call = time.perf_counter() - start
    adapters = lora.init(config, jax.random.key(1), rank=8, targets=("q_proj", "v_proj"))
    optimizer = optax.adamw(1e-3)
    step = make_train_step(params, config, optimizer)
    state = init_state(adapters, optimizer, jax.random.key(2))
    rows = np.random.default_rng(1).integers(0, config.vocab_size, (1, 2, 64)).astype(np.int32)
    batch = {"input_ids": rows, "attention_mask": np.ones_like(rows), "loss_mask": np.ones_like(rows)}
    jax.block_until_ready(step(state, batch))
    return {
        "prefill_s": clock.phase("prefill"),
        "decode_s": clock.phase("decode"),
        "train_step_s": clock.phase("step"),
        "first_generate_s": first_call,
    }


def decode_speed(checkpoint: str, layout: str, new_tokens: int, repeat: int) -> dict:
    import jax
    import numpy as np

    import jaxlora

    model = jaxlora.load(checkpoint, scan_layers=layout == "scanned", compile_cache=False)
    params, config = model.params, model.config
    clock = CompileClock()  # from here: generation's programs, not loading's
    rng = np.random.default_rng(0)
    out = {}
    for batch in (1, 8):
        ids = rng.integers(0, config.vocab_size, (batch, PROMPT)).astype(np.int32)
        out[f"decode_b{batch}_tok_s"] = decode_tok_s(params, config, ids, new_tokens, repeat)
        if batch == 1:  # the warm-up compiled batch 1's prefill and decode
            out["generate_compile_s"] = clock.phase("prefill") + clock.phase("decode")
    ids = rng.integers(0, config.vocab_size, (1, 512)).astype(np.int32)
    forward = jax.jit(jaxlora.forward, static_argnums=1)
    forward(params, config, ids).block_until_ready()
    out["prefill_tok_s"] = 512 / median_of(lambda: forward(params, config, ids).block_until_ready(), repeat)
    out["train_step_s"] = lora_step_seconds(params, config, repeat)
    return out


def lora_step_seconds(params, config, repeat: int) -> float:
    """Median seconds of a LoRA train step (rank 8 on q/v, AdamW, batch 4 x 256) after a warm-up step."""
    import jax
    import numpy as np
    import optax

    from jaxlora import lora
    from jaxlora.train import init_state, make_train_step

    adapters = lora.init(config, jax.random.key(1), rank=8, targets=("q_proj", "v_proj"))
    optimizer = optax.adamw(1e-4)
    step = make_train_step(params, config, optimizer)
    rows = np.random.default_rng(1).integers(0, config.vocab_size, (1, 4, 256)).astype(np.int32)
    batch = {"input_ids": rows, "attention_mask": np.ones_like(rows), "loss_mask": np.ones_like(rows)}
    state = init_state(adapters, optimizer, jax.random.key(2))
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="8,32,96")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--checkpoint", help="a converted SmolLM2 (default: the demo GGUF, converted to a temp folder)")
    parser.add_argument("--hf", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "compile":
            print(json.dumps(compile_times(int(rest[0]), rest[1])))
        else:
            print(json.dumps(decode_speed(rest[0], rest[1], args.new_tokens, args.repeat)))
        return
    depths = [int(d) for d in args.depths.split(",") if d]
    env = {k: v for k, v in os.environ.items() if k != "JAXLORA_COMPILE_CACHE"}
    start = time.perf_counter()
    compiles = {
        (depth, layout): in_fresh_process(
            __file__, ["--worker", "compile", str(depth), layout], f"{depth} layers / {layout}", env
        )
        for depth in depths
        for layout in LAYOUTS
    }
    rows = [("layers", "layout", "prefill s", "decode s", "LoRA train step s", "first generate call s")]
    for (depth, layout), r in compiles.items():
        rows.append(
            (
                str(depth),
                layout,
                f"{r['prefill_s']:.2f}",
                f"{r['decode_s']:.2f}",
                f"{r['train_step_s']:.2f}",
                f"{r['first_generate_s']:.2f}",
            )
        )
    print("\nCompile seconds (trace + lower + XLA compile), tiny-width Llama (hidden 64), float32\n")
    print(markdown_table(rows))
    first, last = min(depths), max(depths)
    for layout in LAYOUTS:
        growth = {
            phase: compiles[(last, layout)][f"{phase}_s"] / compiles[(first, layout)][f"{phase}_s"] for phase in PHASES
        }
        print(f"{layout}: {last} vs {first} layers: " + ", ".join(f"{p} {g:.2f}x" for p, g in growth.items()))
    _, checkpoint = model_sources(args.hf, args.checkpoint)
    speeds = {
        layout: in_fresh_process(
            __file__,
            [
                "--worker",
                "speed",
                str(checkpoint),
                layout,
                "--new-tokens",
                str(args.new_tokens),
                "--repeat",
                str(args.repeat),
            ],
            f"SmolLM2 / {layout}",
            env,
        )
        for layout in LAYOUTS
    }
    rows = [
        (
            "layout",
            "decode tok/s, batch 1",
            "decode tok/s, batch 8",
            "prefill tok/s (512)",
            "LoRA step s (4 x 256)",
            "generate compile s",
        )
    ]
    for layout, r in speeds.items():
        rows.append(
            (
                layout,
                f"{r['decode_b1_tok_s']:.1f}",
                f"{r['decode_b8_tok_s']:.1f}",
                f"{r['prefill_tok_s']:.0f}",
                f"{r['train_step_s']:.2f}",
                f"{r['generate_compile_s']:.1f}",
            )
        )
    print("\nSmolLM2-135M float32 (30 layers), each layout in its own process\n")
    print(markdown_table(rows))
    if args.json:
        print(json.dumps({"compile": {f"{d}/{lay}": r for (d, lay), r in compiles.items()}, "smollm2": speeds}))
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
