"""GGUF (llama.cpp) files: metadata -> an HF config dict, tensors dequantized to float32 under their HF names.

Our own reader (the `gguf` package's dequantizers, no PyTorch) so a quantized GGUF streams tensor by tensor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.convert.gguf_blocks import relayout
from jaxlora.convert.readers import TensorReader
from jaxlora.errors import ConversionError

# GGUF architecture -> HF model_type. Mistral GGUFs are written with the "llama" architecture.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# GGUF tensor name -> HF tensor name; {i} is the layer index.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_NAME_PATTERNS = [
    (re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), hf) for g, hf in TENSOR_NAMES.items()
]


def hf_tensor_name(gguf_name: str) -> str:
    """GGUF name -> HF name; names we do not know pass through unchanged (and are reported as unexpected)."""
    for pattern, hf in _NAME_PATTERNS:
        match = pattern.match(gguf_name)
        if match:
            return hf.format(i=match.group(1)) if match.groups() else hf
    return gguf_name


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp reorders Llama's q/k rows per head from rotate-half to interleaved pairs; undo it."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile(TensorReader):
    def __init__(self, path: Path):
        import gguf

        if not path.is_file():
            raise ConversionError(f"no such file: {path}")
        try:
            self._reader = gguf.GGUFReader(str(path))
        except Exception as e:  # the gguf package raises assorted types on a malformed file
            raise ConversionError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.path = path
        self.architecture = self.field("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise ConversionError(
                f"unsupported GGUF architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        self._tensors = {hf_tensor_name(t.name): t for t in self._reader.tensors}

    def field(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def hf_config(self) -> dict[str, Any]:
        arch = self.architecture
        key = lambda name, default=None: self.field(f"{arch}.{name}", default)  # noqa: E731
        if key("rope.scaling.type", "none") not in ("none",) or "rope_freqs.weight" in self._reader_names():
            raise ConversionError(
                "GGUF files with RoPE scaling are not supported yet; convert the HF safetensors instead"
            )
        num_heads = key("attention.head_count")
        hidden = key("embedding_length")
        vocab = self.field("tokenizer.ggml.tokens")
        config = {
            "model_type": ARCHITECTURES[arch],
            "vocab_size": key("vocab_size") or len(vocab),
            "hidden_size": hidden,
            "intermediate_size": key("feed_forward_length"),
            "num_hidden_layers": key("block_count"),
            "num_attention_heads": num_heads,
            "num_key_value_heads": key("attention.head_count_kv", num_heads),
            "head_dim": key("attention.key_length", hidden // num_heads),
            "max_position_embeddings": key("context_length"),
            # GGUF stores eps as float32; transformers reads that same float32 value.
            "rms_norm_eps": float(np.float32(key("attention.layer_norm_rms_epsilon"))),
            "rope_theta": float(np.float32(key("rope.freq_base", 10000.0))),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
        }
        for name in ("bos", "eos", "pad"):
            token_id = self.field(f"tokenizer.ggml.{name}_token_id")
            if token_id is not None:
                config[f"{name}_token_id"] = int(token_id)
        return config

    def _reader_names(self) -> set[str]:
        return {t.name for t in self._reader.tensors}

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[name].shape))  # GGUF lists dims innermost first

    def get(self, name: str) -> np.ndarray:
        import gguf

        tensor = self._tensors[name]
        try:
            w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except (NotImplementedError, ValueError) as e:
            raise ConversionError(f"cannot dequantize GGUF tensor {tensor.name} ({e})") from None
        return self._rows_in_hf_order(name, w)

    def type_name(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def get_kept(self, name: str) -> dict | None:
        """A 2-D tensor's quantized blocks re-laid as jaxlora's quantized arrays (`gguf_blocks`), rows in HF's
        order; None for a tensor type that is not kept (it converts through float as usual)."""
        tensor = self._tensors[name]
        shape = self.shape(name)
        if len(shape) != 2:
            return None
        kept = relayout(tensor.data, self.type_name(name), *shape)
        return None if kept is None else {k: self._rows_in_hf_order(name, v) for k, v in kept.items()}

    def _rows_in_hf_order(self, name: str, w: np.ndarray) -> np.ndarray:
        if self.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            n_heads = self.field("llama.attention.head_count")
            if ".k_proj." in name:
                n_heads = self.field("llama.attention.head_count_kv", n_heads)
            w = _unpermute_rows(w, n_heads)
        return w

    def write_tokenizer(self, out_dir: Path) -> None:
        """The tokenizer embedded in the GGUF, saved as HF tokenizer files (transformers builds it)."""
        try:
            import torch  # noqa: F401  (transformers' GGUF reader insists on it, even for the tokenizer)
        except ImportError:
            raise ConversionError(
                "building the tokenizer from a GGUF file needs PyTorch (a transformers requirement): "
                "pip install 'jaxlora[torch]'"
            ) from None
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        tokenizer.save_pretrained(str(out_dir))
