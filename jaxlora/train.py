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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora.config import ModelConfig
from jaxlora.losses import PreferenceConfig, head_cross_entropy, next_token_logprobs, preference_loss
from jaxlora.model import apply_decoder, default_positions, run_decoder, segment_positions
from jaxlora.quant import dequantize, is_quantized, map_floats


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


def real_targets(batch: dict) -> jax.Array:
    """[rows, seq - 1] bool: position t's prediction of token t + 1 is a real one, made from a real token of the
    same document (in a left-padded row the last padding slot would otherwise "predict" the first real token)."""
    mask = batch["attention_mask"].astype(bool)
    real = mask[:, 1:] & mask[:, :-1]
    segments = batch.get("segment_ids")
    return real if segments is None else real & (segments[:, 1:] == segments[:, :-1])


def target_weights(batch: dict) -> jax.Array:
    """[rows, seq - 1] float32: 1 for the targets the loss counts (real ones that loss_mask asks for)."""
    return (real_targets(batch) & batch["loss_mask"][:, 1:].astype(bool)).astype(jnp.float32)


def _next_token_nll(params, config, batch, weights, lora, remat, dtype, key, groups=None, num_groups=None):
    """sum(weights * -log p(next token)) over a [rows, seq] micro-batch: one scalar, or [num_groups] sums with
    groups [rows, seq - 1] int32. Packed rows (segment_ids) keep each document to itself."""
    if dtype is not None:
        params = map_floats(lambda p: p.astype(dtype), params)
    ids = batch["input_ids"]
    mask = batch["attention_mask"].astype(bool)
    segments = batch.get("segment_ids")
    positions = default_positions(mask) if segments is None else segment_positions(segments, mask)
    options = dict(lora=lora, dropout_key=key, remat=remat, segment_ids=segments)
    if lora is not None and "lm_head" in lora.config.targets:  # an adapted head: project it as the model does
        logits, _ = apply_decoder(params, config, ids, positions, mask, **options)
        nll = -next_token_logprobs(logits, ids) * weights
        return nll.sum() if groups is None else jax.ops.segment_sum(nll.reshape(-1), groups.reshape(-1), num_groups)
    hidden, _, _ = run_decoder(params, config, ids, positions, mask, project=False, **options)
    if config.logits_divisor != 1.0:  # Granite: (h @ W) / s computed as (h / s) @ W (its head has no bias)
        hidden = (hidden.astype(jnp.float32) / config.logits_divisor).astype(hidden.dtype)
    tied = config.tie_word_embeddings
    head = params["embed"]["embedding"] if tied else params["lm_head"]["kernel"]
    bias = None if tied else params["lm_head"].get("bias")
    vocab_major = tied
    if is_quantized(head):  # stored [vocab, hidden] either way
        head, vocab_major = dequantize(head, hidden.dtype), True
    return head_cross_entropy(
        hidden[:, :-1].reshape(-1, hidden.shape[-1]),
        head,
        bias,
        ids[:, 1:].reshape(-1),
        weights.reshape(-1),
        vocab_major=vocab_major,
        softcap=config.final_softcap,
        groups=None if groups is None else groups.reshape(-1),
        num_groups=num_groups,
    )


def token_loss(params, config: ModelConfig, batch: dict, lora=None, remat: bool = False, dtype=None, key=None):
    """Summed next-token cross-entropy and the number of target tokens, for one [batch, seq] micro-batch.

    key: a PRNG key turns LoRA dropout on (training); None is deterministic (evaluation).
    """
    weights = target_weights(batch)
    return _next_token_nll(params, config, batch, weights, lora, remat, dtype, key), weights.sum()


class SequenceLogprobs(NamedTuple):
    """Per row of a micro-batch [rows]: summed log-probs of the response (the loss_mask targets) and of the rest of
    the real targets (the prompt after its first token), and how many tokens each sum covers."""

    response: jax.Array
    rest: jax.Array
    response_tokens: jax.Array
    rest_tokens: jax.Array


def sequence_logprobs(
    params, config: ModelConfig, batch: dict, lora=None, remat: bool = False, dtype=None, key=None
) -> SequenceLogprobs:
    """Each row's log-likelihood, split into response and prompt, with one pass through the vocabulary projection
    (the chunked head loss summing per group: row r's response is group r, its prompt group rows + r)."""
    rows = batch["input_ids"].shape[0]
    real = real_targets(batch)
    response = target_weights(batch).astype(bool)
    row = jnp.arange(rows, dtype=jnp.int32)[:, None]
    groups = jnp.where(response, row, rows + row)
    nll = _next_token_nll(params, config, batch, real.astype(jnp.float32), lora, remat, dtype, key, groups, 2 * rows)
    response_tokens = response.sum(axis=1, dtype=jnp.float32)
    return SequenceLogprobs(
        -nll[:rows], -nll[rows:], response_tokens, real.sum(axis=1, dtype=jnp.float32) - response_tokens
    )


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


PREFERENCE_METRICS = ("reward_margin", "chosen_logps", "rejected_logps", "accuracy", "tokens")


def preference_batch_loss(
    preference: PreferenceConfig,
    params,
    config: ModelConfig,
    batch: dict,
    lora=None,
    reference_params=None,
    *,
    remat: bool = False,
    dtype=None,
    key=None,
    pairs_total=None,
    chosen_tokens_total=None,
) -> tuple[jax.Array, dict]:
    """The preference loss of one micro-batch of pairs and its metrics.

    batch: {"input_ids", "attention_mask", "loss_mask"} [2 * pairs, seq]: rows [0, pairs) the chosen sequences,
    rows [pairs, 2 * pairs) the rejected ones, loss_mask on each response. reference_params: the frozen model the
    log-ratios are taken against (dpo, ipo), run without adapters: with LoRA it is the base itself, no second copy.
    pairs_total / chosen_tokens_total: what the step averages over (default: this batch's pairs and the real
    targets of its chosen rows), so micro-batches of one step add up to the step's mean.
    Returns (loss, metrics): metrics hold sums over this batch divided by pairs_total: "reward_margin",
    "chosen_logps", "rejected_logps" (summed over each response), "accuracy" (the chosen reward beats the
    rejected), and "tokens" (response tokens, a plain count).
    """
    pairs = batch["input_ids"].shape[0] // 2
    pairs_total = pairs if pairs_total is None else pairs_total
    seq = sequence_logprobs(params, config, batch, lora, remat, dtype, key)
    ref_chosen = ref_rejected = None
    if preference.needs_reference:
        ref = jax.lax.stop_gradient(sequence_logprobs(reference_params, config, batch, None, False, dtype).response)
        ref_chosen, ref_rejected = ref[:pairs], ref[pairs:]
    chosen, rejected = seq.response[:pairs], seq.response[pairs:]
    losses, chosen_reward, rejected_reward = preference_loss(
        preference,
        chosen,
        rejected,
        seq.response_tokens[:pairs],
        seq.response_tokens[pairs:],
        ref_chosen,
        ref_rejected,
    )
    loss = losses.sum() / pairs_total
    if preference.objective == "orpo":  # its SFT term: the chosen sequences' token-mean NLL, prompt included (TRL's)
        chosen_all = -(seq.response[:pairs] + seq.rest[:pairs]).sum()
        if chosen_tokens_total is None:
            chosen_tokens_total = (seq.response_tokens[:pairs] + seq.rest_tokens[:pairs]).sum()
        loss = loss + chosen_all / jnp.maximum(chosen_tokens_total, 1.0)
    metrics = {  # PREFERENCE_METRICS
        "reward_margin": (chosen_reward - rejected_reward).sum() / pairs_total,
        "chosen_logps": chosen.sum() / pairs_total,
        "rejected_logps": rejected.sum() / pairs_total,
        "accuracy": (chosen_reward > rejected_reward).sum() / pairs_total,
        "tokens": seq.response_tokens.sum(),
    }
    return loss, metrics


def make_train_step(
    base_params,
    config: ModelConfig,
    optimizer: optax.GradientTransformation,
    *,
    full: bool = False,
    remat: bool = False,
    dtype=None,
    preference: PreferenceConfig | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """train_step(state, batch) -> (state, metrics): one optimizer step, jitted.

    state: from `init_state`; it is donated (its buffers are reused for the new state: keep using the returned
    one). batch: {"input_ids", "attention_mask", "loss_mask"}, each [grad_accum, batch, seq] int32 (the gradient
    is accumulated over the leading axis, averaged over the loss-mask tokens of all of it); loss_mask marks the
    tokens that are targets. metrics: {"loss", "tokens", "grad_norm"}, scalars of the step.
    The base params are an argument of the compiled function (not a constant baked into it) and are never updated
    when training adapters; `full=True` trains the params themselves. remat recomputes each layer in the backward
    pass; dtype casts the compute (params stay float32).

    preference: a `PreferenceConfig` trains on pairs instead (see `preference_batch_loss` for the batch layout:
    each micro-batch's first half chosen, second half rejected); the loss is averaged over the step's pairs, the
    reference for dpo/ipo is `base_params` without adapters, and metrics add "reward_margin", "chosen_logps",
    "rejected_logps" and "accuracy"."""

    metric_names = ("tokens",) if preference is None else PREFERENCE_METRICS

    def sft_normalizers(batch):
        return {"tokens": jnp.maximum(jax.vmap(lambda b: target_weights(b).sum())(batch).sum(), 1.0)}

    def preference_normalizers(batch):
        accum, rows = batch["input_ids"].shape[:2]
        chosen = jax.tree.map(lambda x: x[:, : rows // 2], batch)
        return {"pairs": accum * (rows // 2), "chosen": jax.vmap(lambda b: real_targets(b).sum())(chosen).sum()}

    def objective(params, lora, base, micro_batch, key, norms):
        """(this micro-batch's share of the step's loss, its metric sums)."""
        if preference is None:
            total, count = token_loss(params, config, micro_batch, lora, remat, dtype, key)
            return total / norms["tokens"], {"tokens": count}
        return preference_batch_loss(
            preference,
            params,
            config,
            micro_batch,
            lora,
            base,
            remat=remat,
            dtype=dtype,
            key=key,
            pairs_total=norms["pairs"],
            chosen_tokens_total=norms["chosen"].astype(jnp.float32),
        )

    @partial(jax.jit, donate_argnums=(1,))
    def step(base, state: TrainState, batch: dict):
        key, step_key = jax.random.split(state.key)
        norms = sft_normalizers(batch) if preference is None else preference_normalizers(batch)

        def micro(carry, inputs):
            micro_batch, index = inputs

            def loss_of(trainable):
                params, lora = (trainable, None) if full else (base, trainable)
                return objective(params, lora, base, micro_batch, jax.random.fold_in(step_key, index), norms)

            (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.trainable)
            grad_sum, sums = carry
            sums = jax.tree.map(jnp.add, sums, {"loss": loss, **metrics})
            return (jax.tree.map(jnp.add, grad_sum, grads), sums), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        accum = jax.tree.leaves(batch)[0].shape[0]
        start = {name: jnp.zeros((), jnp.float32) for name in ("loss", *metric_names)}
        (grads, sums), _ = jax.lax.scan(micro, (zeros, start), (batch, jnp.arange(accum)))
        # Each micro-batch's loss is its share of the step's mean (over every target token, or every pair).
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {**sums, "grad_norm": optax.global_norm(grads)}
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


@partial(jax.jit, static_argnames=("preference", "config", "dtype"))
def _eval_pairs(preference, params, config, batch, lora=None, reference_params=None, dtype=None):
    return preference_batch_loss(preference, params, config, batch, lora, reference_params, dtype=dtype)


def eval_preference(
    preference: PreferenceConfig, params, config: ModelConfig, batches, lora=None, reference_params=None, dtype=None
) -> dict:
    """Mean preference loss, reward margin and accuracy over an iterable of [2 * pairs, seq] micro-batches."""
    sums, pairs = {"loss": 0.0, "reward_margin": 0.0, "accuracy": 0.0}, 0
    for batch in batches:
        n = batch["input_ids"].shape[0] // 2
        loss, metrics = _eval_pairs(preference, params, config, batch, lora, reference_params, dtype)
        for name, value in (
            ("loss", loss),
            ("reward_margin", metrics["reward_margin"]),
            ("accuracy", metrics["accuracy"]),
        ):
            sums[name] += float(value) * n
        pairs += n
    return {name: total / max(pairs, 1) for name, total in sums.items()} | {"pairs": pairs}
