"""RoPE scaling kinds against transformers' own rotary embedding, past each model's original context."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, hf_model

from jaxlora.families import config_from_hf
from jaxlora.rope import rope_cos_sin

KINDS = {
    "linear": "llama-linear-rope",
    "dynamic": "llama-dynamic-rope",
    "llama3": "llama3-rope",
    "yarn": "llama-yarn-rope",
    "longrope": "phi3-longrope",
    "default": "llama-gqa",
}


def hf_cos_sin(name: str, positions: np.ndarray):
    model = hf_model(TINY_CONFIGS[name])
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(x, torch.tensor(positions, dtype=torch.long))
    half = cos.shape[-1] // 2
    return cos[..., :half].numpy(), sin[..., :half].numpy()


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("length", [12, 80])
def test_cos_sin_match_transformers(kind, length):
    """Within the original context (12 positions) and well past it (80 positions; originals are 16)."""
    name = KINDS[kind]
    config = config_from_hf(TINY_CONFIGS[name])
    assert config.rope.kind == kind
    positions = np.arange(length)[None].repeat(2, axis=0)
    want_cos, want_sin = hf_cos_sin(name, positions)
    cos, sin = rope_cos_sin(jnp.asarray(positions, jnp.int32), config)
    # Angles up to 80 rad: float32 spacing there is ~8e-6, so the tables agree to a few 1e-6.
    np.testing.assert_allclose(cos, want_cos, rtol=0, atol=2e-5)
    np.testing.assert_allclose(sin, want_sin, rtol=0, atol=2e-5)


def test_scaling_changes_the_angles_past_the_original_context():
    """The kinds are not silently plain RoPE: past the original 16 positions each rotates differently."""
    positions = jnp.arange(80)[None]
    plain, _ = rope_cos_sin(positions, config_from_hf(TINY_CONFIGS["llama-gqa"]))
    for kind in ("linear", "dynamic", "yarn", "longrope"):
        scaled, _ = rope_cos_sin(positions, config_from_hf(TINY_CONFIGS[KINDS[kind]]))
        assert np.abs(np.asarray(scaled) - np.asarray(plain)).max() > 1e-2, kind
