"""The round trip with Hugging Face PEFT: LoRA adapters to and from a PEFT adapter folder.

A PEFT folder holds `adapter_config.json` and `adapter_model.safetensors` with, per adapted module,
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]. Module names come from the
family's weight table. A fused HF projection (GPT-2's c_attn, CodeGen's and Phi-3's qkv_proj, Phi-3's
gate_up_proj) holds several jaxlora layers: their adapters become one PEFT adapter on the fused module, A
stacked and B block-diagonal (rank = parts x rank, `rank_pattern`/`alpha_pattern` keep the scale), the rows
placed by running the family's splitter over the fused tensor's element indices (as `export hf` does); back, a
PEFT adapter on a fused module gives each part the shared A and its own rows of B, which is exact.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxlora.config import LoraConfig, ModelConfig
from jaxlora.errors import UsageError
from jaxlora.families import family_for
from jaxlora.families.table import TRANSPOSE, Split, layers_of
from jaxlora.lora import Adapters, target_paths
from jaxlora.model import get_path, linear_kernels, set_path
from jaxlora.staging import staged

PREFIX = "base_model.model."


@dataclass(frozen=True)
class HFModule:
    """The transformers module a jaxlora Linear layer lives in: the whole of it, or one part of a fused one."""

    name: str
    split: Split | None = None


def hf_modules(config: ModelConfig) -> dict[tuple[str, ...], HFModule]:
    """jaxlora Linear module path -> its HF module, for the layers PEFT can adapt: Linear weights (transposed
    into kernels), Conv1D weights in families that keep them (GPT-2), and parts of fused projections."""
    family = family_for(config.family)
    modules = {}
    for rule in family.weights:
        if not rule.hf_name.endswith(".weight") or "{e}" in rule.hf_name or not rule.param_path.endswith("/kernel"):
            continue
        split = rule.transform if isinstance(rule.transform, Split) else None
        # A Conv1D family's lone nn.Linear (GPT-2's untied head) would need the opposite fan_in_fan_out.
        whole = rule.transform == (None if family.conv1d_weights else TRANSPOSE)
        if split is None and not whole:
            continue
        for i in layers_of(rule, config):
            path = tuple(rule.param_path.format(i=i).split("/")[:-1])
            modules[path] = HFModule(rule.hf_name.format(i=i).removesuffix(".weight"), split)
    return modules


def fused_rows(config: ModelConfig, parts: dict[str, tuple[str, ...]], split: Split) -> dict[str, np.ndarray]:
    """For a fused module whose parts (name -> jaxlora path) the splitter cuts out: each part's output rows in the
    fused weight, found by splitting the weight's own element indices."""
    family = family_for(config.family)
    kernels = linear_kernels(config)
    fan_in = kernels[next(iter(parts.values()))][0]
    fan_out = sum(kernels[path][1] for path in parts.values())
    shape = (fan_in, fan_out) if family.conv1d_weights else (fan_out, fan_in)
    index = np.arange(fan_in * fan_out, dtype=np.float64).reshape(shape)
    cut = split.splitter(index, config)
    rows = {}
    for part in parts:
        coords = np.unravel_index(cut[part].astype(np.int64), shape)  # each [in, out_part]
        out, inner = (coords[1], coords[0]) if family.conv1d_weights else coords
        if not (np.all(out == out[:1]) and np.all(inner == np.arange(fan_in)[:, None])):
            raise UsageError(f"{config.family}'s fused weight does not split into whole output rows")
        rows[part] = out[0]
    return rows


def _fused_groups(config: ModelConfig, modules: dict) -> dict[str, dict[str, tuple[str, ...]]]:
    """Fused HF module name -> {part: jaxlora path} over every part the table cuts from it."""
    groups: dict[str, dict[str, tuple[str, ...]]] = {}
    for path, module in modules.items():
        if module.split is not None:
            groups.setdefault(module.name, {})[module.split.part] = path
    return groups


def target_modules(adapted: set[str], every: set[str]) -> list[str]:
    """PEFT's target_modules for these HF modules: the shortest name endings (PEFT matches a list entry against
    the end of a module's name) that name no other module, e.g. GPT-2's "attn.c_proj" where "c_proj" would also
    take the MLP's."""
    others = every - adapted
    for length in range(1, max(len(name.split(".")) for name in adapted) + 1):
        endings = {".".join(name.split(".")[-length:]) for name in adapted}
        if not any(other == e or other.endswith("." + e) for other in others for e in endings):
            return sorted(endings)
    return sorted(adapted)


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def export_peft(
    adapters: Adapters, config: ModelConfig, out_dir: str | os.PathLike, base_model: str = "", force: bool = False
) -> Path:
    """Write `adapters` as a PEFT LoRA folder (atomically: a temp folder renamed at the end)."""
    adapters = adapters.per_layer()
    modules = hf_modules(config)
    paths = target_paths(config, adapters.config.targets)
    unmapped = sorted({p[-1] for p in paths if p not in modules})
    if unmapped:
        raise UsageError(f"{config.family} has no HF module PEFT can adapt for {', '.join(unmapped)}")
    lora = adapters.config
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for path in paths:
        if modules[path].split is not None:
            continue
        ab = get_path(adapters.weights, path)
        module = PREFIX + modules[path].name
        tensors[module + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"], np.float32).T)
        tensors[module + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"], np.float32).T)
    for name, parts in _fused_groups(config, modules).items():
        adapted = sorted(part for part, path in parts.items() if path in paths)
        if not adapted:
            continue
        rows = fused_rows(config, parts, modules[parts[adapted[0]]].split)
        fan_in = linear_kernels(config)[parts[adapted[0]]][0]
        rank = lora.rank * len(adapted)
        a = np.zeros((rank, fan_in), np.float32)
        b = np.zeros((sum(len(r) for r in rows.values()), rank), np.float32)
        for n, part in enumerate(adapted):  # block n: this part's A, and its B on the part's own rows
            ab = get_path(adapters.weights, parts[part])
            block = slice(n * lora.rank, (n + 1) * lora.rank)
            a[block] = np.asarray(ab["a"], np.float32).T
            b[rows[part], block] = np.asarray(ab["b"], np.float32).T
        tensors[PREFIX + name + ".lora_A.weight"] = a
        tensors[PREFIX + name + ".lora_B.weight"] = b
        if rank != lora.rank:  # PEFT scales by alpha / rank: keep each part's alpha / lora.rank
            rank_pattern[re.escape(name)] = rank
            growth = rank / lora.rank
            alpha_pattern[re.escape(name)] = lora.alpha * (math.sqrt(growth) if lora.rslora else growth)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "use_rslora": lora.rslora,
        "target_modules": target_modules({modules[path].name for path in paths}, {m.name for m in modules.values()}),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": lora.dropout,
        "bias": "none",
        "fan_in_fan_out": family_for(config.family).conv1d_weights,
        "inference_mode": True,
        "use_dora": False,
        "modules_to_save": None,
    }
    out_dir = Path(out_dir)
    with staged(out_dir, force) as staging:
        (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        save_file(tensors, str(staging / "adapter_model.safetensors"))
    return out_dir


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def import_peft(peft_dir: str | os.PathLike, config: ModelConfig) -> Adapters:
    """Read a PEFT LoRA folder (trained in PyTorch, say) as jaxlora adapters for a model of `config`.

    Modules of other ranks or alphas (`rank_pattern`, `alpha_pattern`) are padded with zeros to the largest rank
    and their B scaled to the common alpha / rank: the same update, one LoraConfig."""
    folder = Path(peft_dir)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise UsageError(f"{folder} is not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{config_file} holds {type(meta).__name__}, not an adapter config")
    if meta.get("peft_type") != "LORA":
        raise UsageError(f"{folder} holds a {meta.get('peft_type')} adapter; only LORA is supported")
    for option, off in (("use_dora", False), ("bias", "none")):
        if meta.get(option) not in (off, None):
            raise UsageError(f"PEFT option {option}={meta[option]!r} is not supported")
    rank_pattern, alpha_pattern = meta.get("rank_pattern") or {}, meta.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise UsageError(f"{config_file}: rank_pattern and alpha_pattern must be objects")
    try:
        tensors = load_file(str(weights_file))
    except SafetensorError as e:
        raise UsageError(f"{weights_file} is not a readable safetensors file ({e})") from None
    try:
        rank, alpha = int(meta["r"]), float(meta["lora_alpha"])
        dropout = float(meta.get("lora_dropout") or 0.0)
        alphas = {key: float(value) for key, value in alpha_pattern.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{config_file} lacks a valid r / lora_alpha ({type(e).__name__}: {e})") from None
    if rank < 1:
        raise UsageError(f"{config_file} declares rank {rank}")
    rslora = bool(meta.get("use_rslora", False))
    modules = hf_modules(config)
    by_name: dict[str, list[tuple[str, ...]]] = {}
    for path, module in modules.items():
        by_name.setdefault(module.name, []).append(path)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        stem = key.removeprefix(PREFIX)
        if stem.endswith(".lora_A.weight"):
            module, leaf = stem.removesuffix(".lora_A.weight"), "a"
        elif stem.endswith(".lora_B.weight"):
            module, leaf = stem.removesuffix(".lora_B.weight"), "b"
        else:
            raise UsageError(f"unexpected tensor {key} in {weights_file.name}")
        if module not in by_name:
            raise UsageError(f"adapter module {module} is not a Linear layer of this {config.family} model")
        pairs.setdefault(module, {})[leaf] = np.asarray(value, np.float32)
    kernels = linear_kernels(config)
    common_scale = _scale(alpha, rank, rslora)
    try:
        ranks = {int(value) for value in rank_pattern.values()}
    except (TypeError, ValueError) as e:
        raise UsageError(f"{config_file}: rank_pattern holds a rank that is not a number ({e})") from None
    if min(ranks, default=rank) < 1:
        raise UsageError(f"{config_file}: rank_pattern declares rank {min(ranks)}")
    rank_pattern = {key: int(value) for key, value in rank_pattern.items()}
    largest = max([rank, *(_pattern_value(rank_pattern, module, rank) for module in pairs)])
    weights: dict = {}
    for module, ab in pairs.items():
        paths = by_name[module]
        fan_in = kernels[paths[0]][0]
        fan_out = sum(kernels[path][1] for path in paths)
        if set(ab) != {"a", "b"}:
            raise UsageError(f"adapter module {module} lacks its lora_{'B' if 'a' in ab else 'A'} weight")
        r = _pattern_value(rank_pattern, module, rank)
        if ab["a"].shape != (r, fan_in) or ab["b"].shape != (fan_out, r):
            raise UsageError(
                f"adapter module {module} has shapes lora_A {ab['a'].shape}, lora_B {ab['b'].shape}; its rank "
                f"{r} and this model expect ({r}, {fan_in}), ({fan_out}, {r})"
            )
        factor = _scale(_pattern_value(alphas, module, alpha), r, rslora) / common_scale
        a = np.zeros((fan_in, largest), np.float32)
        b = np.zeros((largest, fan_out), np.float32)
        a[:, :r], b[:r] = ab["a"].T, ab["b"].T * np.float32(factor)
        split = modules[paths[0]].split
        if split is None:
            set_path(weights, paths[0] + ("a",), jnp.asarray(a))
            set_path(weights, paths[0] + ("b",), jnp.asarray(b))
            continue
        parts = {modules[path].split.part: path for path in paths}
        for part, rows in fused_rows(config, parts, split).items():  # every part shares A, each has its B rows
            set_path(weights, parts[part] + ("a",), jnp.asarray(a))
            set_path(weights, parts[part] + ("b",), jnp.asarray(b[:, rows]))
    targets = tuple(sorted({path[-1] for module in pairs for path in by_name[module]}))
    common_alpha = alpha if largest == rank else common_scale * (math.sqrt(largest) if rslora else largest)
    adapters = Adapters(weights, LoraConfig(largest, common_alpha, targets, rslora, dropout))
    for path in target_paths(config, targets):
        try:
            get_path(weights, path)
        except KeyError:
            raise UsageError(f"adapter lacks {'/'.join(path)} (its target_modules name it)") from None
    return adapters
