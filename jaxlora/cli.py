"""The `jaxlora` command: a thin shell over the Python API. `python -m jaxlora` is the same entry point."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from jaxlora.errors import JaxloraError, UsageError

DEFAULT_CHECKPOINTS = Path("checkpoints")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _default_dst(src: str) -> Path:
    name = Path(src.rstrip("/")).name
    for suffix in (".gguf", ".safetensors", ".bin", ".pth", ".pt"):
        name = name.removesuffix(suffix)
    return DEFAULT_CHECKPOINTS / name


def cmd_convert(args) -> None:
    from jaxlora.convert import convert

    dst = Path(args.dst) if args.dst else _default_dst(args.src)
    start = time.perf_counter()
    convert(args.src, dst, dtype=args.dtype, config_path=args.config, force=args.force, progress=True)
    _say(f"wrote {dst} in {time.perf_counter() - start:.1f}s")


def _load(path: str, dtype: str | None):
    from jaxlora.checkpoint import load

    start = time.perf_counter()
    _say(f"loading {path} ...")
    model = load(path, dtype=dtype)
    _say(
        f"loaded {model.config.family} ({model.config.num_params / 1e6:.1f}M params) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return model


def _prompt_text(args) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        try:
            return Path(args.prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read prompt file {args.prompt_file} ({e})") from None
    if args.prompt is None:
        raise UsageError("give a prompt with --prompt or --prompt-file")
    return args.prompt


def cmd_generate(args) -> None:
    import jax

    from jaxlora.generate import generate

    text = _prompt_text(args)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    model = _load(args.checkpoint, args.dtype)
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise UsageError(f"{args.checkpoint} has no tokenizer; use the Python API with token ids")
    if args.chat:
        if not tokenizer.chat_template:
            raise UsageError(f"{args.checkpoint}'s tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    else:
        ids = tokenizer(text)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = time.perf_counter()
    out = generate(
        model.params,
        model.config,
        [list(ids)],
        key=jax.random.key(args.seed),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        eos_token_ids=model.eos_token_ids,
        pad_token_id=pad_id,
    )
    elapsed = time.perf_counter() - start
    n = int(out.lengths[0])
    print(tokenizer.decode(out.tokens[0, :n], skip_special_tokens=True), flush=True)
    _say(f"{n} tokens in {elapsed:.1f}s (including compilation)")


def cmd_info(args) -> None:
    from jaxlora.checkpoint import read_config

    config, meta = read_config(args.checkpoint)
    size = sum(f.stat().st_size for f in Path(args.checkpoint, "params").rglob("*") if f.is_file())
    rows = [
        ("architecture", config.family),
        ("source", meta.get("source", "")),
        ("parameters", f"{config.num_params:,}"),
        ("dtype", meta["dtype"]),
        ("size on disk", f"{size / 2**20:.1f} MiB"),
        ("layers", config.num_layers),
        ("hidden size", config.hidden_size),
        ("heads (q / kv)", f"{config.num_heads} / {config.num_kv_heads}"),
        ("head dim", config.head_dim),
        ("mlp size", config.intermediate_size),
        ("vocab", config.vocab_size),
        ("context", config.max_position_embeddings),
        ("rope", f"{config.rope.kind}, theta {config.rope.theta:g}"),
        ("tied embeddings", config.tie_word_embeddings),
    ]
    for name, value in rows:
        print(f"{name:16} {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlora", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert an HF checkpoint (folder, file, GGUF or hub id)")
    convert.add_argument("src", help="HF model folder, .safetensors/.bin/.pth/.pt file, .gguf file, or hub id")
    convert.add_argument("dst", nargs="?", help="output folder (default: checkpoints/<name>)")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    convert.add_argument("--config", help="HF config.json for a bare state-dict file")
    convert.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    convert.set_defaults(run=cmd_convert)

    gen = commands.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt")
    gen.add_argument("--prompt-file")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast params on load")
    gen.set_defaults(run=cmd_generate)

    info = commands.add_parser("info", help="describe a converted checkpoint")
    info.add_argument("checkpoint")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except JaxloraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
