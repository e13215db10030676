"""Readers that hand out one source tensor at a time as a numpy array, under its HF name.

Each reader opens its files lazily (safetensors and torch pickles memory-mapped), so conversion holds at most
the output plus one tensor in memory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from jaxlora.errors import ConversionError


class TensorReader:
    """names(): every tensor name in the source; shape(name): its shape, read from the file's header where it has
    one; get(name) -> np.ndarray in its stored dtype."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get(name).shape)

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SafetensorsReader(TensorReader):
    """Names and shapes from each shard's header (its handle stays open); each tensor read through a handle of its
    own, closed at once: a shard's memory map counts every page read through it in the process's resident memory
    until it is unmapped, so one long-lived map per shard would grow to the size of the source."""

    def __init__(self, files: list[Path]):
        from safetensors import SafetensorError, safe_open

        self._files = files
        self._handles = []
        self._where: dict[str, int] = {}
        for path in files:
            if not path.is_file():
                raise ConversionError(f"missing safetensors shard: {path}")
            try:
                handle = safe_open(str(path), framework="numpy")
            except SafetensorError as e:
                raise ConversionError(f"{path} is not a readable safetensors file ({e})") from None
            self._handles.append(handle)
            for name in handle.keys():
                self._where[name] = len(self._handles) - 1

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(self._files[self._where[name]]), framework="numpy") as handle:
            return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


# The 16 values of an FP4 (e2m1) code, sign in the high bit.
FP4_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 (gpt-oss's expert weights): blocks [..., rows, groups, 16] uint8, two FP4 codes a byte (low nibble
    first), and scales [..., rows, groups] uint8, a power of two biased by 127, per 32 values -> float32
    [..., groups * 32, rows]: the last two axes swapped, as transformers lays the experts out ([in, out])."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8 or blocks.shape[:-1] != scales.shape:
        raise ConversionError(f"MXFP4 blocks {blocks.shape} {blocks.dtype} do not match scales {scales.shape}")
    values = np.empty((*blocks.shape, 2), np.float32)
    values[..., 0] = FP4_E2M1[blocks & 0x0F]
    values[..., 1] = FP4_E2M1[blocks >> 4]
    values = np.ldexp(values, (scales.astype(np.int32) - 127)[..., None, None])
    return np.swapaxes(values.reshape(*blocks.shape[:-2], -1), -1, -2)


class MXFP4Experts(TensorReader):
    """A reader that shows each pair NAME_blocks + NAME_scales (gpt-oss's MXFP4 expert weights) as the one float32
    tensor NAME, dequantized when it is read."""

    def __init__(self, reader: TensorReader):
        self._reader = reader
        names = set(reader.names())
        packed = {n.removesuffix("_blocks") for n in names if n.endswith("_blocks")}
        self._packed = {n for n in packed if n + "_scales" in names}
        hidden = {n + suffix for n in self._packed for suffix in ("_blocks", "_scales")}
        self._names = [n for n in reader.names() if n not in hidden] + sorted(self._packed)

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._packed:
            return self._reader.shape(name)
        *prefix, rows, groups, _ = self._reader.shape(name + "_blocks")
        return (*prefix, groups * 32, rows)

    def get(self, name: str) -> np.ndarray:
        if name not in self._packed:
            return self._reader.get(name)
        return dequantize_mxfp4(self._reader.get(name + "_blocks"), self._reader.get(name + "_scales"))

    def close(self) -> None:
        self._reader.close()


def _torch_to_numpy(tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16 of its own: reinterpret the bits, no rounding.
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _unpickler_reason(error: Exception) -> str:
    """torch's weights-only refusal buries the reason after 'WeightsUnpickler error:' (and suggests retrying with
    weights_only=False, which we never do: that part is not repeated)."""
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(error), re.S)
    if match:
        return " ".join(match.group(1).split())
    if "weights_only" in _first_line(error):
        return "it holds objects other than tensors, which jaxlora never unpickles"
    return _first_line(error)


def _load_pickle(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise ConversionError(f"reading {path.name} needs PyTorch: pip install 'jaxlora[torch]'") from None
    import pickle

    if not path.is_file():
        raise ConversionError(f"missing checkpoint file: {path}")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        # torch words it "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module x is blocked".
        needs_code = re.search(r"(?:Unsupported global: |unsupported )GLOBAL (\S+)", str(e))
        if needs_code:
            raise ConversionError(
                f"refused to load {path.name}: unpickling it would call {needs_code.group(1)} "
                "(pickles are loaded with weights_only=True only)"
            ) from None
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({_unpickler_reason(e)})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)})") from None
    # Training scripts often wrap the state dict: {"state_dict": {...}} or {"model": {...}}.
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and set(state) == {wrapper} and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path.name} does not hold a state dict of tensors")
    return state


class TorchPickleReader(TensorReader):
    """`pytorch_model.bin` (sharded too) or a bare `.pth`/`.pt` state dict, loaded with weights_only=True."""

    def __init__(self, files: list[Path]):
        self._tensors: dict = {}
        for path in files:
            self._tensors.update(_load_pickle(path))

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> np.ndarray:
        return _torch_to_numpy(self._tensors[name])

    def close(self) -> None:
        self._tensors.clear()


def shard_files(folder: Path, index_name: str) -> list[Path]:
    """The shard files an HF `*.index.json` names, in order, each once."""
    index_path = folder / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{index_path} is not a valid shard index ({e})") from None
    return [folder / name for name in dict.fromkeys(weight_map.values())]
