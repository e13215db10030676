"""The `jaxlora` command: a thin shell over the Python API. `python -m jaxlora` is the same entry point."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from jaxlora.config import ATTENTION_IMPLS
from jaxlora.errors import JaxloraError, UsageError

DEFAULT_CHECKPOINTS = Path("checkpoints")


def _say(message: str) -> None:
    if "jax" not in sys.modules or _is_primary():
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


def _is_primary() -> bool:
    """Only process 0 of a multi-process run prints."""
    import jax

    return jax.process_index() == 0


def _setup_devices(args):
    """Start jax.distributed when asked, then build the mesh (None: one device)."""
    import jax

    from jaxlora.sharding import make_mesh

    if getattr(args, "distributed", False):
        try:
            # With no arguments JAX reads the cluster from the environment (TPU pods, SLURM, ...).
            jax.distributed.initialize(
                coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
            )
        except Exception as e:  # noqa: BLE001 (the cluster probes raise assorted types)
            raise UsageError(f"could not start jax.distributed ({' '.join(str(e).split())})") from None
    spec = args.mesh or ("tensor=-1" if getattr(args, "distributed", False) else None)
    return make_mesh(spec) if spec else None


def _load(path: str, dtype: str | None, mesh=None, lora: str | None = None, attention: str = "auto"):
    from jaxlora.checkpoint import load
    from jaxlora.model import num_params

    start = time.perf_counter()
    _say(f"loading {path} ..." + (f" onto mesh {dict(mesh.shape)}" if mesh is not None else ""))
    model = load(path, dtype=dtype, mesh=mesh, attention=attention, lora=lora)
    _say(
        f"loaded {model.config.family} ({num_params(model.config) / 1e6:.1f}M params) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return model


def _prompts(args) -> list[str]:
    given = [name for name in ("prompt", "prompt_file", "batch_file") if getattr(args, name) is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --prompt, --prompt-file, --batch-file")
    if args.prompt is not None:
        return [args.prompt]
    path = args.prompt_file or args.batch_file
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path} ({e})") from None
    if args.prompt_file is not None:
        return [text]
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"{path} holds no prompts (one per line)")
    return prompts


def _sampling(args):
    from jaxlora.sampling import Sampling

    sampling = Sampling(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
    )
    sampling.per_row(1)  # validate before loading the model
    return sampling


def _encode(tokenizer, text: str, chat: bool, checkpoint: str) -> list[int]:
    if chat:
        if not tokenizer.chat_template:
            raise UsageError(f"{checkpoint}'s tokenizer has no chat template; drop --chat")
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return list(tokenizer(text)["input_ids"])


def _enable_compile_cache(args) -> None:
    """The persistent XLA cache: a second run of the same shapes skips compilation."""
    if args.no_compile_cache:
        return
    import jax

    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxlora" / "xla"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class TextStream:
    """Prints a row's text as its tokens arrive (decoding the whole row each time keeps multi-byte pieces whole)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.printed = ""

    def add(self, tokens) -> None:
        self.tokens.extend(int(t) for t in tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        self.out.write(text[len(self.printed) :])
        self.out.flush()
        self.printed = text


def _generation_kwargs(args, model, tokenizer) -> dict:
    import jax

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return dict(
        key=jax.random.key(args.seed),
        sampling=_sampling(args),
        eos_token_ids=model.eos_token_ids,
        stop=tuple(args.stop or ()),
        tokenizer=tokenizer,
        pad_token_id=pad_id,
    )


def cmd_generate(args) -> None:
    import json

    from jaxlora.generate import left_pad, stream

    prompts = _prompts(args)
    _sampling(args)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    _enable_compile_cache(args)
    mesh = _setup_devices(args)
    model = _load(args.checkpoint, args.dtype, mesh, args.lora, args.attention)
    out = sys.stdout if _is_primary() else open(os.devnull, "w")  # noqa: SIM115
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise UsageError(f"{args.checkpoint} has no tokenizer; use the Python API with token ids")
    encoded = [_encode(tokenizer, text, args.chat, args.checkpoint) for text in prompts]
    kwargs = _generation_kwargs(args, model, tokenizer)
    ids, mask = left_pad(encoded, kwargs["pad_token_id"])
    start = time.perf_counter()
    chunks = stream(model.params, model.config, ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, **kwargs)
    rows: list[list[int]] = [[] for _ in prompts]
    printer = TextStream(tokenizer, out) if len(prompts) == 1 else None
    for chunk in chunks:
        for r, row in enumerate(rows):
            row.extend(chunk.row(r))
        if printer is not None:
            printer.add(chunk.row(0))
    elapsed = time.perf_counter() - start
    if printer is not None:
        print(file=out, flush=True)
    else:
        for text, row in zip(prompts, rows, strict=True):
            completion = tokenizer.decode(row, skip_special_tokens=True)
            print(json.dumps({"prompt": text, "completion": completion}), file=out, flush=True)
    count = sum(len(row) for row in rows)
    _say(f"{count} tokens in {elapsed:.1f}s ({count / elapsed:.1f} tok/s, including compilation)")


def cmd_chat(args) -> None:
    import jax

    from jaxlora.chat import ChatSession

    sampling = _sampling(args)
    _enable_compile_cache(args)
    mesh = _setup_devices(args)
    model = _load(args.checkpoint, args.dtype, mesh, args.lora, args.attention)
    session = ChatSession(
        model,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        key=jax.random.key(args.seed),
        system=args.system,
        stop=tuple(args.stop or ()),
    )
    interactive = sys.stdin.isatty()
    if interactive:
        _say("chat: type a message; an empty line or Ctrl-D ends the conversation")
    while True:
        try:
            text = input("> " if interactive else "")
        except EOFError:
            break
        if not text.strip():
            break
        printer = TextStream(model.tokenizer)
        for chunk in session.send(text):
            printer.add(chunk.row(0))
        print(flush=True)


def cmd_finetune(args) -> None:
    from jaxlora.trainer import RunOptions, run

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    options = RunOptions(
        data=args.data,
        out=args.out,
        eval_data=args.eval_data,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        pack=not args.pad,
        learning_rate=args.lr,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        clip_norm=args.clip_norm,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=targets,
        full=args.full,
        remat=args.remat,
        dtype=args.dtype,
        seed=args.seed,
        save_every=args.save_every,
        keep=args.keep,
        eval_every=args.eval_every,
        resume=args.resume,
        init_lora=args.lora,
        mesh=args.mesh,
        attention=args.attention,
    )
    run(args.checkpoint, options, log=lambda message: print(message, flush=True))


def cmd_lora_export(args) -> None:
    from jaxlora.checkpoint import load_adapters, read_config
    from jaxlora.peft import export_peft

    meta_file = Path(args.adapters) / "lora_config.json"
    if not meta_file.is_file():
        raise UsageError(f"{args.adapters} is not a jaxlora adapter folder (no lora_config.json)")
    base = json.loads(meta_file.read_text()).get("base") or args.base
    if not base:
        raise UsageError("the adapters do not name their base checkpoint: pass --base CKPT")
    config, _ = read_config(base)
    export_peft(load_adapters(args.adapters, config), config, args.out, base_model=base)
    _say(f"wrote PEFT adapter {args.out}")


def cmd_lora_import(args) -> None:
    from jaxlora.checkpoint import read_config, save_adapters
    from jaxlora.peft import import_peft

    config, _ = read_config(args.base)
    save_adapters(import_peft(args.peft_dir, config), Path(args.out), args.base)
    _say(f"wrote jaxlora adapters {args.out}")


def cmd_info(args) -> None:
    from jaxlora.checkpoint import read_config
    from jaxlora.model import num_params

    config, meta = read_config(args.checkpoint)
    size = sum(f.stat().st_size for f in Path(args.checkpoint, "params").rglob("*") if f.is_file())
    rows = [
        ("architecture", config.family),
        ("source", meta.get("source", "")),
        ("parameters", f"{num_params(config):,}"),
        ("dtype", meta["dtype"]),
        ("size on disk", f"{size / 2**20:.1f} MiB"),
        ("layers", config.num_layers),
        ("hidden size", config.hidden_size),
        ("heads (q / kv)", f"{config.num_heads} / {config.num_kv_heads}"),
        ("head dim", config.head_dim),
        ("mlp size", config.intermediate_size),
        ("vocab", config.vocab_size),
        ("context", config.context_length or f"unbounded (dynamic NTK from {config.max_position_embeddings})"),
        ("rope", _describe_rope(config.rope)),
        ("tied embeddings", config.tie_word_embeddings),
    ]
    _print_table(rows)


def _seq_len(value: str) -> int | None:
    if value == "dynamic":
        return None
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"--seq-len must be a number or 'dynamic', got {value!r}") from None
    if number < 1:
        raise UsageError(f"--seq-len must be at least 1, got {number}")
    return number


def cmd_export(args) -> None:
    from jaxlora import export

    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    model = _load(args.checkpoint, None, lora=args.lora)
    if args.format == "onnx" and args.decode_step:
        if args.cache_len is None:
            raise UsageError("--decode-step needs --cache-len N (the KV cache's slots)")
        report = export.export_onnx_step(model, args.out, cache_len=args.cache_len, batch=args.batch, force=args.force)
        _say(f"wrote {args.out}; {report['greedy_steps_checked']} greedy steps in onnxruntime match jaxlora")
    elif args.format == "onnx":
        report = export.export_onnx(model, args.out, batch=args.batch, seq_len=_seq_len(args.seq_len), force=args.force)
        _say(f"wrote {args.out}; onnxruntime matches jaxlora within {report['max_relative_diff']:.1e} (relative)")
    elif args.format == "stablehlo":
        report = export.export_stablehlo(
            model, args.out, batch=args.batch, seq_len=_seq_len(args.seq_len), force=args.force
        )
        _say(f"wrote {args.out} for {', '.join(report['platforms'])}; reloaded and checked")
    else:
        report = export.export_hf(model, args.out, force=args.force)
        _say(f"wrote {args.out} ({report['tensors']} tensors, float32)")


def _print_table(rows: list[tuple]) -> None:
    """Rows of cells, every column but the last padded to its widest cell."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([f"{cell!s:<{w}}" for cell, w in zip(row, widths, strict=False)] + [str(row[-1])]))


def cmd_eval(args) -> None:
    import jax

    from jaxlora import evaluate

    if not (args.perplexity or args.diversity or args.code_pass_at_k):
        raise UsageError("give at least one of --perplexity FILE, --diversity PROMPTS, --code-pass-at-k PROBLEMS")
    if args.batch_size < 1 or args.samples < 1 or args.max_new_tokens < 1 or args.timeout <= 0:
        raise UsageError("--batch-size, --samples, --max-new-tokens and --timeout must be positive")
    ks = []
    for part in args.k.split(","):
        try:
            ks.append(int(part))
        except ValueError:
            raise UsageError(f"--k takes comma-separated numbers, got {args.k!r}") from None
    if args.code_pass_at_k:
        evaluate.check_ks(ks, args.samples)
    # Read every input before loading the model: a bad file fails fast.
    text = None
    if args.perplexity:
        text = evaluate.read_text(args.perplexity)
        if not text.strip():
            raise UsageError(f"{args.perplexity} holds no text")
    prompts = evaluate.read_lines(args.diversity, "prompts") if args.diversity else None
    problems = evaluate.read_problems(args.code_pass_at_k) if args.code_pass_at_k else None
    sampling = _sampling(args)
    model = _load(args.checkpoint, args.dtype, _setup_devices(args), lora=args.lora, attention=args.attention)
    if model.tokenizer is None:
        raise UsageError(f"{args.checkpoint} has no tokenizer to read the text with")
    key = jax.random.key(args.seed)
    report, rows = {}, []
    if text is not None:
        tokens = model.tokenizer(text)["input_ids"]
        window = args.window or min(model.config.context_length or 1024, 1024)
        stride = args.stride or max(window // 2, 1)
        result = evaluate.perplexity(
            model.params, model.config, tokens, window=window, stride=stride, batch_size=args.batch_size
        )
        report["perplexity"] = {**result, "window": window, "stride": stride}
        rows += [
            ("perplexity", "tokens scored", f"{result['tokens']}"),
            ("perplexity", "window / stride", f"{window} / {stride} ({result['windows']} windows)"),
            ("perplexity", "loss (nats/token)", f"{result['loss']:.4f}"),
            ("perplexity", "perplexity", f"{result['perplexity']:.3f}"),
        ]
    if prompts is not None:
        result = evaluate.diversity(
            model, prompts, samples=args.samples, max_new_tokens=args.max_new_tokens, sampling=sampling, key=key
        )
        report["diversity"] = result
        rows += [("diversity", "prompts x samples", f"{result['prompts']} x {result['samples']}")]
        rows += [("diversity", name, f"{result[name]:.4f}") for name in ("distinct_1", "distinct_2", "distinct_3")]
        rows += [("diversity", "self_bleu", f"{result['self_bleu']:.4f}")]
    if problems is not None:
        result = evaluate.code_pass_at_k(
            model,
            problems,
            samples=args.samples,
            ks=ks,
            max_new_tokens=args.max_new_tokens,
            sampling=sampling,
            key=key,
            timeout=args.timeout,
        )
        report["code"] = result
        rows += [("code", "problems x samples", f"{result['problems']} x {result['samples']}")]
        rows += [("code", f"pass@{k}", f"{result[f'pass@{k}']:.4f}") for k in ks]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(rows)


def _describe_rope(rope) -> str:
    text = f"{rope.kind}, theta {rope.theta:g}"
    if rope.kind != "default":
        text += f", factor {rope.factor:g}"
    if rope.original_max_position_embeddings:
        text += f", original context {rope.original_max_position_embeddings}"
    return text


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top one (0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="HF repetition penalty (1: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", help="stop after this text (repeatable)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast params on load")
    parser.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent XLA cache")
    parser.add_argument("--mesh", help="shard over devices, e.g. data=1,tensor=8 (axes data, fsdp, tensor; -1: rest)")
    parser.add_argument("--lora", help="apply LoRA adapters (a jaxlora runs/NAME/final or a PEFT folder)")
    _add_attention_flag(parser)


def _add_attention_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attention",
        default="auto",
        choices=ATTENTION_IMPLS,
        help="attention implementation: xla (reference), chunked (flash-style, memory linear in length), cudnn "
        "(GPU), splash (TPU); auto picks per platform and length",
    )


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: start jax.distributed (cluster from the environment on TPU pods)",
    )
    parser.add_argument("--coordinator", help="with --distributed off TPU: the coordinator's HOST:PORT")
    parser.add_argument("--num-processes", type=int, help="with --coordinator: how many processes")
    parser.add_argument("--process-id", type=int, help="with --coordinator: this process's index")


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

    gen = commands.add_parser("generate", help="generate text from a prompt (streamed) or a batch of prompts")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt")
    gen.add_argument("--prompt-file", help="the whole file is one prompt")
    gen.add_argument("--batch-file", help="one prompt per line; prints one JSON line per prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _add_generation_flags(gen)
    _add_distributed_flags(gen)
    gen.set_defaults(run=cmd_generate)

    chat = commands.add_parser("chat", help="an interactive multi-turn chat (the tokenizer's chat template)")
    chat.add_argument("checkpoint")
    chat.add_argument("--system", help="a system message for the conversation")
    _add_generation_flags(chat)
    chat.set_defaults(run=cmd_chat)

    tune = commands.add_parser("finetune", help="LoRA (or --full) fine-tuning with optax; resumable")
    tune.add_argument("checkpoint")
    tune.add_argument("--data", required=True, help="text file, or JSONL of text / prompt+completion / messages")
    tune.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    tune.add_argument("--eval-data")
    tune.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: never)")
    tune.add_argument("--steps", type=int, default=100)
    tune.add_argument("--batch-size", type=int, default=4)
    tune.add_argument("--grad-accum", type=int, default=1)
    tune.add_argument("--seq-len", type=int, default=256)
    tune.add_argument("--pad", action="store_true", help="one example per row, padded (default: pack)")
    tune.add_argument("--lr", type=float, default=2e-4)
    tune.add_argument("--warmup", type=int, default=10)
    tune.add_argument("--weight-decay", type=float, default=0.0)
    tune.add_argument("--clip-norm", type=float, default=1.0)
    tune.add_argument("--rank", type=int, default=8)
    tune.add_argument("--alpha", type=float, default=16.0)
    tune.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on the adapters' input")
    tune.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated HF module names")
    tune.add_argument("--full", action="store_true", help="train every param instead of LoRA adapters")
    tune.add_argument("--remat", action="store_true", help="recompute layers in the backward pass (less memory)")
    tune.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--save-every", type=int, default=50)
    tune.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    tune.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    tune.add_argument("--lora", help="start from these adapters (jaxlora or PEFT folder)")
    tune.add_argument("--mesh", help="train on a device mesh, e.g. data=2,tensor=4")
    _add_attention_flag(tune)
    tune.set_defaults(run=cmd_finetune)

    lora = commands.add_parser("lora", help="move adapters to and from Hugging Face PEFT")
    lora_commands = lora.add_subparsers(dest="lora_command", required=True)
    export = lora_commands.add_parser("export", help="jaxlora adapters (runs/NAME/final) -> a PEFT folder")
    export.add_argument("adapters")
    export.add_argument("out")
    export.add_argument("--base", help="the base checkpoint, if the adapters do not name it")
    export.set_defaults(run=cmd_lora_export)
    imp = lora_commands.add_parser("import", help="a PEFT LoRA folder -> jaxlora adapters for a base checkpoint")
    imp.add_argument("peft_dir")
    imp.add_argument("out")
    imp.add_argument("--base", required=True, help="the converted base checkpoint")
    imp.set_defaults(run=cmd_lora_import)

    info = commands.add_parser("info", help="describe a converted checkpoint")
    info.add_argument("checkpoint")
    info.set_defaults(run=cmd_info)

    export = commands.add_parser("export", help="export to ONNX, StableHLO, or an HF checkpoint")
    export.add_argument("format", choices=["onnx", "stablehlo", "hf"])
    export.add_argument("checkpoint")
    export.add_argument("out", help="OUT.onnx, a StableHLO file, or (hf) a folder")
    export.add_argument(
        "--seq-len", default="dynamic", help="onnx/stablehlo: a fixed sequence length, or 'dynamic' (default)"
    )
    export.add_argument("--batch", type=int, help="onnx/stablehlo: a fixed batch size (default: dynamic)")
    export.add_argument(
        "--decode-step", action="store_true", help="onnx: export one KV-cached step (prefill or decode) instead"
    )
    export.add_argument("--cache-len", type=int, help="onnx --decode-step: the KV cache's slots (fixed)")
    export.add_argument("--lora", help="merge these LoRA adapters into the exported weights")
    export.add_argument("--force", action="store_true", help="overwrite an existing output")
    export.set_defaults(run=cmd_export)

    ev = commands.add_parser("eval", help="perplexity, sample diversity, and code pass@k")
    ev.add_argument("checkpoint")
    ev.add_argument("--perplexity", metavar="FILE", help="a text file to score")
    ev.add_argument("--window", type=int, help="perplexity: tokens per window (default: min(context, 1024))")
    ev.add_argument("--stride", type=int, help="perplexity: tokens between window starts (default: window / 2)")
    ev.add_argument("--batch-size", type=int, default=4, help="perplexity: windows per jitted call")
    ev.add_argument("--diversity", metavar="PROMPTS", help="one prompt per line: distinct-1/2/3 and self-BLEU")
    ev.add_argument("--code-pass-at-k", metavar="PROBLEMS", help="HumanEval-format JSONL problems")
    ev.add_argument("--samples", type=int, default=10, help="samples per prompt / problem")
    ev.add_argument("--k", default="1,10", help="code: the k of pass@k, comma-separated (each <= --samples)")
    ev.add_argument("--timeout", type=float, default=5.0, help="code: seconds per program run")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_generation_flags(ev)
    ev.set_defaults(run=cmd_eval, temperature=0.8, max_new_tokens=128)
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
