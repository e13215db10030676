"""Hook points: named activations inside the decoder that a call can read (capture) or edit, named as
TransformerLens names them so interpretability code reads the same.

    hook_embed                    token embeddings (with Gemma's scale)             [batch, pos, hidden]
    hook_pos_embed                learned position embeddings (GPT-2 only)          [batch, pos, hidden]
    blocks.{i}.hook_resid_pre     the residual stream into layer i                  [batch, pos, hidden]
    blocks.{i}.attn.hook_q        queries, before RoPE                              [batch, pos, heads, head_dim]
    blocks.{i}.attn.hook_k        keys, before RoPE                                 [batch, pos, kv_heads, head_dim]
    blocks.{i}.attn.hook_v        values                                            [batch, pos, kv_heads, head_dim]
    blocks.{i}.attn.hook_pattern  attention probabilities                           [batch, heads, q_pos, k_pos]
    blocks.{i}.attn.hook_z        each head's output, before the output projection  [batch, pos, heads, head_dim]
    blocks.{i}.hook_attn_out      what attention adds to the residual stream        [batch, pos, hidden]
    blocks.{i}.hook_mlp_out       what the MLP adds to the residual stream          [batch, pos, hidden]
    blocks.{i}.hook_resid_post    the residual stream out of layer i                [batch, pos, hidden]
    ln_final.hook_normalized      the final norm's output (what the LM head reads)  [batch, pos, hidden]

Latent attention (DeepSeek-V3): hook_q and hook_k are [batch, pos, heads, head_dim] (keys expanded from the
latent, before RoPE), hook_v and hook_z [batch, pos, heads, v_head_dim].

A hook is `fn(x) -> x` of the same shape and dtype, traced with the call (so it works under jit, grad and
vmap). Reading `hook_pattern` needs the score matrix: the call uses the "xla" attention core for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from flax import linen as nn

from jaxlora.config import ModelConfig
from jaxlora.errors import UsageError

CAPTURED = "captured"  # the flax collection captured activations are sown into


class Sites(NamedTuple):
    """What one call does at hook points: edit some (site -> fn), capture some (their values are returned)."""

    edits: Mapping[str, Callable]
    capture: frozenset[str]

    def wants(self, name: str) -> bool:
        return name in self.edits or name in self.capture


def hook_points(config: ModelConfig) -> list[str]:
    """Every hook point of a model of `config`, in the order a forward pass reaches them."""
    names = ["hook_embed"] + (["hook_pos_embed"] if config.learned_positions else [])
    per_layer = ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z")
    per_layer += ("hook_attn_out", "hook_mlp_out", "hook_resid_post")
    for i in range(config.num_layers):
        names += [f"blocks.{i}.{name}" for name in per_layer]
    return names + ["ln_final.hook_normalized"]


def make_sites(config: ModelConfig, hooks: Mapping[str, Callable] | None, capture: Iterable[str]) -> Sites | None:
    """Checked Sites for a call, or None when the call touches no hook point."""
    hooks, capture = dict(hooks or {}), frozenset(capture)
    if not hooks and not capture:
        return None
    known = set(hook_points(config))
    unknown = sorted((set(hooks) | capture) - known)
    if unknown:
        raise UsageError(f"no hook point {unknown[0]!r} in this model; see jaxlora.hook_points(config)")
    for name, fn in hooks.items():
        if not callable(fn):
            raise UsageError(f"the hook for {name} is not callable")
    return Sites(hooks, capture)


def at_site(module: nn.Module, sites: Sites | None, name: str, x):
    """The activation `x` at hook point `name`: edited by its hook if any, and sown for capture if asked."""
    if sites is None or not sites.wants(name):
        return x
    fn = sites.edits.get(name)
    if fn is not None:
        edited = fn(x)
        if getattr(edited, "shape", None) != x.shape:
            raise UsageError(f"the hook for {name} returned shape {getattr(edited, 'shape', None)}, not {x.shape}")
        x = edited.astype(x.dtype)
    if name in sites.capture:
        module.sow(CAPTURED, name, x)
    return x


def collect(variables: Mapping) -> dict[str, object]:
    """{site: value} from the captured collection flax returns (sown values sit in 1-tuples at module paths)."""
    found: dict[str, object] = {}

    def walk(tree):
        for key, value in tree.items():
            if isinstance(value, tuple):
                found[key] = value[0]
            else:
                walk(value)

    walk(variables.get(CAPTURED, {}))
    return found
