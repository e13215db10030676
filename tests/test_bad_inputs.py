"""A corpus of bad input across the whole CLI, as a hostile-but-realistic user would give it.

Every case runs `jaxlora ...` in a process of its own under an address-space limit (an allocation bomb fails the
case, not the machine), in a folder of its own that also holds files of the user's; the process is forked from a
server that has imported the libraries once (forked_cli.py). Each must end with exit status 1, exactly one
`error:` line saying what is wrong, no traceback, and that folder exactly as it was (nothing new, nothing
half-written, nothing of the user's touched). The shared inputs (checkpoints, adapters) are checked
unchanged at the end. The cases run a few at a time in a module fixture; each is reported as its own test.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import forked_cli
import jax
import pytest
import torch
from conftest import TINY_WITH_TOKENIZER, hf_model, save_hf

import jaxlora
from jaxlora import lora
from jaxlora.checkpoint import adapters_to_peft, save_adapters

MEMORY_LIMIT = 6 << 30  # bytes of address space for each case's process (JAX on CPU needs about 2 GiB)
WORKERS = 3


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # "{base}", "{src}", ... name shared inputs; relative paths are in the case's folder
    message: str  # what the error line must say
    setup: Callable[[Path, dict], None] | None = None  # makes the case's own inputs in its folder


def case(name: str, args: str | list[str], message: str, setup=None) -> Case:
    return Case(name, tuple(args.split() if isinstance(args, str) else args), message, setup)


# Setup helpers: each builds one kind of damaged or hostile input in the case's folder.


def write(path: str, text: str | bytes):
    def setup(folder: Path, shared: dict) -> None:
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            target.write_bytes(text)
        else:
            target.write_text(text)

    return setup


def hf_source(config_changes: dict | None = None, damage: Callable[[Path], None] | None = None):
    """A copy of the tiny HF source at ./src with its config.json edited and/or its weights damaged."""

    def setup(folder: Path, shared: dict) -> None:
        src = folder / "src"
        shutil.copytree(shared["src"], src)
        if config_changes is not None:
            config = json.loads((src / "config.json").read_text())
            for key, value in config_changes.items():
                if value is DELETE:
                    config.pop(key, None)
                else:
                    config[key] = value
            (src / "config.json").write_text(json.dumps(config))
        if damage is not None:
            damage(src)

    return setup


def checkpoint_copy(damage: Callable[[Path], None]):
    """A copy of the converted tiny checkpoint at ./ckpt, damaged."""

    def setup(folder: Path, shared: dict) -> None:
        shutil.copytree(shared["base"], folder / "ckpt")
        damage(folder / "ckpt")

    return setup


def adapters_copy(damage: Callable[[Path], None], which: str = "adapters"):
    def setup(folder: Path, shared: dict) -> None:
        shutil.copytree(shared[which], folder / "ad")
        damage(folder / "ad")

    return setup


def edit_json(name: str, **changes):
    def damage(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        data.update(changes)
        (folder / name).write_text(json.dumps(data))

    return damage


def edit_model(**changes):
    """Edit the model config inside a jaxlora checkpoint's config.json."""

    def damage(folder: Path) -> None:
        meta = json.loads((folder / "config.json").read_text())
        meta["model"].update(changes)
        (folder / "config.json").write_text(json.dumps(meta))

    return damage


def replace_file(name: str, content: bytes):
    def damage(folder: Path) -> None:
        (folder / name).write_bytes(content)

    return damage


def truncate_largest(under: str):
    """Cut the largest file under `under` in half (a torn write)."""

    def damage(folder: Path) -> None:
        files = [p for p in (folder / under).rglob("*") if p.is_file()]
        largest = max(files, key=lambda p: p.stat().st_size)
        data = largest.read_bytes()
        largest.write_bytes(data[: len(data) // 2])

    return damage


def delete(pattern: str):
    def damage(folder: Path) -> None:
        for path in folder.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    return damage


def symlink(name: str, to: str):
    def setup(folder: Path, shared: dict) -> None:
        (folder / name).symlink_to(folder / to)

    return setup


def both(*setups):
    def setup(folder: Path, shared: dict) -> None:
        for s in setups:
            s(folder, shared)

    return setup


DELETE = object()


class _RunsCode:
    def __reduce__(self):  # unpickling this runs `touch pwned`: the case's folder fingerprint would show it
        return (os.system, ("touch pwned",))


def torch_pickle(name: str, state: dict):
    def setup(folder: Path, shared: dict) -> None:
        torch.save(state, folder / name)

    return setup


PROBLEM = json.dumps({"task_id": "t/0", "prompt": "def f():\n", "test": "def check(c): pass", "entry_point": "f"})
GEN = "generate {base} --prompt hi --max-new-tokens 2"
TUNE = "finetune {base} --data {data} --steps 1 --batch-size 1 --seq-len 16"
USER_FOLDER = "mine"  # every case's folder holds the user's files here (and notes.txt at its top)

CASES = [
    # ---- convert: sources that are missing, damaged, or lie about their size ----
    case("convert-missing-source", "convert nowhere out", "no such file or folder"),
    case("convert-empty-folder", "convert empty out", "", write("empty/.keep", "")),
    case("convert-text-file", "convert notes.txt out", "notes.txt"),
    case(
        "convert-config-not-json", "convert src out", "config.json", hf_source(damage=replace_file("config.json", b"{"))
    ),
    case(
        "convert-config-a-list", "convert src out", "config.json", hf_source(damage=replace_file("config.json", b"[1]"))
    ),
    case("convert-unknown-family", "convert src out", "t5", hf_source({"model_type": "t5"})),
    case("convert-quantize-unknown", "convert src out --quantize int3", "unknown quantization", hf_source()),
    case("convert-quantize-keep-not-gguf", "convert src out --quantize keep", "must be a .gguf file", hf_source()),
    case("convert-no-model-type", "convert src out", "model_type", hf_source({"model_type": DELETE})),
    case("convert-vocab-1e12", "convert src out", "vocab_size", hf_source({"vocab_size": 10**12})),
    case("convert-hidden-2e40", "convert src out", "hidden_size", hf_source({"hidden_size": 2**40})),
    case("convert-layers-1e9", "convert src out", "num_hidden_layers", hf_source({"num_hidden_layers": 10**9})),
    case("convert-heads-a-string", "convert src out", "num_attention_heads", hf_source({"num_attention_heads": "4"})),
    case("convert-heads-zero", "convert src out", "num_attention_heads", hf_source({"num_attention_heads": 0})),
    case("convert-hidden-negative", "convert src out", "hidden_size", hf_source({"hidden_size": -32})),
    case("convert-heads-not-dividing", "convert src out", "", hf_source({"num_attention_heads": 5})),
    case("convert-vocab-disagrees", "convert src out", "vocab", hf_source({"vocab_size": 50000})),
    case("convert-more-layers-than-weights", "convert src out", "layer", hf_source({"num_hidden_layers": 5})),
    case("convert-fewer-layers-than-weights", "convert src out", "layer", hf_source({"num_hidden_layers": 1})),
    case("convert-hidden-disagrees", "convert src out", "hidden", hf_source({"hidden_size": 128})),
    case(
        "convert-context-huge",
        "convert src out",
        "max_position_embeddings",
        hf_source({"max_position_embeddings": 10**15}),
    ),  # fmt: skip
    case(
        "convert-rope-theta-nan",
        "convert src out",
        "rope",
        hf_source({"rope_parameters": {"rope_theta": float("nan"), "rope_type": "default"}}),
    ),
    case(
        "convert-truncated-safetensors", "convert src out", "model.safetensors", hf_source(damage=truncate_largest("."))
    ),  # fmt: skip
    case(
        "convert-safetensors-garbage",
        "convert src out",
        "model.safetensors",
        hf_source(damage=replace_file("model.safetensors", b"\xff" * 64)),
    ),  # fmt: skip
    case(
        "convert-safetensors-empty",
        "convert src out",
        "model.safetensors",
        hf_source(damage=replace_file("model.safetensors", b"")),
    ),  # fmt: skip
    case(
        "convert-pickle-with-code",
        "convert evil.bin out --config src/config.json",
        "refused to load evil.bin: unpickling it would call posix.system",
        both(hf_source(), torch_pickle("evil.bin", {"model.embed_tokens.weight": _RunsCode()})),
    ),  # fmt: skip
    case(
        "convert-legacy-pickle-with-code",
        "convert evil.pt out --config src/config.json",
        "refused to load evil.pt",
        both(hf_source(), write("evil.pt", pickle.dumps({"model.embed_tokens.weight": _RunsCode()}, protocol=2))),
    ),  # fmt: skip
    case(
        "convert-bin-garbage",
        "convert junk.bin out --config src/config.json",
        "junk.bin",
        both(hf_source(), write("junk.bin", b"not a pickle at all")),
    ),  # fmt: skip
    case("convert-gguf-bad-magic", "convert bad.gguf out", "bad.gguf", write("bad.gguf", b"GGUX" + b"\0" * 64)),
    case(
        "convert-gguf-truncated", "convert cut.gguf out", "cut.gguf", write("cut.gguf", b"GGUF\x03\0\0\0" + b"\1" * 9)
    ),
    case(
        "convert-config-file-missing",
        "convert weights.safetensors out --config nowhere.json",
        "nowhere.json",
        write("weights.safetensors", b""),
    ),  # fmt: skip
    case("convert-dst-dot", "convert {src} .", "current folder"),
    case("convert-dst-dotdot", "convert {src} ..", "current folder"),
    case("convert-dst-cwd-absolute", "convert {src} {work}", "current folder"),
    case("convert-dst-user-folder", f"convert {{src}} {USER_FOLDER}", "already exists"),
    case("convert-dst-user-folder-force", f"convert {{src}} {USER_FOLDER} --force", "not jaxlora output"),
    case("convert-dst-user-file-force", "convert {src} notes.txt --force", "not jaxlora output"),
    case("convert-dst-symlink-force", "convert {src} link --force", "symbolic link", symlink("link", USER_FOLDER)),
    case("convert-dst-under-a-file", "convert {src} notes.txt/out", "notes.txt"),
    case("convert-dst-read-only", "convert {src} /sys/jaxlora-out", "/sys"),
    case("convert-bad-dtype", "convert {src} out --dtype float13", "float13"),
    case("convert-unknown-flag", "convert {src} out --fast", "--fast"),
    case("convert-no-arguments", "convert", "src"),
    case("no-command", [], "command"),
    case("unknown-command", "frobnicate", "frobnicate"),
    # ---- loading a checkpoint: missing, edited or damaged ----
    case("generate-missing-checkpoint", "generate nowhere --prompt hi", "nowhere"),
    case("generate-user-folder", f"generate {USER_FOLDER} --prompt hi", USER_FOLDER),
    case(
        "generate-config-not-json",
        "generate ckpt --prompt hi",
        "config.json",
        checkpoint_copy(replace_file("config.json", b"{oops")),
    ),  # fmt: skip
    case(
        "generate-unknown-dtype",
        "generate ckpt --prompt hi",
        "float13",
        checkpoint_copy(edit_json("config.json", dtype="float13")),
    ),  # fmt: skip
    case(
        "generate-config-vocab-1e12",
        "generate ckpt --prompt hi --max-new-tokens 2",
        "vocab_size",
        checkpoint_copy(edit_model(vocab_size=10**12)),
    ),  # fmt: skip
    case(
        "generate-config-more-layers",
        "generate ckpt --prompt hi --max-new-tokens 2",
        "layers",
        checkpoint_copy(edit_model(num_layers=4, layer_windows=[None] * 4)),
    ),  # fmt: skip
    case(
        "generate-config-wider",
        "generate ckpt --prompt hi --max-new-tokens 2",
        "params",
        checkpoint_copy(edit_model(hidden_size=128)),
    ),  # fmt: skip
    case(
        "generate-dtype-mismatch",
        "generate ckpt --prompt hi",
        "bfloat16",
        checkpoint_copy(edit_json("config.json", dtype="bfloat16")),
    ),  # fmt: skip
    case("generate-params-deleted", "generate ckpt --prompt hi", "params", checkpoint_copy(delete("params"))),
    case(
        "generate-quantization-table-lies",
        "generate ckpt --prompt hi",
        "q_proj",
        checkpoint_copy(edit_json("config.json", quantization={"layers_0/attn/q_proj/kernel": "int8"})),
    ),  # fmt: skip
    case(
        "generate-quantization-format-unknown",
        "generate ckpt --prompt hi",
        "unknown quantization format 'fp8'",
        checkpoint_copy(edit_json("config.json", quantization={"embed/embedding": "fp8"})),
    ),  # fmt: skip
    case(
        "generate-quantization-not-a-weight",
        "generate ckpt --prompt hi",
        "not a quantizable param",
        checkpoint_copy(edit_json("config.json", quantization={"final_norm/scale": "int8"})),
    ),  # fmt: skip
    case("generate-quantize-odd-group", f"{GEN} --quantize int4:7", "even number"),
    case(
        "generate-metadata-deleted",
        "generate ckpt --prompt hi",
        "_METADATA",
        checkpoint_copy(delete("params/*/_METADATA")),
    ),  # fmt: skip
    case("generate-truncated-data", "generate ckpt --prompt hi", "params", checkpoint_copy(truncate_largest("params"))),
    case(
        "generate-generation-config-bad",
        "generate ckpt --prompt hi",
        "generation_config.json",
        checkpoint_copy(replace_file("generation_config.json", b"[not json")),
    ),  # fmt: skip
    case(
        "generate-tokenizer-json-bad",
        "generate ckpt --prompt hi",
        "tokenizer",
        checkpoint_copy(replace_file("tokenizer/tokenizer.json", b'{"version": 7')),
    ),  # fmt: skip
    case("generate-no-tokenizer", "generate ckpt --prompt hi", "no tokenizer", checkpoint_copy(delete("tokenizer"))),
    case("info-without-params", "info ckpt", "params", checkpoint_copy(delete("params"))),
    case("info-missing", "info nowhere", "nowhere"),
    case("info-on-a-file", "info notes.txt", "notes.txt"),
    case("chat-missing-checkpoint", "chat nowhere", "nowhere"),
    # ---- generate: impossible options ----
    case("generate-no-prompt", "generate {base}", "prompt"),
    case(
        "generate-two-prompt-sources", "generate {base} --prompt hi --batch-file p.txt", "prompt", write("p.txt", "a\n")
    ),  # fmt: skip
    case("generate-max-new-tokens-0", "generate {base} --prompt hi --max-new-tokens 0", "max-new-tokens"),
    case("generate-max-new-tokens-negative", "generate {base} --prompt hi --max-new-tokens -5", "max-new-tokens"),
    case("generate-max-new-tokens-text", "generate {base} --prompt hi --max-new-tokens many", "many"),
    case("generate-past-the-context", "generate {base} --prompt hi --max-new-tokens 100000", "context"),
    case("generate-temperature-negative", f"{GEN} --temperature -1", "temperature"),
    case("generate-temperature-nan", f"{GEN} --temperature nan", "temperature"),
    case("generate-temperature-inf", f"{GEN} --temperature inf", "temperature"),
    case("generate-top-p-zero", f"{GEN} --top-p 0", "top"),
    case("generate-top-p-above-one", f"{GEN} --top-p 1.5", "top"),
    case("generate-top-k-negative", f"{GEN} --top-k -1", "top"),
    case("generate-min-p-above-one", f"{GEN} --min-p 2", "min"),
    case("generate-repetition-penalty-zero", f"{GEN} --repetition-penalty 0", "repetition"),
    case("generate-repetition-penalty-nan", f"{GEN} --repetition-penalty nan", "repetition"),
    case("generate-seed-beyond-64-bits", f"{GEN} --seed {2**70}", "seed"),
    case("generate-seed-negative", f"{GEN} --seed -1", "seed"),
    case("generate-seed-text", f"{GEN} --seed abc", "seed"),
    case("generate-empty-stop", [*GEN.split(), "--stop", ""], "stop"),
    case("generate-prompt-file-missing", "generate {base} --prompt-file nowhere.txt", "nowhere.txt"),
    case("generate-prompt-file-a-folder", f"generate {{base}} --prompt-file {USER_FOLDER}", USER_FOLDER),
    case(
        "generate-prompt-file-not-utf8",
        "generate {base} --prompt-file bin.txt",
        "bin.txt",
        write("bin.txt", b"\xff\xfe\xfa"),
    ),  # fmt: skip
    case(
        "generate-batch-file-empty", "generate {base} --batch-file empty.txt", "no prompts", write("empty.txt", "\n\n")
    ),
    case("generate-dtype-bogus", f"{GEN} --dtype float13", "float13"),
    case("generate-mesh-bogus", f"{GEN} --mesh data=zero", "mesh"),
    case("generate-mesh-too-many-devices", f"{GEN} --mesh data=64", "device"),
    case("generate-lora-missing", f"{GEN} --lora nowhere", "nowhere"),
    case("generate-lora-user-folder", f"{GEN} --lora {USER_FOLDER}", USER_FOLDER),
    case("generate-lora-other-model", f"{GEN} --lora {{other_adapters}}", "stored as"),
    case(
        "generate-lora-config-not-json",
        f"{GEN} --lora ad",
        "lora_config.json",
        adapters_copy(replace_file("lora_config.json", b"{rank")),
    ),  # fmt: skip
    case("generate-lora-rank-zero", f"{GEN} --lora ad", "rank", adapters_copy(edit_json("lora_config.json", rank=0))),
    case(
        "generate-lora-rank-disagrees",
        f"{GEN} --lora ad",
        "stored as",
        adapters_copy(edit_json("lora_config.json", rank=8)),
    ),  # fmt: skip
    case(
        "generate-lora-unknown-target",
        f"{GEN} --lora ad",
        "warp_drive",
        adapters_copy(edit_json("lora_config.json", targets=["warp_drive"])),
    ),  # fmt: skip
    case("generate-lora-arrays-deleted", f"{GEN} --lora ad", "adapters", adapters_copy(delete("adapters"))),
    case(
        "generate-peft-config-not-json",
        f"{GEN} --lora ad",
        "adapter_config.json",
        adapters_copy(replace_file("adapter_config.json", b"{"), which="peft"),
    ),  # fmt: skip
    case(
        "generate-peft-weights-missing",
        f"{GEN} --lora ad",
        "adapter_model",
        adapters_copy(delete("adapter_model.*"), which="peft"),
    ),  # fmt: skip
    case(
        "generate-peft-rank-disagrees",
        f"{GEN} --lora ad",
        "shape",
        adapters_copy(edit_json("adapter_config.json", r=2), which="peft"),
    ),  # fmt: skip
    # ---- finetune ----
    case("finetune-out-a-file", f"{TUNE} --out notes.txt", "notes.txt"),
    case("finetune-out-user-folder", f"{TUNE} --out {USER_FOLDER}", "not a jaxlora run"),
    case("finetune-out-dot", f"{TUNE} --out .", "current folder"),
    case("finetune-resume-nothing", f"{TUNE} --out newrun --resume", "nothing to resume"),
    case("finetune-data-missing", "finetune {base} --data nowhere.jsonl --out run", "nowhere.jsonl"),
    case(
        "finetune-data-empty", "finetune {base} --data empty.jsonl --out run", "empty.jsonl", write("empty.jsonl", "")
    ),
    case(
        "finetune-data-bad-json",
        "finetune {base} --data bad.jsonl --out run",
        "bad.jsonl",
        write("bad.jsonl", '{"text": "ok"}\n{"text": \n'),
    ),  # fmt: skip
    case(
        "finetune-data-unknown-format",
        "finetune {base} --data odd.jsonl --out run",
        "odd.jsonl",
        write("odd.jsonl", '{"question": "?", "answer": "!"}\n'),
    ),  # fmt: skip
    case("finetune-eval-data-missing", f"{TUNE} --out run --eval-data nowhere.jsonl", "nowhere.jsonl"),
    case("finetune-steps-zero", "finetune {base} --data {data} --out run --steps 0", "steps"),
    case("finetune-batch-zero", "finetune {base} --data {data} --out run --batch-size 0", "batch"),
    case("finetune-seq-len-one", "finetune {base} --data {data} --out run --seq-len 1", "seq"),
    case("finetune-lr-negative", "finetune {base} --data {data} --out run --lr -1", "lr"),
    case("finetune-lr-nan", "finetune {base} --data {data} --out run --lr nan", "lr"),
    case("finetune-rank-zero", "finetune {base} --data {data} --out run --rank 0", "rank"),
    case("finetune-dropout-one", "finetune {base} --data {data} --out run --dropout 1", "dropout"),
    case("finetune-unknown-target", "finetune {base} --data {data} --out run --targets warp_drive", "warp_drive"),
    case("finetune-grad-accum-zero", "finetune {base} --data {data} --out run --grad-accum 0", "accum"),
    case("finetune-seed-huge", f"finetune {{base}} --data {{data}} --out run --seed {2**64}", "seed"),
    case("finetune-init-lora-other-model", f"{TUNE} --out run --lora {{other_adapters}}", "stored as"),
    case("finetune-data-missing-flag", "finetune {base} --out run", "--data"),
    # ---- lora export / import ----
    case("lora-export-missing", "lora export nowhere out", "nowhere"),
    case("lora-export-out-dot", "lora export {adapters} .", "current folder"),
    case("lora-export-out-user-folder", f"lora export {{adapters}} {USER_FOLDER}", "already exists"),
    case("lora-export-out-user-folder-force", f"lora export {{adapters}} {USER_FOLDER} --force", "not jaxlora output"),
    case("lora-export-out-user-file-force", "lora export {adapters} notes.txt --force", "not jaxlora output"),
    case(
        "lora-export-base-missing", "lora export ad out", "base", adapters_copy(edit_json("lora_config.json", base=""))
    ),
    case(
        "lora-export-base-gone",
        "lora export ad out",
        "nowhere",
        adapters_copy(edit_json("lora_config.json", base="nowhere")),
    ),  # fmt: skip
    case("lora-import-missing", "lora import nowhere out --base {base}", "nowhere"),
    case("lora-import-not-peft", f"lora import {USER_FOLDER} out --base {{base}}", USER_FOLDER),
    case(
        "lora-import-config-bad",
        "lora import ad out --base {base}",
        "adapter_config.json",
        adapters_copy(replace_file("adapter_config.json", b"[]"), which="peft"),
    ),  # fmt: skip
    case(
        "lora-import-out-user-folder-force",
        f"lora import {{peft}} {USER_FOLDER} --base {{base}} --force",
        "not jaxlora output",
    ),  # fmt: skip
    case("lora-import-out-parent", "lora import {peft} .. --base {base}", "current folder"),
    case("lora-import-base-missing", "lora import {peft} out --base nowhere", "nowhere"),
    case("lora-import-other-model", "lora import {peft} out --base {other}", "shape"),
    case("lora-import-no-base-flag", "lora import {peft} out", "--base"),
    # ---- export ----
    case("export-unknown-format", "export tflite {base} out", "tflite"),
    case("export-hf-out-dot", "export hf {base} .", "current folder"),
    case("export-hf-out-user-folder-force", f"export hf {{base}} {USER_FOLDER} --force", "not jaxlora output"),
    case("export-hf-read-only", "export hf {base} /sys/jaxlora-out", "/sys"),
    case("export-onnx-user-file-force", "export onnx {base} notes.txt --force", "not jaxlora output"),
    case("export-stablehlo-user-file", "export stablehlo {base} notes.txt", "already exists"),
    case("export-stablehlo-user-file-force", "export stablehlo {base} notes.txt --force", "not jaxlora output"),
    case("export-seq-len-bogus", "export onnx {base} out.onnx --seq-len many", "seq"),
    case("export-batch-zero", "export onnx {base} out.onnx --batch 0", "batch"),
    case("export-missing-checkpoint", "export hf nowhere out", "nowhere"),
    # ---- eval ----
    case("eval-no-inputs", "eval {base}", "at least one"),
    case("eval-perplexity-missing", "eval {base} --perplexity nowhere.txt", "nowhere.txt"),
    case("eval-perplexity-empty", "eval {base} --perplexity empty.txt", "empty.txt", write("empty.txt", "  \n")),
    case(
        "eval-timeout-nan", "eval {base} --code-pass-at-k p.jsonl --timeout nan", "timeout", write("p.jsonl", PROBLEM)
    ),
    case(
        "eval-timeout-inf", "eval {base} --code-pass-at-k p.jsonl --timeout inf", "timeout", write("p.jsonl", PROBLEM)
    ),
    case("eval-timeout-zero", "eval {base} --code-pass-at-k p.jsonl --timeout 0", "timeout", write("p.jsonl", PROBLEM)),
    case(
        "eval-k-above-samples", "eval {base} --code-pass-at-k p.jsonl --samples 2 --k 5", "5", write("p.jsonl", PROBLEM)
    ),  # fmt: skip
    case("eval-k-not-numbers", "eval {base} --code-pass-at-k p.jsonl --k a,b", "--k", write("p.jsonl", PROBLEM)),
    case("eval-problems-bad-json", "eval {base} --code-pass-at-k p.jsonl", "p.jsonl", write("p.jsonl", "{\n")),
    case(
        "eval-problems-missing-fields",
        "eval {base} --code-pass-at-k p.jsonl",
        "p.jsonl",
        write("p.jsonl", '{"task_id": "x"}\n'),
    ),  # fmt: skip
    case("eval-window-one", "eval {base} --perplexity t.txt --window 1", "window", write("t.txt", "some text here")),
    case("eval-stride-zero", "eval {base} --perplexity t.txt --stride 0", "stride", write("t.txt", "some text here")),
    case("eval-samples-zero", "eval {base} --diversity t.txt --samples 0", "samples", write("t.txt", "a prompt")),
]


def fingerprint(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (hidden ones too) -> a hash of its content, or where its link points."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            entries[name] = "link:" + os.readlink(path)
        elif path.is_dir():
            entries[name] = "folder"
        else:
            entries[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


@pytest.fixture(scope="module")
def shared(tiny_with_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """The inputs cases share: a tiny llama that speaks SmolLM2's tokenizer (HF source and converted), one of
    another width, adapters for each, a PEFT export, and training data."""
    root = tmp_path_factory.mktemp("bad-inputs")
    shutil.copytree(tiny_with_tokenizer / "hf", root / "src")
    shutil.copytree(tiny_with_tokenizer / "jax", root / "base")
    other = dict(
        TINY_WITH_TOKENIZER, hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=6
    )
    save_hf(hf_model(other), root / "other-src")
    jaxlora.convert(str(root / "other-src"), root / "other")
    key = jax.random.key(0)
    save_adapters(lora.init(jaxlora.load(root / "base").config, key, rank=4), root / "adapters", str(root / "base"))
    other_config = jaxlora.load(root / "other").config
    save_adapters(lora.init(other_config, key, rank=4), root / "other_adapters", str(root / "other"))
    adapters_to_peft(root / "adapters", root / "peft")
    (root / "data.jsonl").write_text("\n".join(json.dumps({"text": f"Line {i} of text."}) for i in range(8)) + "\n")
    names = ("src", "base", "other", "adapters", "other_adapters", "peft")
    return {"root": root, "data": root / "data.jsonl", **{name: root / name for name in names}}


@dataclass
class Result:
    process: subprocess.CompletedProcess
    before: dict[str, str]
    after: dict[str, str]


def run_case(item: Case, folder: Path, shared: dict) -> Result:
    folder.mkdir()
    (folder / USER_FOLDER).mkdir()
    (folder / USER_FOLDER / "keep.txt").write_text("the user's own file\n")
    (folder / "notes.txt").write_text("the user's notes\n")
    if item.setup is not None:
        item.setup(folder, shared)
    names = {key: str(value) for key, value in shared.items()} | {"work": str(folder)}
    args = [arg.format(**names) if "{" in arg else arg for arg in item.args]
    before = fingerprint(folder)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(folder.parent / "cache")}
    code, out, err = forked_cli.run(args, folder, env, folder.parent / f"{item.name}.log", MEMORY_LIMIT, timeout=300)
    return Result(subprocess.CompletedProcess(["jaxlora", *args], code, out, err), before, fingerprint(folder))


@pytest.fixture(scope="module")
def results(shared, tmp_path_factory) -> dict[str, Result]:
    root = tmp_path_factory.mktemp("cases")
    shared_before = fingerprint(shared["root"])
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {item.name: pool.submit(run_case, item, root / item.name, shared) for item in CASES}
        done = {name: future.result() for name, future in futures.items()}
    assert fingerprint(shared["root"]) == shared_before, "a case changed the shared inputs"
    return done


def test_the_corpus_is_large_and_names_are_unique():
    assert len(CASES) >= 100
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("item", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(item, results):
    result = results[item.name]
    stderr = result.process.stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    assert result.process.returncode == 1, (result.process.returncode, stderr[-3000:])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert item.message.lower() in errors[0].lower(), errors[0]
    assert result.after == result.before, "the case's folder changed"
