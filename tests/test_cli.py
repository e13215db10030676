"""The `jaxlora` command: bad input is one `error:` line and a non-zero exit, never a traceback."""

import json
import re
import subprocess
import sys

import pytest


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "jaxlora", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def assert_clean_error(result, message):
    """Exit status 1 (as README promises), exactly one `error:` line holding `message`, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert message in error_lines[0]


def test_convert_missing_source(tmp_path):
    result = run_cli("convert", tmp_path / "missing", tmp_path / "out")
    assert_clean_error(result, "no such file or folder")
    assert not (tmp_path / "out").exists()


def test_convert_unknown_architecture(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (src / "model.safetensors").write_bytes(b"")
    result = run_cli("convert", src, tmp_path / "out")
    from jaxlora.families import supported_model_types

    assert_clean_error(result, "supported: " + ", ".join(supported_model_types()))
    assert not (tmp_path / "out").exists()


def test_convert_refuses_to_overwrite(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    assert_clean_error(run_cli("convert", tiny("llama-gqa").hf_dir, tmp_path / "out"), "already exists")


def test_script_is_the_same_entry_point(tmp_path):
    from conftest import ROOT

    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "convert_checkpoint.py"),
            tmp_path / "x.txt",
            tmp_path / "out",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_clean_error(result, "no such file or folder")


def test_info_and_generate_on_a_non_checkpoint(tmp_path):
    assert_clean_error(run_cli("info", tmp_path), "is not a jaxlora checkpoint")
    assert_clean_error(run_cli("generate", tmp_path, "--prompt", "hi"), "is not a jaxlora checkpoint")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
        ([], "give exactly one of --prompt, --prompt-file, --batch-file"),
        (["--prompt", "hi", "--batch-file", "x.txt"], "give exactly one of"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read /nonexistent/prompt.txt"),
        (["--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--prompt", "hi", "--min-p", "2"], "min_p must be in [0, 1]"),
        (["--prompt", "hi", "--repetition-penalty", "0"], "repetition_penalty must be > 0"),
    ],
)
def test_generate_bad_arguments(tmp_path, args, message):
    assert_clean_error(run_cli("generate", tmp_path, *args), message)


@pytest.mark.parametrize(
    "impl, message", [("cudnn", "needs a GPU; this process runs on cpu"), ("splash", "needs a TPU")]
)
def test_attention_backend_the_platform_lacks(tiny, impl, message):
    result = run_cli("generate", tiny("llama-gqa").jax_dir, "--prompt", "hi", "--attention", impl)
    assert_clean_error(result, f"attention '{impl}' {message}")


def test_generate_without_tokenizer(tiny):
    assert_clean_error(run_cli("generate", tiny("llama-gqa").jax_dir, "--prompt", "hi"), "has no tokenizer")


def test_empty_batch_file(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n\n")
    result = run_cli("generate", tmp_path, "--batch-file", tmp_path / "prompts.txt")
    assert_clean_error(result, "holds no prompts")


@pytest.mark.real
def test_prompt_longer_than_the_context(smollm2_checkpoint, tmp_path):
    dst = smollm2_checkpoint
    (tmp_path / "long.txt").write_text("word " * 8200)
    result = run_cli("generate", dst, "--prompt-file", tmp_path / "long.txt", "--max-new-tokens", "4")
    assert_clean_error(result, "exceeds the model's context of 8192 tokens")


@pytest.mark.real
def test_batch_file_prints_one_json_line_per_prompt(smollm2_checkpoint, tmp_path):
    dst = smollm2_checkpoint
    (tmp_path / "prompts.txt").write_text("What is the capital of France?\n\nWhat is 2 + 2?\n")
    result = run_cli(
        "generate",
        dst,
        "--chat",
        "--batch-file",
        tmp_path / "prompts.txt",
        "--max-new-tokens",
        "16",
        "--stop",
        ".",
        "--no-compile-cache",
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["What is the capital of France?", "What is 2 + 2?"]
    assert "Paris" in lines[0]["completion"]
    assert all(line["completion"].count(".") <= 1 and line["completion"].endswith(".") for line in lines)


@pytest.mark.real
def test_chat_command_answers_each_line(smollm2_checkpoint):
    dst = smollm2_checkpoint
    result = subprocess.run(
        [sys.executable, "-m", "jaxlora", "chat", str(dst), "--max-new-tokens", "32"],
        input="What is the capital of France?\nAnd of Italy?\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "Rome" in result.stdout


@pytest.mark.real
def test_generate_uses_a_persistent_compile_cache_unless_told_not_to(smollm2_checkpoint, tmp_path):
    import os

    dst = smollm2_checkpoint
    for flags, cache_home in (([], tmp_path / "on"), (["--no-compile-cache"], tmp_path / "off")):
        result = subprocess.run(
            [sys.executable, "-m", "jaxlora", "generate", str(dst), "--prompt", "Hi", "--max-new-tokens", "4", *flags],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "XDG_CACHE_HOME": str(cache_home)},
        )
        assert result.returncode == 0, result.stderr
    assert any((tmp_path / "on" / "jaxlora" / "xla").iterdir())
    # Told not to, it writes no compiled program: the only things in its cache folder are the CPU kernels' builds
    # (`jaxlora.native`: attention and the decode products, once per machine, not a compile cache).
    written = sorted(p.relative_to(tmp_path / "off").as_posix() for p in (tmp_path / "off").rglob("*"))
    assert written[:2] == ["jaxlora", "jaxlora/kernels"] and len(written) == 4, written
    assert re.fullmatch(r"jaxlora/kernels/causal_attention-[0-9a-f]{24}\.so", written[2]), written
    assert re.fullmatch(r"jaxlora/kernels/tiled_matmul-[0-9a-f]{24}\.so", written[3]), written


@pytest.mark.real
@pytest.mark.xla_defaults
def test_info_and_chat_generate_on_smollm2(smollm2_checkpoint):
    dst = smollm2_checkpoint
    info = run_cli("info", dst)
    assert info.returncode == 0, info.stderr
    assert "134,515,008" in info.stdout and "llama" in info.stdout
    result = run_cli("generate", dst, "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
