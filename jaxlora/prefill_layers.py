"""Prefill as one small compiled program per kind of layer, called layer by layer from the host.

`decoding.prefill` is one program over every layer: XLA traces, compiles (or reads from the compile cache) and
sets up thirty copies of the same layer before the first token. Here the host runs three programs: the layer
inputs (embedding, rotary tables), one program per kind of layer (`stacking.layer_kind`: SmolLM2 has one kind,
so its thirty layers run one program thirty times, each updating its own cache buffers in place), and the head
with the first token's sampling. The state it returns equals `prefill`'s. What it saves is the first call in a
process: measured on SmolLM2, batch 1, 64 tokens, a second process (compile cache warm) reaches its first token
in about a quarter of the time; a warm call runs the same matmuls, plus one dispatch per layer.

`jaxlora.generate`/`stream` use it where it applies (`applies`): one device, no adapters, the unrolled layout.
`decoding.prefill` stays the one to call inside a caller's own `jax.jit`.
"""

from __future__ import annotations

from functools import partial

import jax

from jaxlora.cache import KVCache, LayerCache
from jaxlora.config import ModelConfig
from jaxlora.decoding import STATIC, DecodeState, prefilled_state
from jaxlora.model import Block, Decoder, default_positions
from jaxlora.quant import dequantized_in_order, one_row
from jaxlora.sampling import Processors, SamplingArrays
from jaxlora.sharding import DecodeLayout
from jaxlora.stacking import layer_kind


def applies(config: ModelConfig, input_ids, lora, layout: DecodeLayout | None) -> bool:
    """Whether `prefill_by_layer` covers this call: the unrolled layout on one device, no adapters, and a prompt
    of more than one token (a one-token step reads quantized weights the decode loop's way)."""
    return not config.scan_layers and lora is None and layout is None and not one_row(input_ids.shape)


def prefill_by_layer(
    params,
    cache: KVCache,
    input_ids,
    attention_mask,
    keys,
    sampling: SamplingArrays,
    *,
    config: ModelConfig,
    processors: Processors,
    stop_ids: tuple[int, ...],
    layout: DecodeLayout | None = None,
    score_top: int | None = None,
) -> DecodeState:
    """`decoding.prefill` (no adapters, one device) run layer by layer: the same DecodeState. `cache` is
    consumed (its buffers are donated to the layer programs)."""
    outer = {name: tree for name, tree in params.items() if not name.startswith("layers_")}
    x, inputs, local_inputs, positions = _layer_inputs(outer, cache.key_valid, input_ids, attention_mask, config)
    buffers = list(zip(cache.keys, cache.values, strict=True))
    for i in range(config.num_layers):
        windowed = config.layer_windows[i] is not None
        x, buffers[i] = _layer(
            params[f"layers_{i}"], x, local_inputs if windowed else inputs, buffers[i], config, _kind_index(config, i)
        )
    keys_, values = zip(*buffers, strict=True)
    return _head(
        outer,
        x,
        KVCache(tuple(keys_), tuple(values), inputs.key_valid),
        input_ids,
        attention_mask,
        positions,
        keys,
        sampling,
        config=config,
        processors=processors,
        stop_ids=stop_ids,
        layout=layout,
        score_top=score_top,
    )


def _kind_index(config: ModelConfig, index: int) -> int:
    """The first layer of `index`'s kind: every layer of a kind runs that layer's program."""
    kind = layer_kind(config, index)
    return next(i for i in range(index + 1) if layer_kind(config, i) == kind)


@partial(jax.jit, static_argnums=(4,), donate_argnums=(1,))
def _layer_inputs(outer, key_valid, input_ids, attention_mask, config: ModelConfig):
    positions = default_positions(attention_mask)
    key_valid = jax.lax.dynamic_update_slice(key_valid, attention_mask, (0, 0))
    x, inputs, local_inputs = Decoder(config).apply(
        {"params": outer}, input_ids, positions, key_valid, method=Decoder.layer_inputs
    )
    return x, inputs, local_inputs, positions


@partial(jax.jit, static_argnums=(4, 5), donate_argnums=(3,))
def _layer(layer_params, x, inputs, buffers, config: ModelConfig, index: int):
    """Layer `index`'s block (any layer of its kind: `index` names the kind) on x, writing the prompt's keys and
    values into `buffers` (keys, values) from slot 0."""
    inputs = inputs._replace(write_index=0)  # a constant, as in `prefill`
    block = Block(config, config.layer_windows[index], None, index=index)
    with dequantized_in_order():
        x, cache = block.apply({"params": layer_params}, x, inputs, LayerCache(*buffers))
    return x, (cache.keys, cache.values)


@partial(jax.jit, static_argnames=STATIC, donate_argnames=("cache",))
def _head(
    outer,
    x,
    cache: KVCache,
    input_ids,
    attention_mask,
    positions,
    keys,
    sampling: SamplingArrays,
    *,
    config: ModelConfig,
    processors: Processors,
    stop_ids: tuple[int, ...],
    layout: DecodeLayout | None,
    score_top: int | None,
) -> DecodeState:
    logits = Decoder(config).apply({"params": outer}, x, input_ids.shape[1] - 1, method=Decoder.head)
    return prefilled_state(
        cache,
        logits[:, 0],
        input_ids,
        attention_mask,
        positions,
        keys,
        sampling,
        config,
        processors,
        stop_ids,
        layout,
        score_top,
    )
