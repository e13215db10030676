"""Documents packed into one row: each attends only to itself, with positions restarting, so its per-token
losses and gradients are those it has alone; the packer keeps every token exactly once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_ids

import jaxlora
from jaxlora import lora
from jaxlora.cache import init_cache
from jaxlora.data import pack_documents
from jaxlora.errors import UsageError
from jaxlora.losses import next_token_logprobs
from jaxlora.model import run_decoder
from jaxlora.train import token_loss

LENGTHS = (6, 9, 11)  # then 4 slots of padding: a 30-token row
SEQ = 30


def packed_row(vocab: int):
    docs = [random_ids((1, n), vocab, seed=10 + i)[0] for i, n in enumerate(LENGTHS)]
    used = sum(LENGTHS)
    ids = np.zeros((1, SEQ), np.int32)
    ids[0, :used] = np.concatenate(docs)
    segments = np.zeros((1, SEQ), np.int32)
    segments[0, :used] = np.repeat(np.arange(1, len(LENGTHS) + 1), LENGTHS)
    return docs, ids, segments


def load(tiny, name: str, attention: str):
    return jaxlora.load(tiny(name).jax_dir, attention=attention)


# Learned positions (GPT-2), RoPE (llama), a sliding window with soft caps (Gemma 2), experts (Mixtral); both
# attention cores (their segment masks are also checked against each other in tests/test_attention.py).
@pytest.mark.parametrize(
    "name, attention",
    [("llama-gqa", "xla"), ("llama-gqa", "chunked"), ("gemma2", "chunked"), ("gpt2", "xla"), ("mixtral", "chunked")],
)
def test_packed_row_logprobs_equal_each_document_alone(tiny, name, attention):
    model = load(tiny, name, attention)
    docs, ids, segments = packed_row(model.config.vocab_size)
    mask = segments > 0
    packed = next_token_logprobs(
        jaxlora.forward(model.params, model.config, ids, attention_mask=mask, segment_ids=segments), ids
    )[0]
    start = 0
    for doc in docs:
        alone = next_token_logprobs(jaxlora.forward(model.params, model.config, doc[None]), doc[None])[0]
        # Within the document: the same per-token log-probs as alone.
        np.testing.assert_allclose(packed[start : start + len(doc) - 1], alone, rtol=0, atol=1e-5)
        start += len(doc)
    # Without segments a later document sees the earlier ones: the comparison above can fail.
    leaky = next_token_logprobs(jaxlora.forward(model.params, model.config, ids, attention_mask=mask), ids)[0]
    assert np.abs(np.asarray(leaky[6:14]) - np.asarray(packed[6:14])).max() > 1e-3


@pytest.mark.parametrize("name, attention", [("llama-gqa", "chunked"), ("gemma2", "xla")])
def test_packed_loss_and_adapter_gradients_equal_the_documents_alone(tiny, name, attention):
    """The training loss over a packed row is the sum of each document's (no target across a boundary), and so
    is its gradient with respect to LoRA adapters (the chunked core's backward with segments included)."""
    model = load(tiny, name, attention)
    docs, ids, segments = packed_row(model.config.vocab_size)
    adapters = lora.init(model.config, jax.random.key(0), rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    adapters = adapters.replace(weights=jax.tree.map(lambda x: x + 0.05, adapters.weights))
    ones = lambda a: np.ones_like(a)  # noqa: E731
    packed = {"input_ids": ids, "attention_mask": segments > 0, "loss_mask": ones(ids), "segment_ids": segments}

    def loss(batch):
        summed = lambda w: token_loss(model.params, model.config, batch, adapters.replace(weights=w))[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(summed))(adapters.weights)

    total, grads = loss(packed)
    want_total, want_grads = 0.0, jax.tree.map(jnp.zeros_like, adapters.weights)
    for doc in docs:
        alone = {"input_ids": doc[None], "attention_mask": ones(doc[None]), "loss_mask": ones(doc[None])}
        t, g = loss(alone)
        want_total, want_grads = want_total + t, jax.tree.map(jnp.add, want_grads, g)
    _, count = token_loss(model.params, model.config, packed)
    assert float(count) == sum(n - 1 for n in LENGTHS)  # every document's own targets, none across boundaries
    assert float(total) == pytest.approx(float(want_total), rel=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        scale = np.abs(np.asarray(want)).max()
        assert scale > 0
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


def test_segment_ids_refuse_a_kv_cache_and_a_wrong_shape(tiny):
    model = load(tiny, "llama-gqa", "xla")
    _, ids, segments = packed_row(model.config.vocab_size)
    with pytest.raises(UsageError, match="segment_ids must have the ids' shape"):
        jaxlora.forward(model.params, model.config, ids, segment_ids=segments[:, :5])
    cache = init_cache(model.config, 1, SEQ)
    with pytest.raises(UsageError, match="without a KV cache"):
        run_decoder(model.params, model.config, ids, ids * 0, segments > 0, cache=cache, segment_ids=segments)


def test_pack_documents_keeps_every_token_once_and_fills_rows():
    lengths = [3, 17, 8, 8, 1, 40, 5, 12, 2]
    rows = pack_documents(lengths, 16)
    covered = {d: [] for d in range(len(lengths))}
    for row in rows:
        assert sum(b - a for _, a, b in row) <= 16
        for d, a, b in row:
            covered[d].append((a, b))
    for d, n in enumerate(lengths):
        spans = sorted(covered[d])
        assert spans[0][0] == 0 and spans[-1][1] == n  # starts at 0, ends at its length
        assert all(x[1] == y[0] for x, y in zip(spans[:-1], spans[1:], strict=True))  # contiguous, no overlap, no gap
        assert all(b - a <= 16 for a, b in spans)
    # 96 tokens: six full rows of 16, which best-fit decreasing finds here (no padding at all).
    assert len(rows) == sum(lengths) // 16 == 6
    assert pack_documents(lengths, 16) == rows  # deterministic
