"""LoRA adapters: a pure pytree beside the params, merge == unmerged, and the round trip with HF PEFT."""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import random_ids

import jaxlora
from jaxlora import lora
from jaxlora.errors import UsageError
from jaxlora.peft import export_peft, import_peft

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nonzero(adapters, seed=0):
    """Trained-looking adapters: B is zero right after init, which would hide a wrong B."""
    leaves, treedef = jax.tree.flatten(adapters.weights)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return adapters.replace(weights=jax.tree.unflatten(treedef, noisy))


def test_fresh_adapters_leave_the_model_unchanged_and_trained_ones_do_not(tiny):
    model = tiny("llama-gqa").load()
    ids = random_ids((2, 9), model.config.vocab_size)
    adapters = lora.init(model.config, jax.random.key(0), rank=4, targets=TARGETS)
    base = np.asarray(jaxlora.forward(model.params, model.config, ids))
    fresh = np.asarray(jaxlora.forward(model.params, model.config, ids, lora=adapters))
    np.testing.assert_array_equal(fresh, base)
    trained = np.asarray(jaxlora.forward(model.params, model.config, ids, lora=nonzero(adapters)))
    assert np.abs(trained - base).max() > 1e-3


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2", "gemma2", "gpt_neox", "qwen2_moe"])
def test_merged_equals_unmerged(tiny, name):
    model = tiny(name).load()
    targets = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    adapters = nonzero(lora.init(model.config, jax.random.key(1), rank=3, alpha=6, targets=targets))
    ids = random_ids((2, 11), model.config.vocab_size, seed=2)
    unmerged = np.asarray(jaxlora.forward(model.params, model.config, ids, lora=adapters))
    merged_params = lora.merge(model.params, adapters)
    merged = np.asarray(jaxlora.forward(merged_params, model.config, ids))
    np.testing.assert_allclose(merged, unmerged, rtol=0, atol=1e-5)
    restored = lora.unmerge(merged_params, adapters)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_gradients_reach_only_the_adapters(tiny):
    model = tiny("llama-gqa").load()
    adapters = lora.init(model.config, jax.random.key(2), rank=4, targets=TARGETS)
    ids = random_ids((2, 9), model.config.vocab_size, seed=3)

    def loss(adapters):
        logits = jaxlora.forward(model.params, model.config, ids[:, :-1], lora=adapters)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1).mean()

    grads = jax.jit(jax.grad(loss))(adapters)
    assert isinstance(grads, lora.Adapters) and grads.config == adapters.config
    assert jax.tree.structure(grads.weights) == jax.tree.structure(adapters.weights)
    # B starts at zero, so at first only B has a gradient (A's is exactly zero), as in PEFT.
    pairs = jax.tree.leaves(grads.weights, is_leaf=lambda x: isinstance(x, dict) and "a" in x)
    assert len(pairs) == model.config.num_layers * len(TARGETS)
    for pair in pairs:
        assert np.abs(np.asarray(pair["b"])).max() > 0
        assert np.abs(np.asarray(pair["a"])).max() == 0


def test_unknown_targets_are_refused(tiny):
    config = tiny("llama-gqa").load().config
    with pytest.raises(UsageError, match="no Linear layer named c_attn in llama; available: .*q_proj"):
        lora.init(config, jax.random.key(0), targets=("q_proj", "c_attn"))


def as_if_trained(peft_model, std: float = 0.1):
    """A PEFT model with random B (PEFT initializes B to zero, which would hide a wrong B)."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return peft_model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def test_exported_adapter_loads_in_peft_with_matching_logits(tiny, tmp_path):
    from peft import PeftModel

    m = tiny("llama-gqa")
    model = m.load()
    adapters = nonzero(lora.init(model.config, jax.random.key(3), rank=4, alpha=8, targets=TARGETS))
    export_peft(adapters, model.config, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    peft_model = PeftModel.from_pretrained(copy.deepcopy(m.torch_model), str(tmp_path / "adapter")).eval()
    ids = random_ids((2, 13), model.config.vocab_size, seed=4)
    ours = np.asarray(jaxlora.forward(model.params, model.config, ids, lora=adapters))
    np.testing.assert_allclose(ours, hf_logits(peft_model, ids), rtol=0, atol=1e-4)


def test_adapter_trained_with_peft_reproduces_its_logits(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    m = tiny("qwen2")
    model = m.load()
    torch.manual_seed(0)
    config = LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True)
    peft_model = as_if_trained(get_peft_model(copy.deepcopy(m.torch_model), config), std=0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = random_ids((2, 13), model.config.vocab_size, seed=5)
    expected = hf_logits(peft_model, ids)
    adapters = import_peft(tmp_path / "peft", model.config)
    assert adapters.config.rslora and adapters.config.rank == 6
    ours = np.asarray(jaxlora.forward(model.params, model.config, ids, lora=adapters))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


# Fused HF projections: GPT-2's Conv1D c_attn, CodeGen's qkv_proj in its 4-shard q/v/k order, GPT-NeoX's
# query_key_value interleaved per head, Phi-3's qkv_proj
# and gate_up_proj beside a plain o_proj. Targets that leave a fused part out (CodeGen's k) get a zero block.
FUSED_TARGETS = {
    "gpt2": ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"),
    "codegen": ("q_proj", "v_proj", "o_proj"),
    "gpt_neox": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "phi3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"),
}


@pytest.mark.parametrize("name, rslora", [(name, name == "phi3") for name in sorted(FUSED_TARGETS)])
def test_adapters_on_fused_projections_export_to_peft_and_back(tiny, tmp_path, name, rslora):
    """Exported, PEFT + PyTorch gives our logits (1e-4); imported back, the same function again."""
    from peft import PeftModel

    m = tiny(name)
    model = m.load()
    adapters = nonzero(
        lora.init(model.config, jax.random.key(5), rank=4, alpha=8, targets=FUSED_TARGETS[name], rslora=rslora)
    )
    export_peft(adapters, model.config, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["fan_in_fan_out"] == (name == "gpt2") and meta["rank_pattern"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(m.torch_model), str(tmp_path / "adapter")).eval()
    ids = random_ids((2, 13), model.config.vocab_size, seed=6)
    ours = np.asarray(jaxlora.forward(model.params, model.config, ids, lora=adapters))
    bare = np.asarray(jaxlora.forward(model.params, model.config, ids))
    assert np.abs(ours - bare).max() > 1e-2  # the adapters change the logits: the comparison has teeth
    np.testing.assert_allclose(ours, hf_logits(peft_model, ids), rtol=0, atol=1e-4)
    back = import_peft(tmp_path / "adapter", model.config)
    again = np.asarray(jaxlora.forward(model.params, model.config, ids, lora=back))
    np.testing.assert_allclose(again, ours, rtol=0, atol=1e-5)


def test_adapters_on_a_mixture_with_shared_experts_export_to_peft(tiny, tmp_path):
    """Qwen2-MoE: the MLP targets adapt the dense layer's MLP and each mixture layer's shared expert (the routed
    experts are not Linear modules in transformers, so PEFT cannot adapt them either); PEFT gives our logits."""
    from peft import PeftModel

    m = tiny("qwen2_moe")
    model = m.load()
    targets = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    adapters = nonzero(lora.init(model.config, jax.random.key(6), rank=4, alpha=8, targets=targets))
    adapted = {"/".join(path) for path in lora.target_paths(model.config, targets)}
    assert {"layers_0/moe/shared/gate_proj", "layers_1/mlp/gate_proj", "layers_2/moe/shared/down_proj"} <= adapted
    export_peft(adapters, model.config, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(m.torch_model), str(tmp_path / "adapter")).eval()
    ids = random_ids((2, 13), model.config.vocab_size, seed=6)
    ours = np.asarray(jaxlora.forward(model.params, model.config, ids, lora=adapters))
    assert np.abs(ours - np.asarray(jaxlora.forward(model.params, model.config, ids))).max() > 1e-2
    np.testing.assert_allclose(ours, hf_logits(peft_model, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "name, modules",
    [
        ("gpt2", ["c_attn", "c_fc"]),
        ("codegen", ["qkv_proj"]),
        ("gpt_neox", ["query_key_value"]),
        ("phi3", ["qkv_proj", "gate_up_proj"]),
    ],
)
def test_peft_adapter_trained_on_a_fused_module_imports_exactly(tiny, tmp_path, name, modules):
    from peft import LoraConfig, get_peft_model

    m = tiny(name)
    model = m.load()
    torch.manual_seed(1)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=modules, fan_in_fan_out=name == "gpt2")
    peft_model = as_if_trained(get_peft_model(copy.deepcopy(m.torch_model), config))
    peft_model.save_pretrained(tmp_path / "peft")
    ids = random_ids((2, 13), model.config.vocab_size, seed=7)
    expected = hf_logits(peft_model.eval(), ids)
    adapters = import_peft(tmp_path / "peft", model.config)
    ours = np.asarray(jaxlora.forward(model.params, model.config, ids, lora=adapters))
    assert np.abs(ours - np.asarray(jaxlora.forward(model.params, model.config, ids))).max() > 1e-2
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_peft_rank_and_alpha_patterns_import_as_one_config(tiny, tmp_path):
    """Modules of another rank and alpha (PEFT's patterns) are padded and rescaled into one LoraConfig."""
    from peft import LoraConfig, get_peft_model

    m = tiny("llama-gqa")
    model = m.load()
    torch.manual_seed(2)
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 5}, alpha_pattern={"v_proj": 3}
    )
    peft_model = as_if_trained(get_peft_model(copy.deepcopy(m.torch_model), config))
    peft_model.save_pretrained(tmp_path / "peft")
    ids = random_ids((2, 13), model.config.vocab_size, seed=8)
    adapters = import_peft(tmp_path / "peft", model.config)
    assert adapters.config.rank == 5
    ours = np.asarray(jaxlora.forward(model.params, model.config, ids, lora=adapters))
    np.testing.assert_allclose(ours, hf_logits(peft_model.eval(), ids), rtol=0, atol=1e-4)


def test_peft_export_refuses_a_module_peft_cannot_adapt(tiny, tmp_path):
    """An untied GPT-2 head is an nn.Linear among Conv1D modules: PEFT's one fan_in_fan_out cannot hold both."""
    config = dataclasses.replace(tiny("gpt2").load().config, tie_word_embeddings=False)
    adapters = lora.init(config, jax.random.key(0), targets=("q_proj", "lm_head"))
    with pytest.raises(UsageError, match="gpt2 has no HF module PEFT can adapt for lm_head"):
        export_peft(adapters, config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_rejects_what_it_cannot_reproduce(tiny, tmp_path):
    config = tiny("llama-gqa").load().config
    with pytest.raises(UsageError, match="is not a PEFT adapter folder"):
        import_peft(tmp_path, config)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True})
    )
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="use_dora=True is not supported"):
        import_peft(tmp_path, config)


def test_dropout_acts_in_training_only(tiny, tmp_path):
    from jaxlora.train import token_loss

    model = tiny("llama-gqa").load()
    adapters = nonzero(lora.init(model.config, jax.random.key(4), rank=4, dropout=0.5, targets=TARGETS))
    ids = random_ids((2, 11), model.config.vocab_size, seed=6)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    plain = adapters.replace(config=lora.LoraConfig(4, 16.0, adapters.config.targets))
    evaluation = token_loss(model.params, model.config, batch, adapters)[0]
    np.testing.assert_allclose(evaluation, token_loss(model.params, model.config, batch, plain)[0], rtol=1e-6)
    one = token_loss(model.params, model.config, batch, adapters, key=jax.random.key(1))[0]
    two = token_loss(model.params, model.config, batch, adapters, key=jax.random.key(2))[0]
    assert one != two and one != evaluation
    np.testing.assert_array_equal(
        one, token_loss(model.params, model.config, batch, adapters, key=jax.random.key(1))[0]
    )
    export_peft(adapters, model.config, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_dropout"] == 0.5
    assert import_peft(tmp_path / "out", model.config).config.dropout == 0.5


@pytest.mark.parametrize("name", ["llama-gqa", "gemma2"])
def test_generation_and_score_with_unmerged_adapters_equal_the_merged_model(tiny, name):
    model = tiny(name).load()
    c = model.config
    adapters = nonzero(lora.init(c, jax.random.key(4), rank=4, targets=("q_proj", "v_proj", "down_proj")), seed=4)
    merged = lora.merge(model.params, adapters)
    ids, mask = jaxlora.left_pad([list(random_ids((n,), c.vocab_size, seed=n)) for n in (5, 9)])
    kwargs = dict(attention_mask=mask, max_new_tokens=12, chunk_size=4)
    ours = jaxlora.generate(model.params, c, ids, lora=adapters, **kwargs)
    reference = jaxlora.generate(merged, c, ids, **kwargs)
    np.testing.assert_array_equal(ours.tokens, reference.tokens)
    base = jaxlora.generate(model.params, c, ids, **kwargs)
    assert not np.array_equal(base.tokens, reference.tokens)  # the adapters matter to the tokens
    on_device = jaxlora.sample(model.params, c, ids, attention_mask=mask, max_new_tokens=12, lora=adapters)
    np.testing.assert_array_equal(np.asarray(on_device.tokens), reference.tokens)
    beams = dict(attention_mask=mask, num_beams=2, max_new_tokens=6)
    np.testing.assert_array_equal(
        np.asarray(jaxlora.beam_search(model.params, c, ids, lora=adapters, **beams).tokens),
        np.asarray(jaxlora.beam_search(merged, c, ids, **beams).tokens),
    )
    np.testing.assert_allclose(
        np.asarray(jaxlora.score(model.params, c, ids, mask, lora=adapters)),
        np.asarray(jaxlora.score(merged, c, ids, mask)),
        rtol=0,
        atol=1e-5,
    )


def test_adapter_bank_mixed_batch_equals_each_row_alone(tiny):
    """Three adapters of different ranks, scales and targets plus the bare base in one batch: every row's logits
    (1e-5) and greedy tokens equal that row run alone with its own adapter (or none), in forward and generate."""
    model = tiny("llama-gqa").load()
    c = model.config
    adapters = [
        nonzero(lora.init(c, jax.random.key(1), rank=4, alpha=8, targets=("q_proj", "v_proj")), seed=1),
        nonzero(
            lora.init(c, jax.random.key(2), rank=8, alpha=4, rslora=True, targets=("q_proj", "k_proj", "up_proj")),
            seed=2,
        ),
        nonzero(lora.init(c, jax.random.key(3), rank=2, alpha=16, targets=("o_proj", "down_proj")), seed=3),
    ]
    ids = random_ids((4, 11), c.vocab_size, seed=9)
    rows = [2, -1, 0, 1]
    mixed = lora.select(lora.bank(adapters, c), rows)
    got = np.asarray(jax.jit(lambda p, a: jaxlora.forward(p, c, ids, lora=a))(model.params, mixed))
    got_tokens = np.asarray(jaxlora.generate(model.params, c, ids, max_new_tokens=8, lora=mixed)[0])
    for r, k in enumerate(rows):
        own = None if k < 0 else adapters[k]
        want = np.asarray(jaxlora.forward(model.params, c, ids[r : r + 1], lora=own))[0]
        np.testing.assert_allclose(got[r], want, rtol=0, atol=1e-5)
        tokens = np.asarray(jaxlora.generate(model.params, c, ids[r : r + 1], max_new_tokens=8, lora=own)[0])[0]
        np.testing.assert_array_equal(got_tokens[r], tokens)
    # Each adapter moves its rows: the per-row comparison can tell them apart.
    bare = np.asarray(jaxlora.forward(model.params, c, ids))
    assert all(np.abs(got[r] - bare[r]).max() > 1e-2 for r in (0, 2, 3))
    with pytest.raises(UsageError, match=r"adapter ids must be in \[-1, 2\]"):
        lora.select(lora.bank(adapters, c), [0, 3])
