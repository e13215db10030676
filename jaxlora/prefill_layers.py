"""Prefill as one small compiled program per kind of layer, called layer by layer from the host.

`decoding.prefill` is one program over every layer: XLA traces, compiles (or reads from the compile cache) and
sets up thirty copies of the same layer before the first token. Here the host runs three programs: the layer
inputs (embedding, rotary tables), one program per kind of layer (`stacking.layer_kind`: SmolLM2 has one kind,
so its thirty layers run one program thirty times, each updating its own cache buffers in place), and the head
with the first token's sampling. The state it returns equals `prefill`'s. What it saves is the first call in a
process: measured on SmolLM2, batch 1, 64 tokens, a second process (compile cache warm) reaches its first token
in about a quarter of the time; a warm call runs the same matmuls, plus one dispatch per layer.

`jaxlora.generate`/`stream` and chat use it where it applies (`applies`): one device, the unrolled layout, with or
without adapters (one adapter set, or a bank's per-row selection). `decoding.prefill` stays the one to call inside
a caller's own `jax.jit`.
"""

from __future__ import annotations

import jax

from jaxlora.cache import KVCache, LayerCache
from jaxlora.config import LoraConfig, ModelConfig
from jaxlora.decoding import STATIC, DecodeState, prefilled_state
from jaxlora.executables import stored_jit
from jaxlora.lora import Adapters
from jaxlora.model import Block, Decoder, default_positions
from jaxlora.quant import dequantized_in_order, one_row
from jaxlora.sampling import Processors, SamplingArrays
from jaxlora.sharding import DecodeLayout
from jaxlora.stacking import layer_kind


def applies(config: ModelConfig, input_ids, lora: Adapters | None, layout: DecodeLayout | None) -> bool:
    """Whether `prefill_by_layer` covers this call: the unrolled layout (of the params and of any adapters) on one
    device and a prompt of more than one token (a one-token step reads quantized weights the decode loop's way)."""
    per_layer = not config.scan_layers and (lora is None or not lora.stacks)
    return per_layer and layout is None and not one_row(input_ids.shape)


def prefill_by_layer(
    params,
    cache: KVCache,
    input_ids,
    attention_mask,
    keys,
    sampling: SamplingArrays,
    lora: Adapters | None = None,
    *,
    config: ModelConfig,
    processors: Processors,
    stop_ids: tuple[int, ...],
    layout: DecodeLayout | None = None,
    score_top: int | None = None,
) -> DecodeState:
    """`decoding.prefill` (one device, the unrolled layout) run layer by layer: the same DecodeState. `cache` is
    consumed (its buffers are donated to the layer programs); lora: unmerged adapters (per layer) or None."""
    outer = _outside_layers({"params": params} if lora is None else {"params": params, "lora": lora.weights})
    lora_config = None if lora is None else lora.config
    x, inputs, local_inputs, positions = _layer_inputs(outer, cache.key_valid, input_ids, attention_mask, config)
    buffers = list(zip(cache.keys, cache.values, strict=True))
    for i in range(config.num_layers):
        name, windowed = f"layers_{i}", config.layer_windows[i] is not None
        variables = {"params": params[name]}
        if lora is not None:
            variables["lora"] = lora.weights.get(name, {})
        x, buffers[i] = _layer(
            variables, x, local_inputs if windowed else inputs, buffers[i], config, lora_config, _kind_index(config, i)
        )
    keys_, values = zip(*buffers, strict=True)
    return _head(
        outer,
        lora_config,
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


def _outside_layers(variables: dict) -> dict:
    """The variables of everything but the layers (embeddings, final norm, head)."""
    return {
        kind: {name: tree for name, tree in trees.items() if not name.startswith("layers_")}
        for kind, trees in variables.items()
    }


def _kind_index(config: ModelConfig, index: int) -> int:
    """The first layer of `index`'s kind: every layer of a kind runs that layer's program."""
    kind = layer_kind(config, index)
    return next(i for i in range(index + 1) if layer_kind(config, i) == kind)


@stored_jit(static_argnums=(4,), donate_argnums=(1,))
def _layer_inputs(outer, key_valid, input_ids, attention_mask, config: ModelConfig):
    positions = default_positions(attention_mask)
    key_valid = jax.lax.dynamic_update_slice(key_valid, attention_mask, (0, 0))
    x, inputs, local_inputs = Decoder(config).apply(
        {"params": outer["params"]}, input_ids, positions, key_valid, method=Decoder.layer_inputs
    )
    return x, inputs, local_inputs, positions


@stored_jit(static_argnums=(4, 5, 6), donate_argnums=(3,))
def _layer(variables, x, inputs, buffers, config: ModelConfig, lora: LoraConfig | None, index: int):
    """A layer's block (any layer of `index`'s kind: `index` names the kind) on x, its variables {"params", and
    "lora" with adapters}, writing the prompt's keys and values into `buffers` (keys, values) from slot 0."""
    inputs = inputs._replace(write_index=0)  # a constant, as in `prefill`
    block = Block(config, config.layer_windows[index], lora, index=index)
    with dequantized_in_order():
        x, cache = block.apply(variables, x, inputs, LayerCache(*buffers))
    return x, (cache.keys, cache.values)


@stored_jit(static_argnames=(*STATIC, "lora"), donate_argnames=("cache",))
def _head(
    outer,
    lora: LoraConfig | None,
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
    logits = Decoder(config, lora).apply(outer, x, input_ids.shape[1] - 1, method=Decoder.head)
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
