"""A multi-turn conversation that keeps its KV cache from turn to turn.

Each turn renders the whole conversation with the tokenizer's chat template. When the tokens already in the
cache are a prefix of the new rendering (the usual case: the template appends), only the new suffix is run
(`extend`); otherwise, or when the cache is full, the conversation is prefilled again into a larger cache.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.checkpoint import Model
from jaxlora.decoding import DecodeState, extend, new_cache
from jaxlora.errors import UsageError
from jaxlora.generate import StreamChunk, decode_chunks, left_pad, make_plan, prefill_prompt, prompt_bucket
from jaxlora.model import activation_dtype, check_context, prefill_params
from jaxlora.sampling import Sampling, row_keys
from jaxlora.sharding import params_mesh, to_host
from jaxlora.text import chat_ids, has_chat_template, pad_id


class ChatSession:
    """`send(text)` streams the reply as `StreamChunk`s (batch of one) and records it in `messages`."""

    def __init__(
        self,
        model: Model,
        *,
        max_new_tokens: int = 256,
        sampling: Sampling | None = None,
        key: jax.Array | None = None,
        system: str | None = None,
        stop: tuple[str, ...] = (),
        chunk_size: int = 32,
        lora=None,
    ):
        tokenizer = model.tokenizer
        if tokenizer is None or not has_chat_template(tokenizer):
            raise UsageError("chat needs a checkpoint whose tokenizer has a chat template")
        self.model = model
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.plan = make_plan(
            model.config,
            1,
            mesh=params_mesh(model.params),
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            eos_token_ids=model.eos_token_ids,
            stop=stop,
            tokenizer=tokenizer,
            pad_token_id=pad_id(tokenizer),
            chunk_size=chunk_size,
            lora=lora,
        )
        self.keys = row_keys(key, 1, self.plan.processors.sample)
        if self.plan.layout is not None:
            self.keys = jax.random.wrap_key_data(self.plan.to_device(jax.random.key_data(self.keys)))
        self.state: DecodeState | None = None
        self.cached: list[int] = []  # the tokens whose keys/values are in the cache, in order
        self.reused_turns = 0

    def _start(self, ids: list[int]) -> DecodeState:
        """Prefill the whole conversation into a fresh cache with room for several more turns."""
        params, plan = self.model.params, self.plan
        width = prompt_bucket(len(ids))
        capacity = prompt_bucket(width + 4 * plan.decode_slots)
        cache = new_cache(plan.config, 1, capacity, activation_dtype(params), plan.layout)
        padded, mask = left_pad([ids], plan.pad_id, width)
        padded, mask = plan.to_device(padded, batch_split=True), plan.to_device(mask, batch_split=True)
        return prefill_prompt(params, plan, cache, padded, mask, self.keys)

    def _continue(self, suffix: list[int]) -> DecodeState | None:
        """Run only the new tokens after what the cache holds, if they and the reply fit."""
        width = prompt_bucket(len(suffix))
        state = self.state
        if int(state.write_index) + width + self.plan.decode_slots > state.cache.max_len:
            return None
        padded = np.full((1, width), self.plan.pad_id, np.int32)
        padded[0, : len(suffix)] = suffix
        padded = self.plan.to_device(padded, batch_split=True)
        plan = self.plan
        params = prefill_params(self.model.params, plan.config, width)  # the decode loop's tiled copy, if any
        return extend(params, state, padded, len(suffix), plan.arrays, plan.lora, **plan.static)

    def send(self, text: str) -> Iterator[StreamChunk]:
        self.messages.append({"role": "user", "content": text})
        ids = chat_ids(self.model.tokenizer, self.messages)
        check_context(self.plan.config, len(ids), self.plan.max_new_tokens)
        state = None
        n = len(self.cached)
        if self.state is not None and len(ids) > n and ids[:n] == self.cached:
            state = self._continue(ids[n:])
            self.reused_turns += state is not None
        if state is None:
            state = self._start(ids)
        reply_slot, reply_position = int(state.write_index), to_host(state.position)  # state is donated next
        self.state = None  # donated to the decode loop below

        reply: list[int] = []
        final = yield from self._relay(decode_chunks(self.model.params, state, self.plan), reply)

        # The cache now holds the conversation and reply[:-1] (the last sampled token is never written), plus
        # whatever the loop wrote after the reply ended. Rewind to just after reply[:-1].
        kept = len(reply) - 1
        key_valid = final.cache.key_valid.at[:, reply_slot + kept :].set(False)
        self.state = final._replace(
            cache=final.cache._replace(key_valid=key_valid),
            write_index=jnp.asarray(reply_slot + kept, jnp.int32),
            position=jnp.asarray(reply_position + kept),
        )
        self.keys = final.keys
        self.cached = ids + reply[:kept]
        content = self.model.tokenizer.decode(reply, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": content})

    @staticmethod
    def _relay(chunks, reply: list[int]):
        """Pass chunks through, collecting the reply; returns the decode loop's final state."""
        while True:
            try:
                chunk = next(chunks)
            except StopIteration as done:
                return done.value
            reply.extend(chunk.row(0))
            yield chunk
