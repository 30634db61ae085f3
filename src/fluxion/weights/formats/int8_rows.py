"""fluxion's int8 storage layout: how the embedded fluxion-tiny models ship at half their bf16 size.

    header metadata  "quantization": "int8_rows"
    L.weight         int8 [N, K]   codes in [-127, 127]
    L.weight_scale   fp32 [N]      one scale per output row:   W = weight * weight_scale[:, None]
    anything else    as stored (norm scales, embedders left unquantized)

Symmetric round-to-nearest with the row's absolute maximum mapped to 127. Measured on fluxion-tiny v2 (8
prompts, 4 steps, same seeds): images differ from the bf16 weights' by 50 dB PSNR on average (ComfyUI-style fp8
with one scale per tensor: 38 dB), so the file is a storage format only: `read` dequantizes every weight on load
(fp32, then one rounding to the requested dtype) and the model runs as if loaded from bf16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fluxion.weights.safetensors_io import CheckpointError

TAG = "int8_rows"
METADATA = {"quantization": TAG}


def is_int8_rows(metadata: dict[str, str]) -> bool:
    return metadata.get("quantization") == TAG


def quantize(sd: dict[str, Tensor], which: Callable[[str, Tensor], bool]) -> dict[str, Tensor]:
    """`sd` with every 2-D weight that `which(key, tensor)` selects replaced by int8 codes + row scales."""
    out: dict[str, Tensor] = {}
    for key, w in sd.items():
        if key.endswith(".weight") and w.ndim == 2 and which(key, w):
            w32 = w.float()
            scale = w32.abs().amax(dim=1) / 127.0  # [N]; an all-zero row keeps scale 0 and codes 0
            codes = torch.round(w32 / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
            out[key] = codes.clamp(-127, 127).to(torch.int8)
            out[key.removesuffix("weight") + "weight_scale"] = scale
        else:
            out[key] = w
    return out


def read(sd: dict[str, Tensor], dtype: torch.dtype | None, source: str) -> dict[str, Tensor]:
    """The weights the file means (int8 codes times row scales, in fp32, then `dtype`); checks the pairs."""
    out: dict[str, Tensor] = {}
    scales = {k.removesuffix("_scale"): v for k, v in sd.items() if k.endswith(".weight_scale")}
    # dtype None keeps the file's: that of its unquantized float tensors (bf16 for the shipped models)
    stored = [
        v.dtype for k, v in sd.items() if v.is_floating_point() and k not in scales and "_scale" not in k
    ]
    dtype = dtype or (stored[0] if stored else torch.float32)
    for key, value in sd.items():
        if key.endswith(".weight_scale"):
            if key.removesuffix("_scale") not in sd:
                raise CheckpointError(f"{source}: {key} has no {key.removesuffix('_scale')} to scale")
            continue
        if value.dtype == torch.int8:
            scale = scales.get(key)
            if scale is None or value.ndim != 2 or tuple(scale.shape) != (value.shape[0],):
                raise CheckpointError(
                    f"{source}: int8 tensor {key} {tuple(value.shape)} needs a {key}_scale of shape "
                    f"[{value.shape[0] if value.ndim else '?'}] (int8_rows layout), found "
                    f"{None if scale is None else tuple(scale.shape)}"
                )
            value = value.float() * scale.float()[:, None]
        elif key in scales:
            raise CheckpointError(f"{source}: {key} has a scale but is {value.dtype}, not int8 codes")
        out[key] = value.to(dtype) if value.is_floating_point() else value
    return out
