"""jaxlora: Hugging Face causal language models as pure JAX functions.

The public names below load their module on first use (PEP 562), so `import jaxlora` and the CLI's argument
errors answer before JAX, transformers and orbax are imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    "BeamSearchOutput": "jaxlora.beam",
    "beam_search": "jaxlora.beam",
    "Model": "jaxlora.checkpoint",
    "load": "jaxlora.checkpoint",
    "ModelConfig": "jaxlora.config",
    "convert": "jaxlora.convert",
    "SampleOutput": "jaxlora.decoding",
    "sample": "jaxlora.decoding",
    "JaxloraError": "jaxlora.errors",
    "GenerateOutput": "jaxlora.generate",
    "StreamChunk": "jaxlora.generate",
    "generate": "jaxlora.generate",
    "left_pad": "jaxlora.generate",
    "stream": "jaxlora.generate",
    "hook_points": "jaxlora.hooks",
    "score": "jaxlora.losses",
    "ForwardOutput": "jaxlora.model",
    "embed": "jaxlora.model",
    "forward": "jaxlora.model",
    "Sampling": "jaxlora.sampling",
}

__all__ = [
    "BeamSearchOutput",
    "ForwardOutput",
    "GenerateOutput",
    "JaxloraError",
    "Model",
    "ModelConfig",
    "SampleOutput",
    "Sampling",
    "StreamChunk",
    "beam_search",
    "convert",
    "embed",
    "forward",
    "generate",
    "hook_points",
    "left_pad",
    "load",
    "sample",
    "score",
    "stream",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from jaxlora.beam import BeamSearchOutput, beam_search
    from jaxlora.checkpoint import Model, load
    from jaxlora.config import ModelConfig
    from jaxlora.convert import convert
    from jaxlora.decoding import SampleOutput, sample
    from jaxlora.errors import JaxloraError
    from jaxlora.generate import GenerateOutput, StreamChunk, generate, left_pad, stream
    from jaxlora.hooks import hook_points
    from jaxlora.losses import score
    from jaxlora.model import ForwardOutput, embed, forward
    from jaxlora.sampling import Sampling


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: `jaxlora.decoding.prefill`
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'jaxlora' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package; `jaxlora.generate` and `jaxlora.convert` are both a submodule
    and a public function of that name, and the public name must stay the function."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == _EXPORTS[name]:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
