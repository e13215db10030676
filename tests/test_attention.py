"""The attention implementations against the reference core, with and without a cache; the ring-buffer cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_ids

import jaxlora
from jaxlora.attention import (
    AttentionSpec,
    attention_mask,
    block_layout,
    block_side,
    check_impl,
    chunked_attention,
    dot_product_attention,
    resolve_impl,
)
from jaxlora.cache import init_cache, layer_lengths
from jaxlora.decoding import decode, prefill
from jaxlora.errors import ConfigError
from jaxlora.generate import make_plan

# Small blocks so short sequences span several query and key blocks, with ragged last blocks.
SPEC = AttentionSpec(window=None, scale=0.3, softcap=None, q_block=8, k_block=16, decode_k_block=16)


def qkv(b=2, t=37, s=None, h=6, kvh=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    s = s or t
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, s, kvh, d)).astype(np.float32)
    v = rng.normal(size=(b, s, kvh, d)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def reference(q, k, v, q_slots, key_valid, key_slots, spec):
    mask = attention_mask(q_slots, key_slots, key_valid, spec.window)
    return dot_product_attention(q, k, v, mask, spec.scale, spec.softcap)


CASES = {
    "causal": dict(spec=SPEC),
    "window": dict(spec=SPEC._replace(window=5)),
    "softcap": dict(spec=SPEC._replace(softcap=0.5), scale_up=4.0),
    "window+softcap": dict(spec=SPEC._replace(window=11, softcap=1.0), scale_up=2.0),
    "mha": dict(spec=SPEC, kvh=6),
    "one-block": dict(spec=SPEC._replace(q_block=512, k_block=512)),
    # Blocks sized to the call (64 here: 150 queries in three blocks, the last one ragged).
    "sized-to-call": dict(spec=SPEC._replace(q_block=None, k_block=None), t=150),
}


def case_inputs(case, padded=True):
    q, k, v = qkv(t=case.get("t", 37), kvh=case.get("kvh", 2))
    q = q * case.get("scale_up", 1.0)
    t = q.shape[1]
    key_valid = np.ones((2, t), bool)
    if padded:
        key_valid[1, :13] = False  # a left-padded row: its first 13 queries see nothing
    slots = jnp.arange(t)
    return q, k, v, slots, jnp.asarray(key_valid), slots


@pytest.mark.parametrize("name", sorted(CASES))
def test_chunked_equals_reference(name):
    case = CASES[name]
    q, k, v, q_slots, key_valid, key_slots = case_inputs(case)
    ref = reference(q, k, v, q_slots, key_valid, key_slots, case["spec"])
    out = chunked_attention(q, k, v, q_slots, key_valid, spec=case["spec"])
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    assert np.all(np.asarray(out)[1, :13] == 0)  # padding queries: zeros in both


@pytest.mark.parametrize("name", sorted(CASES))
def test_chunked_gradient_equals_reference(name):
    case = CASES[name]
    q, k, v, q_slots, key_valid, key_slots = case_inputs(case)
    cotangent = jnp.asarray(np.random.default_rng(7).normal(size=q.shape).astype(np.float32))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)

    ref = jax.grad(loss(lambda q, k, v: reference(q, k, v, q_slots, key_valid, key_slots, case["spec"])), (0, 1, 2))
    ours = jax.grad(loss(lambda q, k, v: chunked_attention(q, k, v, q_slots, key_valid, spec=case["spec"])), (0, 1, 2))
    for got, want in zip(jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v), strict=True):
        assert np.abs(np.asarray(want)).max() > 1e-2  # a real gradient, not zeros on both sides
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_chunked_decode_reads_only_the_filled_cache():
    """One query at slot 40 of a 128-slot buffer: key blocks past slot 47 are never read, so NaN there cannot
    leak in; the XLA path scores every slot and is poisoned by the same NaNs (it multiplies them by zero)."""
    q, k, v = qkv(t=1, s=128)
    key_valid = np.zeros((2, 128), bool)
    key_valid[:, 3:41] = True
    slot = jnp.asarray([40])
    clean = reference(q, k, v, slot, jnp.asarray(key_valid), jnp.arange(128), SPEC)
    k_poisoned, v_poisoned = k.at[:, 48:].set(jnp.nan), v.at[:, 48:].set(jnp.nan)
    out = chunked_attention(q, k_poisoned, v_poisoned, slot, jnp.asarray(key_valid), spec=SPEC)
    np.testing.assert_allclose(out, clean, rtol=0, atol=1e-5)
    xla = reference(q, k_poisoned, v_poisoned, slot, jnp.asarray(key_valid), jnp.arange(128), SPEC)
    assert np.isnan(np.asarray(xla)).any()


def test_chunked_with_explicit_key_slots():
    """Keys in ring order (the cache's windowed layers): slots out of order, some never written."""
    q, k, v = qkv(t=5, s=12)
    q_slots = jnp.arange(20, 25)
    key_slots = jnp.asarray([12, 13, 14, 15, 16, 17, 18, 19, -1, -2, 10, 11], jnp.int32)
    key_valid = jnp.asarray(np.tile(np.arange(12) < 8, (2, 1)) | (np.arange(12) >= 10))
    spec = SPEC._replace(window=9)
    out = chunked_attention(q, k, v, q_slots, key_valid, key_slots, spec=spec)
    np.testing.assert_allclose(out, reference(q, k, v, q_slots, key_valid, key_slots, spec), rtol=0, atol=1e-5)


FAMILIES = ["llama-gqa", "gemma2", "gemma3", "mistral-window", "gpt_neox"]


@pytest.mark.parametrize("name", FAMILIES)
def test_model_logits_and_gradients_chunked_equal_xla(tiny, name):
    model = tiny(name).load()
    ids = random_ids((2, 23), model.config.vocab_size, seed=4)
    mask = np.ones_like(ids, bool)
    mask[1, :6] = False
    xla_config, chunked_config = model.config.with_attention("xla"), model.config.with_attention("chunked")

    def loss(params, config):
        logits = jaxlora.forward(params, config, ids, attention_mask=mask)
        return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)[..., :5])

    fwd = jax.jit(jaxlora.forward, static_argnums=1)
    real = mask
    np.testing.assert_allclose(
        np.asarray(fwd(model.params, chunked_config, ids, attention_mask=mask))[real],
        np.asarray(fwd(model.params, xla_config, ids, attention_mask=mask))[real],
        rtol=0,
        atol=1e-5,
    )
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    got, want = grad(model.params, chunked_config), grad(model.params, xla_config)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        # A param's gradient sums terms as large as the leaf's largest entry (~40 here) that may cancel: float32
        # rounding is relative to those terms, so the bound is 1e-5 of the leaf's scale. A wrong mask or block
        # would be off by O(1) of it.
        scale = max(1.0, float(np.abs(np.asarray(want_leaf)).max()))
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("name", ["llama-gqa", "gemma2", "mistral-window"])
def test_generate_chunked_equals_xla(tiny, name):
    model = tiny(name).load()
    ids = random_ids((2, 9), model.config.vocab_size, seed=5)
    outs = [
        jaxlora.generate(model.params, model.config.with_attention(impl), ids, max_new_tokens=30).tokens
        for impl in ("xla", "chunked")
    ]
    np.testing.assert_array_equal(outs[0], outs[1])


def run_cache(model, ids, mask, ring: bool, steps: int = 40):
    """Prefill + `steps` greedy decode steps on a cache with or without ring buffers: (tokens, final cache)."""
    plan = make_plan(model.config, ids.shape[0], max_new_tokens=steps + 1)
    cache = init_cache(model.config, ids.shape[0], ids.shape[1] + plan.decode_slots, ring=ring)
    keys = jax.random.split(jax.random.key(0), ids.shape[0])
    state = prefill(model.params, cache, jnp.asarray(ids), jnp.asarray(mask), keys, plan.arrays, **plan.static)
    first = np.asarray(state.token)
    state, tokens, _ = decode(model.params, state, plan.arrays, pad_id=0, steps=plan.decode_slots, **plan.static)
    return np.concatenate([first[:, None], np.asarray(tokens)], axis=1), state.cache


@pytest.mark.parametrize("name", ["mistral-window", "gemma2", "gemma3", "qwen2-window"])
def test_ring_cache_equals_full_cache(tiny, name):
    model = tiny(name).load()
    ids = random_ids((2, 16), model.config.vocab_size, seed=6)
    mask = np.ones_like(ids, bool)
    mask[0, :5] = False
    ring_tokens, ring_cache = run_cache(model, ids, mask, ring=True)
    full_tokens, full_cache = run_cache(model, ids, mask, ring=False)
    np.testing.assert_array_equal(ring_tokens, full_tokens)
    windows = model.config.layer_windows
    for i, (ring_k, full_k) in enumerate(zip(ring_cache.keys, full_cache.keys, strict=True)):
        assert ring_k.shape[1] == (windows[i] if windows[i] is not None else full_k.shape[1])
    assert any(w is not None for w in windows)


@pytest.mark.parametrize("name", ["mistral-window", "llama-gqa"])
def test_a_chat_turn_through_extend_equals_a_fresh_generation(tiny, name):
    """A chat turn (several tokens at once, right-padded to its bucket) written by `extend` after a decode: its
    reply equals generating from the whole sequence at once, with ring-buffer and with full caches (positions,
    slots and the window all line up)."""
    from jaxlora.decoding import extend

    model = tiny(name).load()
    ids = random_ids((1, 16), model.config.vocab_size, seed=8)
    turn = random_ids((1, 11), model.config.vocab_size, seed=9)
    replies = []
    for ring in (True, False):
        plan = make_plan(model.config, 1, max_new_tokens=9)
        cache = init_cache(model.config, 1, 64, ring=ring)
        keys = jax.random.split(jax.random.key(0), 1)
        state = prefill(
            model.params, cache, jnp.asarray(ids), jnp.ones((1, 16), bool), keys, plan.arrays, **plan.static
        )
        first = np.asarray(state.token)
        state, decoded, _ = decode(model.params, state, plan.arrays, pad_id=0, steps=8, **plan.static)
        # The cache now holds the prompt, the first token and 7 decoded ones; the 8th (state.token) is dropped.
        written = np.concatenate([ids, first[:, None], np.asarray(decoded)[:, :7]], axis=1)
        padded = np.zeros((1, 16), np.int32)
        padded[0, :11] = turn[0]
        state = extend(model.params, state, jnp.asarray(padded), jnp.int32(11), plan.arrays, **plan.static)
        reply_first = np.asarray(state.token)
        state, reply, _ = decode(model.params, state, plan.arrays, pad_id=0, steps=8, **plan.static)
        replies.append(np.concatenate([reply_first[:, None], np.asarray(reply)], axis=1))
    fresh = jaxlora.generate(model.params, model.config, np.concatenate([written, turn], axis=1), max_new_tokens=9)
    np.testing.assert_array_equal(replies[0], fresh.tokens)
    np.testing.assert_array_equal(replies[1], fresh.tokens)


def test_ring_lengths():
    from jaxlora.config import ModelConfig

    config = ModelConfig("llama", 11, 8, 8, 3, 2, 1, 4, 4096, layer_windows=(7, None, 100))
    assert layer_lengths(config, 64) == (7, 64, 64)
    assert layer_lengths(config, 64, ring=False) == (64, 64, 64)


def test_unavailable_backends_are_clear_errors():
    with pytest.raises(ConfigError, match="attention 'cudnn' needs a GPU; this process runs on cpu"):
        check_impl("cudnn", "cpu")
    with pytest.raises(ConfigError, match="attention 'splash' needs a TPU"):
        check_impl("splash", "cpu")
    with pytest.raises(ConfigError, match="unknown attention implementation 'flash'"):
        check_impl("flash", "cpu")


def test_auto_picks_by_platform_and_size():
    spec = AttentionSpec(None, 0.1, None)
    assert resolve_impl("auto", 16, 16, jnp.float32, spec, "cpu") == "xla"
    assert resolve_impl("auto", 64, 128, jnp.float32, spec, "cpu") == "xla"
    assert resolve_impl("auto", 128, 128, jnp.float32, spec, "cpu") == "chunked"  # measured faster from here
    assert resolve_impl("auto", 4096, 4096, jnp.float32, spec, "cpu") == "chunked"
    assert resolve_impl("auto", 1, 8192, jnp.float32, spec, "cpu") == "xla"  # decode
    assert resolve_impl("auto", 256, 256, jnp.bfloat16, spec, "gpu") == "cudnn"
    assert resolve_impl("auto", 256, 256, jnp.bfloat16, spec._replace(softcap=50.0), "gpu") == "xla"
    assert resolve_impl("auto", 512, 512, jnp.float32, spec, "gpu") == "chunked"  # the accelerators' threshold
    assert resolve_impl("auto", 256, 256, jnp.bfloat16, spec, "tpu") == "splash"
    assert resolve_impl("xla", 4096, 4096, jnp.float32, spec, "cpu") == "xla"


def test_blocks_are_sized_to_the_call():
    """Square blocks whose scores over batch x heads stay within SCORE_BLOCK_ENTRIES, at least two per query
    range (the causal skip) and at most MAX_QUERY_BLOCKS, from MIN_BLOCK to MAX_BLOCK; a spec's own sizes win."""
    assert block_side(9, 1024) == 256  # one row of SmolLM2's 9 heads
    assert block_side(36, 512) == 128  # four rows
    assert block_side(72, 256) == 64
    assert block_side(9, 256) == 128  # 256 queries: two blocks
    assert block_side(1, 1 << 16) == 512
    assert block_side(4096, 256) == 64
    assert block_side(9, 2048) == 512  # at most MAX_QUERY_BLOCKS query blocks
    assert block_side(36, 1024) == 256
    q = jnp.zeros((4, 256, 9, 8))
    assert block_layout(AttentionSpec(None, 1.0, None), q, 256) == (128, 2, 128, 2)
    assert block_layout(AttentionSpec(None, 1.0, None, q_block=32, k_block=16), q, 256) == (32, 8, 16, 16)
    assert block_layout(AttentionSpec(None, 1.0, None), q[:, :1], 4096) == (1, 1, 2048, 2)  # decode: DECODE_K_BLOCK


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cudnn attention needs a GPU; this run has none")
def test_cudnn_equals_reference():
    q, k, v, q_slots, key_valid, key_slots = case_inputs(CASES["causal"])
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    from jaxlora.attention import attend

    out = attend(q, k, v, q_slots, key_valid, scale=SPEC.scale, impl="cudnn")
    ref = reference(q, k, v, q_slots, key_valid, key_slots, SPEC)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="splash attention needs a TPU; this run has none")
def test_splash_equals_reference():
    q, k, v = qkv(t=256, h=4, kvh=2, d=128)
    key_valid = jnp.ones((2, 256), bool)
    slots = jnp.arange(256)
    from jaxlora.attention import attend

    out = attend(q, k, v, slots, key_valid, scale=SPEC.scale, impl="splash")
    np.testing.assert_allclose(out, reference(q, k, v, slots, key_valid, slots, SPEC), atol=1e-2)


@pytest.mark.parametrize(
    "window, softcap, kv_heads, packed",
    [
        (None, None, 4, False),
        (None, None, 2, False),
        (48, None, 2, False),
        (None, 3.0, 1, False),
        (None, None, 2, True),
    ],
    ids=["causal", "gqa", "window", "softcap-mqa", "packed"],
)
def test_splash_kernel_in_interpret_mode_equals_reference(window, softcap, kv_heads, packed):
    """The TPU splash kernel itself, run by Pallas' interpreter on CPU, with the masks and segment ids jaxlora
    builds: row 1 left-padded by 37 tokens, or (packed) row 0 holding three documents."""
    from jaxlora.attention import _splash_attention

    t = 256
    q, k, v = qkv(t=t, h=4, kvh=kv_heads, d=32, seed=3)
    slots = jnp.arange(t, dtype=jnp.int32)
    valid = np.ones((2, t), bool)
    valid[1, :37] = False
    segments = None
    if packed:
        ids = np.zeros((2, t), np.int32)
        ids[0, :200] = np.repeat([1, 2, 3], [60, 100, 40])
        ids[1] = valid[1]
        segments, valid = jnp.asarray(ids), ids > 0
    spec = AttentionSpec(window, 0.2, softcap)
    out = _splash_attention(q, k, v, slots, jnp.asarray(valid), segments, spec, interpret=True)
    mask = attention_mask(slots, slots, jnp.asarray(valid), window, segments)
    want = dot_product_attention(q, k, v, mask, spec.scale, softcap) * valid[:, :, None, None]
    assert np.abs(np.asarray(want)).max() > 0.1
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=0, atol=1e-5)


# A packed row: documents of 5, 13 and 15 tokens, then 4 slots of padding; the other row one document, left-padded.
PACKED_LENGTHS = (5, 13, 15)


def packed_inputs(case):
    q, k, v, slots, _, _ = case_inputs(case, padded=False)
    segments = np.zeros((2, q.shape[1]), np.int32)
    segments[0, : sum(PACKED_LENGTHS)] = np.repeat(np.arange(1, 4), PACKED_LENGTHS)
    segments[1, 9:] = 1
    return q, k, v, slots, jnp.asarray(segments > 0), jnp.asarray(segments)


def documents_alone(q, k, v, spec):
    """Row 0's documents each attended alone (slots from 0), concatenated: what the packed row must equal."""
    outs, start = [], 0
    for n in PACKED_LENGTHS:
        piece = slice(start, start + n)
        alone = reference(
            q[:1, piece], k[:1, piece], v[:1, piece], jnp.arange(n), jnp.ones((1, n), bool), jnp.arange(n), spec
        )
        outs.append(alone[0])
        start += n
    return jnp.concatenate(outs)


@pytest.mark.parametrize("name", ["causal", "window", "window+softcap", "mha"])
def test_segments_keep_each_packed_document_to_itself(name):
    """Both cores: a document packed after others attends as if alone (its slots do not restart, which causal
    attention within the document does not see), padding stays zero, and the chunked core's gradient equals the
    reference's with the same segments."""
    case = CASES[name]
    q, k, v, slots, key_valid, segments = packed_inputs(case)
    spec = case["spec"]
    mask = attention_mask(slots, slots, key_valid, spec.window, segments)
    ref = dot_product_attention(q, k, v, mask, spec.scale, spec.softcap)
    out = chunked_attention(q, k, v, slots, key_valid, segments=segments, spec=spec)
    alone = documents_alone(q, k, v, spec)
    used = sum(PACKED_LENGTHS)
    for got in (ref, out):
        np.testing.assert_allclose(got[0, :used], alone, rtol=0, atol=1e-5)
        assert np.all(np.asarray(got)[0, used:] == 0) and np.all(np.asarray(got)[1, :9] == 0)
    # Without segments the later documents do see the earlier ones: the check above has teeth.
    leaky = chunked_attention(q, k, v, slots, key_valid, spec=spec)
    assert np.abs(np.asarray(leaky)[0, 5:used] - np.asarray(alone)[5:]).max() > 1e-2
    cotangent = jnp.asarray(np.random.default_rng(3).normal(size=q.shape).astype(np.float32))

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent), (0, 1, 2)))(q, k, v)

    want = grads(lambda q, k, v: dot_product_attention(q, k, v, mask, spec.scale, spec.softcap))
    got = grads(lambda q, k, v: chunked_attention(q, k, v, slots, key_valid, segments=segments, spec=spec))
    for g, w in zip(got, want, strict=True):
        assert np.abs(np.asarray(w)).max() > 1e-2
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def test_attention_sinks_take_probability_and_only_the_reference_core_takes_them():
    """gpt-oss's sinks: one more logit per head in each softmax, with no value; `auto` runs them on `xla`."""
    from jaxlora.attention import attend

    q, k, v = qkv(t=9, h=4, kvh=2)
    slots, valid = jnp.arange(9), jnp.ones((2, 9), bool)
    sinks = jnp.asarray([-30.0, 0.0, 1.0, 3.0])
    out = attend(q, k, v, slots, valid, sinks=sinks)
    plain = attend(q, k, v, slots, valid, impl="xla")
    np.testing.assert_allclose(out[:, :, 0], plain[:, :, 0], atol=1e-6)  # a sink of -30 takes nothing
    # Head 3's sink takes e^3 / (e^3 + sum of the row's e^score): its output shrinks by exactly that share.
    scores = jnp.einsum("bqd,bkd->bqk", q[:, :, 3], k[:, :, 1]) / np.sqrt(8)
    scores = jnp.where(jnp.tril(jnp.ones((9, 9), bool)), scores, -jnp.inf)
    kept = 1 - jnp.exp(3.0) / (jnp.exp(3.0) + jnp.exp(scores).sum(-1))
    np.testing.assert_allclose(out[:, :, 3], plain[:, :, 3] * kept[..., None], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="attention sinks need the 'xla' attention core"):
        attend(q, k, v, slots, valid, sinks=sinks, impl="chunked")
