"""DeepSeek-V3 beyond the tests every family runs (test_parity, test_export, test_scan_layers, ...): the latent KV
cache and the absorbed attention it runs, the other spellings of the block, the router against transformers'
own, the multi-token-prediction layer dropped on convert, refused options, LoRA on the latent projections."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, hf_model, random_ids, save_hf
from test_parity import torch_logits
from test_sharding import run_worker

import jaxlora
from jaxlora import lora, moe
from jaxlora.cache import bytes_per_token, init_cache
from jaxlora.errors import ConfigError
from jaxlora.families import config_from_hf
from jaxlora.model import apply_decoder
from jaxlora.quant import is_quantized

jit_forward = jax.jit(jaxlora.forward, static_argnums=1)

# DeepSeek-V3's published sizes (its config.json's numbers, typed here: nothing is downloaded), bfloat16.
DEEPSEEK_V3 = dict(
    model_type="deepseek_v3",
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_attention_heads=128,
    num_key_value_heads=128,
    n_shared_experts=1,
    n_routed_experts=256,
    routed_scaling_factor=2.5,
    kv_lora_rank=512,
    q_lora_rank=1536,
    qk_rope_head_dim=64,
    v_head_dim=128,
    qk_nope_head_dim=128,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    n_group=8,
    topk_group=4,
    num_experts_per_tok=8,
    first_k_dense_replace=3,
    norm_topk_prob=True,
    moe_layer_freq=1,
    num_nextn_predict_layers=1,
    max_position_embeddings=163840,
    rms_norm_eps=1e-6,
    rope_theta=10000,
    rope_scaling=dict(
        beta_fast=32,
        beta_slow=1,
        factor=40,
        mscale=1.0,
        mscale_all_dim=1.0,
        original_max_position_embeddings=4096,
        type="yarn",
    ),
)


def test_the_cache_holds_one_latent_per_token_not_keys_and_values(tiny):
    config = tiny("deepseek_v3").load().config
    cache = init_cache(config, batch=2, max_len=32)
    per_token = config.num_layers * (20 + 6) * 4  # kv_lora_rank + qk_rope_head_dim float32 numbers per layer
    assert bytes_per_token(config) == per_token
    assert sum(a.nbytes for a in cache.keys + cache.values) == 2 * 32 * per_token
    # The real model: 61 x (512 + 64) bfloat16 numbers a token (70 KB), against 61 x 128 heads x (192 + 128) for
    # its keys and values expanded (4.9 MB): 71 times less.
    v3 = config_from_hf(DEEPSEEK_V3)
    assert v3.mla and v3.num_layers == 61 and v3.attn_scale == pytest.approx(192**-0.5 * (0.1 * np.log(40) + 1) ** 2)
    latent = bytes_per_token(v3, jnp.bfloat16)
    assert latent == 61 * 576 * 2 == 70272
    assert 61 * 128 * (192 + 128) * 2 / latent == pytest.approx(71.1, abs=0.05)


def test_cached_decoding_equals_the_uncached_forward(tiny):
    """With a cache the queries are taken into latent space and attend over the cached latents; without one the
    latents are expanded into keys and values (as transformers does). The two orders agree to float32 rounding."""
    model = tiny("deepseek_v3").load()
    params, config = model.params, model.config
    ids = random_ids((2, 12), config.vocab_size, seed=5)
    want = np.asarray(jit_forward(params, config, ids))
    prompt, max_len = 5, 16
    cache = init_cache(config, batch=2, max_len=max_len)
    valid = np.zeros((2, max_len), bool)
    valid[:, :prompt] = True
    positions = np.tile(np.arange(prompt), (2, 1))
    logits, cache = apply_decoder(params, config, ids[:, :prompt], positions, valid, cache=cache)
    np.testing.assert_allclose(np.asarray(logits), want[:, :prompt], rtol=0, atol=1e-5)
    for t in range(prompt, ids.shape[1]):
        valid[:, t] = True
        logits, cache = apply_decoder(
            params, config, ids[:, t : t + 1], np.full((2, 1), t), valid, cache=cache, write_index=t
        )
        np.testing.assert_allclose(np.asarray(logits)[:, 0], want[:, t], rtol=0, atol=1e-5)


# The other spellings of the block: queries straight from the hidden state (no q_lora_rank), rotate-half RoPE
# without scaling, attention biases, unnormalized picks from one group, no dense layer.
VARIANT = dict(
    TINY_CONFIGS["deepseek_v3"],
    q_lora_rank=None,
    rope_interleave=False,
    attention_bias=True,
    rope_parameters=dict(rope_type="default", rope_theta=500.0),
    norm_topk_prob=False,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=0,
)


def test_the_other_spellings_match_transformers(tmp_path):
    torch_model = hf_model(VARIANT, seed=2)
    jaxlora.convert(str(save_hf(torch_model, tmp_path / "hf")), tmp_path / "jax")
    model = jaxlora.load(tmp_path / "jax")
    config = model.config
    assert config.direct_queries and config.rotary_style == "half" and config.qkv_bias and not config.dense_layers
    ids = random_ids((2, 19), config.vocab_size, seed=1)
    np.testing.assert_allclose(jit_forward(model.params, config, ids), torch_logits(torch_model, ids), atol=1e-4)
    prompt = random_ids((2, 7), config.vocab_size, seed=3)
    with torch.no_grad():
        ref = torch_model.generate(
            torch.tensor(prompt), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )[:, 7:].numpy()
    np.testing.assert_array_equal(jaxlora.generate(model.params, config, prompt, max_new_tokens=16).tokens, ref)


@pytest.mark.parametrize(
    ("groups", "per_token", "k", "normalize"), [(4, 2, 2, True), (8, 3, 4, False), (1, 1, 3, True)]
)
def test_routing_picks_and_weighs_as_transformers_router(groups, per_token, k, normalize):
    from transformers import AutoConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    experts, hidden = 16, 24
    hf = AutoConfig.for_model(
        "deepseek_v3",
        hidden_size=hidden,
        n_routed_experts=experts,
        n_group=groups,
        topk_group=per_token,
        num_experts_per_tok=k,
        norm_topk_prob=normalize,
        routed_scaling_factor=2.5,
    )
    router = DeepseekV3TopkRouter(hf)
    torch.manual_seed(groups)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(0, 0.3)  # negative entries too: masked experts must never win
    x = torch.randn(64, hidden)
    with torch.no_grad():
        logits, want_weights, want_experts = router(x)
    weights, picked = moe.route_grouped(
        jnp.asarray(logits.numpy()),
        jnp.asarray(router.e_score_correction_bias.numpy()),
        k,
        groups,
        per_token,
        normalize,
        2.5,
    )
    order = np.argsort(want_experts.numpy(), axis=-1)  # transformers leaves its picks unsorted
    np.testing.assert_array_equal(
        np.sort(np.asarray(picked), axis=-1), np.take_along_axis(want_experts.numpy(), order, -1)
    )
    mine = np.take_along_axis(np.asarray(weights), np.argsort(np.asarray(picked), axis=-1), -1)
    np.testing.assert_allclose(mine, np.take_along_axis(want_weights.numpy(), order, -1), rtol=1e-6, atol=1e-7)


def test_the_multi_token_prediction_layer_is_dropped_with_a_note(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    m = tiny("deepseek_v3")
    src = tmp_path / "src"
    save_hf(m.torch_model, src)
    state = load_file(src / "model.safetensors")
    layers = TINY_CONFIGS["deepseek_v3"]["num_hidden_layers"]
    # The released checkpoints' extra layer: a whole decoder layer plus its own norms, projection and head.
    for name, tensor in list(state.items()):
        if name.startswith(f"model.layers.{layers - 1}."):
            state[name.replace(f".{layers - 1}.", f".{layers}.", 1)] = tensor.clone()
    hidden = TINY_CONFIGS["deepseek_v3"]["hidden_size"]
    state[f"model.layers.{layers}.eh_proj.weight"] = torch.zeros(hidden, 2 * hidden)
    state[f"model.layers.{layers}.enorm.weight"] = torch.ones(hidden)
    state[f"model.layers.{layers}.shared_head.head.weight"] = torch.zeros(97, hidden)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    lines = []
    jaxlora.convert(str(src), tmp_path / "jax", report=lines.append)
    dropped = [line for line in lines if "multi-token-prediction" in line]
    assert dropped and f"[{layers}]" in dropped[0], lines
    model = jaxlora.load(tmp_path / "jax")
    ids = random_ids((2, 11), model.config.vocab_size, seed=9)
    np.testing.assert_allclose(
        jit_forward(model.params, model.config, ids), torch_logits(m.torch_model, ids), atol=1e-4
    )


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, "fp8"),
        ({"n_group": 3}, "n_group"),
        ({"num_experts_per_tok": 7, "topk_group": 1}, "num_experts_per_tok"),
    ],
)
def test_options_it_does_not_implement_are_refused_by_name(change, named):
    with pytest.raises(ConfigError, match=named):
        config_from_hf({**TINY_CONFIGS["deepseek_v3"], **change})


def random_adapters(config, targets, seed):
    adapters = lora.init(config, jax.random.key(seed), rank=4, alpha=8.0, targets=targets)
    leaves, tree = jax.tree.flatten(adapters.weights)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]  # B non-zero
    return dataclasses.replace(adapters, weights=jax.tree.unflatten(tree, noisy))


LATENT_TARGETS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def test_lora_on_the_latent_projections_cached_and_not(tiny):
    """Adapters on kv_b_proj act in low-rank form on both halves the cache absorbs; merged or not, with a cache or
    without, the model is the same."""
    model = tiny("deepseek_v3").load()
    params, config = model.params, model.config
    adapters = random_adapters(config, LATENT_TARGETS, seed=1)
    merged = lora.merge(params, adapters)
    ids = random_ids((2, 13), config.vocab_size, seed=2)
    with_adapters = np.asarray(jaxlora.forward(params, config, ids, lora=adapters))
    np.testing.assert_allclose(with_adapters, np.asarray(jit_forward(merged, config, ids)), rtol=0, atol=1e-5)
    assert np.abs(with_adapters - np.asarray(jit_forward(params, config, ids))).max() > 1e-2
    prompt = random_ids((2, 6), config.vocab_size, seed=3)
    unmerged = jaxlora.generate(params, config, prompt, max_new_tokens=12, lora=adapters, return_logprobs=True)
    folded = jaxlora.generate(merged, config, prompt, max_new_tokens=12, return_logprobs=True)
    np.testing.assert_array_equal(unmerged.tokens, folded.tokens)
    np.testing.assert_allclose(unmerged.logprobs, folded.logprobs, rtol=0, atol=1e-5)


def test_a_bank_of_latent_adapters_gives_each_row_its_own(tiny):
    model = tiny("deepseek_v3").load()
    params, config = model.params, model.config
    first, second = (random_adapters(config, LATENT_TARGETS, seed=s) for s in (4, 5))
    bank = lora.bank([first, second], config)
    prompt = random_ids((3, 6), config.vocab_size, seed=6)
    mixed = jaxlora.generate(params, config, prompt, max_new_tokens=10, lora=lora.select(bank, [1, -1, 0])).tokens
    alone = [
        jaxlora.generate(params, config, prompt[r : r + 1], max_new_tokens=10, lora=a).tokens[0]
        for r, a in enumerate([second, None, first])
    ]
    np.testing.assert_array_equal(mixed, np.stack(alone))


def test_int8_latent_projections_decode_as_they_forward(tiny):
    """Quantized kv_b_proj is dequantized inside both attention orders: greedy decoding with the cache picks what
    the uncached forward's argmax picks at every step."""
    m = tiny("deepseek_v3")
    model, int8 = m.load(), jaxlora.load(m.jax_dir, quantize="int8")
    config = int8.config
    ids = random_ids((2, 10), config.vocab_size, seed=7)
    assert all(is_quantized(int8.params[f"layers_{i}"]["attn"]["kv_b_proj"]["kernel"]) for i in range(3))
    quantized = np.asarray(jit_forward(int8.params, config, ids))
    assert np.abs(quantized - np.asarray(jit_forward(model.params, model.config, ids))).max() > 0
    out = jaxlora.generate(int8.params, config, ids[:, :4], max_new_tokens=6)
    again = np.asarray(jit_forward(int8.params, config, np.concatenate([ids[:, :4], out.tokens], axis=1)))
    np.testing.assert_array_equal(again[:, 3:-1].argmax(-1), out.tokens)


def test_latent_attention_on_eight_devices_equals_one(tiny):
    """Heads of q_b_proj, kv_b_proj and o_proj split over `tensor`, experts over `expert`, rows over `data`; the
    cache's one latent per token cannot split by heads and stays whole on each device of the tensor axis."""
    proc = run_worker(["latent", tiny("deepseek_v3").jax_dir], devices=8)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    for spec, result in report.items():
        assert result["max_logit_diff"] <= 1e-5, (spec, result)
        assert result["tokens_equal"], spec
    assert report["fsdp=2,tensor=4"]["kv_b_spec"] == "P(None, 'tensor')"
    assert report["fsdp=2,tensor=4"]["o_spec"] == "P('tensor', 'fsdp')"


def test_peft_adapters_on_the_latent_projections_round_trip(tiny, tmp_path):
    """A PEFT adapter made on transformers' DeepSeek-V3 (kv_b_proj among its targets) gives PEFT's logits and
    greedy tokens here, through the cached, absorbed attention too; exported back, PEFT reads the same adapter."""
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model
    from test_lora import as_if_trained, hf_logits

    from jaxlora.peft import export_peft, import_peft

    m = tiny("deepseek_v3")
    model = m.load()
    torch.manual_seed(1)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=list(LATENT_TARGETS))
    peft_model = as_if_trained(get_peft_model(copy.deepcopy(m.torch_model), peft_config), std=0.05).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    adapters = import_peft(tmp_path / "peft", model.config)
    ids = random_ids((2, 13), model.config.vocab_size, seed=8)
    ours = np.asarray(jaxlora.forward(model.params, model.config, ids, lora=adapters))
    np.testing.assert_allclose(ours, hf_logits(peft_model, ids), rtol=0, atol=1e-4)
    prompt = ids[:, :6]
    with torch.no_grad():
        want = peft_model.generate(
            input_ids=torch.tensor(prompt), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[:, 6:].numpy()
    got = jaxlora.generate(model.params, model.config, prompt, max_new_tokens=12, lora=adapters).tokens
    np.testing.assert_array_equal(got, want)
    export_peft(adapters, model.config, tmp_path / "back")
    again = PeftModel.from_pretrained(copy.deepcopy(m.torch_model), str(tmp_path / "back")).eval()
    np.testing.assert_allclose(hf_logits(again, ids), hf_logits(peft_model, ids), rtol=0, atol=1e-5)
