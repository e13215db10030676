"""The generation engine: bucketed compiles, batching, stopping, streaming, per-row sampling."""

import jax
import numpy as np
import pytest
from conftest import random_ids

import jaxlora
from jaxlora import prefill_layers
from jaxlora.cache import init_cache
from jaxlora.decoding import decode, decode_for, prefill
from jaxlora.errors import UsageError
from jaxlora.generate import prompt_bucket
from jaxlora.model import decode_params


class CharTokenizer:
    """Decodes token t as chr(ord('a') + t % 26): enough for stop-string tests on a tiny model."""

    def decode(self, tokens, **_):
        return "".join(chr(ord("a") + int(t) % 26) for t in tokens)


def test_prompt_buckets():
    assert [prompt_bucket(n) for n in (1, 16, 17, 32, 33, 100, 512, 513)] == [16, 16, 32, 32, 64, 128, 512, 1024]


def test_prompts_in_one_bucket_compile_prefill_and_decode_once(tiny):
    model = tiny("llama-gqa").load()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _secs, **_kw: (
            compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
        )
    )
    prefills = (prefill_layers._layer_inputs, prefill_layers._layer, prefill_layers._head)  # llama: one kind
    batch = 3  # a batch size no other test uses, so the first prompt compiles
    loop = decode_for(model.params, decode_params(model.params, model.config, batch))  # the CPU kernel's, here
    before = [f._cache_size() for f in (*prefills, loop)]
    for length in range(17, 27):  # ten lengths, all in the 32 bucket
        ids = random_ids((batch, length), model.config.vocab_size, seed=length)
        jaxlora.generate(model.params, model.config, ids, max_new_tokens=20)
        if length == 17:
            after_first = len(compiles)
    assert [f._cache_size() for f in (*prefills, loop)] == [n + 1 for n in before]
    assert len(compiles) == after_first, "a later prompt length compiled something"


def test_a_first_token_compiles_four_programs(tiny):
    """The empty cache and prefill's three (layer inputs, one per kind of layer, the head): a new process reads
    each program from the compile cache (a few ms apiece, after lowering it for the cache key), so the small steps
    around prefill must not each compile one (they were twelve more; greedy row keys are made on the host)."""
    model = tiny("llama-gqa").load()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _secs, **_kw: (
            compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
        )
    )
    batch = 7
    ids = random_ids((batch, 40), model.config.vocab_size, seed=7)
    jax.clear_caches()  # whatever ran before in this process, each program is compiled here
    first = next(jaxlora.stream(model.params, model.config, ids, max_new_tokens=5))
    assert first.tokens.shape == (batch, 1)
    assert len(compiles) == 4


def test_greedy_programs_hold_no_random_number_rounds(tiny):
    """Greedy decoding never draws, so its prefill and decode loop carry the row keys unsplit: no key splits (and
    so no threefry rounds for a new process to lower for the compile cache's key). A sampled one splits them."""
    model = tiny("llama-gqa").load()
    ids = random_ids((2, 6), model.config.vocab_size, seed=3)

    def program(**options):
        return str(
            jax.make_jaxpr(lambda p: jaxlora.sample(p, model.config, ids, max_new_tokens=3, **options))(model.params)
        )

    assert "random_split" not in program()
    assert "random_split" in program(key=jax.random.key(0), sampling=jaxlora.Sampling(temperature=0.7))


def test_batched_generation_equals_one_by_one(tiny):
    model = tiny("qwen2").load()
    prompts = [list(random_ids((n,), model.config.vocab_size, seed=n)) for n in (3, 11, 7)]
    ids, mask = jaxlora.left_pad(prompts)
    batched = jaxlora.generate(model.params, model.config, ids, attention_mask=mask, max_new_tokens=12)
    for row, prompt in enumerate(prompts):
        alone = jaxlora.generate(model.params, model.config, [prompt], max_new_tokens=12)
        np.testing.assert_array_equal(batched.tokens[row], alone.tokens[0])


def test_batched_sampling_equals_one_by_one_with_row_keys(tiny):
    """Row r samples with fold_in(key, r) and its own parameters, whatever else is in the batch."""
    model = tiny("llama-gqa").load()
    prompts = [list(random_ids((n,), model.config.vocab_size, seed=20 + n)) for n in (4, 9)]
    ids, mask = jaxlora.left_pad(prompts)
    key = jax.random.key(7)
    sampling = jaxlora.Sampling(temperature=[1.2, 0.8], top_k=[0, 20], top_p=[0.9, 1.0], repetition_penalty=[1.0, 1.3])
    batched = jaxlora.generate(
        model.params, model.config, ids, attention_mask=mask, max_new_tokens=10, key=key, sampling=sampling
    )
    for row, prompt in enumerate(prompts):
        alone = jaxlora.generate(
            model.params,
            model.config,
            [prompt],
            max_new_tokens=10,
            key=jax.random.fold_in(key, row)[None],
            sampling=jaxlora.Sampling(
                **{f: [getattr(sampling, f)[row]] for f in ("temperature", "top_k", "top_p", "repetition_penalty")}
            ),
        )
        np.testing.assert_array_equal(batched.tokens[row], alone.tokens[0])


def test_same_seed_same_output_and_rows_can_mix_greedy_and_sampling(tiny):
    model = tiny("llama-gqa").load()
    ids = np.repeat(random_ids((1, 5), model.config.vocab_size, seed=10), 2, axis=0)
    sampling = jaxlora.Sampling(temperature=[0.0, 1.5])
    run = lambda seed: jaxlora.generate(  # noqa: E731
        model.params, model.config, ids, max_new_tokens=16, key=jax.random.key(seed), sampling=sampling
    )
    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens[1] != c.tokens[1]).any()
    greedy = jaxlora.generate(model.params, model.config, ids[:1], max_new_tokens=16)
    np.testing.assert_array_equal(a.tokens[0], greedy.tokens[0])
    np.testing.assert_array_equal(c.tokens[0], greedy.tokens[0])


def test_generation_stops_at_eos_and_pads(tiny):
    model = tiny("llama-gqa").load()
    ids = random_ids((2, 5), model.config.vocab_size, seed=9)
    free = jaxlora.generate(model.params, model.config, ids, max_new_tokens=10)
    eos = int(free.tokens[0, 3])
    first = int(np.argmax(free.tokens[0] == eos))
    out = jaxlora.generate(model.params, model.config, ids, max_new_tokens=10, eos_token_ids=[eos], pad_token_id=-1)
    assert out.lengths[0] == first + 1
    np.testing.assert_array_equal(out.tokens[0, : first + 1], free.tokens[0, : first + 1])
    assert (out.tokens[0, first + 1 :] == -1).all()
    hits = np.flatnonzero(free.tokens[1] == eos)
    assert out.lengths[1] == (hits[0] + 1 if hits.size else 10)


def test_decode_pads_rows_after_their_stop_token_inside_the_loop(tiny):
    """The device loop itself marks a row done at its stop token and pads it from the next step on (the host-side
    check on each chunk is a second line, for stop strings)."""
    from jaxlora.generate import make_plan

    model = tiny("llama-gqa").load()
    ids = random_ids((2, 6), model.config.vocab_size, seed=9)
    free = jaxlora.generate(model.params, model.config, ids, max_new_tokens=17).tokens
    stop = int(free[0, 4])
    plan = make_plan(model.config, 2, max_new_tokens=17, eos_token_ids=[stop], pad_token_id=-1)
    cache = init_cache(model.config, 2, 16 + plan.decode_slots)
    keys = jax.random.split(jax.random.key(0), 2)
    padded, mask = jaxlora.left_pad(ids, 0, 16)  # the prompt bucket, as generate pads it
    state = prefill(model.params, cache, padded, mask, keys, plan.arrays, **plan.static)
    state, tokens, _ = decode(model.params, state, plan.arrays, pad_id=-1, steps=16, **plan.static)
    tokens = np.asarray(tokens)  # steps 1..16 of the 17 new tokens
    first = int(np.argmax(free[0] == stop))
    assert 1 <= first < 15
    np.testing.assert_array_equal(tokens[0, :first], free[0, 1 : first + 1])
    assert (tokens[0, first:] == -1).all() and bool(np.asarray(state.done)[0])


def test_stop_token_ids_and_stop_strings(tiny):
    model = tiny("llama-gqa").load()
    ids = random_ids((1, 6), model.config.vocab_size, seed=12)
    free = jaxlora.generate(model.params, model.config, ids, max_new_tokens=40).tokens[0]
    by_id = jaxlora.generate(model.params, model.config, ids, max_new_tokens=40, stop_token_ids=[int(free[5])])
    assert by_id.lengths[0] == int(np.argmax(free == free[5])) + 1

    tokenizer = CharTokenizer()
    text = tokenizer.decode(free)
    stop = text[20:23]  # a three-token stop string, completed by token 22 at the latest
    end = next(n for n in range(1, 41) if stop in tokenizer.decode(free[:n]))
    out = jaxlora.generate(
        model.params,
        model.config,
        ids,
        max_new_tokens=40,
        stop=[stop],
        tokenizer=tokenizer,
        pad_token_id=-1,
        chunk_size=8,
    )
    assert out.lengths[0] == end
    np.testing.assert_array_equal(out.tokens[0, :end], free[:end])
    assert (out.tokens[0, end:] == -1).all()


def test_stream_yields_the_generate_tokens_in_chunks_and_stops_early(tiny):
    model = tiny("qwen2").load()
    ids, mask = jaxlora.left_pad([list(random_ids((n,), model.config.vocab_size, seed=n)) for n in (4, 8)])
    kwargs = dict(attention_mask=mask, max_new_tokens=30, chunk_size=8)
    chunks = list(jaxlora.stream(model.params, model.config, ids, **kwargs))
    assert [c.tokens.shape[1] for c in chunks] == [1, 8, 8, 8, 5]
    assert [c.start for c in chunks] == [0, 1, 9, 17, 25]
    # Rows that run to max_new_tokens have their length in the last chunk, and only there.
    assert [list(c.lengths) for c in chunks] == [[0, 0]] * 4 + [[30, 30]]
    whole = jaxlora.generate(model.params, model.config, ids, **kwargs)
    np.testing.assert_array_equal(np.concatenate([c.tokens for c in chunks], axis=1), whole.tokens)
    for r in range(2):
        assert sum((c.row(r) for c in chunks), []) == list(whole.tokens[r, : whole.lengths[r]])

    # Once every row has hit EOS the stream ends instead of decoding to max_new_tokens.
    eos = [int(whole.tokens[0, 2]), int(whole.tokens[1, 2])]
    stopped = list(jaxlora.stream(model.params, model.config, ids, eos_token_ids=eos, **kwargs))
    assert len(stopped) <= 2
    for r in range(2):
        assert sum((c.row(r) for c in stopped), [])[-1] == eos[r]


def test_logprobs_stop_at_each_rows_end_and_stream_with_the_tokens(tiny):
    model = tiny("qwen2").load()
    ids = random_ids((2, 6), model.config.vocab_size, seed=14)
    free = jaxlora.generate(model.params, model.config, ids, max_new_tokens=20, return_logprobs=True, top_logprobs=2)
    assert free.logprobs.shape == (2, 20) and free.top_ids.shape == free.top_logprobs.shape == (2, 20, 2)
    assert (free.logprobs < 0).all() and (free.top_logprobs[..., 0] >= free.logprobs).all()
    eos = int(free.tokens[0, 5])
    kwargs = dict(max_new_tokens=20, eos_token_ids=[eos], return_logprobs=True, top_logprobs=2, chunk_size=8)
    out = jaxlora.generate(model.params, model.config, ids, **kwargs)
    end = int(out.lengths[0])
    assert end <= 6
    np.testing.assert_array_equal(out.logprobs[0, :end], free.logprobs[0, :end])
    assert (out.logprobs[0, end:] == 0).all() and (out.top_logprobs[0, end:] == 0).all()
    chunks = list(jaxlora.stream(model.params, model.config, ids, **kwargs))
    for field in ("logprob", "raw_logprob", "top_ids", "top_logprobs"):
        streamed = np.concatenate([getattr(c.scores, field) for c in chunks], axis=1)
        whole = getattr(out, field if field.startswith("top") else field + "s")
        np.testing.assert_array_equal(streamed, whole[:, : streamed.shape[1]])


def test_sample_runs_on_device_and_equals_generate(tiny):
    """`sample` is one compiled function: inside a caller's jit, prompts of one padded width share one compile,
    and its greedy and sampled tokens (and ends at EOS) equal `generate`'s."""
    from jaxlora.decoding import _sample

    model = tiny("qwen2").load()
    config = model.config

    @jax.jit
    def rollout(params, ids, mask, key):
        return jaxlora.sample(params, config, ids, attention_mask=mask, key=key, max_new_tokens=14, sampling=hot)

    hot = jaxlora.Sampling(temperature=0.9, top_k=30)
    before = _sample._cache_size()
    for n, seed in ((9, 1), (13, 2)):
        prompts = [
            list(random_ids((n,), config.vocab_size, seed=seed)),
            list(random_ids((5,), config.vocab_size, seed=seed + 9)),
        ]
        ids, mask = jaxlora.left_pad(prompts, width=16)
        key = jax.random.key(seed)
        out = rollout(model.params, ids, mask, key)
        expected = jaxlora.generate(
            model.params, config, ids, attention_mask=mask, key=key, max_new_tokens=14, sampling=hot
        )
        np.testing.assert_array_equal(np.asarray(out.tokens), expected.tokens)
        greedy = jaxlora.sample(model.params, config, ids, attention_mask=mask, max_new_tokens=14)
        expected = jaxlora.generate(model.params, config, ids, attention_mask=mask, max_new_tokens=14)
        np.testing.assert_array_equal(np.asarray(greedy.tokens), expected.tokens)
    assert rollout._cache_size() == 1 and _sample._cache_size() == before + 1  # the direct greedy call

    eos = int(expected.tokens[0, 3])
    stopped = jaxlora.sample(model.params, config, ids, attention_mask=mask, max_new_tokens=14, eos_token_ids=[eos])
    reference = jaxlora.generate(model.params, config, ids, attention_mask=mask, max_new_tokens=14, eos_token_ids=[eos])
    np.testing.assert_array_equal(np.asarray(stopped.tokens), reference.tokens)
    np.testing.assert_array_equal(np.asarray(stopped.lengths), reference.lengths)


@pytest.mark.parametrize(
    "call, edits, message",
    [
        ("sample", dict(input_ids=[1, 2, 3]), r"input_ids must be integer ids \[batch, prompt_len\]"),
        ("sample", dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
        ("sample", dict(attention_mask=np.ones((1, 2), bool)), "attention_mask shape"),
        ("beam_search", dict(num_beams=0), "num_beams must be at least 1"),
        ("beam_search", dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
        ("beam_search", dict(input_ids=np.ones((1, 3), np.float32)), "input_ids must be integer ids"),
    ],
)
def test_on_device_generation_refuses_bad_arguments(tiny, call, edits, message):
    model = tiny("llama-gqa").load()
    kwargs = dict(input_ids=random_ids((1, 3), 97), max_new_tokens=4) | (
        {"num_beams": 2} if call == "beam_search" else {}
    )
    with pytest.raises(UsageError, match=message):
        getattr(jaxlora, call)(model.params, model.config, **(kwargs | edits))


def test_vmap_sample_over_keys_equals_separate_calls(tiny):
    model = tiny("llama-gqa").load()
    ids = random_ids((2, 6), model.config.vocab_size, seed=3)
    hot = jaxlora.Sampling(temperature=1.0)
    keys = jax.random.split(jax.random.key(5), 4)
    draw = lambda key: jaxlora.sample(model.params, model.config, ids, key=key, max_new_tokens=10, sampling=hot)
    batched = np.asarray(jax.vmap(lambda key: draw(key).tokens)(keys))
    separate = np.stack([np.asarray(draw(key).tokens) for key in keys])
    np.testing.assert_array_equal(batched, separate)
    assert len({row.tobytes() for row in batched}) == 4, "four keys drew the same tokens"


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window"])
def test_a_cached_prefix_continues_many_suffixes_like_a_full_forward(tiny, name):
    """Prompt caching: one (left-padded) prefix run once into the cache, three suffixes continued from it; each
    suffix's logits equal a forward over prefix + suffix (past mistral-window's sliding window: a ring buffer)."""
    from jaxlora.decoding import forward_cached

    model = tiny(name).load()
    vocab = model.config.vocab_size
    prefix, mask = jaxlora.left_pad([list(random_ids((9,), vocab, seed=1)), list(random_ids((6,), vocab, seed=2))])
    cache = init_cache(model.config, 2, 9 + 7)
    _, prefix_cache = forward_cached(model.params, model.config, cache, prefix, 0, attention_mask=mask)
    for seed in range(3):
        suffix = random_ids((2, 7), vocab, seed=10 + seed)
        logits, _ = forward_cached(model.params, model.config, prefix_cache, suffix, 9)
        whole = jaxlora.forward(
            model.params,
            model.config,
            np.concatenate([prefix, suffix], axis=1),
            attention_mask=np.concatenate([mask, np.ones_like(suffix, bool)], axis=1),
        )
        np.testing.assert_allclose(np.asarray(logits), np.asarray(whole)[:, 9:], rtol=0, atol=1e-4)


def test_prompt_plus_new_tokens_beyond_context_is_refused(tiny):
    model = tiny("llama-gqa").load()
    ids = random_ids((1, 250), model.config.vocab_size)
    with pytest.raises(UsageError, match="exceeds the model's context of 256 tokens"):
        jaxlora.generate(model.params, model.config, ids, max_new_tokens=7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (dict(max_new_tokens=4, temperature=1.0), "needs a PRNG key"),
        (dict(max_new_tokens=4, stop=["x"]), "stop strings need the tokenizer"),
        (dict(max_new_tokens=4, sampling=jaxlora.Sampling(top_p=2.0)), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=4, top_logprobs=2), "top_logprobs needs return_logprobs=True"),
        (dict(max_new_tokens=4, return_logprobs=True, top_logprobs=-1), r"top_logprobs must be in \[0, 97\]"),
    ],
)
def test_bad_arguments(tiny, kwargs, message):
    model = tiny("llama-gqa").load()
    with pytest.raises(UsageError, match=message):
        jaxlora.generate(model.params, model.config, random_ids((1, 3), 97), **kwargs)


def test_decode_updates_the_donated_cache_in_place(tiny):
    """The compiled decode chunk aliases the cache buffers to its outputs and never copies a cache buffer."""
    import re

    from jaxlora.cache import init_cache
    from jaxlora.sampling import Sampling

    model = tiny("llama-gqa").load()
    config = model.config
    processors, arrays = Sampling().compile(2)
    keys = jax.random.split(jax.random.key(0), 2)
    cache = init_cache(config, 2, 48)
    ids = random_ids((2, 16), config.vocab_size)
    state = prefill(
        model.params,
        cache,
        ids,
        np.ones((2, 16), bool),
        keys,
        arrays,
        config=config,
        processors=processors,
        stop_ids=(),
    )
    hlo = (
        decode.lower(model.params, state, arrays, config=config, processors=processors, stop_ids=(), pad_id=0, steps=8)
        .compile()
        .as_text()
    )
    shape = f"f32[2,48,{config.num_kv_heads},{config.head_dim}]"
    assert len(re.findall(re.escape(shape) + r"\{[^}]*\} dynamic-update-slice\(", hlo)) >= 2 * config.num_layers
    assert not re.findall(re.escape(shape) + r"\{[^}]*\} copy\(", hlo), "a cache buffer is copied"
    aliased = re.search(r"input_output_alias=\{(.*?)\}\s*,\s*entry", hlo, re.S) or re.search(
        r"input_output_alias=\{(.*)", hlo
    )
    assert aliased and aliased.group(1).count("may-alias") >= 2 * config.num_layers


def test_forward_refuses_a_sequence_past_the_context(tiny):
    model = tiny("gpt2").load()  # learned positions: 64 of them
    ids = random_ids((1, 65), model.config.vocab_size)
    with pytest.raises(UsageError, match="sequence of 65 tokens exceeds the model's context of 64 tokens"):
        jaxlora.forward(model.params, model.config, ids)


def test_dynamic_ntk_scaling_has_no_context_limit(tiny):
    model = tiny("llama-dynamic-rope").load()
    assert model.config.context_length is None
    ids = random_ids((1, 40), model.config.vocab_size)
    assert jaxlora.generate(model.params, model.config, ids, max_new_tokens=8).tokens.shape == (1, 8)


CACHE_FOLDER_IN_USE = """
import sys, jax, jaxlora
if sys.argv[2] == "own":
    jax.config.update("jax_compilation_cache_dir", "/tmp/the-programs-own-choice")
jaxlora.load(sys.argv[1], compile_cache={"default": None, "on": True, "off": False, "own": None}[sys.argv[2]])
from jaxlora import executables
print(jax.config.jax_compilation_cache_dir or "", executables.folder_in_use() or "", sep="|")
"""


def test_load_turns_the_persistent_compile_cache_on_unless_told_not_to(tiny, tmp_path):
    import os
    import subprocess
    import sys

    def folder_in_use(mode: str, **env) -> tuple[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "JAXLORA_COMPILE_CACHE"} | env
        result = subprocess.run(
            [sys.executable, "-c", CACHE_FOLDER_IN_USE, str(tiny("llama-gqa").jax_dir), mode],
            capture_output=True,
            text=True,
            timeout=300,
            env={**env, "XDG_CACHE_HOME": str(tmp_path)},
        )
        assert result.returncode == 0, result.stderr[-2000:]
        xla, store = result.stdout.strip().split("|")
        return xla, store

    default = str(tmp_path / "jaxlora" / "xla")
    on = (default, str(tmp_path / "jaxlora" / "xla" / "executables"))
    assert folder_in_use("default") == on
    assert folder_in_use("off") == ("", "")
    assert folder_in_use("default", JAXLORA_COMPILE_CACHE="off") == ("", "")
    assert folder_in_use("on", JAXLORA_COMPILE_CACHE="off") == on
    assert folder_in_use("default", JAXLORA_COMPILE_CACHE="on") == on
    elsewhere = tmp_path / "elsewhere"
    assert folder_in_use("default", JAXLORA_COMPILE_CACHE=str(elsewhere)) == (
        str(elsewhere),
        str(elsewhere / "executables"),
    )
    assert folder_in_use("on", JAXLORA_COMPILE_CACHE=str(elsewhere)) == (  # the CLI's generate: on, in that folder
        str(elsewhere),
        str(elsewhere / "executables"),
    )
    assert folder_in_use("on") == on
    assert folder_in_use("own") == ("/tmp/the-programs-own-choice", "")  # the program's folder, without jaxlora's store


COMPILE_COUNTER = """
import json, sys
import jax, numpy as np
import jaxlora
from jaxlora import compile_cache
from jaxlora.sampling import Sampling

compile_cache.enable(sys.argv[2], min_compile_seconds=0)
key = jax.random.key(1)  # the script's own programs, before the count
events = []
jax.monitoring.register_event_listener(lambda event, **_: events.append(event))
jax.monitoring.register_event_duration_secs_listener(lambda event, _secs, **_: events.append(event))
model = jaxlora.load(sys.argv[1])
ids = np.arange(10, dtype=np.int32).reshape(2, 5) + 3
greedy = jaxlora.generate(model.params, model.config, ids, max_new_tokens=40)
sampled = jaxlora.generate(
    model.params, model.config, ids, max_new_tokens=12, sampling=Sampling(temperature=0.9, top_p=0.8),
    key=key, return_logprobs=True,
)
print(json.dumps({
    "misses": events.count("/jax/compilation_cache/cache_misses"),
    "hits": events.count("/jax/compilation_cache/cache_hits"),
    "lowerings": events.count("/jax/core/compile/jaxpr_to_mlir_module_duration"),
    "tokens": [np.asarray(greedy.tokens).tolist(), np.asarray(sampled.tokens).tolist()],
    "logprobs": np.asarray(sampled.logprobs).tolist(),
}))
"""


def test_a_second_process_compiles_nothing_with_the_persistent_cache(tiny, tmp_path):
    """A second process runs generation's programs from jaxlora's store of whole executables without tracing,
    lowering or compiling any (`jaxlora.executables`); without the store, every executable the first process
    compiled comes from JAX's disk cache: no miss, as many hits as the first process had misses. Each gives the
    first process's tokens and log-probs."""
    import json
    import shutil
    import subprocess
    import sys

    def run() -> dict:
        result = subprocess.run(
            [sys.executable, "-c", COMPILE_COUNTER, str(tiny("llama-gqa").jax_dir), str(tmp_path / "xla")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    first = run()
    assert first["misses"] >= 2 and first["hits"] == 0 and first["lowerings"] >= first["misses"]
    assert len(list((tmp_path / "xla" / "executables").glob("decode_steps-*.bin"))) == 2  # greedy, sampled
    from_store = run()
    assert (from_store["misses"], from_store["hits"], from_store["lowerings"]) == (0, 0, 0)
    shutil.rmtree(tmp_path / "xla" / "executables")
    from_jax_cache = run()
    assert from_jax_cache["misses"] == 0 and from_jax_cache["hits"] == first["misses"]
    # That process stored nothing: an executable JAX read from its cache serializes without some of its functions,
    # and a process that loaded one from the store failed. A fourth process runs from JAX's cache again.
    assert not list((tmp_path / "xla" / "executables").glob("*.bin"))
    once_more = run()
    assert once_more["misses"] == 0 and once_more["hits"] == first["misses"]
    for later in (from_store, from_jax_cache, once_more):
        assert later["tokens"] == first["tokens"] and later["logprobs"] == first["logprobs"]
