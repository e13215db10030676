"""Many adapters in one batch: decode speed of a batch of 8 whose rows run 4 different adapters (an adapter bank,
`jaxlora.lora.bank` + `select`: per-row gathered A and B) against the same batch running one adapter (the plain
shared-weight path), and the bare base for scale.

SmolLM2-135M-Instruct float32 (the demo checkpoint, or --checkpoint), rank 16 on q/k/v/o, greedy decoding of
--new-tokens tokens after a 32-token prompt at batch 8. Each case runs in its own fresh process; the figure is
the median of --repeat generate calls after one warm-up call (which compiles).

    python scripts/bench_lora_bank.py [--checkpoint CKPT] [--new-tokens 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import in_fresh_process, markdown_table, median_of, model_sources  # noqa: E402

CASES = {
    "base": "no adapter",
    "one": "one adapter for all 8 rows",
    "bank": "4 adapters mixed over the 8 rows (bank)",
}
BATCH, PROMPT, RANK, TARGETS = 8, 32, 16, ("q_proj", "k_proj", "v_proj", "o_proj")


def measure(checkpoint: str, case: str, new_tokens: int, repeat: int) -> dict:
    import jax
    import numpy as np

    import jaxlora
    from jaxlora import lora

    model = jaxlora.load(checkpoint)
    config = model.config
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(BATCH, PROMPT)).astype(np.int32)

    def trained(seed):
        fresh = lora.init(config, jax.random.key(seed), rank=RANK, targets=TARGETS)
        leaves, tree = jax.tree.flatten(fresh.weights)
        keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
        return fresh.replace(
            weights=jax.tree.unflatten(
                tree, [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
            )
        )

    adapters = None
    if case == "one":
        adapters = trained(0)
    elif case == "bank":
        adapters = lora.select(lora.bank([trained(s) for s in range(4)], config), [0, 1, 2, 3, 0, 1, 2, 3])

    def run():
        out = jaxlora.generate(model.params, config, ids, max_new_tokens=new_tokens, lora=adapters)
        np.asarray(out.tokens)

    run()
    seconds = median_of(run, repeat)
    return {"tok_s": BATCH * new_tokens / seconds, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # one side, in its own process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.checkpoint, args.case, args.new_tokens, args.repeat)))
        return
    _, checkpoint = model_sources(None, args.checkpoint)
    results = {}
    for case in CASES:
        argv = ["--checkpoint", str(checkpoint), "--case", case, "--new-tokens", str(args.new_tokens)]
        results[case] = in_fresh_process(__file__, [*argv, "--repeat", str(args.repeat)], case)
    one = results["one"]["tok_s"]
    rows = [("batch of 8", "tok/s", "vs one adapter")]
    rows += [(CASES[c], f"{r['tok_s']:.1f}", f"{r['tok_s'] / one:.2f}x") for c, r in results.items()]
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
