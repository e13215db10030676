"""Quantized SmolLM2 against float32: parameter bytes, load time, peak memory, decode and prefill speed, perplexity.

Rows: float32 and bfloat16 (the checkpoint cast on load), int8 and int4 (quantized on load from the float32
checkpoint), and the demo GGUF's own Q4_1/Q8_0 blocks kept as they are (`convert --quantize keep`, converted once
into a temporary folder). Each row runs in its own fresh process: load (timed), greedy decoding of --new-tokens
tokens after a 16-token prompt at batch 1 and 8, perplexity on tests/data/perplexity.txt (windows of 256, stride
128) and a 512-token prefill, each the median of --repeat calls after a warm-up call (which compiles). Peak RSS
three times: after loading, after decoding at batch 1 (loading plus `generate` for one sequence: what a chat or
a code completion costs), and after all of it.

    python scripts/bench_quant.py [--checkpoint CKPT] [--new-tokens 64] [--repeat 3] [--rows float32,int8,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import in_fresh_process, markdown_table, median_of, model_sources, vm_hwm_mb  # noqa: E402

ROWS = {
    "float32": dict(),
    "bfloat16": dict(dtype="bfloat16"),
    "int8": dict(quantize="int8"),
    "int4:64": dict(quantize="int4:64"),
    "int4:32": dict(quantize="int4:32"),
    "gguf-kept": dict(),  # the Q4_1 file's blocks, kept
}
TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "perplexity.txt"
PREFILL = 512


def measure(checkpoint: str, row: str, new_tokens: int, repeat: int) -> dict:
    import jax
    import numpy as np

    import jaxlora
    from jaxlora.eval.perplexity import perplexity

    start = time.perf_counter()
    model = jaxlora.load(checkpoint, **ROWS[row])
    jax.block_until_ready(model.params)
    load_seconds = time.perf_counter() - start
    result = {
        "param_mb": sum(a.nbytes for a in jax.tree.leaves(model.params)) / 1e6,
        "load_s": load_seconds,
        "load_rss_mb": vm_hwm_mb(),
    }
    for batch in (1, 8):
        ids = np.full((batch, 16), 504, np.int32)

        def decode(ids=ids):
            np.asarray(jaxlora.generate(model.params, model.config, ids, max_new_tokens=new_tokens).tokens)

        decode()
        result[f"decode_b{batch}"] = batch * new_tokens / median_of(decode, repeat)
        if batch == 1:  # before anything runs more than one row at a time
            result["generate_rss_mb"] = vm_hwm_mb()
    tokens = model.tokenizer(TEXT.read_text())["input_ids"]
    result["perplexity"] = perplexity(model.params, model.config, tokens, window=256, stride=128)["perplexity"]
    prompt = np.asarray([(np.arange(PREFILL) * 7 + 3) % model.config.vocab_size], np.int32)
    prefill = jax.jit(jaxlora.forward, static_argnums=1)

    def run_prefill():
        prefill(model.params, model.config, prompt).block_until_ready()

    run_prefill()
    result["prefill"] = PREFILL / median_of(run_prefill, repeat)
    result["peak_rss_mb"] = vm_hwm_mb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a float32 SmolLM2 checkpoint (default: the demo GGUF, converted)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--row", choices=sorted(ROWS), help=argparse.SUPPRESS)  # one row, in its own process
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure(args.checkpoint, args.row, args.new_tokens, args.repeat)))
        return
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"error: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    gguf, checkpoint = model_sources(None, args.checkpoint)
    kept = None
    if "gguf-kept" in rows:
        import jaxlora

        kept = jaxlora.convert(str(gguf), Path(tempfile.mkdtemp()) / "kept", quantize="keep")
    results = {}
    for row in rows:
        path = kept if row == "gguf-kept" else checkpoint
        argv = ["--checkpoint", str(path), "--row", row, "--new-tokens", str(args.new_tokens)]
        results[row] = in_fresh_process(__file__, [*argv, "--repeat", str(args.repeat)], row)
        print(row, json.dumps(results[row]), file=sys.stderr, flush=True)
    base = results.get("float32")
    header = ("SmolLM2-135M", "params MB", "load s", "RSS load MB", "RSS generate b1 MB", "RSS peak MB", "decode b1")
    header = (*header, "decode b8")
    table = [(*header, "prefill 512", "perplexity")]
    for row, r in results.items():
        relative = f" ({r['param_mb'] / base['param_mb']:.2f}x)" if base else ""
        rss_relative = f" ({r['generate_rss_mb'] / base['generate_rss_mb']:.2f}x)" if base else ""
        table.append(
            (
                row,
                f"{r['param_mb']:.0f}{relative}",
                f"{r['load_s']:.1f}",
                f"{r['load_rss_mb']:.0f}",
                f"{r['generate_rss_mb']:.0f}{rss_relative}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['decode_b1']:.1f}",
                f"{r['decode_b8']:.1f}",
                f"{r['prefill']:.0f}",
                f"{r['perplexity']:.3f}",
            )
        )
    print(markdown_table(table))


if __name__ == "__main__":
    main()
