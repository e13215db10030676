"""Fine-tuning: one jitted pure step, `train_step(state, batch) -> (state, metrics)`, over LoRA adapters (the
base params stay frozen and out of the optimizer) or over all params (`full=True`).

A batch is {"input_ids", "attention_mask", "loss_mask"} int32 [grad_accum, micro_batch, seq], and for packed rows
"segment_ids" (each document its own id: it attends only to itself, its positions restart at 0, and its first
token is no target of the document before it): the step scans
over the leading axis summing gradients, then applies one optax AdamW update (warmup + cosine decay, global-norm
clipping). The loss is next-token cross-entropy on the tokens whose loss_mask is 1.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora.config import ModelConfig
from jaxlora.losses import head_cross_entropy, next_token_logprobs
from jaxlora.model import apply_decoder, default_positions, run_decoder, segment_positions


@struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any  # lora.Adapters, or the params themselves for full fine-tuning
    opt_state: Any
    key: jax.Array


def make_optimizer(
    learning_rate: float, total_steps: int, *, warmup_steps: int = 0, weight_decay: float = 0.0, clip_norm: float = 1.0
) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay to 10% of the peak, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(warmup_steps, 0), max(total_steps, warmup_steps + 1), end_value=0.1 * learning_rate
    )
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))


def token_loss(params, config: ModelConfig, batch: dict, lora=None, remat: bool = False, dtype=None, key=None):
    """Summed next-token cross-entropy and the number of target tokens, for one [batch, seq] micro-batch.

    key: a PRNG key turns LoRA dropout on (training); None is deterministic (evaluation).
    """
    if dtype is not None:
        params = jax.tree.map(lambda p: p.astype(dtype), params)
    ids = batch["input_ids"]
    mask = batch["attention_mask"].astype(bool)
    # Position t predicts token t + 1; count only targets that are real and asked for, predicted from a real token
    # (in a left-padded row the last padding slot would otherwise "predict" the first real token).
    weight = batch["loss_mask"][:, 1:] * mask[:, 1:] * mask[:, :-1]
    segments = batch.get("segment_ids")
    if segments is None:
        positions = default_positions(mask)
    else:  # packed documents: none attends to or predicts across its neighbour, positions restart at each
        positions = segment_positions(segments, mask)
        weight = weight * (segments[:, 1:] == segments[:, :-1])
    weight = weight.astype(jnp.float32)
    options = dict(lora=lora, dropout_key=key, remat=remat, segment_ids=segments)
    if lora is not None and "lm_head" in lora.config.targets:  # an adapted head: project it as the model does
        logits, _ = apply_decoder(params, config, ids, positions, mask, **options)
        return -(next_token_logprobs(logits, ids) * weight).sum(), weight.sum()
    hidden, _, _ = run_decoder(params, config, ids, positions, mask, project=False, **options)
    tied = config.tie_word_embeddings
    head = params["embed"]["embedding"] if tied else params["lm_head"]["kernel"]
    bias = None if tied else params["lm_head"].get("bias")
    total = head_cross_entropy(
        hidden[:, :-1].reshape(-1, hidden.shape[-1]),
        head,
        bias,
        ids[:, 1:].reshape(-1),
        weight.reshape(-1),
        vocab_major=tied,
        softcap=config.final_softcap,
    )
    return total, weight.sum()


def _owned(x: jax.Array, home: jax.sharding.Sharding) -> jax.Array:
    """A fresh copy of x, committed: to x's own devices, or to `home` where x is not yet committed to any."""
    where = x.sharding if x.committed else home
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.device_put(jax.random.clone(x), where)
    return jax.device_put(jnp.copy(x), where)


def init_state(trainable, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """The training state for `make_train_step`: step 0, `trainable` (LoRA adapters, or the params for full
    fine-tuning), the optimizer's state and a PRNG key for dropout.

    Every array in it is a fresh copy committed to its devices: the train step donates the state, so the caller's
    `trainable` and `key` stay usable, and step 0 runs the same compiled program as every later step (an
    uncommitted input would compile a second one).
    """
    state = TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), key)
    # Scalars (the step, optimizer counters) go where the trainable arrays are: replicated over their mesh.
    first = jax.tree.leaves(trainable)[0].sharding
    home = NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first
    return jax.tree.map(lambda x: _owned(x, home), state)


def make_train_step(
    base_params,
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    *,
    full: bool = False,
    remat: bool = False,
    dtype=None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """train_step(state, batch) -> (state, metrics): one optimizer step, jitted.

    state: from `init_state`; it is donated (its buffers are reused for the new state: keep using the returned
    one). batch: {"input_ids", "attention_mask", "loss_mask"}, each [grad_accum, batch, seq] int32 (the gradient
    is accumulated over the leading axis, averaged over the loss-mask tokens of all of it); loss_mask marks the
    tokens that are targets. metrics: {"loss", "tokens", "grad_norm"}, scalars of the step.
    The base params are an argument of the compiled function (not a constant baked into it) and are never updated
    when training adapters; `full=True` trains the params themselves. remat recomputes each layer in the backward
    pass; dtype casts the compute (params stay float32)."""

    @partial(jax.jit, donate_argnums=(1,))
    def step(base, state: TrainState, batch: dict):
        key, step_key = jax.random.split(state.key)

        def micro(carry, inputs):
            micro_batch, index = inputs

            def loss_of(trainable):
                params, lora = (trainable, None) if full else (base, trainable)
                return token_loss(params, config, micro_batch, lora, remat, dtype, jax.random.fold_in(step_key, index))

            (total, count), grads = jax.value_and_grad(loss_of, has_aux=True)(state.trainable)
            grad_sum, loss_sum, count_sum = carry
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + total, count_sum + count), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        accum = jax.tree.leaves(batch)[0].shape[0]
        (grads, loss_sum, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), (batch, jnp.arange(accum)))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)  # mean over every target token of the whole step
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss_sum / count, "tokens": count, "grad_norm": optax.global_norm(grads)}
        return TrainState(state.step + 1, trainable, opt_state, key), metrics

    return lambda state, batch: step(base_params, state, batch)


@partial(jax.jit, static_argnames=("config", "dtype"))
def _eval_batch(params, config, batch, lora=None, dtype=None):
    return token_loss(params, config, batch, lora, False, dtype)


def eval_loss(params, config: ModelConfig, batches, lora=None, dtype=None) -> dict:
    """Mean token loss and perplexity over an iterable of [batch, seq] micro-batches."""
    total, count = 0.0, 0.0
    for batch in batches:
        loss, n = _eval_batch(params, config, batch, lora, dtype)
        total, count = total + float(loss), count + float(n)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": float(jnp.exp(loss)), "tokens": count}
