"""Scanned layers (`jaxlora.stacking`): the same model run as `lax.scan`s over stacked params gives what the
unrolled decoder gives, in every path that runs the decoder."""

import json
import random

import jax
import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, hf_model, random_ids, save_hf
from test_cli import run_cli
from test_parity import torch_logits
from test_sharding import run_worker

import jaxlora
from jaxlora import lora
from jaxlora.checkpoint import load_adapters, save_adapters
from jaxlora.config import ModelConfig
from jaxlora.errors import UsageError
from jaxlora.stacking import Stack, layer_stacks, stack_tree, unstack_tree
from jaxlora.train import init_state, make_optimizer, make_train_step

DEPTH = 6
# Six-layer versions of the tiny models and the stacks each is cut into: one kind throughout; local/global pairs
# (Gemma 2's windows, gpt-oss's windows with sinks and experts, SmolLM3's layers without RoPE); a dense layer
# among mixtures (Qwen2-MoE's mlp_only_layers=[1]); learned positions with LayerNorm (GPT-2); a parallel block
# with interleaved rotary (GPT-J).
DEEP = {
    "llama-gqa": (Stack(0, 1, 6),),
    "gemma2": (Stack(0, 2, 3),),
    "gpt_oss": (Stack(0, 2, 3),),
    "smollm3": (Stack(0, 2, 3),),
    "qwen2_moe": (Stack(0, 1, 1), Stack(1, 1, 1), Stack(2, 1, 4)),
    "deepseek_v3": (Stack(0, 1, 1), Stack(1, 1, 5)),
    "gpt2": (Stack(0, 1, 6),),
    "gptj": (Stack(0, 1, 6),),
}


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """deep(name) -> (transformers model, converted folder) of a six-layer tiny model, built once per module."""
    built = {}

    def get(name):
        if name not in built:
            depth_key = "n_layer" if TINY_CONFIGS[name]["model_type"] in ("gpt2", "gptj") else "num_hidden_layers"
            model = hf_model({**TINY_CONFIGS[name], depth_key: DEPTH})
            root = tmp_path_factory.mktemp(f"deep-{name}")
            jaxlora.convert(str(save_hf(model, root / "hf")), root / "jax")
            built[name] = (model, root / "jax")
        return built[name]

    return get


def both(path, **options):
    """The checkpoint loaded unrolled and scanned."""
    return jaxlora.load(path, scan_layers=False, **options), jaxlora.load(path, scan_layers=True, **options)


jit_forward = jax.jit(jaxlora.forward, static_argnums=1)


@pytest.mark.parametrize("name", sorted(DEEP))
def test_scanned_logits_match_transformers_and_the_unrolled_decoder(deep, name):
    torch_model, path = deep(name)
    unrolled, scanned = both(path)
    assert scanned.config.scan_layers and not unrolled.config.scan_layers
    assert layer_stacks(scanned.config) == DEEP[name]
    assert not any(k.startswith("layers_") for k in scanned.params)
    ids = random_ids((3, 19), scanned.config.vocab_size, seed=1)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    real = mask.astype(bool)
    got = np.asarray(jit_forward(scanned.params, scanned.config, ids, attention_mask=mask))
    np.testing.assert_allclose(got[real], torch_logits(torch_model, ids, mask)[real], rtol=0, atol=1e-4)
    want = np.asarray(jit_forward(unrolled.params, unrolled.config, ids, attention_mask=mask))
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(DEEP))
def test_scanned_greedy_generation_matches_transformers(deep, name):
    """Prefill and the decode loop over the stacked cache (ring buffers past Gemma 2's and gpt-oss's windows)."""
    torch_model, path = deep(name)
    scanned = jaxlora.load(path, scan_layers=True)
    ids = random_ids((2, 9), scanned.config.vocab_size, seed=3)
    with torch.no_grad():
        ref = torch_model.generate(
            torch.tensor(ids, dtype=torch.long), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )[:, ids.shape[1] :].numpy()
    out = jaxlora.generate(scanned.params, scanned.config, ids, max_new_tokens=16, chunk_size=4)
    np.testing.assert_array_equal(out.tokens, ref)


@pytest.mark.parametrize("name", ["gemma2", "llama-gqa"])
def test_scanned_beam_search_equals_unrolled(deep, name):
    _, path = deep(name)
    unrolled, scanned = both(path)
    ids = random_ids((2, 7), scanned.config.vocab_size, seed=4)
    want = jaxlora.beam_search(unrolled.params, unrolled.config, ids, num_beams=3, max_new_tokens=10)
    got = jaxlora.beam_search(scanned.params, scanned.config, ids, num_beams=3, max_new_tokens=10)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-5)


def test_hook_points_run_on_a_scanned_model(deep):
    """Hooks, captures and hidden states are named per layer: a scanned model runs them on its layers' slices."""
    _, path = deep("gemma2")
    unrolled, scanned = both(path)
    ids = random_ids((2, 11), scanned.config.vocab_size, seed=5)

    def ablate(x):
        return x.at[:, :, 1].set(0.0)

    outputs = [
        jaxlora.forward(
            m.params,
            m.config,
            ids,
            output_hidden_states=True,
            hooks={"blocks.3.attn.hook_z": ablate},
            capture=("blocks.4.hook_mlp_out",),
        )
        for m in (unrolled, scanned)
    ]
    want, got = outputs
    np.testing.assert_allclose(got.logits, want.logits, rtol=0, atol=1e-5)
    assert len(got.hidden_states) == DEPTH + 1
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        got.captured["blocks.4.hook_mlp_out"], want.captured["blocks.4.hook_mlp_out"], rtol=0, atol=1e-5
    )
    plain = jaxlora.forward(scanned.params, scanned.config, ids)
    assert np.abs(np.asarray(plain) - np.asarray(got.logits)).max() > 1e-3  # the hook acted


@pytest.mark.parametrize("remat", [False, True])
def test_lora_training_is_the_same_in_both_layouts(deep, remat):
    """Three LoRA steps (remat or not): the same losses and adapters. (Dropout draws its masks from keys that flax
    folds the module path into, which differs between the layouts: both train, on different masks.)"""
    _, path = deep("qwen2_moe")
    unrolled, scanned = both(path)
    ids = random_ids((2, 16), scanned.config.vocab_size, seed=6)
    batch = {"input_ids": ids[None], "attention_mask": np.ones_like(ids)[None], "loss_mask": np.ones_like(ids)[None]}
    targets = ("q_proj", "v_proj", "down_proj")
    results = []
    for m in (unrolled, scanned):
        adapters = lora.init(m.config, jax.random.key(0), rank=4, targets=targets)
        assert bool(adapters.stacks) == m.config.scan_layers
        optimizer = make_optimizer(1e-2, 10)
        step = make_train_step(m.params, m.config, optimizer, remat=remat)
        state = init_state(adapters, optimizer, jax.random.key(1))
        losses = []
        for _ in range(3):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        results.append((losses, state.trainable))
    (want_losses, want), (got_losses, got) = results
    np.testing.assert_allclose(got_losses, want_losses, rtol=0, atol=1e-5)
    assert want_losses[-1] < want_losses[0]
    for a, b in zip(jax.tree.leaves(got.per_layer().weights), jax.tree.leaves(want.weights), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_adapters_keep_one_layout_on_disk(deep, tmp_path):
    _, path = deep("llama-gqa")
    unrolled, scanned = both(path)
    adapters = lora.init(scanned.config, jax.random.key(2), rank=4, targets=("q_proj", "up_proj"))
    adapters = adapters.replace(weights=jax.tree.map(lambda x: x + 0.01, adapters.weights))
    save_adapters(adapters, tmp_path / "saved", str(path))
    back = load_adapters(tmp_path / "saved", unrolled.config)
    assert not back.stacks and "layers_5" in back.weights
    for a, b in zip(jax.tree.leaves(back.weights), jax.tree.leaves(adapters.per_layer().weights), strict=True):
        np.testing.assert_array_equal(a, b)
    restacked = load_adapters(tmp_path / "saved", scanned.config)
    assert restacked.stacks == layer_stacks(scanned.config)
    ids = random_ids((2, 9), scanned.config.vocab_size, seed=7)
    np.testing.assert_allclose(
        jaxlora.forward(scanned.params, scanned.config, ids, lora=restacked),
        jaxlora.forward(unrolled.params, unrolled.config, ids, lora=back),
        rtol=0,
        atol=1e-5,
    )
    # Merged into stacked params, as into per-layer ones.
    merged = jaxlora.forward(lora.merge(scanned.params, restacked), scanned.config, ids)
    np.testing.assert_allclose(
        merged, jaxlora.forward(lora.merge(unrolled.params, back), unrolled.config, ids), atol=1e-5
    )
    with pytest.raises(UsageError, match="laid_out_for"):
        lora.merge(scanned.params, back)
    # `lora=` on load merges before stacking; the PEFT files are the same from either layout.
    merged_on_load = jaxlora.load(path, lora=tmp_path / "saved", scan_layers=True)
    np.testing.assert_allclose(jaxlora.forward(merged_on_load.params, merged_on_load.config, ids), merged, atol=1e-5)
    jaxlora.peft.export_peft(restacked, scanned.config, tmp_path / "peft-scanned")
    jaxlora.peft.export_peft(back, unrolled.config, tmp_path / "peft-unrolled")
    assert (tmp_path / "peft-scanned" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "peft-unrolled" / "adapter_model.safetensors"
    ).read_bytes()


def test_an_adapter_bank_on_a_scanned_model(deep):
    _, path = deep("gemma2")
    unrolled, scanned = both(path)
    adapters = [
        lora.init(unrolled.config, jax.random.key(k), rank=r, targets=t)
        for k, r, t in ((1, 4, ("q_proj",)), (2, 2, ("o_proj", "up_proj")))
    ]
    adapters = [a.replace(weights=jax.tree.map(lambda x: x + 0.02, a.weights)) for a in adapters]
    ids = random_ids((3, 9), scanned.config.vocab_size, seed=8)
    rows = [1, -1, 0]
    want = jaxlora.generate(
        unrolled.params,
        unrolled.config,
        ids,
        max_new_tokens=8,
        lora=lora.select(lora.bank(adapters, unrolled.config), rows),
    )
    got = jaxlora.generate(
        scanned.params,
        scanned.config,
        ids,
        max_new_tokens=8,
        lora=lora.select(lora.bank(adapters, scanned.config), rows),
    )
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_full_fine_tuning_gradients_are_the_same_in_both_layouts(deep):
    _, path = deep("gemma2")
    unrolled, scanned = both(path)
    ids = random_ids((2, 12), scanned.config.vocab_size, seed=9)

    def loss(params, config):
        logprobs = jax.nn.log_softmax(jaxlora.forward(params, config, ids)[:, :-1])
        return -jax.numpy.take_along_axis(logprobs, ids[:, 1:, None], axis=-1).mean()

    want = jax.grad(loss)(unrolled.params, unrolled.config)
    got = unstack_tree(jax.grad(loss)(scanned.params, scanned.config), layer_stacks(scanned.config))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def kinds_config(kinds):
    """A config whose layer i has window/no-RoPE as kinds[i] says (0: plain, 1: windowed, 2: no RoPE)."""
    return ModelConfig(
        family="llama",
        vocab_size=11,
        hidden_size=8,
        intermediate_size=8,
        num_layers=len(kinds),
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        max_position_embeddings=32,
        layer_windows=tuple(4 if k == 1 else None for k in kinds),
        no_rope_layers=tuple(i for i, k in enumerate(kinds) if k == 2),
        scan_layers=True,
    )


@pytest.mark.parametrize("seed", range(40))
def test_stacks_cover_every_layer_once_with_its_own_kind(seed):
    rng = random.Random(seed)
    pattern = [rng.randrange(3) for _ in range(rng.randrange(1, 4))]
    kinds = (pattern * rng.randrange(1, 6))[: rng.randrange(1, 16)] + [
        rng.randrange(3) for _ in range(rng.randrange(3))
    ]
    if not kinds:
        kinds = [0]
    stacks = layer_stacks(kinds_config(kinds))
    covered = [stack.layer(j, step) for stack in stacks for step in range(stack.repeats) for j in range(stack.period)]
    assert sorted(covered) == list(range(len(kinds)))
    for stack in stacks:
        for step in range(stack.repeats):
            assert [kinds[stack.layer(j, step)] for j in range(stack.period)] == [
                kinds[stack.layer(j, 0)] for j in range(stack.period)
            ]
    # A tree stacked and unstacked comes back whole.
    tree = {f"layers_{i}": {"w": np.full((2,), i, np.float32)} for i in range(len(kinds))} | {"embed": 1}
    back = unstack_tree(stack_tree(tree, stacks), stacks)
    assert list(back) == ["embed", *(f"layers_{i}" for i in range(len(kinds)))]
    assert all(np.array_equal(back[k]["w"], tree[k]["w"]) for k in tree if k != "embed")


def test_periods_are_found():
    assert layer_stacks(kinds_config([1, 0] * 12)) == (Stack(0, 2, 12),)
    assert layer_stacks(kinds_config([0, 0, 0, 2] * 9)) == (Stack(0, 4, 9),)  # SmolLM3: no RoPE every 4th
    assert layer_stacks(kinds_config([1, 1, 1, 1, 1, 0] * 4 + [1, 1])) == (Stack(0, 6, 4), Stack(24, 1, 2))
    assert layer_stacks(kinds_config([0, 1, 2])) == (Stack(0, 1, 1), Stack(1, 1, 1), Stack(2, 1, 1))


def test_auto_and_bad_choices(deep):
    _, path = deep("llama-gqa")
    assert not jaxlora.load(path).config.scan_layers  # auto: six layers on CPU stay unrolled
    assert jaxlora.load(path, scan_layers="on").config.scan_layers
    with pytest.raises(UsageError, match="scan_layers must be"):
        jaxlora.load(path, scan_layers="sideways")
    # The runtime layout is not part of the saved model description.
    assert "scan_layers" not in jaxlora.load(path, scan_layers=True).config.to_dict()


def test_scanned_layers_on_eight_devices_equal_one(deep):
    """Stacked params keep their layer's sharding with a whole leading axis: logits, greedy tokens and two LoRA
    steps on two meshes equal one unrolled device."""
    _, path = deep("gemma2")
    proc = run_worker(["scanned", path], devices=8)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert set(report) == {"data=2,tensor=4", "fsdp=2,tensor=4"}
    for spec, result in report.items():
        assert result["max_logit_diff"] <= 1e-5, (spec, result)
        assert result["tokens_equal"], spec
        assert result["max_adapter_diff"] <= 1e-5, (spec, result)
    assert report["data=2,tensor=4"]["q_proj_spec"] == "P(None, None, 'tensor')"
    assert report["fsdp=2,tensor=4"]["q_proj_spec"] == "P(None, 'fsdp', 'tensor')"


def test_cli_generates_the_same_text_scanned(tiny_with_tokenizer):
    args = ["generate", tiny_with_tokenizer / "jax", "--prompt", "def add(a, b):", "--max-new-tokens", "12"]
    off = run_cli(*args, "--scan-layers", "off")
    on = run_cli(*args, "--scan-layers", "on")
    assert off.returncode == 0 and on.returncode == 0, on.stderr
    assert on.stdout == off.stdout and on.stdout.strip()


def test_quantized_weights_scan_too(deep):
    """int4 weights quantized on load are stacked like float ones: the scanned model gives the unrolled quantized
    model's logits and greedy tokens."""
    _, path = deep("llama-gqa")
    unrolled, scanned = both(path, quantize="int4:8")
    assert scanned.params["stacks_0"]["blocks_0"]["mlp"]["up_proj"]["kernel"]["values"].shape[0] == DEPTH
    ids = random_ids((2, 11), scanned.config.vocab_size, seed=10)
    np.testing.assert_allclose(
        jit_forward(scanned.params, scanned.config, ids),
        jit_forward(unrolled.params, unrolled.config, ids),
        rtol=0,
        atol=1e-5,
    )
    np.testing.assert_array_equal(
        jaxlora.generate(scanned.params, scanned.config, ids, max_new_tokens=8).tokens,
        jaxlora.generate(unrolled.params, unrolled.config, ids, max_new_tokens=8).tokens,
    )


def test_export_of_a_scanned_model_is_per_layer(deep, tmp_path):
    from jaxlora.export import export_hf

    _, path = deep("gemma2")
    unrolled, scanned = both(path)
    export_hf(scanned, tmp_path / "from-scanned")
    export_hf(unrolled, tmp_path / "from-unrolled")
    files = sorted(p.name for p in (tmp_path / "from-unrolled").iterdir() if p.suffix == ".safetensors")
    assert files
    for name in files:
        assert (tmp_path / "from-scanned" / name).read_bytes() == (tmp_path / "from-unrolled" / name).read_bytes()


def test_loading_scanned_holds_one_restored_layer_at_a_time(deep):
    """Stacking streams: when a layer group is restored, every earlier one is already in its stack and gone."""
    import weakref

    from jaxlora.checkpoint import read_config, restored_groups
    from jaxlora.stacking import stack_groups

    _, path = deep("gemma2")  # a period of two: two members' buffers filled in turn
    config, meta = read_config(path)
    config = config.with_scan(True)
    earlier = []

    def watched():
        for group, subtree in restored_groups(path, config, meta["dtype"]):
            if group.startswith("layers_"):
                assert all(ref() is None for ref in earlier), f"a layer before {group} is still held"
                earlier.extend(weakref.ref(leaf) for leaf in jax.tree.leaves(subtree))
            yield group, subtree
            del subtree

    stacked = stack_groups(watched(), config)
    want = jaxlora.load(path, scan_layers=True).params
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
