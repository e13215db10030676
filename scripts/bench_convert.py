"""Conversion at scale: a synthetic ~1.6B-parameter Llama (random bfloat16 weights, sharded safetensors, written in
a temporary folder) converted to a float32 jaxlora checkpoint, then loaded over 8 fake CPU devices.

Reports the conversion's time and peak RSS over the interpreter's baseline (after imports) against the target of
2x the largest tensor plus 1 GB, and for the sharded load (mesh fsdp=2,tensor=4 over 8 host-platform devices)
each device's bytes against 1/8 of the checkpoint. Each step runs in its own fresh process. Needs about 11 GB of
free disk in the temporary folder (or --workdir).

    python scripts/bench_convert.py [--layers 24] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import in_fresh_process, markdown_table, vm_hwm_mb  # noqa: E402

# Llama-shaped: hidden 2048, 16 query heads and 8 kv heads of 128, MLP 8192, vocabulary 32000, untied head.
SHAPE = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
)


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    d, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = SHAPE["num_key_value_heads"] * d // SHAPE["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (d, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, d),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
            }
        )
    return shapes


def write_source(folder: Path, layers: int, shard_bytes: int = 1 << 30) -> dict:
    """Random bfloat16 tensors in safetensors shards of about `shard_bytes`, with an index and config.json."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**SHAPE, "num_hidden_layers": layers}))
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, size, index = {}, {}, 0, 0
    shapes = tensor_shapes(layers)

    def flush():
        nonlocal shard, size, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, size, index = {}, 0, index + 1

    for name, shape in shapes.items():
        shard[name] = (torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    largest = max(int(torch.Size(s).numel()) for s in shapes.values())
    return {"params": params, "largest_tensor_f32_mb": largest * 4 / 1e6, "shards": index}


def convert_worker(src: str, dst: str) -> dict:
    import jax  # noqa: F401, I001

    import jaxlora  # noqa: F401  (the baseline includes the libraries a conversion imports)
    from jaxlora.convert import convert

    baseline = vm_hwm_mb()
    start = time.perf_counter()
    convert(src, dst)
    return {"seconds": time.perf_counter() - start, "baseline_mb": baseline, "peak_mb": vm_hwm_mb()}


def load_worker(path: str) -> dict:
    import jax

    import jaxlora
    from jaxlora.sharding import make_mesh

    baseline = vm_hwm_mb()
    start = time.perf_counter()
    model = jaxlora.load(path, mesh=make_mesh("fsdp=2,tensor=4"))
    jax.block_until_ready(model.params)
    seconds = time.perf_counter() - start
    per_device: dict[str, int] = {}
    total = 0
    for leaf in jax.tree.leaves(model.params):
        total += leaf.nbytes
        for shard in leaf.addressable_shards:
            per_device[str(shard.device)] = per_device.get(str(shard.device), 0) + shard.data.nbytes
    return {
        "seconds": seconds,
        "devices": len(per_device),
        "total_bytes": total,
        "per_device_bytes": sorted(per_device.values()),
        "peak_over_baseline_mb": vm_hwm_mb() - baseline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (24: about 1.6B parameters)")
    parser.add_argument("--workdir", help="where the source and the checkpoint are written (default: a temp folder)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *paths = args.worker
        print(json.dumps(convert_worker(*paths) if kind == "convert" else load_worker(*paths)))
        return
    folder = Path(tempfile.mkdtemp(prefix="jaxlora-bench-convert-", dir=args.workdir))
    try:
        start = time.perf_counter()
        source = write_source(folder / "src", args.layers)
        write_s = time.perf_counter() - start
        print(f"wrote {source['params'] / 1e9:.2f}B params in {source['shards']} shards in {write_s:.0f} s", flush=True)
        converted = in_fresh_process(
            __file__, ["--worker", "convert", str(folder / "src"), str(folder / "jax")], "convert"
        )
        devices_env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
        loaded = in_fresh_process(__file__, ["--worker", "load", str(folder / "jax")], "load", env=devices_env)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    over = converted["peak_mb"] - converted["baseline_mb"]
    target = 2 * source["largest_tensor_f32_mb"] + 1000
    eighth = loaded["total_bytes"] / 8
    print(
        "\n"
        + markdown_table(
            [
                ("step", "figure", "target"),
                (
                    f"convert {source['params'] / 1e9:.2f}B params, bf16 safetensors -> float32",
                    f"{converted['seconds']:.0f} s; peak RSS {over:.0f} MB over the {converted['baseline_mb']:.0f} MB "
                    f"baseline ({converted['peak_mb']:.0f} MB)",
                    f"<= {target:.0f} MB over baseline (2 x {source['largest_tensor_f32_mb']:.0f} MB + 1 GB): "
                    + ("met" if over <= target else "NOT met"),
                ),
                (
                    f"load(mesh=fsdp=2,tensor=4) on {loaded['devices']} fake CPU devices",
                    f"{loaded['seconds']:.0f} s; {loaded['total_bytes'] / 1e9:.2f} GB in all, per device "
                    f"{min(loaded['per_device_bytes']) / 1e6:.0f}-{max(loaded['per_device_bytes']) / 1e6:.0f} MB; "
                    f"peak RSS {loaded['peak_over_baseline_mb']:.0f} MB over baseline",
                    f"about 1/8 ({eighth / 1e6:.0f} MB) per device: "
                    + ("met" if max(loaded["per_device_bytes"]) <= 1.05 * eighth else "NOT met"),
                ),
            ]
        )
    )


if __name__ == "__main__":
    main()
