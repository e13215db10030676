"""`jaxlora serve` driven by the official openai client over 127.0.0.1: text equal to `generate` alone, streaming,
n, stop strings, errors, a client going away, 16 concurrent streams; on a tiny model and on the real SmolLM2."""

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import jaxlora
from jaxlora.text import chat_ids

openai = pytest.importorskip("openai")  # a dev dependency: `make test` installs it

from servers import Server  # noqa: E402


@pytest.fixture(scope="module")
def tiny_server(tiny_with_tokenizer):
    server = Server(tiny_with_tokenizer / "jax", "--max-batch", "4", "--block-size", "8")
    yield server
    err = server.stop()
    assert "Traceback" not in err, err[-3000:]


@pytest.fixture(scope="module")
def tiny_model(tiny_with_tokenizer):
    return jaxlora.load(tiny_with_tokenizer / "jax")


def lone_text(model, ids, max_tokens):
    """What `generate` gives for one prompt alone, as text (greedy)."""
    out = jaxlora.generate(
        model.params,
        model.config,
        np.asarray([ids], np.int32),
        max_new_tokens=max_tokens,
        eos_token_ids=model.eos_token_ids,
    )
    tokens = [int(t) for t in out.tokens[0][: int(out.lengths[0])]]
    return model.tokenizer.decode(tokens, skip_special_tokens=True)


PROMPTS = ["def add(a, b):", "The capital of France is", "Once upon a time", "import numpy as np\n", "1, 2, 3,"]


def test_completions_equal_generate_alone_streamed_or_not(tiny_server, tiny_model):
    client = tiny_server.client
    for prompt in PROMPTS[:3]:
        ids = tiny_model.tokenizer(prompt)["input_ids"]
        want = lone_text(tiny_model, ids, 24)
        out = client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0)
        assert out.choices[0].text == want
        assert out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 24
        pieces = client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in pieces) == want


def test_chat_completions_use_the_chat_template(tiny_server, tiny_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    want = lone_text(tiny_model, chat_ids(tiny_model.tokenizer, messages), 20)
    out = tiny_server.client.chat.completions.create(model="m", messages=messages, max_tokens=20, temperature=0)
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    chunks = list(
        tiny_server.client.chat.completions.create(
            model="m", messages=messages, max_tokens=20, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sixteen_concurrent_streams_each_get_their_lone_text(tiny_server, tiny_model):
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 8 + i) for i in range(16)]

    def run(job):
        prompt, max_tokens = job
        stream = tiny_server.client.completions.create(
            model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        return "".join(chunk.choices[0].text for chunk in stream)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, jobs))
    for (prompt, max_tokens), text in zip(jobs, got, strict=True):
        assert text == lone_text(tiny_model, tiny_model.tokenizer(prompt)["input_ids"], max_tokens)


def test_n_choices_seeds_and_stop_strings(tiny_server, tiny_model):
    client = tiny_server.client
    greedy = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=16, temperature=0, n=2)
    assert len(greedy.choices) == 2 and greedy.choices[0].text == greedy.choices[1].text
    sampled = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=16, temperature=1.5, n=2, seed=7)
    again = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=16, temperature=1.5, n=2, seed=7)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert sampled.choices[0].text != sampled.choices[1].text  # each choice its own seed
    full = greedy.choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    cut = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="m", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


def reference_logprobs(model, ids):
    """log p(ids[t + 1] | ids[..t]) for every t, from `jaxlora.score` (the model's own distribution)."""
    return np.asarray(jaxlora.score(model.params, model.config, np.asarray([ids], np.int32)))[0]


def test_logprobs_echo_and_several_prompts(tiny_server, tiny_model):
    """Log-probs of new tokens and, with echo, of the prompt's own tokens equal `jaxlora.score` on prompt + answer
    (1e-5); the top alternatives are the model's most likely, the greedy token first; several prompts in one
    request each get n choices equal to their lone text; streamed log-probs equal the whole answer's."""
    client, tokenizer = tiny_server.client, tiny_model.tokenizer
    ids = tokenizer(PROMPTS[1])["input_ids"]
    out = client.completions.create(model="m", prompt=ids, max_tokens=8, temperature=0, logprobs=3, echo=True)
    choice = out.choices[0]
    got = choice.logprobs
    assert len(got.tokens) == len(ids) + 8 and got.token_logprobs[0] is None and got.top_logprobs[0] is None
    assert choice.text.startswith(tokenizer.decode(ids))
    lone = jaxlora.generate(tiny_model.params, tiny_model.config, np.asarray([ids], np.int32), max_new_tokens=8)
    generated = [int(t) for t in lone.tokens[0][:8]]
    want = reference_logprobs(tiny_model, ids + generated)
    np.testing.assert_allclose(got.token_logprobs[1:], want, atol=1e-5)
    for t, (logprob, top) in enumerate(zip(got.token_logprobs, got.top_logprobs, strict=True)):
        if t >= len(ids):  # greedy: the chosen token is the most likely one
            assert len(top) == 3 and max(top.values()) == logprob
    assert got.text_offset[len(ids)] == len(tokenizer.decode(ids))
    # Streamed: the same log-probs, chunk by chunk.
    streamed = client.completions.create(model="m", prompt=ids, max_tokens=8, temperature=0, logprobs=2, stream=True)
    pieces = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    np.testing.assert_allclose([lp for p in pieces for lp in p.token_logprobs], want[len(ids) - 1 :], atol=1e-5)
    # Chat: logprobs true with top_logprobs.
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(
        model="m", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 6 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob == c.logprob for c in content)
    # echo with max_tokens 0: the prompt scored, nothing generated.
    scored = client.completions.create(model="m", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == tokenizer.decode(ids) and scored.usage.completion_tokens == 0
    np.testing.assert_allclose(scored.choices[0].logprobs.token_logprobs[1:], want[: len(ids) - 1], atol=1e-5)
    # Several prompts, n=2 each: choice i answers prompt i // 2.
    several = client.completions.create(model="m", prompt=PROMPTS[:2], max_tokens=6, temperature=0, n=2)
    texts = [c.text for c in sorted(several.choices, key=lambda c: c.index)]
    lone_texts = [lone_text(tiny_model, tokenizer(p)["input_ids"], 6) for p in PROMPTS[:2]]
    assert texts == [lone_texts[0], lone_texts[0], lone_texts[1], lone_texts[1]]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "hi", "n": 0}, "n must be"),
        ({"prompt": "", "max_tokens": 4}, "prompt"),
        ({"prompt": "hi", "frobnicate": 1}, "frobnicate"),
        ({"prompt": "hi", "stop": 3}, "stop"),
        ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "hi", "logprobs": 99}, "log-probs"),
        ({"prompt": "hi", "echo": True, "stream": True}, "echo"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, "true or false"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "word " * 200}, "context"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_lives(tiny_server, body, words):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    status, answer = tiny_server.post(path, json.dumps(body).encode())
    assert status == 400 and words in answer["error"]["message"], answer
    assert tiny_server.health()["status"] == "ok"


def test_malformed_json_and_the_sdk_error_type(tiny_server):
    status, answer = tiny_server.post("/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in answer["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        tiny_server.client.chat.completions.create(model="m", messages=[], max_tokens=4)
    models = tiny_server.client.models.list()
    assert [m.id for m in models.data] == ["jax"]


@pytest.mark.real
@pytest.mark.xla_defaults
def test_the_real_smollm2_serves_and_a_client_leaving_frees_its_slot(smollm2_checkpoint):
    """SmolLM2 with one slot: a long stream whose client goes away after its first chunk is cancelled at once
    (the slot is free and the next request runs), chat text equals `generate` alone, and SIGTERM drains the
    request in flight before the server exits."""
    server = Server(smollm2_checkpoint, "--max-batch", "1", "--max-len", "512")
    try:
        model = jaxlora.load(smollm2_checkpoint)
        messages = [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}]
        out = server.client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0)
        assert out.choices[0].message.content == lone_text(model, chat_ids(model.tokenizer, messages), 24)
        stream = server.client.chat.completions.create(
            model="m", messages=messages, max_tokens=400, temperature=0, stream=True
        )
        chunks = iter(stream)
        while not next(chunks).choices[0].delta.content:  # the role comes first, before the request runs
            pass
        assert server.health()["running"] == 1
        stream.close()  # the client goes away ~400 tokens (about 10 s here) before the answer would end
        deadline = time.time() + 5
        while server.health()["running"] and time.time() < deadline:
            time.sleep(0.1)
        assert server.health() == {"status": "ok", "running": 0, "waiting": 0}
        quick = server.client.completions.create(model="m", prompt="1, 2, 3,", max_tokens=4, temperature=0)
        assert quick.choices[0].finish_reason == "length"
        # SIGTERM mid-stream: the stream still ends whole (64 tokens, its lone text), then the server exits 0.
        ids = chat_ids(model.tokenizer, messages)
        stream = server.client.completions.create(model="m", prompt=ids, max_tokens=64, temperature=0, stream=True)
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        server.proc.send_signal(signal.SIGTERM)
        text += "".join(c.choices[0].text for c in chunks)
        assert text == lone_text(model, ids, 64)
        assert server.proc.wait(timeout=30) == 0
    finally:
        err = server.stop()
    assert "Traceback" not in err, err[-3000:]
    assert "completion=24" in err and "completion=64" in err  # one log line per request, the drained one too
