"""Sparse mixture-of-experts dispatch (`jaxlora.moe`): every implementation equals the dense one, forward and
backward; Mixtral through each equals transformers; decode and expert parallelism over fake devices."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import BASE, hf_model, random_ids, save_hf
from test_sharding import run_worker

import jaxlora
from jaxlora import moe
from jaxlora.errors import UsageError

IMPLS = ("dense", "gathered", "blocked", "ragged")
SPARSE = IMPLS[1:]

# 16 experts, 4 per token, a hidden size no block or group divides.
MANY_EXPERTS = dict(
    model_type="mixtral",
    **{**BASE, "intermediate_size": 24},
    num_local_experts=16,
    num_experts_per_tok=4,
    router_jitter_noise=0.0,
)


def random_mixture(tokens, experts, k, d=12, f=20, seed=0, skew=False, biases=False):
    """(x, routing weights, picked experts, Experts): random, with biases on request."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, d)).astype(np.float32)
    logits = rng.normal(size=(tokens, experts)).astype(np.float32)
    if skew:  # most tokens pick the same experts: one long run per expert and many empty experts
        logits[:, :k] += 10.0
    gate, up = (rng.normal(size=(experts, d, f)).astype(np.float32) * 0.3 for _ in range(2))
    down = rng.normal(size=(experts, f, d)).astype(np.float32) * 0.3
    kernels = moe.Experts(jnp.asarray(gate), jnp.asarray(up), jnp.asarray(down))
    if biases:
        kernels = kernels._replace(
            **{
                name: jnp.asarray(rng.normal(size=(experts, size)).astype(np.float32))
                for name, size in (("gate_bias", f), ("up_bias", f), ("down_bias", d))
            }
        )
    weights, picked = moe.route(jnp.asarray(logits), k)
    return jnp.asarray(x), weights, picked, kernels


def silu_glu(gate, up):
    return gate / (1 + np.exp(-gate)) * up


def clamped_glu(gate, up, limit=1.5, alpha=1.702):  # gpt-oss's, with a limit these values reach
    gate = np.minimum(gate, limit)
    return (np.clip(up, -limit, limit) + 1) * gate / (1 + np.exp(-alpha * gate))


def reference(x, weights, picked, w: moe.Experts, glu=silu_glu):
    """Token by token in numpy: the definition."""
    x, weights, picked = map(np.asarray, (x, weights, picked))
    zero = lambda b, e: 0.0 if b is None else np.asarray(b)[e]  # noqa: E731
    out = np.zeros_like(x)
    for t in range(len(x)):
        for weight, e in zip(weights[t], picked[t], strict=True):
            gate = x[t] @ np.asarray(w.gate)[e] + zero(w.gate_bias, e)
            up = x[t] @ np.asarray(w.up)[e] + zero(w.up_bias, e)
            out[t] += weight * (glu(gate, up) @ np.asarray(w.down)[e] + zero(w.down_bias, e))
    return out


def jax_glu(name):
    if name == "silu":
        return moe.gated(jax.nn.silu)

    def clamped(gate, up, limit=1.5, alpha=1.702):
        gate = jnp.minimum(gate, limit)
        return (jnp.clip(up, -limit, limit) + 1) * (gate * jax.nn.sigmoid(gate * alpha))

    return clamped


# Token counts on both sides of the block sizes (8 ... 64), empty experts and long runs; the last two with
# biases and gpt-oss's clamped activation.
CASES = [
    (1, 8, 2, False, False),
    (3, 16, 4, False, False),
    (40, 4, 2, False, False),
    (300, 8, 2, False, False),
    (257, 16, 4, True, False),
    (64, 64, 8, False, False),
    (3, 8, 2, False, True),
    (120, 8, 4, True, True),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("tokens", "experts", "k", "skew", "gpt_oss"), CASES)
def test_each_dispatch_equals_the_definition(impl, tokens, experts, k, skew, gpt_oss):
    x, weights, picked, w = random_mixture(tokens, experts, k, seed=tokens, skew=skew, biases=gpt_oss)
    glu = "clamped" if gpt_oss else "silu"
    got = jax.jit(moe.mixture, static_argnames=("glu", "impl"))(x, weights, picked, w, glu=jax_glu(glu), impl=impl)
    want = reference(x, weights, picked, w, clamped_glu if gpt_oss else silu_glu)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", SPARSE)
def test_gradients_equal_the_dense_ones(impl):
    """Training through sparse dispatch: gradients for the tokens, the routing weights, every expert kernel and
    bias."""
    x, weights, picked, w = random_mixture(50, 8, 2, seed=7, biases=True)
    target = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    glu = jax_glu("clamped")

    def loss(x, weights, w, impl):
        return jnp.sum((moe.mixture(x, weights, picked, w, glu, impl) - target) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    dense, sparse = grads(x, weights, w, "dense"), grads(x, weights, w, impl)
    for want, got in zip(jax.tree.leaves(dense), jax.tree.leaves(sparse), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        assert np.abs(np.asarray(want)).max() > 0


def test_auto_groups_sorted_pairs_on_cpu():
    assert jax.default_backend() == "cpu"
    assert moe.pick_impl("auto") == "blocked"  # the fastest measured on CPU at prefill and decode alike
    assert moe.pick_impl("gathered") == "gathered"  # a choice is kept


@pytest.fixture(scope="module")
def many_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe16")
    torch_model = hf_model(MANY_EXPERTS, seed=5)
    jaxlora.convert(str(save_hf(torch_model, root / "hf")), root / "jax")
    return torch_model, root / "jax"


@pytest.mark.parametrize("impl", IMPLS)
def test_sixteen_experts_match_transformers_through_each_dispatch(many_experts, impl):
    torch_model, path = many_experts
    model = jaxlora.load(path, moe=impl)
    ids = random_ids((2, 11), model.config.vocab_size, seed=2)
    with torch.no_grad():
        want = torch_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        tokens = torch_model.generate(
            torch.tensor(ids, dtype=torch.long), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )[:, ids.shape[1] :].numpy()
    np.testing.assert_allclose(np.asarray(jaxlora.forward(model.params, model.config, ids)), want, atol=1e-4)
    # Decoding: a prefill of 2 x 11 tokens (88 pairs), then steps of 2 tokens (8 pairs).
    out = jaxlora.generate(model.params, model.config, ids, max_new_tokens=16)
    np.testing.assert_array_equal(out.tokens, tokens)


def test_a_bad_dispatch_name_is_refused(many_experts):
    with pytest.raises(UsageError, match="mixture-of-experts implementation"):
        jaxlora.load(many_experts[1], moe="sparse")


def test_expert_parallelism_on_eight_devices_equals_one(many_experts):
    """Experts split over the `expert` mesh axis (alone and with data/tensor): logits, greedy tokens and the
    gradients of a full fine-tuning loss equal one device's, through blocked (sparse) and dense dispatch."""
    _, path = many_experts
    proc = run_worker(["experts", path], devices=8)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert set(report) == {"expert=8", "data=2,expert=4", "expert=2,tensor=4"}
    assert set(report["expert=8"]) == {"blocked", "dense"}
    for spec, by_impl in report.items():
        for impl, result in by_impl.items():
            assert result["max_logit_diff"] <= 1e-5, (spec, impl, result)
            assert result["max_grad_diff"] <= 1e-5, (spec, impl, result)
            assert result["tokens_equal"], (spec, impl)
    assert report["expert=8"]["blocked"]["gate_spec"] == "P('expert', None, None)"
    assert report["expert=2,tensor=4"]["blocked"]["gate_spec"] == "P('expert', None, 'tensor')"
