"""A mutation check: small deliberate bugs in important behaviour, each of which the test suite must catch.

Each mutant edits a temporary copy of the project (the package, tests and scripts; never this checkout), then runs
the test files that should notice it (a fast subset, stopping at the first failure). A mutant that leaves those
tests green survived: the tests do not guard that behaviour. Prints a table and the caught count; exits non-zero
if any mutant survived.

    python scripts/mutants.py [--only NAME_SUBSTRING] [--list]     (also: make mutants)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # under jaxlora/
    edits: tuple[tuple[str, str], ...]  # (old, new): each old must occur exactly once in the file
    tests: tuple[str, ...]  # pytest arguments: the tests that should catch it


def m(name: str, file: str, old: str, new: str, *tests: str) -> Mutant:
    return Mutant(name, file, ((old, new),), tests)


PARITY = "tests/test_parity.py"
MUTANTS = [
    # Where auto attention turns chunked.
    m(
        "auto attention keeps xla at exactly 128 x 128 scores",
        "attention.py",
        "q_len * k_len >= threshold",
        "q_len * k_len > threshold",
        "tests/test_attention.py",
    ),
    # Blocks split the queries in two at least, so the causal mask skips blocks.
    m(
        "attention blocks may cover every query",
        "attention.py",
        "or 2 * side > q_len)",
        ")",
        "tests/test_attention.py",
    ),
    # Long prompts keep blocks large enough for at most MAX_QUERY_BLOCKS query blocks.
    m(
        "attention blocks shrink however many query blocks that makes",
        "attention.py",
        "while floor < MAX_BLOCK and floor * MAX_QUERY_BLOCKS < q_len:",
        "while False:",
        "tests/test_attention.py",
    ),
    # The model's own param shape check (in place of flax's, which traced every initializer).
    m(
        "a stored param's shape is not checked",
        "model.py",
        "if not is_quantized(stored) and tuple(stored.shape) != tuple(shape):",
        "if False:",
        "tests/test_forward.py",
    ),
    # Sampling processors and their order.
    m(
        "repetition penalty: divide and multiply swapped",
        "sampling.py",
        "jnp.where(logits < 0, logits * p, logits / p)",
        "jnp.where(logits < 0, logits / p, logits * p)",
        "tests/test_sampling.py",
    ),
    m(
        "top-p keeps the boundary token (<= turned into <)",
        "sampling.py",
        "remove_sorted = cumulative <= (1 - top_p[:, None])",
        "remove_sorted = cumulative < (1 - top_p[:, None])",
        "tests/test_sampling.py",
    ),
    m(
        "top-k drops the ties at the k-th logit",
        "sampling.py",
        "(logits < kth)",
        "(logits <= kth)",
        "tests/test_sampling.py",
    ),
    m(
        "min-p relative to the mean, not the top probability",
        "sampling.py",
        "min_p[:, None] * probs.max(axis=-1, keepdims=True)",
        "min_p[:, None] * probs.mean(axis=-1, keepdims=True)",
        "tests/test_sampling.py",
    ),
    Mutant(
        "top-k applied after top-p",
        "sampling.py",
        (
            ("    if processors.top_k:\n        logits = apply_top_k(logits, params.top_k)\n", ""),
            (
                "    if processors.min_p:\n",
                "    if processors.top_k:\n        logits = apply_top_k(logits, params.top_k)\n"
                "    if processors.min_p:\n",
            ),
        ),
        ("tests/test_sampling.py",),
    ),
    m(
        "temperature applied to greedy rows too (divides by zero)",
        "sampling.py",
        "safe_temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)",
        "safe_temperature = params.temperature",
        "tests/test_generate.py",
        "-k",
        "mix_greedy",
    ),
    # The seen mask of the repetition penalty, inside generate.
    m(
        "decode never marks generated tokens as seen",
        "decoding.py",
        "seen=_mark_seen(state.seen, token, processors),",
        "seen=state.seen,",
        PARITY,
        "-k",
        "repetition",
    ),
    m(
        "prefill never marks the prompt's tokens as seen",
        "decoding.py",
        "seen=_mark_prompt_seen(seen, input_ids, attention_mask, processors),",
        "seen=seen,",
        PARITY,
        "-k",
        "repetition",
    ),
    # RoPE kinds.
    m(
        "rotate-half RoPE with the wrong sign",
        "rope.py",
        "first * cos - second * sin",
        "first * cos + second * sin",
        PARITY,
        "-k",
        "logits_match_transformers and llama-gqa",
    ),
    m(
        "interleaved RoPE (GPT-J, CodeGen) with the wrong sign",
        "rope.py",
        "odd * cos + even * sin",
        "odd * cos - even * sin",
        PARITY,
        "-k",
        "logits_match_transformers and (gptj or codegen)",
    ),
    m(
        "llama3 RoPE scales long wavelengths up, not down",
        "rope.py",
        "scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)",
        "scaled = np.where(wavelen > low_freq_wavelen, inv_freq * rope.factor, inv_freq)",
        "tests/test_rope.py",
    ),
    m(
        "YaRN and LongRoPE attention factor dropped",
        "rope.py",
        "if rope.attention_factor != 1.0:",
        "if False:",
        "tests/test_rope.py",
    ),
    m(
        "dynamic NTK exponent dim / (dim - 1)",
        "rope.py",
        "        dim / (dim - 2)\n",
        "        dim / (dim - 1)\n",
        PARITY,
        "-k",
        "dynamic",
    ),
    m(
        "partial rotary rotates the whole head",
        "rope.py",
        "rope_dim = 2 * cos.shape[-1]",
        "rope_dim = x.shape[-1]",
        PARITY,
        "-k",
        "logits_match_transformers and gpt_neox",
    ),
    # Windows and ring buffers.
    m(
        "sliding window one token wider (xla core)",
        "attention.py",
        "visible &= queries - keys < window",
        "visible &= queries - keys <= window",
        PARITY,
        "-k",
        "logits_match_transformers and mistral-window",
    ),
    m(
        "sliding window one token wider (chunked core)",
        "attention.py",
        "visible &= q_slots[:, None] - k_slots[None, :] < spec.window",
        "visible &= q_slots[:, None] - k_slots[None, :] <= spec.window",
        "tests/test_attention.py",
        "-k",
        "chunked_equals_reference",
    ),
    m(
        "ring buffer entries mapped one slot off",
        "cache.py",
        "return next_slot - 1 - jnp.mod(next_slot - 1 - jnp.arange(size), size)",
        "return next_slot - jnp.mod(next_slot - 1 - jnp.arange(size), size)",
        "tests/test_attention.py",
        "-k",
        "ring",
    ),
    # Soft-caps.
    m(
        "attention soft-cap without its scale",
        "attention.py",
        "scores = softcap * jnp.tanh(scores / softcap)",
        "scores = jnp.tanh(scores / softcap)",
        PARITY,
        "-k",
        "logits_match_transformers and gemma2",
    ),
    m(
        "final logit soft-cap dropped",
        "model.py",
        "if c.final_softcap is not None:",
        "if False:",
        PARITY,
        "-k",
        "logits_match_transformers and gemma2",
    ),
    # GQA mapping in every attention backend.
    m(
        "GQA: query heads grouped the wrong way (xla core)",
        "attention.py",
        "q = q.reshape(b, t, kv_heads, h // kv_heads, d)",
        "q = q.reshape(b, t, h // kv_heads, kv_heads, d).swapaxes(2, 3)",
        PARITY,
        "-k",
        "logits_match_transformers and llama-gqa",
    ),
    m(
        "GQA: query heads grouped the wrong way (chunked core)",
        "attention.py",
        "x = x.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)",
        "x = x.reshape(b, t, h // kv_heads, kv_heads, d).transpose(0, 3, 2, 1, 4)",
        "tests/test_attention.py",
        "-k",
        "chunked_equals_reference",
    ),
    # Norms and their offsets.
    m(
        "Gemma's (1 + w) norm computed in bfloat16",
        "model.py",
        "return (normed * (self.weight_offset + scale.astype(jnp.float32))).astype(x.dtype)",
        "return normed.astype(x.dtype) * (self.weight_offset + scale.astype(x.dtype))",
        "tests/test_forward.py",
        "-k",
        "norms",
    ),
    m(
        "Gemma's norm without the 1 + offset",
        "families/llama.py",
        "norm_weight_offset=1.0 if gemma else 0.0,",
        "norm_weight_offset=0.0,",
        PARITY,
        "-k",
        "logits_match_transformers and gemma",
    ),
    m(
        "LayerNorm variance not centred",
        "model.py",
        "jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + self.eps)",
        "jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)",
        PARITY,
        "-k",
        "logits_match_transformers and gpt2",
    ),
    # LoRA scaling and dropout.
    m(
        "LoRA update scaled by alpha instead of alpha / rank",
        "model.py",
        "b.astype(x.dtype), self.lora.scale)",
        "b.astype(x.dtype), self.lora.alpha)",
        "tests/test_lora.py",
    ),
    m(
        "LoRA backward: B's gradient unscaled",
        "model.py",
        "db = scale * jax.lax.dot_general(xa2, dy2, rows)",
        "db = jax.lax.dot_general(xa2, dy2, rows)",
        "tests/test_gradients.py",
        "-k",
        "lora_gradients",
    ),
    m(
        "LoRA backward: no gradient flows to the input through the adapter",
        "model.py",
        "dx = jnp.dot(dxa, a.T).reshape(x.shape)",
        "dx = jnp.zeros_like(x)",
        "tests/test_gradients.py",
        "-k",
        "lora_gradients",
    ),
    m(
        "rsLoRA scale alpha / rank",
        "config.py",
        "return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)",
        "return self.alpha / self.rank",
        "tests/test_lora.py",
    ),
    m(
        "LoRA dropout never acts in training",
        "model.py",
        "x = nn.Dropout(self.lora.dropout, deterministic=False)(x)\n            if a.ndim == 3",
        "x = nn.Dropout(self.lora.dropout, deterministic=True)(x)\n            if a.ndim == 3",
        "tests/test_lora.py",
        "-k",
        "dropout",
    ),
    # Loss masks.
    m(
        "loss mask shifted by one token",
        "train.py",
        'batch["loss_mask"][:, 1:].astype(bool)',
        'batch["loss_mask"][:, :-1].astype(bool)',
        "tests/test_gradients.py",
        "-k",
        "token_loss",
    ),
    m(
        "gradient accumulation averages each micro-batch, not the step's tokens",
        "train.py",
        'return total / norms["tokens"], {"tokens": count}',
        'return total / jnp.maximum(count, 1.0), {"tokens": count}',
        "tests/test_train.py",
        "-k",
        "accumulation",
    ),
    m(
        "chunked head loss drops the soft-cap's derivative",
        "losses.py",
        "return loss, dz if tanh is None else dz * (1 - tanh * tanh)",
        "return loss, dz",
        "tests/test_gradients.py",
        "-k",
        "chunked_head or param_gradients",
    ),
    m(
        "chunked head loss gives the head no gradient",
        "losses.py",
        "dw.astype(weight.dtype),",
        "jnp.zeros_like(weight),",
        "tests/test_gradients.py",
        "-k",
        "chunked_head or param_gradients",
    ),
    # Packed documents.
    m(
        "packed documents: the chunked core lets a document see the one before it",
        "attention.py",
        "        mask &= same_segment(q_segments, k_segments)\n",
        "        pass\n",
        "tests/test_attention.py",
        "-k",
        "segments",
    ),
    m(
        "packed documents: positions run on across documents",
        "model.py",
        "return jnp.maximum(seen - before - 1, 0)",
        "return jnp.maximum(seen - 1, 0)",
        "tests/test_packing.py",
    ),
    m(
        "packed documents: a document's first token is a target of the one before",
        "train.py",
        "return real if segments is None else real & (segments[:, 1:] == segments[:, :-1])",
        "return real",
        "tests/test_packing.py",
    ),
    # Preference objectives (against TRL).
    m(
        "DPO: the reference log-probs ignored",
        "losses.py",
        "chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps",
        "chosen_ratio, rejected_ratio = chosen_logps, rejected_logps",
        "tests/test_preference.py",
        "-k",
        "trl",
    ),
    m(
        "IPO without its length normalization",
        "losses.py",
        "chosen_mean = chosen_ratio / jnp.maximum(chosen_tokens, 1)",
        "chosen_mean = chosen_ratio",
        "tests/test_preference.py",
        "-k",
        "trl",
    ),
    m(
        "ORPO's NLL on the response only",
        "train.py",
        "chosen_all = -(seq.response[:pairs] + seq.rest[:pairs]).sum()",
        "chosen_all = -seq.response[:pairs].sum()",
        "tests/test_preference.py",
        "-k",
        "trl",
    ),
    m(
        "SimPO: label smoothing ignored",
        "losses.py",
        "p.simpo_gamma / p.beta, p.beta, p.label_smoothing)",
        "p.simpo_gamma / p.beta, p.beta, 0.0)",
        "tests/test_preference.py",
        "-k",
        "trl",
    ),
    m(
        "preference rows: the reference computed with the adapters",
        "train.py",
        "sequence_logprobs(reference_params, config, batch, None, False, dtype)",
        "sequence_logprobs(reference_params, config, batch, lora, False, dtype)",
        "tests/test_preference.py",
        "-k",
        "learned",
    ),
    # PEFT exchange of fused projections.
    m(
        "fused PEFT export: the parts' B blocks on each other's rows",
        "peft.py",
        'b[rows[part], block] = np.asarray(ab["b"], np.float32).T',
        'b[rows[adapted[-1 - n]], block] = np.asarray(ab["b"], np.float32).T',
        "tests/test_lora.py",
        "-k",
        "fused_projections",
    ),
    m(
        "fused PEFT export: the grown rank keeps the plain alpha (scale shrinks)",
        "peft.py",
        "lora.alpha * (math.sqrt(growth) if lora.rslora else growth)",
        "lora.alpha",
        "tests/test_lora.py",
        "-k",
        "fused_projections",
    ),
    m(
        "adapter bank: a row with id -1 runs adapter 0",
        "lora.py",
        '"b": jnp.where(present, jnp.take(ab["b"], safe, axis=axis), 0.0)',
        '"b": jnp.take(ab["b"], safe, axis=axis)',
        "tests/test_lora.py",
        "-k",
        "bank",
    ),
    # Stop strings, EOS, cache write offsets, chat-turn positions.
    m(
        "stop string ends one token late",
        "generate.py",
        "        if any(s in tokenizer.decode(tokens[:n]) for s in stop):\n            return n\n",
        "        if any(s in tokenizer.decode(tokens[:n]) for s in stop):\n            return n + 1\n",
        "tests/test_generate.py",
        "-k",
        "stop",
    ),
    m(
        "EOS never ends a row in the decode loop",
        "decoding.py",
        "done=state.done | _is_stop(token, stop_ids),",
        "done=state.done,",
        "tests/test_generate.py",
        "-k",
        "inside_the_loop",
    ),
    m(
        "decode writes every step into the same cache slot",
        "decoding.py",
        "write_index=state.write_index + 1,",
        "write_index=state.write_index,",
        PARITY,
        "-k",
        "greedy_tokens_match_transformers and llama-gqa",
    ),
    m(
        "chat-turn positions off by one in extend",
        "decoding.py",
        "positions = state.position[:, None] + jnp.arange(width)",
        "positions = state.position[:, None] + jnp.arange(width) + 1",
        "tests/test_attention.py",
        "-k",
        "chat_turn",
    ),
    m(
        "left padding shifts positions",
        "model.py",
        "return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)",
        "return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1), 0)",
        PARITY,
        "-k",
        "left_padded",
    ),
    # `load` leaves the tokenizer on disk until it is asked for (reading it imports transformers and PyTorch).
    m(
        "load reads the tokenizer at once",
        "checkpoint.py",
        "return Model(config, params, tokenizer_folder(path), generation, path)",
        "return Model(config, params, read_tokenizer(path / 'tokenizer'), generation, path)",
        "tests/test_convert.py",
        "-k",
        "import_neither",
    ),
    # `load` reads a param group's files itself, and leaves to orbax (and its checks) what it does not recognize.
    m(
        "stored arrays: a stored dtype other than the config's accepted",
        "stored_arrays.py",
        "or np.dtype(store.dtype.numpy_dtype) != np.dtype(leaf.dtype):",
        "or False:",
        "tests/test_convert.py",
        "-k",
        "orbax_restore",
    ),
    # Converter splitters.
    m(
        "GPT-NeoX fused qkv: k and v swapped",
        "families/gpt_neox.py",
        "q, k, v = (p.T if p.ndim == 2 else p for p in parts)",
        "q, v, k = (p.T if p.ndim == 2 else p for p in parts)",
        "tests/test_convert.py",
        "-k",
        "by_hand",
    ),
    m(
        "CodeGen fused qkv read as q, k, v blocks",
        "families/codegen.py",
        "q, v, k = (blocks[:, j].reshape(hidden, hidden).T for j in range(3))",
        "q, k, v = (blocks[:, j].reshape(hidden, hidden).T for j in range(3))",
        "tests/test_convert.py",
        "-k",
        "by_hand",
    ),
    m(
        "Mixtral router weights: sigmoid instead of softmax over the picked experts",
        "moe.py",
        "probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)",
        "probs = jax.nn.sigmoid(router_logits.astype(jnp.float32))",
        PARITY,
        "-k",
        "logits_match_transformers and mixtral",
    ),
    # Quantized weights.
    m(
        "Q4_K: a sub-block's high scale bits taken from the minimums' bytes",
        "convert/gguf_blocks.py",
        "(mixed & 15) | ((low_sc >> 6) << 4)",
        "(mixed & 15) | ((low_m >> 6) << 4)",
        "tests/test_quant.py",
        "-k",
        "bit_for_bit",
    ),
    m(
        "int4 nibbles unpacked high first",
        "quant.py",
        "low, high = packed & 15, packed >> 4",
        "high, low = packed & 15, packed >> 4",
        "tests/test_quant.py",
    ),
    m(
        "quantized tied head uses the embedding un-transposed",
        "quant.py",
        "return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))",
        "return jax.lax.dot_general(x, w.reshape(w.shape[::-1]), (((x.ndim - 1,), (0,)), ((), ())))",
        "tests/test_quant.py",
        "-k",
        "equals_its_dequantized or tied",
    ),
    m(
        "one-row int4 product: the low nibbles multiplied by x's odd elements",
        "quant.py",
        "low = pairs[None, :, 0] @ _dequantize_plane(values & 15, q, x.dtype).T",
        "low = pairs[None, :, 1] @ _dequantize_plane(values & 15, q, x.dtype).T",
        "tests/test_quant.py",
        "-k",
        "one_row",
    ),
    m(
        "one-row signed int4 product reads the nibbles unsigned",
        "quant.py",
        "        nibbles = jnp.where(nibbles > 7, nibbles - 16, nibbles)\n",
        "",
        "tests/test_quant.py",
        "-k",
        "one_row",
    ),
    m(
        "a one-sequence decode loop lets XLA lift the dequantization out (a float copy of the weights)",
        "model.py",
        "        params = held_in_loop(params, positions)",
        "        params = params",
        "tests/test_quant.py",
        "-k",
        "float_copy",
    ),
    m(
        "generation's prefill dequantizes every weight first",
        "quant.py",
        "w = dequantize(_after(q, x) if _IN_ORDER.get() else q, x.dtype)",
        "w = dequantize(q, x.dtype)",
        "tests/test_quant.py",
        "-k",
        "float_copy",
    ),
    m(
        "int8 quantization rounds toward zero",
        "quant.py",
        "values = np.clip(np.round(g / safe[..., None]), -127, 127)",
        "values = np.clip(np.trunc(g / safe[..., None]), -127, 127)",
        "tests/test_quant.py",
        "-k",
        "half_a_step",
    ),
    # Mixture-of-experts dispatch.
    m(
        "blocked experts: a block's expert read one block late (searchsorted side left)",
        "moe.py",
        'jnp.searchsorted(padded_ends, starts, side="right")',
        'jnp.searchsorted(padded_ends, starts, side="left")',
        "tests/test_moe.py",
        "-k",
        "definition",
    ),
    m(
        "blocked experts: the last used block is skipped",
        "moe.py",
        "used = starts < padded_ends[-1]",
        "used = starts + block < padded_ends[-1]",
        "tests/test_moe.py",
        "-k",
        "definition",
    ),
    m(
        "gathered experts: every pair takes its token's first expert",
        "moe.py",
        'jnp.einsum("tkf,tkfd->tkd", glu(gate, up), w.down[experts])',
        'jnp.einsum("tkf,tkfd->tkd", glu(gate, up), w.down[experts[:, :1]].repeat(experts.shape[1], 1))',
        "tests/test_moe.py",
        "-k",
        "definition",
    ),
    # Scanned layers.
    m(
        "scanned layers: a layer's kind ignores its RoPE switch (SmolLM3 scans as one stack)",
        "stacking.py",
        "index in config.no_rope_layers)",
        "False)",
        "tests/test_scan_layers.py",
        "-k",
        "logits_match and smollm3",
    ),
    m(
        "scanned layers: period members read across instead of down (layer start + member * repeats + step)",
        "stacking.py",
        "return self.start + step * self.period + member",
        "return self.start + member * self.repeats + step",
        "tests/test_scan_layers.py",
        "-k",
        "logits_match and gemma2",
    ),
    m(
        "scanned decode: every layer writes its keys into the stack's first layer",
        "model.py",
        "cache = None if buffers is None else LayerCache(*buffers[j], step)",
        "cache = None if buffers is None else LayerCache(*buffers[j], 0 * step)",
        "tests/test_scan_layers.py",
        "-k",
        "greedy_generation and llama",
    ),
    m(
        "scanned ring prefill: a stack's several new entries land in its first layer",
        "cache.py",
        'return buffer.at[layer, :, entries].set(new.swapaxes(0, 1), mode="drop")',
        'return buffer.at[0, :, entries].set(new.swapaxes(0, 1), mode="drop")',
        "tests/test_scan_layers.py",
        "-k",
        "greedy_generation and gemma2",
    ),
    # The serving engine.
    m(
        "engine: a prompt's reused prefix blocks are not attended to",
        "engine.py",
        "key_valid = (positions < start) | ((positions >= start) & (positions < start + length))",
        "key_valid = (positions < 0) | ((positions >= start) & (positions < start + length))",
        "tests/test_engine.py",
        "-k",
        "concurrent and llama",
    ),
    m(
        "engine: decode steps' keys and values never reach the slot's blocks",
        "engine.py",
        "here = jnp.where(live[:, None], rows[:, first:], TRASH * block_size)",
        "here = jnp.where(live[:, None] & False, rows[:, first:], TRASH * block_size)",
        "tests/test_engine.py",
        "-k",
        "concurrent and llama",
    ),
    m(
        "engine: a chunk's new entries go back one block slot early",
        "engine.py",
        "here = jnp.where(live[:, None], rows[:, first:], TRASH * block_size)",
        "here = jnp.where(live[:, None], rows[:, first - 1 : -1], TRASH * block_size)",
        "tests/test_engine.py",
        "-k",
        "concurrent and llama",
    ),
    m(
        "engine: a chunk's step does not count its own new token among the keys",
        "engine.py",
        "cache.key_valid, jnp.ones((tokens.shape[0], 1), bool), (0, write_index)",
        "cache.key_valid, jnp.zeros((tokens.shape[0], 1), bool), (0, write_index)",
        "tests/test_engine.py",
        "-k",
        "concurrent and llama",
    ),
    m(
        "engine: an echoed prompt's log-probs shifted by one token",
        "engine.py",
        "_token_logprob(jax.tree.map(lambda a, t=t: a[t], scores), k) for t in range(len(prompt) - 1)]",
        "_token_logprob(jax.tree.map(lambda a, t=t: a[max(t - 1, 0)], scores), k) for t in range(len(prompt) - 1)]",
        "tests/test_engine.py",
        "-k",
        "logprobs",
    ),
    m(
        "lm-eval in process: rolling windows conditioned on EOS, not BOS (as lm_eval's clients do)",
        "eval/harness.py",
        "return self.eot_token_id if bos is None else bos",
        "return self.eot_token_id",
        "tests/test_harness.py",
    ),
    m(
        "engine: a finished request's blocks are never given back",
        "engine.py",
        "        self.pool.release(running.blocks)\n",
        "        pass\n",
        "tests/test_engine.py",
        "-k",
        "small_pool",
    ),
    # Families' quirks.
    m(
        "Qwen-MoE: picked router probabilities always renormalized (norm_topk_prob ignored)",
        "moe.py",
        "    if normalize:\n        top_probs",
        "    if True:\n        top_probs",
        PARITY,
        "-k",
        "logits_match_transformers and moe",
    ),
    m(
        "Qwen2-MoE: the shared expert joins without its sigmoid gate",
        "model.py",
        'shared = jax.nn.sigmoid(Linear(1, axes=("embed", None), name="shared_gate")(x)) * shared',
        'shared = 0 * Linear(1, axes=("embed", None), name="shared_gate")(x) + shared',
        PARITY,
        "-k",
        "logits_match_transformers and qwen2_moe",
    ),
    m(
        "DeepSeek-V3 routing: experts picked outside the token's best groups",
        "moe.py",
        "_, experts = jax.lax.top_k(jnp.where(allowed, choice, -jnp.inf), k)",
        "_, experts = jax.lax.top_k(jnp.where(allowed | True, choice, -jnp.inf), k)",
        "tests/test_mla.py",
        "-k",
        "routing",
    ),
    m(
        "DeepSeek-V3 routing: the picked experts weighed by their biased scores",
        "moe.py",
        "weights = jnp.take_along_axis(scores, experts, axis=-1)",
        "weights = jnp.take_along_axis(choice, experts, axis=-1)",
        "tests/test_mla.py",
        "-k",
        "routing",
    ),
    m(
        "DeepSeek-V3: YaRN's mscale applied once, not squared, to the attention scale",
        "families/deepseek.py",
        'scale *= _mscale(float(params["factor"]), float(params["mscale_all_dim"])) ** 2',
        'scale *= _mscale(float(params["factor"]), float(params["mscale_all_dim"]))',
        PARITY,
        "-k",
        "logits_match_transformers and deepseek",
    ),
    m(
        "latent attention: the cached keys lose their rotated part",
        "model.py",
        "keys = jnp.concatenate([latents, k_ropes], -1)",
        "keys = jnp.concatenate([latents, 0 * k_ropes], -1)",
        "tests/test_mla.py",
        "-k",
        "cached_decoding",
    ),
    m(
        "latent attention: an adapter on kv_b_proj skipped where queries are absorbed",
        "model.py",
        'y = y + scale * jnp.einsum("bthr,blr->bthl", jnp.einsum("bthn,brhn->bthr", x, b[..., :nope]), a)',
        'y = y + 0 * jnp.einsum("bthr,blr->bthl", jnp.einsum("bthn,brhn->bthr", x, b[..., :nope]), a)',
        "tests/test_mla.py",
        "-k",
        "lora_on_the_latent",
    ),
    m(
        "SmolLM3: RoPE in every layer (no_rope_layers ignored)",
        "model.py",
        "if not c.learned_positions and self.index not in c.no_rope_layers:",
        "if not c.learned_positions:",
        PARITY,
        "-k",
        "logits_match_transformers and smollm3",
    ),
    m(
        "Granite: sublayer outputs join the residual unscaled",
        "model.py",
        "            if c.residual_multiplier == 1.0:\n",
        "            if True:\n",
        PARITY,
        "-k",
        "logits_match_transformers and granite",
    ),
    m(
        "Granite: the training head forgets logits_scaling",
        "train.py",
        "    if config.logits_divisor != 1.0:",
        "    if False:",
        "tests/test_gradients.py",
        "-k",
        "param_gradients and granite",
    ),
    m(
        "gpt-oss: attention sinks left out of the softmax",
        "attention.py",
        "        if sinks is None:\n            probs = jax.nn.softmax(scores, axis=-1)",
        "        if True:\n            probs = jax.nn.softmax(scores, axis=-1)",
        PARITY,
        "-k",
        "logits_match_transformers and gpt_oss",
    ),
    m(
        "gpt-oss: the expert gate unclamped",
        "model.py",
        "            gate = jnp.minimum(gate, limit)\n",
        "",
        PARITY,
        "-k",
        "mxfp4",
    ),
    m(
        "blocked experts: the down projection's bias left out",
        "moe.py",
        "            return _plus(hidden @ w.down[e], w.down_bias, e)",
        "            return hidden @ w.down[e]",
        "tests/test_moe.py",
        "-k",
        "definition",
    ),
    m(
        "MXFP4: the two codes of a byte swapped",
        "convert/readers.py",
        "    values[..., 0] = FP4_E2M1[blocks & 0x0F]\n    values[..., 1] = FP4_E2M1[blocks >> 4]",
        "    values[..., 0] = FP4_E2M1[blocks >> 4]\n    values[..., 1] = FP4_E2M1[blocks & 0x0F]",
        PARITY,
        "-k",
        "mxfp4",
    ),
    # The sandbox.
    Mutant(
        "sandbox shares the host's network and PID space (no --unshare-all)",
        "eval/sandbox.py",
        (('        "--unshare-all",\n', ""),),
        ("tests/test_sandbox.py",),
    ),
    Mutant(
        "sandbox shows /etc and the home folder (read-only)",
        "eval/sandbox.py",
        (
            (
                "        *_system_binds(),\n",
                '        *_system_binds(), "--ro-bind", "/etc", "/etc",\n'
                '        "--ro-bind", os.path.expanduser("~"), os.path.expanduser("~"),\n',
            ),
        ),
        ("tests/test_sandbox.py",),
    ),
    Mutant(
        "sandbox memory limit 8x too high for a sample's processes together",
        "eval/sandbox.py",
        (('"memory.limit_in_bytes", MEMORY_LIMIT)', '"memory.limit_in_bytes", 8 * MEMORY_LIMIT)'),),
        ("tests/test_sandbox.py",),
    ),
]


def stage(copy: Path) -> None:
    """The project's code and tests in `copy` (no venv, no git, no checkpoints)."""
    for name in ("jaxlora", "tests", "scripts"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")


def apply(mutant: Mutant, copy: Path) -> None:
    path = copy / "jaxlora" / mutant.file
    text = path.read_text()
    for old, new in mutant.edits:
        count = text.count(old)
        if count != 1:
            raise SystemExit(f"mutant {mutant.name!r}: {old!r} occurs {count} times in {mutant.file} (want 1)")
        text = text.replace(old, new)
    path.write_text(text)


def run(mutant: Mutant, timeout: int) -> tuple[str, float]:
    """'caught', 'SURVIVED' or 'timeout', and the seconds it took."""
    with tempfile.TemporaryDirectory(prefix="jaxlora-mutant-") as folder:
        copy = Path(folder)
        stage(copy)
        apply(mutant, copy)
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        start = time.perf_counter()
        try:
            result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start
        seconds = time.perf_counter() - start
    if result.returncode == 5:  # no test collected: the subset is wrong, which is the script's bug
        raise SystemExit(f"mutant {mutant.name!r}: no test matched {mutant.tests}")
    return ("caught" if result.returncode != 0 else "SURVIVED"), seconds


def check_unmutated(timeout: int) -> None:
    """Every subset passes on the unmutated code (else a 'caught' would mean nothing)."""
    subsets = sorted({m.tests for m in MUTANTS})
    with tempfile.TemporaryDirectory(prefix="jaxlora-mutant-") as folder:
        copy = Path(folder)
        stage(copy)
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        for tests in subsets:
            command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
            result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
            if result.returncode != 0:
                raise SystemExit(f"the unmutated code fails {' '.join(tests)}:\n{result.stdout[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--skip-baseline", action="store_true", help="do not first run the subsets unmutated")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if args.only is None or args.only in m.name]
    if args.list:
        for mutant in chosen:
            print(f"{mutant.name}  [{mutant.file}]  {' '.join(mutant.tests)}")
        return
    if not args.skip_baseline:
        check_unmutated(args.timeout)
    rows = []
    for mutant in chosen:
        status, seconds = run(mutant, args.timeout)
        rows.append((mutant.name, mutant.file, status, seconds))
        print(f"{status:8}  {seconds:6.1f}s  {mutant.name}", flush=True)
    caught = sum(status == "caught" for _, _, status, _ in rows)
    print()
    print("| mutant | file | result | seconds |")
    print("| --- | --- | --- | --- |")
    for name, file, status, seconds in rows:
        print(f"| {name} | {file} | {status} | {seconds:.0f} |")
    print(f"\n{caught} of {len(rows)} mutants caught")
    if caught != len(rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
