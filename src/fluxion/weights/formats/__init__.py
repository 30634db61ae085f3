"""Checkpoint file formats beyond plain safetensors: one module per format, one place that tells them apart.

| module          | what it reads                                                                        |
|-----------------|--------------------------------------------------------------------------------------|
| `comfy_quant`   | ComfyUI quantized safetensors: `.comfy_quant` + `weight_scale` (fp8 per tensor, NVFP4), |
|                 | the older `scaled_fp8` marker layout (`scale_weight`), plain fp8 casts                |
| `gguf_io`       | GGUF files in city96's layout (BFL names; F32/F16/BF16, Q8_0, K-quants, ...)          |
| `bnb_nf4`       | bitsandbytes 4-bit (nf4 / fp4) tensors as diffusers / transformers serialise them     |
| `bundle`        | ComfyUI all-in-one checkpoints (`model.diffusion_model.` + `vae.` + `text_encoders.`) |
| `int8_rows`     | fluxion's int8 storage: int8 codes + one fp32 scale per row (the embedded models)     |

Everything is dequantized exactly on read (each tensor in fp32, then cast once to the requested dtype), except
weights the caller may keep packed: fp8 e4m3 with its scale (fluxion's fp8 fast path, quant/fp8.py) and GGUF Q8_0
blocks (int8 weight-only with one scale per 32 inputs, quant/weight_only.py). Those come back as `PackedWeight`s
next to a state dict whose entry holds the codes (same [out, in] shape as the weight), so strict key and shape
checks run unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from fluxion.weights.safetensors_io import PICKLE_SUFFIXES, CheckpointError

PackedFormat = Literal["fp8_e4m3", "int8_block32"]


@dataclass(frozen=True)
class PackedWeight:
    """A quantized Linear weight kept as stored. The codes live in the state dict under the weight's key.

    fp8_e4m3:     codes float8_e4m3fn [N, K], scale fp32 [N, 1]   W = codes * scale (a per-tensor scale is
                  broadcast to every row: the same numbers, so exact)
    int8_block32: codes int8 [N, K],          scale fp32 [N, K/32] W = codes * scale per block of 32 inputs
    """

    format: PackedFormat
    scale: Tensor


QuantInfo = dict[str, PackedWeight]  # BFL weight key -> how its codes in the state dict are scaled


def dequantize_packed(codes: Tensor, packed: PackedWeight, dtype: torch.dtype | None = None) -> Tensor:
    """The weight the file means, computed in fp32 and rounded once to `dtype` (fp32 if None)."""
    if packed.format == "fp8_e4m3":
        w = codes.float() * packed.scale
    else:
        N, K = codes.shape
        w = (codes.float().view(N, K // 32, 32) * packed.scale[..., None]).view(N, K)
    return w if dtype is None else w.to(dtype)


def dequantize_all(
    sd: dict[str, Tensor], quant: QuantInfo | None, dtype: torch.dtype | None
) -> dict[str, Tensor]:
    """`sd` with every packed weight replaced by its dequantized value."""
    if not quant:
        return sd
    return {k: dequantize_packed(v, quant[k], dtype) if k in quant else v for k, v in sd.items()}


def sniff(path: str | Path) -> str:
    """The container of a checkpoint file from its first bytes: "safetensors", "gguf", "pickle", "unknown"."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if path.suffix in PICKLE_SUFFIXES or head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04"):
        return "pickle"
    return "unknown"


def refuse_unknown(path: Path, what: str = "checkpoint") -> None:
    """A one-line error naming the container when it is one we know but do not read (by magic bytes, else by
    suffix); returns when it is none of them (the safetensors reader then says what it sees)."""
    with open(path, "rb") as f:
        head = f.read(16)
    by_magic = {b"\x89HDF": "an HDF5 (Keras .h5) file", b"\x93NUMPY": "a NumPy .npy array"}
    by_suffix = {
        ".onnx": "an ONNX model",
        ".msgpack": "a Flax msgpack checkpoint",
        ".h5": "an HDF5 (Keras .h5) file",
        ".npz": "a NumPy .npz archive",
        ".tflite": "a TFLite model",
        ".engine": "a TensorRT engine",
        ".plan": "a TensorRT engine",
    }
    name = next(
        (n for magic, n in by_magic.items() if head.startswith(magic)), by_suffix.get(path.suffix.lower())
    )
    if name:
        raise CheckpointError(
            f"{path}: {name}, not a {what} fluxion reads (safetensors, GGUF, or a diffusers folder)"
        )
