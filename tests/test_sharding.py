"""Sharding on fake CPU devices, each run in a subprocess so the rest of the suite keeps its single device."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import EVEN, hf_model, random_ids, save_hf, xla_flags

import jaxlora

WORKER = Path(__file__).with_name("sharding_worker.py")

# Sizes that split over 2, 4 and 8 devices: EVEN (conftest) ...
# ... and SmolLM2's awkward head counts (9 and 3) with an mlp of 36.
UNEVEN = dict(
    model_type="llama",
    vocab_size=96,
    hidden_size=72,
    intermediate_size=36,
    num_hidden_layers=2,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=8,
    max_position_embeddings=128,
)


def run_worker(args, devices, timeout=300):
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=WORKER.parent,
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    paths = {}
    for name, config in (("even", EVEN), ("uneven", UNEVEN)):
        save_hf(hf_model(config), root / f"{name}-hf")
        paths[name] = jaxlora.convert(str(root / f"{name}-hf"), root / name)
    paths["even-int4"] = jaxlora.convert(str(root / "even-hf"), root / "even-int4", quantize="int4:16")
    ids = random_ids((8, 9), 96, seed=3)
    np.save(root / "ids.npy", ids)
    paths["ids"] = root / "ids.npy"
    return paths


def expected_spec(path: str, mesh: dict) -> str:
    """Megatron-style placement written out by hand (not read from jaxlora's rules): heads and the MLP split over
    `tensor`, the embedding dimension over `fsdp`; norms replicated; an axis of size 1 is no split at all."""
    from jax.sharding import PartitionSpec

    tensor = "tensor" if mesh["tensor"] > 1 else None
    fsdp = "fsdp" if mesh["fsdp"] > 1 else None
    leaf = path.split("/")
    if leaf[-1] == "scale":
        return str(PartitionSpec(None))
    if leaf[0] == "embed":  # [vocab, embed]
        return str(PartitionSpec(tensor, fsdp))
    if leaf[-2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") or leaf[0] == "lm_head":  # [embed, out]
        return str(PartitionSpec(fsdp, tensor))
    if leaf[-2] in ("o_proj", "down_proj"):  # [heads or mlp, embed]
        return str(PartitionSpec(tensor, fsdp))
    raise AssertionError(f"no expectation written for {path}")


def test_meshes_give_single_device_results(checkpoints):
    paths = [checkpoints[name] for name in ("even", "ids", "uneven", "even-int4")]
    proc = run_worker(["meshes", *paths], devices=8)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["devices"] == 8
    for mesh in report["meshes"]:
        assert mesh["max_logit_diff"] <= 1e-5, mesh
        assert mesh["max_chunked_logit_diff"] <= 1e-5, mesh
        assert mesh["tokens_equal"], mesh
        assert mesh["specs"] == {path: expected_spec(path, mesh["mesh"]) for path in mesh["specs"]}, mesh
        tensor = mesh["mesh"]["tensor"]
        # q_proj [embed, heads]: heads split over `tensor`, embed over `fsdp`.
        n = tensor * mesh["mesh"]["fsdp"]
        assert set(mesh["q_proj_bytes_per_device"]) == {mesh["q_proj_bytes"] // n}, mesh
    tensor8 = report["meshes"][1]
    assert tensor8["mesh"]["tensor"] == 8
    assert tensor8["q_proj_spec"] == "P(None, 'tensor')"
    assert tensor8["q_proj_shard_shapes"] == [[64, 8]]  # sharded restore: each device holds one head's columns
    assert report["lora_step"]["max_adapter_diff"] <= 1e-5 and report["lora_step"]["loss_diff"] <= 1e-5
    for where, result in report["quantized"].items():
        assert result["max_logit_diff"] <= 1e-5 and result["tokens_equal"], where
    # q_proj stored [heads, embed]: values and their scales and minimums split like the float kernel (transposed)
    assert report["quantized"]["data=2,fsdp=2,tensor=2 stored"]["q_proj"] == dict.fromkeys(
        ("values", "scale", "min"), "P('tensor', 'fsdp')"
    )
    assert report["quantized"]["tensor=8 on_load"]["q_proj"] == dict.fromkeys(
        ("values", "scale", "min"), "P('tensor', None)"
    )
    assert report["uneven"] == {
        "tokens_equal": True,
        "q_proj_spec": "P(None, None)",  # 9 heads do not split over 4: replicated
        "up_proj_spec": "P(None, 'tensor')",  # 36 = 4 x 9 does
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_like_one(checkpoints):
    single = jaxlora.load(checkpoints["even"])
    ids = np.load(checkpoints["ids"])
    expected = jaxlora.generate(single.params, single.config, ids, max_new_tokens=12).tokens.tolist()
    port = free_port()
    procs = [run_worker(["process", checkpoints["even"], checkpoints["ids"], i, port], devices=4) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    reports = sorted((json.loads(out.strip().splitlines()[-1]) for out, _ in outputs), key=lambda r: r["process"])
    assert [r["process"] for r in reports] == [0, 1]
    for r in reports:
        assert (r["global_devices"], r["local_devices"], r["local_q_shards"]) == (8, 4, 4)
        assert r["tokens"] == expected


def run_cli(args, devices):
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "jaxlora", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        input="What is the capital of France?\n",
    )


@pytest.mark.real
@pytest.mark.xla_defaults
def test_cli_generate_and_chat_on_a_mesh_match_one_device(smollm2_checkpoint):
    dst = smollm2_checkpoint
    common = ["--max-new-tokens", "24", "--no-compile-cache"]
    prompt = ["--chat", "--prompt", "What is the capital of France?"]
    alone = run_cli(["generate", dst, *prompt, *common], devices=1)
    # SmolLM2's 9 heads stay whole (replicated); its MLP (1536) and vocab (49152) split 8 ways.
    sharded = run_cli(["generate", dst, *prompt, *common, "--mesh", "tensor=8"], devices=8)
    assert alone.returncode == 0 and sharded.returncode == 0, sharded.stderr[-2000:]
    assert "Paris" in alone.stdout and sharded.stdout == alone.stdout
    assert "onto mesh" in sharded.stderr
    chat = run_cli(["chat", dst, *common, "--mesh", "data=1,fsdp=2,tensor=4"], devices=8)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip() == alone.stdout.strip()


def test_bad_mesh_specs_are_one_line_errors():
    from jaxlora.errors import UsageError
    from jaxlora.sharding import parse_mesh_spec

    for spec, message in (
        ("data=3", "has 3 devices but 8 are available"),
        ("model=8", "expected name=size"),
        ("data=-1,tensor=-1", "only one axis may be -1"),
        ("data=3,tensor=-1", "8 devices do not divide by 3"),
        ("tensor=0", "sizes must be >= 1"),
    ):
        with pytest.raises(UsageError, match=message):
            parse_mesh_spec(spec, 8)
    assert parse_mesh_spec("data=2,tensor=-1", 8) == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 4}
    assert parse_mesh_spec("expert=-1", 8) == {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}


@pytest.mark.real
def test_cli_distributed_generates_like_one_process(tiny_with_tokenizer):
    """Two `jaxlora generate --distributed` processes (4 devices each, one 8-device mesh): process 0 prints the
    text a single process prints; process 1 prints nothing."""
    common = [
        "generate",
        tiny_with_tokenizer / "jax",
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "12",
        "--no-compile-cache",
    ]
    alone = run_cli(common, devices=1)
    assert alone.returncode == 0, alone.stderr[-2000:]
    port = free_port()
    env = {"XLA_FLAGS": xla_flags(4), "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxlora", *map(str, common), "--distributed", "--coordinator", f"127.0.0.1:{port}"]
            + ["--num-processes", "2", "--process-id", str(i)],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    # stdout carries the text alone: gloo's C++ log lines ("[Gloo] Rank 0 is connected ...") go to stderr.
    assert outputs[0][0] == alone.stdout and outputs[1][0] == ""
    assert "onto mesh {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 8}" in outputs[0][1]


def test_the_serving_engine_on_eight_devices_equals_one(checkpoints):
    """Continuous batching with params sharded as loaded and the KV pool's heads over `tensor`: greedy tokens
    equal, log-probs within 1e-5 of one device."""
    proc = run_worker(["engine", checkpoints["even"]], devices=8)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    for spec, result in report.items():
        assert result["tokens_equal"], spec
        assert result["max_logprob_diff"] <= 1e-5, (spec, result)
    assert report["data=2,tensor=4"]["pool_spec"] == "P(None, 'tensor')"
