"""jaxlora: Hugging Face causal language models as pure JAX functions."""

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
