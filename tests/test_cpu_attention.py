"""The CPU attention kernel (`jaxlora.cpu_attention`): its output and logsumexp against the reference core over
masks, windows, ring-ordered slots, packed segments and odd shapes; gradients through it; which calls `auto` gives
it; a model's logits with it against XLA's cores."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_ids

import jaxlora
from jaxlora import attention, cpu_attention, native
from jaxlora.attention import (
    AttentionSpec,
    attend,
    attention_mask,
    chunked_attention,
    dot_product_attention,
    kernel_attention,
    resolve_impl,
)


def inputs(b, t, s, h, kvh, d, dv, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, s, kvh, d)).astype(np.float32)
    v = rng.normal(size=(b, s, kvh, dv)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def reference(q, k, v, q_slots, key_valid, key_slots, spec, segments=None):
    mask = attention_mask(q_slots, key_slots, key_valid, spec.window, segments)
    return dot_product_attention(q, k, v, mask, spec.scale)


def kernel(q, k, v, q_slots, key_valid, key_slots=None, segments=None, spec=None):
    return jax.jit(lambda *a: kernel_attention(*a, spec=spec))(q, k, v, q_slots, key_valid, key_slots, segments)


def _spy(monkeypatch, kernel: str = "forward"):
    """The q shapes `cpu_attention.<kernel>` ("forward" or "backward") is called with from here on."""
    calls = []
    real = getattr(cpu_attention, kernel)

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_attention, kernel, spy)
    return calls


def test_the_kernel_builds_and_registers_here():
    # The machines this suite runs on have a C++ compiler: a fallback to XLA's cores must not pass for the kernel.
    assert cpu_attention._registered()
    assert list(native.kernels_folder().glob("causal_attention-*.so"))


# (batch, queries, keys, heads, kv heads, head width, value width, window): SmolLM2's prefill; grouped and plain
# heads; widths off every vector multiple (the tiny models') and 80 (Phi-2's); values narrower than keys (latent
# attention); queries past one work item's 32 positions with a ragged last; a window; one query row (decode).
SHAPES = {
    "smollm2-prefill": (1, 512, 512, 9, 3, 64, 64, None),
    "grouped-ragged": (2, 70, 70, 6, 2, 32, 32, None),
    "tiny-widths": (2, 23, 23, 4, 2, 10, 10, None),
    "narrow-values": (2, 41, 41, 4, 4, 12, 7, None),
    "wide-heads": (1, 37, 37, 4, 4, 80, 80, None),
    "window": (2, 100, 100, 8, 2, 128, 128, 17),
    "cached": (2, 9, 64, 6, 3, 16, 16, None),
    "decode": (3, 1, 50, 6, 2, 32, 48, None),
    # At most 8 query rows per item: scores straight from the keys, unpacked (widths past a multiple of 16, a window)
    "decode-odd-widths": (2, 1, 40, 4, 1, 20, 13, None),
    "decode-window": (2, 2, 60, 6, 2, 24, 24, 9),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_kernel_equals_the_reference_core(name):
    """Queries at the end of the keys' slots (a cache: prompt or decode after earlier tokens), one row left-padded
    and a few keys of the other missing (padding queries see nothing: zeros, logsumexp +inf)."""
    b, t, s, h, kvh, d, dv, window = SHAPES[name]
    q, k, v = inputs(b, t, s, h, kvh, d, dv)
    spec = AttentionSpec(window, 0.7 / np.sqrt(d), None)
    valid = np.ones((b, s), bool)
    valid[-1, : s - t + min(t, 5) if t > 1 else 3] = False
    if b > 2:
        valid[0, 1::3] = False
    q_slots, key_valid = jnp.arange(s - t, s), jnp.asarray(valid)
    out = kernel(q, k, v, q_slots, key_valid, spec=spec)
    want = reference(q, k, v, q_slots, key_valid, jnp.arange(s), spec)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(want)).max() > 0.1
    _, lse = attention._kernel_forward(q, k, v, q_slots, jnp.arange(s), key_valid, None, spec)
    _, chunked_lse = attention._chunked_forward(q, k, v, q_slots, jnp.arange(s), key_valid, None, spec)
    np.testing.assert_allclose(lse, chunked_lse, rtol=1e-6, atol=1e-5)
    if t > 1:
        blind = min(t, 5)  # the padded row's first queries see no key
        assert np.all(np.asarray(out)[-1, :blind] == 0)
        assert np.all(np.isinf(np.asarray(lse)[-1, ..., :blind]))


def test_ring_ordered_key_slots():
    """Keys in a windowed layer's ring order: slots out of order, some never written (negative)."""
    q, k, v = inputs(2, 5, 12, 6, 2, 16, 16)
    q_slots = jnp.arange(20, 25)
    key_slots = jnp.asarray([12, 13, 14, 15, 16, 17, 18, 19, -1, -2, 10, 11], jnp.int32)
    key_valid = jnp.asarray(np.tile(np.arange(12) < 8, (2, 1)) | (np.arange(12) >= 10))
    spec = AttentionSpec(9, 0.3, None)
    out = kernel(q, k, v, q_slots, key_valid, key_slots, spec=spec)
    np.testing.assert_allclose(out, reference(q, k, v, q_slots, key_valid, key_slots, spec), rtol=0, atol=1e-5)
    # Without the slots the same keys read as 0..11: other keys visible, other numbers.
    contiguous = kernel(q, k, v, q_slots, key_valid, spec=spec)
    assert np.abs(np.asarray(contiguous) - np.asarray(out)).max() > 1e-2


def test_packed_segments_stay_apart():
    q, k, v = inputs(2, 40, 40, 4, 2, 16, 16)
    segments = jnp.asarray(np.repeat([[0, 1, 2, 3], [5, 5, 6, 7]], [7, 13, 11, 9], axis=1), jnp.int32)
    key_valid = jnp.ones((2, 40), bool)
    slots, spec = jnp.arange(40), AttentionSpec(None, 0.25, None)
    out = kernel(q, k, v, slots, key_valid, segments=segments, spec=spec)
    np.testing.assert_allclose(out, reference(q, k, v, slots, key_valid, slots, spec, segments), atol=1e-5, rtol=0)
    leaky = kernel(q, k, v, slots, key_valid, spec=spec)
    assert np.abs(np.asarray(leaky) - np.asarray(out)).max() > 1e-2


def _cotangent_grads(fn, q, k, v, seed=7):
    """d/d(q, k, v) of sum(fn(q, k, v) * a fixed random cotangent)."""
    out_shape = jax.eval_shape(fn, q, k, v).shape
    cotangent = jnp.asarray(np.random.default_rng(seed).normal(size=out_shape).astype(np.float32))
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent), (0, 1, 2)))(q, k, v)


def _assert_grads_equal(got, want):
    for g, w in zip(got, want, strict=True):
        assert np.abs(np.asarray(w)).max() > 1e-2
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_gradients_through_the_kernel_equal_the_reference(name, monkeypatch):
    """The backward kernel's dq, dk, dv against XLA's gradients of the reference core, over the forward test's
    shapes and masks (a padded row's blind queries, missing keys, a window, grouped heads, odd widths)."""
    calls = _spy(monkeypatch, "backward")
    b, t, s, h, kvh, d, dv, window = SHAPES[name]
    q, k, v = inputs(b, t, s, h, kvh, d, dv, seed=3)
    spec = AttentionSpec(window, 0.7 / np.sqrt(d), None)
    valid = np.ones((b, s), bool)
    valid[-1, : s - t + min(t, 5) if t > 1 else 3] = False
    if b > 2:
        valid[0, 1::3] = False
    q_slots, key_valid, key_slots = jnp.arange(s - t, s), jnp.asarray(valid), jnp.arange(s)
    got = _cotangent_grads(lambda q, k, v: kernel_attention(q, k, v, q_slots, key_valid, spec=spec), q, k, v)
    want = _cotangent_grads(lambda q, k, v: reference(q, k, v, q_slots, key_valid, key_slots, spec), q, k, v)
    _assert_grads_equal(got, want)
    assert calls == [q.shape], "the backward kernel ran"


def test_gradients_with_ring_slots_and_packed_segments_equal_the_reference(monkeypatch):
    calls = _spy(monkeypatch, "backward")
    q, k, v = inputs(2, 5, 12, 6, 2, 16, 16, seed=5)
    q_slots = jnp.arange(20, 25)
    key_slots = jnp.asarray([12, 13, 14, 15, 16, 17, 18, 19, -1, -2, 10, 11], jnp.int32)
    key_valid = jnp.asarray(np.tile(np.arange(12) < 8, (2, 1)) | (np.arange(12) >= 10))
    spec = AttentionSpec(9, 0.3, None)
    got = _cotangent_grads(lambda q, k, v: kernel_attention(q, k, v, q_slots, key_valid, key_slots, spec=spec), q, k, v)
    want = _cotangent_grads(lambda q, k, v: reference(q, k, v, q_slots, key_valid, key_slots, spec), q, k, v)
    _assert_grads_equal(got, want)

    q, k, v = inputs(2, 40, 40, 4, 2, 16, 16, seed=6)
    segments = jnp.asarray(np.repeat([[0, 1, 2, 3], [5, 5, 6, 7]], [7, 13, 11, 9], axis=1), jnp.int32)
    key_valid, slots, spec = jnp.ones((2, 40), bool), jnp.arange(40), AttentionSpec(None, 0.25, None)
    got = _cotangent_grads(
        lambda q, k, v: kernel_attention(q, k, v, slots, key_valid, segments=segments, spec=spec), q, k, v
    )
    want = _cotangent_grads(lambda q, k, v: reference(q, k, v, slots, key_valid, slots, spec, segments), q, k, v)
    _assert_grads_equal(got, want)
    assert len(calls) == 2


def test_gradients_without_the_backward_kernel_come_from_the_chunked_loop(monkeypatch):
    """Where the backward kernel is not built, the forward kernel's gradients come from the chunked core's loop."""
    calls = _spy(monkeypatch, "backward")
    monkeypatch.setattr(cpu_attention, "takes_backward", lambda: False)
    q, k, v = inputs(1, 30, 30, 4, 2, 16, 16, seed=8)
    slots, valid, spec = jnp.arange(30), jnp.ones((1, 30), bool), AttentionSpec(None, 0.3, None)
    got = _cotangent_grads(lambda q, k, v: kernel_attention(q, k, v, slots, valid, spec=spec), q, k, v)
    want = _cotangent_grads(lambda q, k, v: reference(q, k, v, slots, valid, slots, spec), q, k, v)
    _assert_grads_equal(got, want)
    assert calls == []


def test_under_vmap_each_call_runs_by_itself():
    q, k, v = inputs(3, 20, 20, 4, 2, 16, 16)
    slots, valid, spec = jnp.arange(20), jnp.ones((1, 20), bool), AttentionSpec(None, 0.3, None)

    def one(q, k, v):
        return kernel_attention(q[None], k[None], v[None], slots, valid, spec=spec)[0]

    mapped = jax.jit(jax.vmap(one))(q, k, v)
    np.testing.assert_allclose(mapped, reference(q, k, v, slots, jnp.ones((3, 20), bool), slots, spec), atol=1e-5)


def test_auto_gives_the_kernel_every_call_it_takes(monkeypatch):
    calls = _spy(monkeypatch)
    q, k, v = inputs(1, 16, 16, 4, 2, 16, 16)
    slots, valid = jnp.arange(16), jnp.ones((1, 16), bool)
    attend(q, k, v, slots, valid)
    attend(q[:, :1], k, v, slots[-1:], valid)  # decode: one query row
    assert len(calls) == 2
    attend(q, k, v, slots, valid, softcap=30.0)  # a soft cap: chunked or xla
    attend(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), slots, valid)
    attend(q, k, v, slots, valid, impl="chunked")
    assert len(calls) == 2
    monkeypatch.setenv(native.SWITCH, "off")
    attend(q, k, v, slots, valid)
    assert len(calls) == 2
    monkeypatch.delenv(native.SWITCH)
    out = attend(q, k, v, slots, valid, impl="cpu", softcap=30.0)  # asked for, not taken: chunked
    assert len(calls) == 2
    spec = AttentionSpec(None, 0.25, 30.0)
    want = chunked_attention(q, k, v, slots, valid, spec=spec)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)


def test_resolve_gives_cpu_only_where_the_kernel_takes_the_call():
    spec = AttentionSpec(None, 0.1, None)
    assert resolve_impl("auto", 16, 16, jnp.float32, spec, "cpu", kernel=True) == "cpu"
    assert resolve_impl("auto", 512, 512, jnp.float32, spec, "cpu", kernel=True) == "cpu"
    assert resolve_impl("auto", 1, 512, jnp.float32, spec, "cpu", kernel=True) == "cpu"
    assert resolve_impl("auto", 1, 512, jnp.float32, spec, "cpu", kernel=False) == "xla"
    assert resolve_impl("auto", 512, 512, jnp.float32, spec, "cpu", kernel=False) == "chunked"
    assert resolve_impl("cpu", 512, 512, jnp.float32, spec, "cpu", kernel=False) == "chunked"
    assert resolve_impl("cpu", 1, 512, jnp.float32, spec, "cpu", kernel=True) == "cpu"
    with pytest.raises(jaxlora.errors.ConfigError, match="attention 'cpu' needs a CPU; this process runs on gpu"):
        resolve_impl("cpu", 16, 16, jnp.float32, spec, "gpu")


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window", "gpt_neox"])
def test_model_logits_and_gradients_with_the_kernel_equal_xla(tiny, name, monkeypatch):
    calls = _spy(monkeypatch)
    model = tiny(name).load()
    ids = random_ids((2, 23), model.config.vocab_size, seed=4)
    mask = np.ones_like(ids, bool)
    mask[1, :6] = False
    configs = {impl: model.config.with_attention(impl) for impl in ("xla", "cpu")}

    def loss(params, config):
        logits = jaxlora.forward(params, config, ids, attention_mask=mask)
        return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)[..., :5])

    fwd = jax.jit(jaxlora.forward, static_argnums=1)
    logits = {impl: np.asarray(fwd(model.params, config, ids, attention_mask=mask)) for impl, config in configs.items()}
    np.testing.assert_allclose(logits["cpu"][mask], logits["xla"][mask], rtol=0, atol=1e-5)
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    got, want = grad(model.params, configs["cpu"]), grad(model.params, configs["xla"])
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = max(1.0, float(np.abs(np.asarray(want_leaf)).max()))  # see test_attention's twin test
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=0, atol=1e-5 * scale)
    assert calls, "the kernel ran"


STORED_KERNEL_CALL = """
import json, sys
import jax.numpy as jnp
import numpy as np
from jaxlora import executables
from jaxlora.attention import AttentionSpec, kernel_attention
from jaxlora.executables import stored_jit

executables.use(sys.argv[1])


def attention(q):
    return kernel_attention(q, q, q, jnp.arange(8), jnp.ones((1, 8), bool), spec=AttentionSpec(None, 0.5, None))


program = stored_jit(attention)
if sys.argv[2] == "read":
    program.jitted = None  # nothing to trace, lower or compile with: the stored program or a failure
q = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 2, 16)), jnp.float32)
print(json.dumps(np.asarray(program(q)).ravel().tolist()))
"""


def test_a_stored_program_calling_the_kernel_runs_in_a_new_process(tmp_path):
    """A process that reads a stored program traces nothing, so nothing there registered the kernel: reading
    registers jaxlora's kernels first. With the kernels switched off a process compiles its own program."""
    import json
    import os
    import subprocess
    import sys

    def run(mode, **env):
        result = subprocess.run(
            [sys.executable, "-c", STORED_KERNEL_CALL, str(tmp_path / "store"), mode],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **env},
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    first = run("compile")
    assert len(list((tmp_path / "store").glob("*.bin"))) == 1
    assert run("read") == first
    run("compile", **{native.SWITCH: "off"})
    assert len(list((tmp_path / "store").glob("*.bin"))) == 2


CONCURRENT_KERNEL_CALLS = """
import threading
import jax, jax.numpy as jnp, numpy as np
from jaxlora.attention import AttentionSpec, kernel_attention

spec = AttentionSpec(None, 0.5, None)
rng = np.random.default_rng(0)
xs = [tuple(jnp.asarray(rng.normal(size=(1, 64, h, 32)), jnp.float32) for h in (4, 2, 2)) for _ in range(8)]


@jax.jit
def many(xs):  # eight independent calls: XLA runs them side by side on its pool's threads
    return [kernel_attention(q, k, v, jnp.arange(64), jnp.ones((1, 64), bool), spec=spec) for q, k, v in xs]


want = [np.asarray(o) for o in many(xs)]
failures = []


def calls():
    for _ in range(100):
        if any(not np.array_equal(o, w) for o, w in zip(many(xs), want)):
            failures.append(1)


threads = [threading.Thread(target=calls) for _ in range(3)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("done", len(failures))
"""


def test_calls_running_at_once_on_every_pool_thread_finish():
    """Programs from three threads, each with eight independent kernel calls, keep all of XLA's pool threads in
    the kernel at once: a call must not wait for its pool tasks to start (it deadlocked so in a run of the suite)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", CONCURRENT_KERNEL_CALLS], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["done", "0"]
