"""The serving engine: continuous batching over a paged KV cache, with prefix reuse.

`max_batch` decode slots run together in jitted chunks of a few steps. Between chunks the host retires finished
requests and admits waiting ones into free slots (each prompt prefilled alone, in a bucketed jitted call), so a
request never waits for another one's answer to end.

The KV cache is a pool of fixed-size blocks per layer plus a block table per slot: a request holds the blocks
its prompt and `max_tokens` need (reserved when it is admitted, so a running request never runs out; one that
cannot get them waits), not a context's worth. Block 0 is never handed out: unused table entries point at it and
writes that must land nowhere (padding, a finished row's last steps) go there.

Prefix reuse: a full block of prompt tokens is keyed by a hash of every token up to its end. A request whose
prompt starts with cached blocks (a shared system prompt, the previous turn of a chat, an eval's few-shot
header) takes them as they are and prefills only the rest. Blocks no request uses stay cached until space is
needed, evicted least recently used first.

Each step every slot attends over a view of its own blocks gathered in sequence order and right-aligned, so the
slot's newest token sits at the same view slot in every row (one compiled step for any mix of lengths, sliding
windows included); the step's new keys and values are then scattered into the slot's block. The view is as long
as the longest live sequence needs, in powers of two blocks, and a chunk runs only the live slots (their count
rounded up to a power of two). Compiled programs depend on (prompt bucket, live rows, view length, chunk, the
sampling processors live slots use), never on a request: no compile per request.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
from collections.abc import Iterable, Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora.cache import KVCache, entry_shapes
from jaxlora.config import ModelConfig
from jaxlora.errors import UsageError
from jaxlora.model import activation_dtype, apply_decoder, decode_params, forward, prefill_params
from jaxlora.quant import for_decode_loop
from jaxlora.sampling import Processors, Sampling, SamplingArrays, TokenScores, next_token, row_keys, score_choice
from jaxlora.sharding import params_mesh, spec_for
from jaxlora.stacking import layer_stacks, unstack_tree

# Prefill compiles every processor in: a request's own values switch each off exactly (top_k 0, top_p 1, min_p 0,
# repetition_penalty 1, temperature 0), and it runs once per request. A decode chunk compiles only the processors
# some live slot uses: their sorts over the vocabulary cost more than the model at SmolLM2's size (measured: 288
# ms a step with all of them against 79 without, 8 slots over 256-token views).
ALL_PROCESSORS = Processors(sample=True, repetition_penalty=True, top_k=True, top_p=True, min_p=True)
TRASH = 0  # the block that is never handed out
MIN_VIEW = 256  # tokens: the shortest decode view (see `Engine._view_blocks`)
TOP_LOGPROBS = 20  # the most alternatives a request may ask for; a chunk computes this many when any slot asks


@dataclasses.dataclass
class Request:
    """One generation: prompt token ids, at most `max_tokens` new tokens, sampling values (numbers, not per-row
    lists), a seed (the PRNG key `jax.random.key(seed)`, as `generate(key=...)` takes it for a lone prompt) and
    the token ids that end it (kept in the output, as `generate` keeps an EOS). logprobs: None, or how many of
    the model's most likely alternatives (0..TOP_LOGPROBS) to report with each new token's log-probability."""

    prompt: Sequence[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    id: int = -1


class TokenLogprob(NamedTuple):
    """A new token's log-probability under the model's own distribution (log-softmax of its logits, before any
    sampling processor) and the model's `k` most likely tokens with theirs, most likely first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Event:
    """What one engine step produced for a request: its new tokens, and whether (and why) it finished."""

    id: int
    tokens: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    cached_tokens: int = 0  # prompt tokens taken from cached blocks (reported with the first event)
    logprobs: list[TokenLogprob] | None = None  # one per token, for requests that ask for them


class _Running(NamedTuple):
    request: Request
    blocks: list[int]
    produced: list[int]


class BlockPool:
    """Host bookkeeping of the KV blocks: free blocks, reference counts, and the prefix cache (hash -> block)
    with an LRU order over cached blocks no request uses."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.free = collections.deque(range(1, num_blocks))  # block 0 is TRASH
        self.refs = [0] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unreferenced, LRU first

    def available(self) -> int:
        return len(self.free) + len(self.idle)

    def prefix_hashes(self, tokens: Sequence[int]) -> list[bytes]:
        """The hash of every full block of `tokens`, each covering all tokens up to that block's end."""
        hashes, digest = [], hashlib.sha256()
        size = self.block_size
        for start in range(0, len(tokens) - size + 1, size):
            digest.update(np.asarray(tokens[start : start + size], np.int64).tobytes())
            hashes.append(digest.copy().digest())
        return hashes

    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (not yet referenced by the caller)."""
        blocks = []
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def take(self, blocks: list[int]) -> None:
        for block in blocks:
            self.refs[block] += 1
            self.idle.pop(block, None)

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks (evicting idle cached ones, least recently used first), or None if there are not
        enough."""
        if count > self.available():
            return None
        blocks = []
        for _ in range(count):
            if self.free:
                block = self.free.popleft()
            else:
                block, _ = self.idle.popitem(last=False)
                del self.by_hash[self.hash_of.pop(block)]
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def register(self, block: int, digest: bytes) -> None:
        """Offer a full block of prompt tokens for reuse (first writer wins)."""
        if digest not in self.by_hash and block not in self.hash_of:
            self.by_hash[digest] = block
            self.hash_of[block] = digest

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.idle[block] = None
                else:
                    self.free.append(block)


def _view_indices(table: jax.Array, positions: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Sequence positions [..., n] of a slot with block table [max_blocks] -> their rows in the flattened pool
    (TRASH for positions < 0 or past the table) and whether each is a real position (>= 0)."""
    blocks = jnp.take(table, jnp.clip(positions // block_size, 0, table.shape[0] - 1))
    inside = (positions >= 0) & (positions < table.shape[0] * block_size)
    rows = jnp.where(inside, blocks * block_size + positions % block_size, TRASH * block_size)
    return rows, positions >= 0


def _gather(pool: tuple[jax.Array, ...], rows: jax.Array) -> tuple[jax.Array, ...]:
    """Each layer's pool [blocks * block_size, heads, dim] at rows [batch, n] -> [batch, n, heads, dim]."""
    return tuple(jnp.take(layer, rows, axis=0) for layer in pool)


def _scatter(pool: tuple[jax.Array, ...], rows: jax.Array, new: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Write new [batch, n, heads, dim] per layer at pool rows [batch, n]."""
    return tuple(
        layer.at[rows.reshape(-1)].set(n.reshape(-1, *n.shape[2:])) for layer, n in zip(pool, new, strict=True)
    )


class _Pools(NamedTuple):
    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]


@partial(jax.jit, static_argnames=("config", "block_size", "cached_blocks"), donate_argnames=("pools", "seen"))
def _prefill(
    params,
    pools: _Pools,
    table,
    ids,
    start,
    length,
    sampling: SamplingArrays,
    key,
    seen,
    row,
    *,
    config,
    block_size,
    cached_blocks,
):
    """Run one prompt's uncached part ids [1, bucket] (right-padded, `length` real) from position `start` on,
    attending to the slot's cached blocks; write its keys/values into the slot's blocks; sample its first token.
    seen [slots, vocab]: row `row` is reset to the prompt's tokens (repetition penalty). The attention's view is
    the first `cached_blocks` blocks of the table plus one bucket: 0 for a prompt with no cached prefix (it
    attends over its own bucket), the whole table with one (two programs per bucket, whatever the prefix)."""
    bucket = ids.shape[1]
    view_len = cached_blocks * block_size + bucket  # room for a whole bucket past any start
    positions = jnp.arange(view_len)
    if cached_blocks:
        rows, _ = _view_indices(table[:cached_blocks], positions, block_size)
    else:
        rows = jnp.full((view_len,), TRASH * block_size, jnp.int32)
    key_valid = (positions < start) | ((positions >= start) & (positions < start + length))
    cache = KVCache(_gather(pools.keys, rows[None]), _gather(pools.values, rows[None]), key_valid[None])
    logits, cache = apply_decoder(
        params,
        config,
        ids,
        (start + jnp.arange(bucket))[None],
        key_valid[None],
        cache=cache,
        write_index=start,
        logits_at=length - 1,
    )
    new_positions = start + jnp.arange(bucket)
    new_rows, _ = _view_indices(table, jnp.where(jnp.arange(bucket) < length, new_positions, -1), block_size)

    def new_part(layers):
        return tuple(jax.lax.dynamic_slice_in_dim(a, start, bucket, axis=1) for a in layers)

    pools = _Pools(
        _scatter(pools.keys, new_rows[None], new_part(cache.keys)),
        _scatter(pools.values, new_rows[None], new_part(cache.values)),
    )
    prompt_seen = (
        jnp.zeros((config.vocab_size,), bool)
        .at[jnp.where(jnp.arange(bucket) < length, ids[0], -1)]
        .set(True, mode="drop")
    )
    seen = seen.at[row].set(prompt_seen)
    keys, step_key = jax.random.split(key)
    token, scores = next_token(logits[:, 0], sampling, ALL_PROCESSORS, step_key[None], seen[row][None], TOP_LOGPROBS)
    seen = seen.at[row, token[0]].set(True)
    return pools, token[0], keys, seen, jax.tree.map(lambda a: a[0], scores)


@partial(
    jax.jit, static_argnames=("config", "block_size", "steps", "processors", "top"), donate_argnames=("pools", "seen")
)
def _decode(
    params,
    pools: _Pools,
    slots,
    tables,
    tokens,
    positions,
    live,
    keys,
    seen,
    sampling: SamplingArrays,
    *,
    config,
    block_size,
    steps,
    processors,
    top=None,
):
    """`steps` decode steps of the slots `slots` [n]: tokens [n] at positions [n] go into the cache and the next
    are sampled. keys [max_batch] and seen [max_batch, vocab] are every slot's (these slots' are taken and put
    back). live [n] bool: rows whose writes count (the others write to TRASH). tables [slots, view blocks]:
    the first blocks of each slot's table, as many as cover every live position of the chunk (the view's length,
    hence the attention's, follows the longest live sequence, in powers of two). -> pools, the sampled tokens
    [slots, steps], keys, seen, and with `top` (an int) the tokens' `TokenScores` [slots, steps, ...] (else None).

    Each slot's view is gathered from the pool once per chunk, right-aligned so that the chunk's `steps` new
    tokens of every row land at the same view slots (view_len - steps + s at step s): the steps write into the
    view in place and attend over it, and the chunk's new entries go back into the pool once, at its end."""
    view_len = tables.shape[1] * block_size
    first = view_len - steps  # the view slot of each row's first new token
    view_positions = positions[:, None] - first + jnp.arange(view_len)
    rows, valid = jax.vmap(partial(_view_indices, block_size=block_size))(tables, view_positions)
    valid = valid & (jnp.arange(view_len) < first)  # the chunk's own slots become valid as they are written
    cache = KVCache(_gather(pools.keys, rows), _gather(pools.values, rows), valid)
    loop_params = for_decode_loop(params, tokens.shape[0])

    def step(carry, s):
        cache, tokens, keys, seen = carry
        write_index = first + s
        key_valid = jax.lax.dynamic_update_slice(
            cache.key_valid, jnp.ones((tokens.shape[0], 1), bool), (0, write_index)
        )
        cache = cache._replace(key_valid=key_valid)
        logits, cache = apply_decoder(
            loop_params,
            config,
            tokens[:, None],
            (positions + s)[:, None],
            key_valid,
            cache=cache,
            write_index=write_index,
        )
        pairs = jax.vmap(jax.random.split)(keys)
        token, scores = next_token(logits[:, 0], sampling, processors, pairs[:, 1], seen, top)
        seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
        return (cache, token, pairs[:, 0], seen), (token, scores)

    carry = (cache, tokens, keys[slots], seen[slots])
    (cache, _, slot_keys, slot_seen), (sampled, scores) = jax.lax.scan(step, carry, jnp.arange(steps))
    here = jnp.where(live[:, None], rows[:, first:], TRASH * block_size)
    pools = _Pools(
        _scatter(pools.keys, here, tuple(k[:, first:] for k in cache.keys)),
        _scatter(pools.values, here, tuple(v[:, first:] for v in cache.values)),
    )
    scores = None if scores is None else jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), scores)
    return pools, sampled.T, keys.at[slots].set(slot_keys), seen.at[slots].set(slot_seen), scores


@partial(jax.jit, static_argnames=("config",))
def _prompt_scores(params, ids, length, *, config) -> TokenScores:
    """ids [1, bucket] (right-padded, `length` real) -> `TokenScores` [bucket - 1, ...] of each next prompt token
    under the model (entry t: token t + 1 given tokens ..t), with TOP_LOGPROBS alternatives."""
    mask = jnp.arange(ids.shape[1])[None] < length
    logits = forward(params, config, ids, attention_mask=mask)[0, :-1]
    return score_choice(logits, logits, ids[0, 1:], TOP_LOGPROBS)


def _token_logprob(scores, k: int) -> TokenLogprob:
    """One token's host `TokenScores` -> its `TokenLogprob` with k alternatives."""
    top = [(int(t), float(lp)) for t, lp in zip(scores.top_ids[:k], scores.top_logprobs[:k], strict=True)]
    return TokenLogprob(float(scores.raw_logprob), top)


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= n)


class Engine:
    """Continuous batching over `params` (scanned params are unstacked for it). Params on a mesh (`load(...,
    mesh=...)`) run sharded as they lie, the KV pool's heads split over `tensor` (one process).

    submit(...) -> request id; step() -> the events of one round (admissions, one decode chunk, retirements);
    cancel(id) frees a request's slot and blocks at once; run(requests) drives everything to the end.
    max_len: the longest prompt + answer a request may have (default: the model's context, at most 4096);
    num_blocks: the pool's size (default: every slot at max_len, plus one trash block). prefix_cache=False
    prefills every prompt whole (for measuring what reuse saves).
    """

    def __init__(
        self,
        params,
        config: ModelConfig,
        *,
        max_batch: int = 8,
        max_len: int | None = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        chunk: int = 4,
        buckets: Sequence[int] = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072),
        prefix_cache: bool = True,
    ):
        if config.scan_layers:
            params, config = unstack_tree(params, layer_stacks(config)), config.with_scan(False)
        if max_batch < 1 or block_size < 1 or chunk < 1:
            raise UsageError("max_batch, block_size and chunk must be at least 1")
        if jax.process_count() > 1:
            raise UsageError("the serving engine runs in one process (a mesh over its own devices)")
        self.params, self.config = params, config
        self.loop_params = decode_params(params, config, max_batch)  # the decode chunks' (`jaxlora.cpu_matmul`)
        limit = min(config.context_length or 4096, 4096)
        self.max_len = max_len or limit
        if self.max_len > (config.context_length or self.max_len):
            raise UsageError(f"max_len {self.max_len} is past the model's context of {config.context_length}")
        self.block_size, self.chunk, self.slots = block_size, chunk, max_batch
        self.prefix_cache = prefix_cache
        self.max_blocks = -(-self.max_len // block_size)
        self.buckets = tuple(sorted(b for b in buckets if b <= self.max_len)) or (self.max_len,)
        if self.buckets[-1] < self.max_len:
            self.buckets += (self.max_len,)
        num_blocks = num_blocks or max_batch * self.max_blocks + 1
        self.pool = BlockPool(num_blocks, block_size)
        dtype = activation_dtype(params)
        (kh, kd), (vh, vd) = entry_shapes(config)
        rows = num_blocks * block_size
        self.pools = _Pools(
            tuple(jnp.zeros((rows, kh, kd), dtype) for _ in range(config.num_layers)),
            tuple(jnp.zeros((rows, vh, vd), dtype) for _ in range(config.num_layers)),
        )
        self.tables = np.zeros((max_batch, self.max_blocks), np.int32)
        self.tokens = np.zeros(max_batch, np.int32)
        self.positions = np.zeros(max_batch, np.int32)
        self.keys = row_keys(jax.random.key(0), max_batch, False)
        self.seen = jnp.zeros((max_batch, config.vocab_size), bool)
        # Committed from the start, as every program's outputs are: the first call then compiles the same program
        # as every later one (jit keys programs on whether their inputs are committed). On a mesh (the params'
        # own) the pool's kv heads split over `tensor` like generate's cache; the slots' state is replicated.
        mesh = params_mesh(params)
        if mesh is None:
            where = pool_where = jax.devices()[0]
        else:
            where = NamedSharding(mesh, PartitionSpec())
            pool_where = NamedSharding(
                mesh, spec_for(("cache_len", "kv_heads", "head_dim"), (rows, kh, kd), mesh, config, "kv pool")
            )
        self.pools = jax.device_put(self.pools, pool_where)
        self.keys, self.seen = jax.device_put((self.keys, self.seen), where)
        self.sampling = {name: np.zeros(max_batch, np.float32) for name in SamplingArrays._fields}
        self.sampling["top_k"] = np.zeros(max_batch, np.int32)
        self.sampling["top_p"][:] = 1.0
        self.sampling["repetition_penalty"][:] = 1.0
        self.running: dict[int, _Running] = {}  # slot -> request
        self.waiting: collections.deque[Request] = collections.deque()
        self._ids = itertools.count()

    # The host side.

    def submit(self, prompt: Sequence[int], max_tokens: int, **options) -> int:
        """Queue a request (see `Request` for the options); returns its id. Refuses what can never run."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise UsageError("the prompt is empty")
        if max_tokens < 1:
            raise UsageError(f"max_tokens must be at least 1, got {max_tokens}")
        if len(prompt) + max_tokens > self.max_len:
            raise UsageError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the engine's {self.max_len}"
            )
        needed = -(-(len(prompt) + max_tokens) // self.block_size)
        if needed > len(self.pool.refs) - 1:
            raise UsageError(f"the request needs {needed} KV blocks; the engine's pool has {len(self.pool.refs) - 1}")
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            raise UsageError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        request = Request(prompt, max_tokens, id=next(self._ids), **options)
        if request.logprobs is not None and not 0 <= request.logprobs <= TOP_LOGPROBS:
            raise UsageError(f"logprobs must be in 0..{TOP_LOGPROBS}, got {request.logprobs}")
        request.sampling.per_row(1)  # refuses bad values now, not inside the engine
        self.waiting.append(request)
        return request.id

    def prompt_logprobs(self, prompt: Sequence[int], k: int) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the ones before it (None for the first, which has no
        context) with k alternatives: what an `echo` with logprobs reports (lm-evaluation-harness's
        loglikelihood). One forward over the prompt in its bucket, outside the decode slots."""
        prompt = [int(t) for t in prompt]
        if not 1 <= len(prompt) <= self.max_len:
            raise UsageError(f"the prompt must have 1..{self.max_len} tokens, got {len(prompt)}")
        if not 0 <= k <= TOP_LOGPROBS:
            raise UsageError(f"logprobs must be in 0..{TOP_LOGPROBS}, got {k}")
        bucket = _bucket(len(prompt), self.buckets)
        ids = np.zeros((1, bucket), np.int32)
        ids[0, : len(prompt)] = prompt
        scores = jax.device_get(_prompt_scores(self.params, jnp.asarray(ids), len(prompt), config=self.config))
        return [None] + [_token_logprob(jax.tree.map(lambda a, t=t: a[t], scores), k) for t in range(len(prompt) - 1)]

    def cancel(self, request_id: int) -> bool:
        """Drop a request, waiting or running (its slot and blocks are free at once); False if unknown."""
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                return True
        for slot, running in self.running.items():
            if running.request.id == request_id:
                self._retire(slot)
                return True
        return False

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def step(self) -> list[Event]:
        """Admit what fits, run one decode chunk, retire what finished: this round's events."""
        events = self._admit()
        if self.running:
            events += self._decode_chunk()
        return events

    def run(self, requests: Iterable[dict]) -> dict[int, list[int]]:
        """Submit every request (dicts of `submit`'s arguments) and step until all are done: {id: tokens}."""
        ids = [self.submit(**r) for r in requests]
        out: dict[int, list[int]] = {i: [] for i in ids}
        while not self.idle:
            for event in self.step():
                out[event.id] += event.tokens
        return out

    def _admit(self) -> list[Event]:
        events = []
        while self.waiting and len(self.running) < self.slots:
            request = self.waiting[0]
            size = self.block_size
            # The last prompt token is always run (its logits give the first new token).
            hashes = self.pool.prefix_hashes(request.prompt[:-1]) if self.prefix_cache else []
            cached = self.pool.cached_prefix(hashes)
            needed = -(-(len(request.prompt) + request.max_tokens) // size) - len(cached)
            self.pool.take(cached)
            fresh = self.pool.allocate(needed)
            if fresh is None:  # waits for blocks (in order: no overtaking) until a request ends
                self.pool.release(cached)
                break
            self.waiting.popleft()
            slot = next(s for s in range(self.slots) if s not in self.running)
            blocks = cached + fresh
            self.tables[slot] = TRASH
            self.tables[slot, : len(blocks)] = blocks
            token, scores = self._prefill(slot, request, len(cached) * size)
            for i, digest in enumerate(hashes):
                self.pool.register(blocks[i], digest)
            self.running[slot] = _Running(request, blocks, [token])
            events.append(Event(request.id, [token], cached_tokens=len(cached) * size))
            if request.logprobs is not None:
                events[-1].logprobs = [_token_logprob(jax.device_get(scores), request.logprobs)]
            finish = self._finish_reason(self.running[slot])
            if finish:
                events[-1].finished, events[-1].finish_reason = True, finish
                self._retire(slot)
        # submit() refuses what the whole pool cannot hold: with no request running, a waiting one always fits.
        assert self.running or not self.waiting, "no request runs, yet one waits for blocks: blocks were lost"
        return events

    def _prefill(self, slot: int, request: Request, start: int) -> int:
        rest = request.prompt[start:]
        bucket = _bucket(len(rest), self.buckets)
        ids = np.zeros((1, bucket), np.int32)
        ids[0, : len(rest)] = rest
        rows = request.sampling.per_row(1)
        for name, value in rows.items():
            self.sampling[name][slot] = value[0]
        key = jax.random.fold_in(jax.random.key(request.seed), 0)  # generate's key for row 0
        self.pools, token, row_key, self.seen, scores = _prefill(
            prefill_params(self.params, self.config, bucket),  # the decode loop's tiled copy, if it has one
            self.pools,
            jnp.asarray(self.tables[slot]),
            jnp.asarray(ids),
            jnp.asarray(start, jnp.int32),
            jnp.asarray(len(rest), jnp.int32),
            SamplingArrays(**{k: jnp.asarray(v[slot : slot + 1]) for k, v in self.sampling.items()}),
            key,
            self.seen,
            jnp.asarray(slot, jnp.int32),
            config=self.config,
            block_size=self.block_size,
            cached_blocks=self.max_blocks if start else 0,
        )
        self.keys = self.keys.at[slot].set(row_key)
        token = int(token)
        self.tokens[slot] = token
        self.positions[slot] = len(request.prompt)
        return token, scores

    def _decode_chunk(self) -> list[Event]:
        # The chunk runs only as many rows as there are live slots, rounded up to a power of two (at most every
        # slot): one request decodes at batch 1, not at max_batch. The padding rows are free slots, not live.
        active = sorted(self.running)
        count = min(1 << (len(active) - 1).bit_length(), self.slots)
        rows = np.asarray(active + [s for s in range(self.slots) if s not in self.running][: count - len(active)])
        live = np.arange(count) < len(active)
        longest = int(self.positions[active].max()) + self.chunk
        view_blocks = self._view_blocks(-(-longest // self.block_size))
        wants_scores = any(self.running[s].request.logprobs is not None for s in active)
        self.pools, sampled, self.keys, self.seen, scores = _decode(
            self.loop_params,
            self.pools,
            jnp.asarray(rows, jnp.int32),
            jnp.asarray(self.tables[rows, :view_blocks]),
            jnp.asarray(self.tokens[rows]),
            jnp.asarray(self.positions[rows]),
            jnp.asarray(live),
            self.keys,
            self.seen,
            SamplingArrays(**{k: jnp.asarray(v[rows]) for k, v in self.sampling.items()}),
            config=self.config,
            block_size=self.block_size,
            steps=self.chunk,
            processors=self._processors(rows[live]),
            top=TOP_LOGPROBS if wants_scores else None,
        )
        sampled = dict(zip(active, np.asarray(sampled), strict=False))
        scores = None if scores is None else jax.device_get(scores)
        events = []
        for row, slot in enumerate(active):
            running = self.running[slot]
            new = []
            finish = None
            for token in sampled[slot]:
                new.append(int(token))
                running.produced.append(int(token))
                finish = self._finish_reason(running)
                if finish:
                    break
            self.tokens[slot] = sampled[slot][-1]
            self.positions[slot] += self.chunk
            events.append(Event(running.request.id, new, finish is not None, finish))
            if running.request.logprobs is not None:
                events[-1].logprobs = [
                    _token_logprob(jax.tree.map(lambda a, row=row, i=i: a[row, i], scores), running.request.logprobs)
                    for i in range(len(new))
                ]
            if finish:
                self._retire(slot)
        return events

    def _view_blocks(self, blocks: int) -> int:
        """The decode view (in blocks) that covers `blocks`: a power of two, at least MIN_VIEW tokens, at most the
        table (few distinct programs; the attention over a short view costs little next to the weights)."""
        smallest = -(-MIN_VIEW // self.block_size)
        return min(max(1 << (blocks - 1).bit_length(), smallest), self.max_blocks)

    def row_counts(self) -> list[int]:
        """The row counts a decode chunk runs at: powers of two up to max_batch, and max_batch."""
        return sorted({min(1 << k, self.slots) for k in range(self.slots.bit_length() + 1)})

    def warmup(self, processors: Sequence[Processors] = (Processors(), Processors(sample=True))) -> int:
        """Compile every program requests can need, now rather than in the middle of serving: each prompt
        bucket's prefill (with and without a cached prefix) and a decode chunk for every row count, view length
        and sampling mode in `processors` (greedy and plain sampling by default; other modes, and chunks
        with log-probs, compile when first used). The runs touch only the trash block and free slots' state.
        Returns the number of programs run."""
        if self.running or self.waiting:
            raise UsageError("warm the engine up before it takes requests")
        count = 0
        table = jnp.zeros(self.max_blocks, jnp.int32)
        arrays = SamplingArrays(**{k: jnp.asarray(v[:1]) for k, v in self.sampling.items()})
        for bucket, cached_blocks in itertools.product(
            self.buckets, (0, self.max_blocks) if self.prefix_cache else (0,)
        ):
            self.pools, _, _, self.seen, _ = _prefill(
                prefill_params(self.params, self.config, bucket),
                self.pools,
                table,
                jnp.zeros((1, bucket), jnp.int32),
                jnp.asarray(0, jnp.int32),
                jnp.asarray(1, jnp.int32),
                arrays,
                jax.random.key(0),
                self.seen,
                jnp.asarray(0, jnp.int32),
                config=self.config,
                block_size=self.block_size,
                cached_blocks=cached_blocks,
            )
            count += 1
        views = sorted({self._view_blocks(1 << k) for k in range(self.max_blocks.bit_length() + 1)})
        for rows in self.row_counts():
            for view in views:
                for mode in processors:
                    self.pools, _, self.keys, self.seen, _ = _decode(
                        self.loop_params,
                        self.pools,
                        jnp.arange(rows, dtype=jnp.int32),
                        jnp.zeros((rows, view), jnp.int32),
                        jnp.zeros(rows, jnp.int32),
                        jnp.zeros(rows, jnp.int32),
                        jnp.zeros(rows, bool),
                        self.keys,
                        self.seen,
                        SamplingArrays(**{k: jnp.asarray(v[:rows]) for k, v in self.sampling.items()}),
                        config=self.config,
                        block_size=self.block_size,
                        steps=self.chunk,
                        processors=mode,
                        top=None,  # as `_decode_chunk` passes it: jit keys programs on the keywords given
                    )
                    count += 1
        jax.block_until_ready(self.pools)
        return count

    def _processors(self, live: np.ndarray) -> Processors:
        """The sampling processors the slots `live` use (a static part of the decode program)."""
        values = {k: v[live] for k, v in self.sampling.items()}
        sampled = values["temperature"] > 0
        return Processors(
            sample=bool(sampled.any()),
            repetition_penalty=bool((values["repetition_penalty"] != 1).any()),
            top_k=bool((sampled & (values["top_k"] > 0)).any()),
            top_p=bool((sampled & (values["top_p"] < 1)).any()),
            min_p=bool((sampled & (values["min_p"] > 0)).any()),
        )

    @staticmethod
    def _finish_reason(running: _Running) -> str | None:
        if running.produced[-1] in running.request.stop_token_ids:
            return "stop"
        if len(running.produced) >= running.request.max_tokens:
            return "length"
        return None

    def _retire(self, slot: int) -> None:
        running = self.running.pop(slot)
        self.pool.release(running.blocks)
        self.tables[slot] = TRASH
