"""fluxion's int8 storage layout: how the embedded fluxion-tiny models ship at half their bf16 size.

    header metadata  "quantization": "int8_rows"
    L.weight         int8 [N, K]   codes in [-127, 127]
    L.weight_scale   fp32 [N]      one scale per output row:   W = weight * weight_scale[:, None]
    anything else    as stored (1-D norm scales; 2-D weights the writer chose to keep)

Symmetric round-to-nearest with the row's absolute maximum mapped to 127 (quant/weight_only.py's recipe).
Images from fluxion-tiny v2 stored this way differ from the unquantized weights' by 53.2 dB PSNR (student) and
53.4 dB (base), mean over 24 prompts, same seeds; ComfyUI-style fp8 with one scale per tensor: 43.3 / 42.8 dB
(`benchmarks/bench_quant_quality.py --model <export>`; docs/tiny-run-v2b/bench_quant_quality_*.json). So the
file is a storage format only: `read` dequantizes every weight on load (fp32, then one rounding to the
requested dtype) and the model runs as if loaded from the unquantized weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fluxion.quant.weight_only import int8_per_row
from fluxion.weights.safetensors_io import CheckpointError

TAG = "int8_rows"
METADATA = {"quantization": TAG}


def is_int8_rows(metadata: dict[str, str]) -> bool:
    return metadata.get("quantization") == TAG


def quantize(
    sd: dict[str, Tensor], which: Callable[[str, Tensor], bool] = lambda key, w: True
) -> dict[str, Tensor]:
    """`sd` with every 2-D weight that `which(key, tensor)` selects (default: all) replaced by int8 codes + row
    scales."""
    out: dict[str, Tensor] = {}
    for key, w in sd.items():
        if key.endswith(".weight") and w.ndim == 2 and which(key, w):
            # the per-channel recipe of fluxion's int8 weight-only layers (quant/weight_only.py)
            out[key], out[key + "_scale"] = int8_per_row(w)
        else:
            out[key] = w
    return out


def read(sd: dict[str, Tensor], dtype: torch.dtype | None, source: str) -> dict[str, Tensor]:
    """The weights the file means (int8 codes times row scales, in fp32, then `dtype`; the other tensors as
    stored when `dtype` is None); checks the pairs."""
    out: dict[str, Tensor] = {}
    scales = {k.removesuffix("_scale"): v for k, v in sd.items() if k.endswith(".weight_scale")}
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
            # dtype None: fp32, the exact weights the file means (as the other quantized formats return them)
            out[key] = (value.float() * scale.float()[:, None]).to(dtype or torch.float32)
            continue
        if key in scales:
            raise CheckpointError(f"{source}: {key} has a scale but is {value.dtype}, not int8 codes")
        out[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return out
