"""The round trip with Hugging Face PEFT: LoRA adapters to and from a PEFT adapter folder.

A PEFT folder holds `adapter_config.json` and `adapter_model.safetensors` with, per adapted module,
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]. Module names come from the
family's weight table, so only Linear layers that exist 1:1 in the HF model can be exchanged (a fused HF
projection such as GPT-2's c_attn has no single jaxlora counterpart).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxlora.config import LoraConfig, ModelConfig
from jaxlora.errors import UsageError
from jaxlora.families import family_for
from jaxlora.families.table import TRANSPOSE
from jaxlora.lora import Adapters, target_paths
from jaxlora.model import get_path, set_path
from jaxlora.staging import staged

PREFIX = "base_model.model."


def module_names(config: ModelConfig) -> dict[tuple[str, ...], str]:
    """jaxlora Linear module path -> HF module name, for the Linear layers that map 1:1."""
    names = {}
    for rule in family_for(config.family).weights:
        one_to_one = rule.transform == TRANSPOSE and rule.hf_name.endswith(".weight") and "{e}" not in rule.hf_name
        if not one_to_one or not rule.param_path.endswith("/kernel"):
            continue
        if rule.when is not None and not getattr(config, rule.when):
            continue
        for i in range(config.num_layers) if "{i}" in rule.hf_name else [None]:
            path = tuple(rule.param_path.format(i=i).split("/")[:-1])
            names[path] = rule.hf_name.format(i=i).removesuffix(".weight")
    return names


def export_peft(
    adapters: Adapters, config: ModelConfig, out_dir: str | os.PathLike, base_model: str = "", force: bool = False
) -> Path:
    """Write `adapters` as a PEFT LoRA folder (atomically: a temp folder renamed at the end)."""
    names = module_names(config)
    paths = target_paths(config, adapters.config.targets)
    unmapped = sorted({p[-1] for p in paths if p not in names})
    if unmapped:
        raise UsageError(f"{config.family} has no 1:1 HF module for {', '.join(unmapped)}; PEFT cannot load it")
    tensors = {}
    for path in paths:
        ab = get_path(adapters.weights, path)
        module = PREFIX + names[path]
        tensors[module + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"], np.float32).T)
        tensors[module + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"], np.float32).T)
    lora = adapters.config
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "use_rslora": lora.rslora,
        # transformers' module names (GPT-J's out_proj is our o_proj, GPT-NeoX's dense too).
        "target_modules": sorted({names[path].rsplit(".", 1)[-1] for path in paths}),
        "lora_dropout": lora.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_dora": False,
        "modules_to_save": None,
    }
    out_dir = Path(out_dir)
    with staged(out_dir, force) as staging:
        (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        save_file(tensors, str(staging / "adapter_model.safetensors"))
    return out_dir


def import_peft(peft_dir: str | os.PathLike, config: ModelConfig) -> Adapters:
    """Read a PEFT LoRA folder (trained in PyTorch, say) as jaxlora adapters for a model of `config`."""
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
    for option, off in (("use_dora", False), ("bias", "none"), ("rank_pattern", {}), ("alpha_pattern", {})):
        if meta.get(option) not in (off, None):
            raise UsageError(f"PEFT option {option}={meta[option]!r} is not supported")
    try:
        tensors = load_file(str(weights_file))
    except SafetensorError as e:
        raise UsageError(f"{weights_file} is not a readable safetensors file ({e})") from None
    by_module = {name: path for path, name in module_names(config).items()}
    weights: dict = {}
    targets = set()
    try:
        rank, alpha = int(meta["r"]), float(meta["lora_alpha"])
        dropout = float(meta.get("lora_dropout") or 0.0)
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{config_file} lacks a valid r / lora_alpha ({type(e).__name__}: {e})") from None
    if rank < 1:
        raise UsageError(f"{config_file} declares rank {rank}")
    for key, value in tensors.items():
        stem = key.removeprefix(PREFIX)
        if stem.endswith(".lora_A.weight"):
            module, leaf = stem.removesuffix(".lora_A.weight"), "a"
        elif stem.endswith(".lora_B.weight"):
            module, leaf = stem.removesuffix(".lora_B.weight"), "b"
        else:
            raise UsageError(f"unexpected tensor {key} in {weights_file.name}")
        if module not in by_module:
            raise UsageError(f"adapter module {module} is not a Linear layer of this {config.family} model")
        path = by_module[module]
        targets.add(path[-1])
        set_path(weights, path + (leaf,), jnp.asarray(value.T))
    adapters = Adapters(
        weights,
        LoraConfig(
            rank,
            alpha,
            tuple(sorted(targets)),
            bool(meta.get("use_rslora", False)),
            dropout,
        ),
    )
    expected = target_paths(config, adapters.config.targets)
    for path, (fan_in, fan_out) in expected.items():
        try:
            ab = get_path(weights, path)
        except KeyError:
            raise UsageError(f"adapter lacks {'/'.join(path)} (its target_modules name it)") from None
        if ab["a"].shape != (fan_in, rank) or ab["b"].shape != (rank, fan_out):
            raise UsageError(
                f"adapter {'/'.join(path)} has shapes {ab['a'].shape}, {ab['b'].shape}; "
                f"expected ({fan_in}, {rank}), ({rank}, {fan_out})"
            )
    return adapters
