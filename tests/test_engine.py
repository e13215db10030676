"""The serving engine (`jaxlora.engine`): every request's output equals `generate` on its prompt alone, whatever
else is in flight; prefix blocks are reused; compiles do not grow with requests; blocks are never lost."""

import jax
import numpy as np
import pytest

import jaxlora
from jaxlora.engine import Engine
from jaxlora.errors import UsageError
from jaxlora.sampling import Sampling


def mixed_requests(vocab, count, seed, system_every=3, system_len=40):
    """Prompts of 3-60 tokens, a third of them after one shared 40-token system prompt; answers of 1-30."""
    rng = np.random.default_rng(seed)
    system = [int(t) for t in rng.integers(0, vocab, system_len)]
    requests = []
    for i in range(count):
        own = [int(t) for t in rng.integers(0, vocab, int(rng.integers(3, 60)))]
        prompt = (system if i % system_every == 0 else []) + own
        requests.append(dict(prompt=prompt, max_tokens=int(rng.integers(1, LONGEST + 1))))
    return requests


LONGEST = 30  # the longest answer in mixed_requests


def alone(model, request, **options):
    """`generate` on the request's prompt alone. It always runs LONGEST tokens (one compile per prompt bucket, not
    per answer length) and keeps the request's first max_tokens: a shorter run is a prefix of a longer one with
    the same key (each step's key comes from the one before)."""
    ids = np.asarray([request["prompt"]], np.int32)
    out = jaxlora.generate(model.params, model.config, ids, max_new_tokens=LONGEST, **options)
    return [int(t) for t in out.tokens[0][: request["max_tokens"]]]


def drive(engine, requests):
    """Submit all, step to the end: ({id: tokens}, {id: finish reason}, {id: cached prompt tokens})."""
    ids = [engine.submit(**r) for r in requests]
    tokens, reasons, cached = {i: [] for i in ids}, {}, {}
    while not engine.idle:
        for event in engine.step():
            tokens[event.id] += event.tokens
            cached.setdefault(event.id, event.cached_tokens)
            if event.finished:
                reasons[event.id] = event.finish_reason
    return [tokens[i] for i in ids], [reasons[i] for i in ids], [cached[i] for i in ids]


@pytest.mark.parametrize(("name", "count"), [("llama-gqa", 20), ("gemma2", 12), ("deepseek_v3", 8)])
def test_concurrent_requests_each_equal_generate_alone(tiny, name, count):
    """Four slots, up to twenty requests of mixed lengths (so requests join and leave mid-flight), some sharing a
    prefix: greedy tokens equal `generate` on each prompt alone (Gemma 2: windows shorter than the sequences and
    soft-caps; DeepSeek-V3: the latent cache)."""
    model = tiny(name).load()
    requests = mixed_requests(model.config.vocab_size, count, seed=1)
    engine = Engine(model.params, model.config, max_batch=4, max_len=128, block_size=8)
    tokens, reasons, cached = drive(engine, requests)
    for request, got, reason in zip(requests, tokens, reasons, strict=True):
        assert got == alone(model, request)
        assert reason == "length" and len(got) == request["max_tokens"]
    # The shared 40-token system prompt is five blocks of 8: every request after the first starting with it
    # takes them from the cache.
    shared = [c for i, c in enumerate(cached) if i % 3 == 0]
    assert shared[0] == 0 and all(c == 40 for c in shared[1:]), shared
    assert all(c == 0 for i, c in enumerate(cached) if i % 3)


def test_sampled_requests_equal_generate_with_their_seed(tiny):
    model = tiny("llama-gqa").load()
    requests = mixed_requests(model.config.vocab_size, 6, seed=2)
    settings = [
        Sampling(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2),
        Sampling(temperature=1.3, min_p=0.05),
        Sampling(),
        Sampling(temperature=0.7, repetition_penalty=1.5),
        Sampling(temperature=1.0),
        Sampling(top_k=5, repetition_penalty=1.3),
    ]
    for i, (request, sampling) in enumerate(zip(requests, settings, strict=True)):
        request.update(sampling=sampling, seed=100 + i)
    engine = Engine(model.params, model.config, max_batch=3, max_len=128, block_size=8)
    tokens, _, _ = drive(engine, requests)
    for request, got in zip(requests, tokens, strict=True):
        want = alone(model, request, sampling=request["sampling"], key=jax.random.key(request["seed"]))
        assert got == want


def test_compiles_depend_on_buckets_not_requests(tiny, caplog):
    """After `warmup` (every prompt bucket with and without a cached prefix, every row count and view, greedy and
    sampled), 50 requests of mixed lengths, prefix hits included, compile none of the engine's programs."""
    model = tiny("llama-gqa").load()
    engine = Engine(model.params, model.config, max_batch=4, max_len=128, block_size=8, buckets=(16, 64))

    def engine_compiles() -> int:
        return sum(
            "Compiling jit(_prefill)" in r.message or "Compiling jit(_decode)" in r.message for r in caplog.records
        )

    with jax.log_compiles(), caplog.at_level("WARNING"):
        # Prompt buckets 16, 64 and 128 (the engine's max_len), each with and without a cached prefix; decode
        # chunks of 1, 2 or 4 rows over one view (MIN_VIEW is past the 16 blocks of 8 of max_len), greedy and
        # sampled: 6 + 6 programs.
        assert engine.warmup() == 12
        warm = engine_compiles()
        requests = mixed_requests(model.config.vocab_size, 50, seed=3)
        for request in requests[::2]:
            request["sampling"] = Sampling(temperature=0.9)
        tokens, _, cached = drive(engine, requests)
        assert sum(c > 0 for c in cached) >= 10  # prefix hits happened
        assert engine_compiles() == warm, "a request compiled an engine program after the warm-up"
    # A warmed engine's greedy answers are still generate's (the warm-up wrote only to the trash block).
    for request, got in zip(requests[1::2], tokens[1::2], strict=True):
        assert got == alone(model, request)


def test_a_small_pool_makes_requests_wait_and_loses_no_block(tiny):
    """Sixteen blocks of 8 for four slots: requests wait for blocks (never fail), idle cached prefixes are evicted
    least recently used first, and when everything is done every block is free or cached, none referenced."""
    model = tiny("llama-gqa").load()
    requests = mixed_requests(model.config.vocab_size, 12, seed=4)
    engine = Engine(model.params, model.config, max_batch=4, max_len=128, block_size=8, num_blocks=17)
    tokens, _, _ = drive(engine, requests)
    for request, got in zip(requests, tokens, strict=True):
        assert got == alone(model, request)
    pool = engine.pool
    assert all(refs == 0 for refs in pool.refs) and pool.available() == 16
    assert set(pool.idle) == set(pool.hash_of) and len(pool.idle) + len(pool.free) == 16


def test_a_request_larger_than_the_pool_is_refused(tiny):
    model = tiny("llama-gqa").load()
    engine = Engine(model.params, model.config, max_batch=2, max_len=128, block_size=8, num_blocks=5)
    with pytest.raises(UsageError, match="KV blocks"):
        engine.submit(list(range(30)), max_tokens=20)
    with pytest.raises(UsageError, match="exceeds"):
        engine.submit(list(range(100)), max_tokens=40)
    with pytest.raises(UsageError, match="temperature"):
        engine.submit([1, 2], max_tokens=2, sampling=Sampling(temperature=-1.0))


def test_stop_ids_end_a_request_and_cancel_frees_its_slot_at_once(tiny):
    model = tiny("llama-gqa").load()
    engine = Engine(model.params, model.config, max_batch=2, max_len=128, block_size=8)
    prompt = [5, 9, 14, 3]
    full = alone(model, dict(prompt=prompt, max_tokens=20))
    stop = full[6]
    first = full.index(stop)
    tokens, reasons, _ = drive(engine, [dict(prompt=prompt, max_tokens=20, stop_token_ids=(stop,))])
    assert tokens[0] == full[: first + 1] and reasons == ["stop"]
    # Two long requests fill both slots; a third waits until one is cancelled, then is admitted next step.
    long_ones = [engine.submit(prompt, max_tokens=60) for _ in range(2)]
    waiting = engine.submit([7, 7, 7], max_tokens=3)
    engine.step()
    assert {r.request.id for r in engine.running.values()} == set(long_ones)
    assert engine.cancel(long_ones[0])
    events = engine.step()
    assert any(e.id == waiting for e in events)
    assert engine.cancel(long_ones[1]) and not engine.cancel(12345)


def test_logprobs_of_every_slot_equal_score_on_prompt_and_answer(tiny):
    """Requests asking for log-probs (some not) decode together: each new token's log-prob equals `jaxlora.score`
    on prompt + answer (1e-5), its alternatives are the model's most likely (greedy: itself first); the prompt's
    own log-probs too."""
    model = tiny("llama-gqa").load()
    requests = mixed_requests(model.config.vocab_size, 8, seed=5)
    for i, request in enumerate(requests):
        request["logprobs"] = None if i % 3 == 2 else i % 3 + 1
    engine = Engine(model.params, model.config, max_batch=4, max_len=128, block_size=8)
    ids = [engine.submit(**r) for r in requests]
    tokens, logprobs = {i: [] for i in ids}, {i: [] for i in ids}
    while not engine.idle:
        for event in engine.step():
            tokens[event.id] += event.tokens
            logprobs[event.id] += event.logprobs or []
    for request, i in zip(requests, ids, strict=True):
        if request["logprobs"] is None:
            assert logprobs[i] == []
            continue
        sequence = request["prompt"] + tokens[i]
        want = np.asarray(jaxlora.score(model.params, model.config, np.asarray([sequence], np.int32)))[0]
        got = [entry.logprob for entry in logprobs[i]]
        np.testing.assert_allclose(got, want[len(request["prompt"]) - 1 :], atol=1e-5)
        for token, entry in zip(tokens[i], logprobs[i], strict=True):
            assert len(entry.top) == request["logprobs"] and entry.top[0] == (token, entry.logprob)
    prompt = requests[0]["prompt"]
    scored = engine.prompt_logprobs(prompt, 2)
    want = np.asarray(jaxlora.score(model.params, model.config, np.asarray([prompt], np.int32)))[0]
    assert scored[0] is None and len(scored) == len(prompt)
    np.testing.assert_allclose([e.logprob for e in scored[1:]], want, atol=1e-5)
