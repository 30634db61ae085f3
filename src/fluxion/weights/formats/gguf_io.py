"""GGUF checkpoints in city96's layout (ComfyUI-GGUF), read with the `gguf` package.

Facts (ComfyUI-GGUF loader.py / convert.py):
- tensor names are the BFL / ComfyUI state-dict names, sometimes with the `model.diffusion_model.` prefix;
- GGUF lists dimensions fastest-first, so a torch [out, in] weight is stored with shape (in, out): the torch
  shape is the reverse; `GGUFReader` already hands out data in row-major (torch) order;
- a tensor whose last dim is not a multiple of 256 may have been flattened to (-1, 256) before quantizing, its
  real shape kept in the metadata array `comfy.gguf.orig_shape.<name>`.
Every quantization type that `gguf.quants.dequantize` implements is read (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1,
Q2_K..Q6_K, IQ*); the values are the package's own dequantization, in fp32, rounded once to the target dtype.
Q8_0 (blocks of 32 int8 codes with one fp16 scale) can instead be kept as codes + scales (`keep_q8_0`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fluxion.weights.formats import PackedWeight, QuantInfo
from fluxion.weights.safetensors_io import CheckpointError

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _reader(path: Path):
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency of the weights extra
        raise CheckpointError(
            f"{path} is a GGUF file: install the gguf package (pip install fluxion[gguf])"
        ) from e
    try:
        return gguf, gguf.GGUFReader(str(path))
    except (ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: a GGUF file fluxion cannot parse ({e})") from None


def _orig_shape(gguf, reader, name: str) -> tuple[int, ...] | None:
    field = reader.get_field(f"comfy.gguf.orig_shape.{name}")
    if field is None:
        return None
    return tuple(int(field.parts[i][0]) for i in field.data)


def _torch_shape(gguf, reader, t) -> tuple[int, ...]:
    return _orig_shape(gguf, reader, t.name) or tuple(int(d) for d in reversed(t.shape.tolist()))


def _name(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    gguf, reader = _reader(Path(path))
    return {_name(t.name): _torch_shape(gguf, reader, t) for t in reader.tensors}


def read(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    keep_q8_0: Callable[[str], bool] = lambda key: False,
) -> tuple[dict[str, Tensor], QuantInfo]:
    """All tensors as torch tensors (BFL names, torch shapes), dequantized to `dtype` (fp32 if None); Q8_0 weights
    for which `keep_q8_0(key)` is true stay int8 codes with a PackedWeight("int8_block32")."""
    path = Path(path)
    gguf, reader = _reader(path)
    Q = gguf.GGMLQuantizationType
    sd: dict[str, Tensor] = {}
    quant: QuantInfo = {}
    for t in reader.tensors:
        name, qtype = _name(t.name), t.tensor_type
        shape = _torch_shape(gguf, reader, t)
        reshaped = _orig_shape(gguf, reader, t.name) is not None
        if qtype == Q.Q8_0 and len(shape) == 2 and not reshaped and shape[1] % 32 == 0 and keep_q8_0(name):
            blocks = np.asarray(t.data, dtype=np.uint8).reshape(-1, 34)  # 2-byte fp16 scale + 32 int8 codes
            scale = torch.from_numpy(blocks[:, :2].copy().view(np.float16).astype(np.float32))
            codes = torch.from_numpy(blocks[:, 2:].copy().view(np.int8))
            sd[name] = codes.reshape(shape)
            quant[name] = PackedWeight("int8_block32", scale.reshape(shape[0], shape[1] // 32))
            continue
        try:
            values = gguf.quants.dequantize(t.data, qtype)
        except NotImplementedError:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} uses GGUF quantization type {qtype.name}, which the installed gguf "
                "package cannot dequantize; use a Q8_0, K-quant (Q2_K..Q6_K), F16 or BF16 file"
            ) from None
        out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
        sd[name] = out if dtype is None else out.to(dtype)
    return sd, quant
