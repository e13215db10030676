"""Perplexity over a text with a sliding window, as in transformers' "Perplexity of fixed-length models".

Windows of `window` tokens start every `stride` tokens; each window scores only the tokens the previous window did
not (the rest are context), so every token after the first is predicted once, with up to window - 1 tokens before
it. Windows are right-padded to one shape and scored in jitted batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.config import ModelConfig
from jaxlora.errors import UsageError
from jaxlora.losses import next_token_logprobs
from jaxlora.model import forward


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window in the file
    end: int  # one past its last token
    scored_from: int  # tokens before this are context only


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """HF's recipe: begin at 0, stride, 2 * stride, ...; each window scores the tokens after the previous end."""
    if window < 2 or not 0 < stride <= window:
        raise UsageError(f"need window >= 2 and 0 < stride <= window, got window {window}, stride {stride}")
    windows, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        windows.append(Window(begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == num_tokens:
            break
    return windows


@partial(jax.jit, static_argnums=1)
def _window_nll(params, config: ModelConfig, ids, mask, scored):
    """ids/mask/scored [batch, window] -> summed negative log-likelihood of the scored tokens, per row."""
    logprobs = next_token_logprobs(forward(params, config, ids, attention_mask=mask), ids)
    return -jnp.sum(jnp.where(scored[:, 1:], logprobs, 0.0), axis=-1)


def perplexity(params, config: ModelConfig, tokens, *, window: int, stride: int, batch_size: int = 4) -> dict:
    """tokens [n] int -> {"tokens" scored, "loss" (mean NLL per token, nats), "perplexity", "windows"}."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.size < 2:
        raise UsageError("perplexity needs at least 2 tokens of text")
    window = min(window, tokens.size)
    windows = sliding_windows(tokens.size, window, stride)
    total_nll, total_scored = 0.0, 0
    for start in range(0, len(windows), batch_size):
        group = windows[start : start + batch_size]
        ids = np.zeros((batch_size, window), np.int32)
        mask = np.zeros((batch_size, window), bool)
        scored = np.zeros((batch_size, window), bool)
        for row, w in enumerate(group):
            n = w.end - w.begin
            ids[row, :n] = tokens[w.begin : w.end]
            mask[row, :n] = True
            scored[row, w.scored_from - w.begin : n] = True
        total_nll += float(np.sum(_window_nll(params, config, ids, mask, scored)))
        total_scored += int(scored[:, 1:].sum())
    loss = total_nll / total_scored
    return {"tokens": total_scored, "loss": loss, "perplexity": math.exp(loss), "windows": len(windows)}
