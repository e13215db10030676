"""CodeGen (Salesforce/codegen-*-mono/multi/nl): GPT-J's block with a fused qkv_proj in CodeGen's own layout."""

from __future__ import annotations

import numpy as np

from jaxlora.config import ModelConfig
from jaxlora.families.gptj import IGNORED, SHARED, parallel_block_config
from jaxlora.families.table import Family, Split, WeightRule

_LAYER = "transformer.h.{i}."

MP_NUM = 4


def split_qkv(w: np.ndarray, config: ModelConfig) -> dict[str, np.ndarray]:
    """CodeGen was trained on 4 model-parallel shards: qkv_proj's rows are 4 blocks, each ordered q, v, k."""
    hidden = w.shape[1]
    blocks = w.reshape(MP_NUM, 3, hidden // MP_NUM, hidden)
    q, v, k = (blocks[:, j].reshape(hidden, hidden).T for j in range(3))
    return {"q": q, "k": k, "v": v}


WEIGHTS = SHARED + (
    WeightRule(_LAYER + "attn.qkv_proj.weight", "layers_{i}/attn/q_proj/kernel", Split(split_qkv, "q")),
    WeightRule(_LAYER + "attn.qkv_proj.weight", "layers_{i}/attn/k_proj/kernel", Split(split_qkv, "k")),
    WeightRule(_LAYER + "attn.qkv_proj.weight", "layers_{i}/attn/v_proj/kernel", Split(split_qkv, "v")),
)

FAMILY = Family(
    model_types=("codegen",),
    config_from_hf=parallel_block_config,
    weights=WEIGHTS,
    ignored=IGNORED,
)
