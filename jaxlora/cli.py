"""The `jaxlora` command: a thin shell over the Python API. `python -m jaxlora` is the same entry point.

Each command imports the library inside its function, so `--help` and argument errors answer at once, before
JAX, transformers and orbax load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

from jaxlora.config import ATTENTION_IMPLS, DTYPE_NAMES, MOE_IMPLS
from jaxlora.errors import JaxloraError, UsageError
from jaxlora.staging import raise_interrupt


def _is_primary() -> bool:
    """Only process 0 of a multi-process run prints (before JAX has started, there is only one process)."""
    if "jax" not in sys.modules:
        return True
    from jaxlora.sharding import is_primary

    return is_primary()


def _say(message: str) -> None:
    if _is_primary():
        print(message, file=sys.stderr, flush=True)


def _native_stdout_to_stderr() -> None:
    """gloo (jax.distributed's CPU collectives) logs from C++ straight to file descriptor 1: point that at stderr
    and give Python's stdout a descriptor of its own, so stdout carries only the generated text."""
    sys.stdout.flush()
    ours = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(ours, "w", buffering=1)


def _setup_devices(args):
    """Start jax.distributed when asked, then build the mesh (None: one device)."""
    from jaxlora.sharding import make_mesh, start_distributed

    distributed = getattr(args, "distributed", False)
    if distributed:
        _native_stdout_to_stderr()
        start_distributed(args.coordinator, args.num_processes, args.process_id)
    spec = args.mesh or ("tensor=-1" if distributed else None)
    return make_mesh(spec) if spec else None


def _load(args, mesh=None):
    from jaxlora.checkpoint import load
    from jaxlora.model import num_params

    start = time.perf_counter()
    _say(f"loading {args.checkpoint} ..." + (f" onto mesh {dict(mesh.shape)}" if mesh is not None else ""))
    model = load(
        args.checkpoint,
        dtype=getattr(args, "dtype", None),
        mesh=mesh,
        attention=getattr(args, "attention", "auto"),
        moe=getattr(args, "moe", "auto"),
        scan_layers=getattr(args, "scan_layers", "auto"),
        lora=args.lora,
        quantize=getattr(args, "quantize", None),
        # generate and chat: on unless --no-compile-cache; other commands: on unless JAXLORA_COMPILE_CACHE=off
        compile_cache=(not args.no_compile_cache) if hasattr(args, "no_compile_cache") else None,
    )
    seconds = time.perf_counter() - start
    _say(f"loaded {model.config.family} ({num_params(model.config) / 1e6:.1f}M params) in {seconds:.1f}s")
    return model


def _sampling(args):
    """The sampling flags as a `Sampling`, validated (before anything slow happens)."""
    from jaxlora.sampling import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    sampling.per_row(1)
    return sampling


def _start_generation(args):
    """What generate and chat share: checked sampling flags, the compile cache, devices, the model."""
    sampling = _sampling(args)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model = _load(args, _setup_devices(args))  # the persistent compile cache on, unless --no-compile-cache
    if model.tokenizer is None:
        raise UsageError(f"{args.checkpoint} has no tokenizer; use the Python API with token ids")
    return model, sampling


def cmd_serve(args) -> None:
    from jaxlora.serve import serve

    for name in ("max_batch", "max_queue", "block_size", "port"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    model = _load(args, _setup_devices(args))
    _say(f"serving on http://{args.host}:{args.port}/v1 (max batch {args.max_batch})")
    serve(
        model,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_len=args.max_len,
        max_queue=args.max_queue,
        block_size=args.block_size,
        name=args.name,
        prefix_cache=not args.no_prefix_cache,
        warmup=args.warmup,
    )


def cmd_convert(args) -> None:
    from jaxlora.convert import convert, default_dst

    dst = Path(args.dst) if args.dst else default_dst(args.src)
    start = time.perf_counter()
    convert(
        args.src,
        dst,
        dtype=args.dtype,
        config_path=args.config,
        force=args.force,
        progress=True,
        quantize=args.quantize,
        report=_say,
    )
    _say(f"wrote {dst} in {time.perf_counter() - start:.1f}s")


def cmd_generate(args) -> None:
    import jax

    from jaxlora.generate import check_stop_strings, left_pad, stream
    from jaxlora.text import TextStream, pad_id, prompt_ids, read_prompts

    prompts = read_prompts(args.prompt, args.prompt_file, args.batch_file)
    check_stop_strings(args.stop or ())  # before the model loads
    model, sampling = _start_generation(args)
    tokenizer = model.tokenizer
    ids, mask = left_pad([prompt_ids(tokenizer, text, args.chat) for text in prompts], pad_id(tokenizer))
    out = sys.stdout if _is_primary() else open(os.devnull, "w")  # noqa: SIM115
    start = time.perf_counter()
    chunks = stream(
        model.params,
        model.config,
        ids,
        attention_mask=mask,
        max_new_tokens=args.max_new_tokens,
        key=jax.random.key(args.seed),
        sampling=sampling,
        eos_token_ids=model.eos_token_ids,
        stop=tuple(args.stop or ()),
        tokenizer=tokenizer,
        pad_token_id=pad_id(tokenizer),
    )
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
    from jaxlora.text import TextStream

    model, sampling = _start_generation(args)
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

    options = RunOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RunOptions)})
    run(args.checkpoint, options, log=lambda message: print(message, flush=True))


def cmd_lora_export(args) -> None:
    from jaxlora.checkpoint import adapters_to_peft

    adapters_to_peft(args.adapters, args.out, base=args.base, force=args.force)
    _say(f"wrote PEFT adapter {args.out}")


def cmd_lora_import(args) -> None:
    from jaxlora.checkpoint import peft_to_adapters

    peft_to_adapters(args.peft_dir, args.out, args.base, force=args.force)
    _say(f"wrote jaxlora adapters {args.out}")


def cmd_info(args) -> None:
    from jaxlora.checkpoint import describe

    _print_table(describe(args.checkpoint))


def cmd_export(args) -> None:
    from jaxlora import export

    seq_len = export.parse_seq_len(args.seq_len)
    export.check_out(args.format, args.out, args.force)
    model = _load(args)
    options = dict(batch=args.batch, decode_step=args.decode_step, cache_len=args.cache_len, force=args.force)
    _say(export.run(args.format, model, args.out, seq_len=seq_len, **options))


def cmd_eval(args) -> None:
    from jaxlora import eval as evaluation

    inputs = evaluation.read_inputs(args.perplexity, args.diversity, args.code_pass_at_k)
    names = ("window", "stride", "batch_size", "samples", "max_new_tokens", "timeout", "seed", "unsafe_no_sandbox")
    options = evaluation.EvalOptions(
        **{name: getattr(args, name) for name in names}, ks=evaluation.parse_ks(args.k), sampling=_sampling(args)
    )
    options.check(inputs)  # before the model loads
    if inputs.problems is not None:
        _say(f"code: {evaluation.sandbox.describe()}")
    report = evaluation.run(_load(args, _setup_devices(args)), inputs, options)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(evaluation.table(report))


def _print_table(rows: list[tuple]) -> None:
    """Rows of cells, every column but the last padded to its widest cell."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([f"{cell!s:<{w}}" for cell, w in zip(row, widths, strict=False)] + [str(row[-1])]))


def _targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top one (0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="HF repetition penalty (1: off)")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--stop", action="append", help="stop after this text (repeatable)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="cast params on load")
    parser.add_argument("--quantize", metavar="FORMAT", help="quantize a float checkpoint on load: int8, int4[:GROUP]")
    parser.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent XLA cache")
    parser.add_argument(
        "--mesh", help="shard over devices, e.g. data=1,tensor=8 (axes data, fsdp, expert, tensor; -1: rest)"
    )
    parser.add_argument("--lora", help="apply LoRA adapters (a jaxlora runs/NAME/final or a PEFT folder)")
    _add_impl_flags(parser)


def _add_impl_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attention",
        default="auto",
        choices=ATTENTION_IMPLS,
        help="attention implementation: xla (reference), chunked (flash-style, memory linear in length), cudnn "
        "(GPU), splash (TPU), cpu (jaxlora's CPU kernel); auto picks per platform and length",
    )
    parser.add_argument(
        "--moe",
        default="auto",
        choices=MOE_IMPLS,
        help="mixture-of-experts dispatch: dense (every expert on every token), gathered, blocked (sorted grouped "
        "matmuls), ragged (lax.ragged_dot); auto: ragged on TPU, blocked elsewhere",
    )
    parser.add_argument(
        "--scan-layers",
        default="auto",
        choices=("auto", "on", "off"),
        help="run the layers as lax.scans over stacked params (compile time flat in depth) or one by one; auto: "
        "scanned on TPU and for deep models",
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


def _add_finetune_command(commands) -> None:
    """Flags named after `trainer.RunOptions` fields (dest=), so the options are read off the parsed args."""
    tune = commands.add_parser("finetune", help="LoRA (or --full) fine-tuning with optax; resumable")
    tune.add_argument("checkpoint")
    tune.add_argument(
        "--data",
        required=True,
        help="text file, or JSONL of text / prompt+completion / messages (pairs: see --objective)",
    )
    tune.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    tune.add_argument("--eval-data")
    tune.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: never)")
    tune.add_argument("--steps", type=int, default=100)
    tune.add_argument("--batch-size", type=int, default=4)
    tune.add_argument("--grad-accum", type=int, default=1)
    tune.add_argument("--seq-len", type=int, default=256)
    tune.add_argument("--pad", dest="pack", action="store_false", help="one example per row, padded (default: pack)")
    tune.add_argument("--lr", dest="learning_rate", type=float, default=2e-4)
    tune.add_argument("--warmup", dest="warmup_steps", type=int, default=10)
    tune.add_argument("--weight-decay", type=float, default=0.0)
    tune.add_argument("--clip-norm", type=float, default=1.0)
    tune.add_argument("--rank", type=int, default=8)
    tune.add_argument("--alpha", type=float, default=16.0)
    tune.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on the adapters' input")
    tune.add_argument(
        "--targets", type=_targets, default="q_proj,k_proj,v_proj,o_proj", help="comma-separated HF module names"
    )
    tune.add_argument("--full", action="store_true", help="train every param instead of LoRA adapters")
    tune.add_argument("--remat", action="store_true", help="recompute layers in the backward pass (less memory)")
    tune.add_argument("--dtype", choices=DTYPE_NAMES, help="compute dtype")
    tune.add_argument("--seed", type=_seed, default=0)
    tune.add_argument("--save-every", type=int, default=50)
    tune.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    tune.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    tune.add_argument("--lora", dest="init_lora", help="start from these adapters (jaxlora or PEFT folder)")
    tune.add_argument("--mesh", help="train on a device mesh, e.g. data=2,tensor=4")
    tune.add_argument(
        "--quantize", metavar="FORMAT", help="QLoRA: quantize the frozen base on load (int8, int4[:GROUP])"
    )
    tune.add_argument(
        "--objective",
        default="sft",
        choices=("sft", "dpo", "ipo", "orpo", "simpo"),
        help="sft (default), or a preference objective on JSONL pairs {prompt, chosen, rejected}",
    )
    tune.add_argument("--beta", type=float, default=0.1, help="preference objectives' beta (default 0.1)")
    tune.add_argument("--label-smoothing", type=float, default=0.0, help="dpo/simpo: conservative label noise")
    tune.add_argument("--simpo-gamma", type=float, default=0.5, help="simpo's target reward margin")
    _add_impl_flags(tune)
    tune.set_defaults(run=cmd_finetune)


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one `error:` line and exit status 1, like every other bad input."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a seed is a whole number from 0 to 2**63 - 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxlora", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    convert = commands.add_parser("convert", help="convert an HF checkpoint (folder, file, GGUF or hub id)")
    convert.add_argument("src", help="HF model folder, .safetensors/.bin/.pth/.pt file, .gguf file, or hub id")
    convert.add_argument("dst", nargs="?", help="output folder (default: checkpoints/<name>)")
    convert.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    convert.add_argument("--config", help="HF config.json for a bare state-dict file")
    convert.add_argument(
        "--quantize",
        metavar="FORMAT",
        help="keep linear weights and embeddings quantized: int8 (per output channel), int4[:GROUP] (group-wise, "
        "scale and min; group 64 by default), or keep (a GGUF file's quantized blocks, re-laid exactly)",
    )
    convert.add_argument("--force", action="store_true", help="replace an existing output (only jaxlora output)")
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

    _add_finetune_command(commands)

    srv = commands.add_parser("serve", help="an OpenAI-compatible server (continuous batching, paged KV cache)")
    srv.add_argument("checkpoint")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-batch", type=int, default=8, help="decode slots run together")
    srv.add_argument("--max-len", type=int, help="longest prompt + answer (default: the context, at most 4096)")
    srv.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503 answers")
    srv.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    srv.add_argument("--no-prefix-cache", action="store_true", help="prefill every prompt whole (no block reuse)")
    srv.add_argument(
        "--warmup", action="store_true", help="compile every engine program before serving (no compile stalls later)"
    )
    srv.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent XLA cache")
    srv.add_argument("--mesh", help="shard over this process's devices, e.g. tensor=8 (axes data, fsdp, tensor)")
    srv.add_argument("--name", help="the model name clients use (default: the checkpoint folder's name)")
    srv.add_argument("--dtype", choices=DTYPE_NAMES, help="cast params on load")
    srv.add_argument("--quantize", metavar="FORMAT", help="quantize a float checkpoint on load: int8, int4[:GROUP]")
    srv.add_argument("--lora", help="merge LoRA adapters (a jaxlora runs/NAME/final or a PEFT folder)")
    srv.set_defaults(run=cmd_serve)

    lora = commands.add_parser("lora", help="move adapters to and from Hugging Face PEFT")
    lora_commands = lora.add_subparsers(dest="lora_command", required=True, parser_class=_Parser)
    export = lora_commands.add_parser("export", help="jaxlora adapters (runs/NAME/final) -> a PEFT folder")
    export.add_argument("adapters")
    export.add_argument("out")
    export.add_argument("--base", help="the base checkpoint, if the adapters do not name it")
    export.add_argument("--force", action="store_true", help="replace an existing output (only jaxlora/PEFT output)")
    export.set_defaults(run=cmd_lora_export)
    imp = lora_commands.add_parser("import", help="a PEFT LoRA folder -> jaxlora adapters for a base checkpoint")
    imp.add_argument("peft_dir")
    imp.add_argument("out")
    imp.add_argument("--base", required=True, help="the converted base checkpoint")
    imp.add_argument("--force", action="store_true", help="replace an existing output (only jaxlora/PEFT output)")
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
    export.add_argument("--force", action="store_true", help="replace an existing output (only jaxlora output)")
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
    ev.add_argument(
        "--unsafe-no-sandbox",
        action="store_true",
        help="code: where no sandbox can be built, run generated code unisolated (never the default)",
    )
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_generation_flags(ev)
    ev.set_defaults(run=cmd_eval, temperature=0.8, max_new_tokens=128)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    # SIGTERM ends a run the way Ctrl-C does: the staging of a half-written output is removed on the way out.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, raise_interrupt)
    try:
        args.run(args)
    except JaxloraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # the file system's refusals: a read-only or full disk, a path that is a file, ...
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or type(e).__name__}{where}", file=sys.stderr)
        sys.exit(1)
    except MemoryError:
        print("error: out of memory (the model or input is larger than this machine's memory)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args else signal.SIGINT
        print("interrupted", file=sys.stderr)
        sys.exit(128 + int(signum))


if __name__ == "__main__":
    main()
