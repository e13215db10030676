"""Logits processors match transformers' own on random logits; sampling draws from the right distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jaxlora.errors import UsageError
from jaxlora.sampling import Sampling, first_argmax, process_logits, sample_next

VOCAB = 257


def random_logits(batch=4, seed=0):
    return np.random.default_rng(seed).normal(0, 3, (batch, VOCAB)).astype(np.float32)


def ours(logits, seen=None, **params):
    processors, arrays = Sampling(**params).compile(logits.shape[0])
    if seen is None:
        seen = np.zeros((logits.shape[0], 1), bool)
    return np.asarray(process_logits(jnp.asarray(logits), arrays, processors, jnp.asarray(seen)))


def hf_rows(logits, make_processor, values, input_ids=None):
    rows = []
    for row, value in enumerate(values):
        ids = torch.zeros((1, 1), dtype=torch.long) if input_ids is None else torch.tensor(input_ids[row : row + 1])
        rows.append(make_processor(value)(ids, torch.tensor(logits[row : row + 1])).numpy())
    return np.concatenate(rows)


def assert_same_filter(a, b):
    np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))
    finite = ~np.isneginf(a)
    np.testing.assert_allclose(a[finite], b[finite], rtol=1e-6, atol=1e-6)


def test_temperature_matches_transformers():
    logits = random_logits()
    temps = [0.5, 1.0, 1.7, 3.0]
    expected = hf_rows(logits, TemperatureLogitsWarper, temps)
    assert_same_filter(ours(logits, temperature=temps), expected)


def test_top_k_matches_transformers():
    logits = random_logits()
    logits[0, :5] = logits[0, 5]  # ties at the threshold are kept, as in HF
    ks = [6, 1, 50, VOCAB]
    expected = hf_rows(logits, TopKLogitsWarper, ks)
    assert_same_filter(ours(logits, temperature=1.0, top_k=ks), expected)


def test_top_p_matches_transformers():
    logits = random_logits(seed=1)
    ps = [0.1, 0.5, 0.9, 0.999]
    expected = hf_rows(logits, TopPLogitsWarper, ps)
    assert_same_filter(ours(logits, temperature=1.0, top_p=ps), expected)


def test_min_p_matches_transformers():
    logits = random_logits(seed=2)
    ps = [0.01, 0.05, 0.2, 0.9]
    expected = hf_rows(logits, MinPLogitsWarper, ps)
    assert_same_filter(ours(logits, temperature=1.0, min_p=ps), expected)


def test_repetition_penalty_matches_transformers():
    logits = random_logits(seed=3)
    rng = np.random.default_rng(4)
    input_ids = rng.integers(0, VOCAB, (4, 30))
    seen = np.zeros((4, VOCAB), bool)
    seen[np.arange(4)[:, None], input_ids] = True
    penalties = [1.3, 0.8, 2.0, 1.1]
    expected = hf_rows(logits, lambda p: RepetitionPenaltyLogitsProcessor(penalty=p), penalties, input_ids)
    assert_same_filter(ours(logits, seen=seen, repetition_penalty=penalties), expected)


def test_processors_chain_in_transformers_order():
    logits = random_logits(seed=5)
    t = torch.tensor(logits)
    ids = torch.zeros((4, 1), dtype=torch.long)
    for processor in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.8), MinPLogitsWarper(0.1)):
        t = processor(ids, t)
    assert_same_filter(ours(logits, temperature=0.7, top_k=40, top_p=0.8, min_p=0.1), t.numpy())


def draw(logits_row, n, **params):
    logits = jnp.tile(jnp.asarray(logits_row)[None], (n, 1))
    processors, arrays = Sampling(**params).compile(n)
    keys = jax.random.split(jax.random.key(0), n)
    return np.asarray(sample_next(logits, arrays, processors, keys))


def chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_samples_follow_the_distribution():
    probs = np.array([0.30, 0.25, 0.15, 0.10, 0.08, 0.06, 0.04, 0.02])
    samples = draw(np.log(probs), 20000, temperature=1.0)
    counts = np.bincount(samples, minlength=len(probs))
    # 7 degrees of freedom: P(chi2 > 24.32) = 0.001 for a correct sampler.
    assert chi_square(counts, probs) < 24.32


def test_samples_after_top_k_and_temperature_follow_the_renormalized_distribution():
    probs = np.array([0.30, 0.25, 0.15, 0.10, 0.08, 0.06, 0.04, 0.02])
    samples = draw(np.log(probs), 20000, temperature=2.0, top_k=3)
    assert samples.max() < 3
    tempered = probs[:3] ** 0.5
    counts = np.bincount(samples, minlength=3)
    # 2 degrees of freedom: P(chi2 > 13.82) = 0.001.
    assert chi_square(counts, tempered / tempered.sum()) < 13.82


def test_greedy_rows_ignore_warpers_and_sampled_rows_apply_them():
    logits = random_logits(batch=2, seed=6)
    processors, arrays = Sampling(temperature=[0.0, 1.0], top_k=[3, 3]).compile(2)
    keys = jax.random.split(jax.random.key(1), 400).reshape(200, 2)
    draws = np.asarray(jax.vmap(lambda k: sample_next(jnp.asarray(logits), arrays, processors, k))(keys))
    assert (draws[:, 0] == logits[0].argmax()).all()  # greedy: the top token, whatever the warper
    top3 = set(np.argsort(logits[1])[-3:].tolist())
    assert set(draws[:, 1].tolist()) == top3  # sampled: only the top 3, and each of them


def test_top_p_keeps_exactly_the_nucleus_at_the_boundary():
    """Four equal tokens (probabilities 1/4, exact in float32): the tail to drop has mass <= 1 - top_p, so a top_p
    that lands on a cumulative sum exactly drops it (HF's `<=`)."""
    logits = np.full((3, VOCAB), -np.inf, np.float32)
    logits[:, 10:14] = 1.0
    for top_p, kept in ((0.5, 2), (0.75, 3), (0.25, 1)):
        out = ours(logits, temperature=1.0, top_p=top_p)
        expected = hf_rows(logits, lambda p: TopPLogitsWarper(p), [top_p] * 3)
        assert (np.isfinite(out).sum(axis=1) == kept).all(), (top_p, np.isfinite(out).sum(axis=1))
        assert_same_filter(out, expected)


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(temperature=[0.1, 0.2, 0.3]), "temperature has 3 values for a batch of 2"),
    ],
)
def test_impossible_parameters_are_refused(params, message):
    with pytest.raises(UsageError, match=message):
        Sampling(**params).compile(2)


def test_first_argmax_is_argmax_on_ties_infinities_and_nans():
    """The greedy token: the first index of the largest logit, or of the first NaN (as jnp.argmax and torch's
    argmax), for ties, rows of -inf, +inf, and logits as wide as a real vocabulary."""
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((8, 49152)).astype(np.float32)
    wide[3, [7, 40000]] = 9.0  # a tie: the first wins
    rows = np.array(
        [
            [0.5, 2.0, 2.0, -1.0, 2.0],
            [-np.inf] * 5,
            [1.0, np.inf, 3.0, np.inf, 0.0],
            [1.0, np.nan, 3.0, np.nan, 5.0],
            [np.nan, -np.inf, np.inf, 0.0, 1.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [-3.0, -2.0, -1.0, -2.0, -3.0],
        ],
        np.float32,
    )
    for logits in (wide, rows):
        got = np.asarray(jax.jit(first_argmax)(logits))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
        np.testing.assert_array_equal(got, torch.from_numpy(logits).argmax(-1).numpy())
    assert np.asarray(first_argmax(jnp.asarray(rows)))[0] == 1 and np.asarray(first_argmax(jnp.asarray(wide)))[3] == 7
