"""Gradients against PyTorch autograd on the same weights: with respect to every base param, to LoRA adapters
(against PEFT) and to the input embeddings, each leaf within 1e-4 of its own largest entry."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import random_ids
from safetensors.numpy import load_file

import jaxlora
from jaxlora import lora
from jaxlora.checkpoint import Model
from jaxlora.export import hf_tensors
from jaxlora.losses import next_token_logprobs
from jaxlora.peft import export_peft
from jaxlora.train import token_loss

RTOL = 1e-4


def batch(vocab: int, seed: int = 0) -> dict:
    ids = random_ids((2, 13), vocab, seed=seed)
    loss_mask = np.random.default_rng(seed).integers(0, 2, size=ids.shape).astype(np.int32)
    return {"input_ids": ids, "loss_mask": loss_mask}


def jax_loss(params, config, data, lora_weights=None, inputs_embeds=None):
    """Summed next-token negative log-likelihood over the targets whose loss_mask is 1: the training loss (which
    projects the vocabulary in chunks, with its own gradient), or from `forward`'s logits for inputs_embeds."""
    ids = jnp.asarray(data["input_ids"])
    if inputs_embeds is None:
        return token_loss(params, config, {**data, "attention_mask": np.ones_like(data["input_ids"])}, lora_weights)[0]
    logits = jaxlora.forward(params, config, None, inputs_embeds=inputs_embeds, lora=lora_weights)
    return -(next_token_logprobs(logits, ids) * data["loss_mask"][:, 1:]).sum()


def torch_loss(model, data, inputs_embeds=None):
    ids = torch.tensor(data["input_ids"], dtype=torch.long)
    out = model(input_ids=None if inputs_embeds is not None else ids, inputs_embeds=inputs_embeds)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, ids[:, 1:, None])[..., 0]
    return -(picked * torch.tensor(data["loss_mask"][:, 1:])).sum()


def assert_close(got: np.ndarray, want: np.ndarray, name: str) -> None:
    scale = np.abs(want).max()
    assert scale > 0, f"{name}: the reference gradient is zero, so this compares nothing"
    err = np.abs(got - want).max() / scale
    assert err <= RTOL, f"{name}: gradients differ by {err:.2e} of their scale"


@pytest.mark.parametrize(
    "name",
    [
        "llama-gqa",
        "llama-tied-mha",
        "gemma2",
        "phi3",
        "gpt2",
        "gptj",
        "gpt_neox",
        "mixtral",
        "qwen2_moe",
        "olmo2",
        "granite",
        "gpt_oss",
    ],
)
def test_param_gradients_match_torch(tiny, name):
    """Every param, fused tensors included: our gradient tree goes back to transformers' names through the family
    table, as `export hf` takes params (the table's maps are linear, so they carry gradients too)."""
    m = tiny(name)
    model = m.load()
    data = batch(model.config.vocab_size)
    grads = jax.grad(jax_loss)(model.params, model.config, data)
    reference = copy.deepcopy(m.torch_model)
    reference.zero_grad()
    torch_loss(reference, data).backward()
    ours = hf_tensors(Model(model.config, grads), {k: tuple(v.shape) for k, v in reference.state_dict().items()})
    checked = 0
    for hf_name, param in reference.named_parameters():  # a tied head is one parameter: its two uses summed
        want, got = param.grad.numpy(), ours[hf_name]
        padding = getattr(reference.get_input_embeddings(), "padding_idx", None)
        if param is reference.get_input_embeddings().weight and padding is not None:
            # torch's nn.Embedding(padding_idx=...) drops that row's gradient as an input (it never trains; a tied
            # head still adds its part); ours is the loss's true derivative there. Compare every other row.
            assert padding in data["input_ids"]
            want, got = np.delete(want, padding, axis=0), np.delete(got, padding, axis=0)
        assert_close(got, want, hf_name)
        checked += 1
    assert checked == len(list(m.torch_model.parameters()))


@pytest.mark.parametrize("name", ["llama-gqa", "gemma2", "gptj"])
def test_lora_gradients_match_peft(tiny, tmp_path, name):
    from peft import PeftModel

    m = tiny(name)
    model = m.load()
    adapters = lora.init(model.config, jax.random.key(1), rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj"))
    # B starts at zero, which would leave A's gradient zero: give both non-zero values.
    leaves, treedef = jax.tree.flatten(adapters.weights)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    adapters = adapters.replace(
        weights=jax.tree.unflatten(
            treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        )
    )
    data = batch(model.config.vocab_size, seed=1)
    grads = jax.grad(lambda w: jax_loss(model.params, model.config, data, adapters.replace(weights=w)))(
        adapters.weights
    )
    export_peft(adapters, model.config, tmp_path / "values")
    export_peft(adapters.replace(weights=grads), model.config, tmp_path / "grads")
    ours = load_file(str(tmp_path / "grads" / "adapter_model.safetensors"))

    reference = PeftModel.from_pretrained(copy.deepcopy(m.torch_model), tmp_path / "values", is_trainable=True)
    torch_loss(reference, data).backward()
    theirs = {n.replace(".default", ""): p.grad.numpy() for n, p in reference.named_parameters() if p.requires_grad}
    assert sorted(theirs) == sorted(ours) and len(ours) == 2 * 3 * model.config.num_layers
    for key, grad in theirs.items():
        assert_close(ours[key], grad, key)


@pytest.mark.parametrize("name", ["llama-gqa", "gemma", "gpt2"])
def test_input_embedding_gradients_match_torch(tiny, name):
    """Saliency: the gradient with respect to the input embeddings (before Gemma's scale, GPT-2's positions), which
    a tied head does not mix into."""
    m = tiny(name)
    model = m.load()
    data = batch(model.config.vocab_size, seed=2)
    embeds = jaxlora.embed(model.params, model.config, data["input_ids"])
    ours = jax.grad(lambda e: jax_loss(model.params, model.config, data, inputs_embeds=e))(embeds)
    reference = copy.deepcopy(m.torch_model)
    theirs = reference.get_input_embeddings()(torch.tensor(data["input_ids"])).detach().requires_grad_()
    torch_loss(reference, data, inputs_embeds=theirs).backward()
    assert_close(np.asarray(ours), theirs.grad.numpy(), "inputs_embeds")
    # The same logits either way in.
    np.testing.assert_array_equal(
        np.asarray(jaxlora.forward(model.params, model.config, inputs_embeds=embeds)),
        np.asarray(jaxlora.forward(model.params, model.config, data["input_ids"])),
    )


def test_token_loss_equals_torch_cross_entropy(tiny):
    """The training loss: next-token cross-entropy over the targets whose loss_mask is 1, that are real tokens and
    that a real token predicts (a left-padded row's first token is not a target), summed, with its token count."""
    m = tiny("llama-gqa")
    model = m.load()
    data = batch(model.config.vocab_size, seed=3)
    mask = np.ones_like(data["input_ids"])
    mask[1, :4] = 0  # left padding
    total, count = token_loss(model.params, model.config, {**data, "attention_mask": mask})
    ids, attn = torch.tensor(data["input_ids"], dtype=torch.long), torch.tensor(mask)
    with torch.no_grad():
        logits = m.torch_model(ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").numpy()
    weight = data["loss_mask"][:, 1:] * mask[:, 1:] * mask[:, :-1]
    assert float(count) == weight.sum() > 0
    assert float(total) == pytest.approx(float((nll * weight).sum()), rel=1e-5)


@pytest.mark.parametrize("grouped", [False, True], ids=["total", "per-sequence"])
@pytest.mark.parametrize(
    "vocab_major, softcap, use_bias", [(True, None, False), (False, None, True), (True, 3.0, False), (False, 3.0, True)]
)
def test_chunked_head_loss_equals_the_full_logits(monkeypatch, vocab_major, softcap, use_bias, grouped):
    """The training loss's vocabulary projection in chunks (with a ragged last chunk): its value and its gradients
    with respect to the hidden states, the head and its bias equal those of the whole [rows, vocab] logits. Grouped:
    the per-sequence sums preference losses use, through a nonlinear function of them (each group's cotangent
    differs, and groups straddle chunks)."""
    from jaxlora import losses

    rows, width, vocab = 37, 24, 50
    monkeypatch.setattr(losses, "HEAD_CHUNK_LOGITS", 16 * vocab)  # chunks of 16 rows: 37 = 16 + 16 + 5
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (rows, width))
    weight = jax.random.normal(keys[1], (vocab, width) if vocab_major else (width, vocab))
    bias = jax.random.normal(keys[2], (vocab,)) if use_bias else None
    targets = jnp.asarray(random_ids((rows,), vocab, seed=4))
    weights = jnp.asarray(np.random.default_rng(5).integers(0, 2, rows), jnp.float32)

    def full(h, w, b):
        logits = h @ (w.T if vocab_major else w) + (0.0 if b is None else b)
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=-1)[:, 0]
        if grouped:
            return of_groups(jax.ops.segment_sum(-(weights * picked), groups, 5))
        return -(weights * picked).sum()

    groups = jnp.arange(rows) // 8  # 5 groups: 8, 8, 8, 8 and 5 rows
    scales = jnp.asarray([1.0, -2.0, 0.5, 3.0, -1.0])

    def of_groups(sums):
        return jnp.sum(scales * jnp.sin(sums / 4))

    def chunked(h, w, b):
        options = dict(vocab_major=vocab_major, softcap=softcap)
        if grouped:
            return of_groups(
                losses.head_cross_entropy(h, w, b, targets, weights, groups=groups, num_groups=5, **options)
            )
        return losses.head_cross_entropy(h, w, b, targets, weights, **options)

    argnums = (0, 1, 2) if use_bias else (0, 1)
    want_value, want_grads = jax.value_and_grad(full, argnums)(hidden, weight, bias)
    got_value, got_grads = jax.value_and_grad(chunked, argnums)(hidden, weight, bias)
    assert abs(float(got_value) - float(want_value)) <= 1e-5 * abs(float(want_value))
    for name, got, want in zip(("hidden", "head", "bias"), got_grads, want_grads, strict=False):
        assert_close(np.asarray(got), np.asarray(want), name)
    assert float(jax.jit(chunked)(hidden, weight, bias)) == pytest.approx(float(want_value), rel=1e-5)
