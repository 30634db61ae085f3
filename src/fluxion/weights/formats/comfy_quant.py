"""ComfyUI's quantized safetensors layouts (read from ComfyUI comfy/ops.py, comfy/utils.py and comfy-kitchen).

Current layout (Comfy-Org `*_fp8mixed` files, BFL's FLUX.2 fp8 / NVFP4 releases), per quantized Linear `L`:
    L.weight        the codes
    L.comfy_quant   uint8 bytes of a JSON object, e.g. {"format": "float8_e4m3fn"} (optionally also
                    "full_precision_matrix_mult": true); the safetensors header may carry the same per-layer
                    objects as `_quantization_metadata` = {"format_version": "1.0", "layers": {L: {...}}}
    format float8_e4m3fn / float8_e5m2:  L.weight fp8 [N, K]; L.weight_scale fp32 scalar (one per tensor);
                    L.input_scale fp32 scalar (a static activation scale).   W = weight * weight_scale
    format nvfp4:   L.weight uint8 [N, K/2], two E2M1 codes per byte, the first element of a pair in the HIGH
                    nibble; L.weight_scale float8_e4m3fn block scales, one per 16 inputs, stored in cuBLAS's
                    swizzled 128x4 tile layout, shape (roundup(N, 128), roundup(K/16, 4)); L.weight_scale_2
                    fp32 scalar.    W[r, c] = e2m1(code) * weight_scale[r, c // 16] * weight_scale_2
Older "scaled fp8" layout: a `scaled_fp8` marker tensor (its dtype is the fp8 type; 2 elements = full-precision
matmul), `L.scale_weight` fp32 (per tensor) and `L.scale_input` (activation scale, 1.0 = none). A plain fp8 file
without scales means W = weight (scale 1).

Static input scales are not used: fluxion's fp8 path scales activations per token on the fly (quant/fp8.py),
and the dequantized path does not quantize activations at all. NVFP4 is dequantized on load: Hopper has no FP4
tensor cores, so a 4-bit matmul would be slower than bf16.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from torch import Tensor

from fluxion.weights.formats import PackedWeight, QuantInfo
from fluxion.weights.safetensors_io import CheckpointError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# E2M1 values of the 16 codes (sign is the top bit of the nibble).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
READABLE = ("float8_e4m3fn", "float8_e5m2", "nvfp4")


def is_comfy_quantized(keys, metadata: dict[str, str]) -> bool:
    return "_quantization_metadata" in metadata or any(
        k.endswith((".comfy_quant", ".scale_weight")) or k.split(".")[-1] == "scaled_fp8" for k in keys
    )


def _strip(name: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if name.startswith(p):
            return name[len(p) :]
    return name


def layer_configs(
    sd: dict[str, Tensor], metadata: dict[str, str], prefixes: tuple[str, ...] = ()
) -> dict[str, dict]:
    """Per-layer quantization configs (layer name -> JSON object), popping the `.comfy_quant` tensors from `sd`.
    Layer names in the header metadata lose `prefixes` so they match the (already stripped) tensor names."""
    layers: dict[str, dict] = {}
    if "_quantization_metadata" in metadata:
        try:
            header = json.loads(metadata["_quantization_metadata"])
        except json.JSONDecodeError as e:
            raise CheckpointError(
                f"_quantization_metadata in the safetensors header is not JSON: {e}"
            ) from None
        # A bundle's header lists every component's layers: keep those of the tensors at hand.
        for name, conf in header.get("layers", {}).items():
            name = _strip(name, prefixes)
            if f"{name}.weight" in sd:
                layers[name] = conf
    for key in [k for k in sd if k.endswith(".comfy_quant")]:
        raw = sd.pop(key)
        layer = key[: -len(".comfy_quant")]
        try:
            layers[layer] = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{key} is not a ComfyUI quantization config (uint8 JSON): {e}") from None
    marker = [k for k in sd if k.split(".")[-1] == "scaled_fp8"]
    if marker and not layers:
        # Older layout: every layer with a `scale_weight` is fp8 (ComfyUI converts it the same way).
        for key in [k for k in sd if k.endswith(".scale_weight")]:
            layer = key[: -len(".scale_weight")]
            sd[f"{layer}.weight_scale"] = sd.pop(key)
            layers[layer] = {"format": "float8_e4m3fn"}
        for key in [k for k in sd if k.endswith(".scale_input")]:
            sd[key[: -len(".scale_input")] + ".input_scale"] = sd.pop(key)
    for key in marker:
        sd.pop(key)
    return layers


def row_scale(scale: Tensor, rows: int, name: str) -> Tensor:
    """A per-tensor ([], [1]) or per-row ([N], [N, 1]) fp32 scale as [N, 1]; anything else is refused."""
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(1, 1).expand(rows, 1).contiguous()
    if s.numel() == rows and (s.ndim == 1 or (s.ndim == 2 and s.shape[1] == 1)):
        return s.reshape(rows, 1).contiguous()
    raise CheckpointError(
        f"{name}: fp8 scale of shape {tuple(scale.shape)} for a weight with {rows} rows; fluxion reads per-tensor "
        "and per-row fp8 scales (block-wise fp8 is not supported)"
    )


def unswizzle_block_scales(blocked: Tensor, rows: int, cols: int) -> Tensor:
    """cuBLAS's block-scale tile layout -> a plain [rows, cols] matrix.

    The scales are padded to (roundup(rows, 128), roundup(cols, 4)) and cut into 128x4 tiles stored one after the
    other (row-tile major); inside a tile, the scale of (row r, col c) sits at (r % 32) * 16 + (r // 32) * 4 + c.
    """
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    t = blocked.reshape(row_tiles, col_tiles, 32, 4, 4)  # [row tile, col tile, r % 32, r // 32, c]
    return t.permute(0, 3, 2, 1, 4).reshape(row_tiles * 128, col_tiles * 4)[:rows, :cols]


def dequantize_nvfp4(codes: Tensor, block_scale: Tensor, tensor_scale: Tensor) -> Tensor:
    """uint8 [N, K/2] packed E2M1 (first of a pair in the high nibble) -> fp32 [N, K]."""
    N, half = codes.shape
    K = 2 * half
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.uint8)
    nibbles = torch.stack([c >> 4, c & 0xF], dim=-1).reshape(N, K).long()
    bs = block_scale.contiguous().view(torch.uint8).view(torch.float8_e4m3fn).float()
    scales = unswizzle_block_scales(bs, N, K // 16) * tensor_scale.float().reshape(())
    return (values[nibbles].view(N, K // 16, 16) * scales[..., None]).view(N, K)


def unpack(
    sd: dict[str, Tensor],
    metadata: dict[str, str],
    *,
    keep_fp8: Callable[[str], bool] = lambda key: False,
    dtype: torch.dtype | None = None,
    prefixes: tuple[str, ...] = (),
    source: str = "",
) -> tuple[dict[str, Tensor], QuantInfo]:
    """Plain tensors from a ComfyUI-quantized state dict: every quantized weight dequantized to `dtype` (fp32 if
    None), except e4m3 weights for which `keep_fp8(weight_key)` is true: those stay fp8 with a PackedWeight."""
    sd = dict(sd)
    layers = layer_configs(sd, metadata, prefixes)
    quant: QuantInfo = {}
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
    for layer, conf in layers.items():
        fmt = conf.get("format") if isinstance(conf, dict) else None
        wkey = f"{layer}.weight"
        if wkey not in sd:
            raise CheckpointError(f"{source}: quantization config for {layer!r} but no tensor {wkey}")
        if fmt not in READABLE:
            raise CheckpointError(
                f"{source}: layer {layer!r} is stored in ComfyUI quantization format {fmt!r}, which fluxion "
                f"does not read (it reads {', '.join(READABLE)}); use a bf16, fp8 or GGUF file of this model"
            )
        sd.pop(f"{layer}.input_scale", None)  # static activation scale: unused (module docstring)
        w = sd[wkey]
        if fmt == "nvfp4":
            try:
                block, tensor = sd.pop(f"{layer}.weight_scale"), sd.pop(f"{layer}.weight_scale_2")
            except KeyError as e:
                raise CheckpointError(f"{source}: NVFP4 layer {layer!r} lacks {e.args[0]}") from None
            sd[wkey] = cast(dequantize_nvfp4(w, block, tensor))
            continue
        storage = torch.float8_e4m3fn if fmt == "float8_e4m3fn" else torch.float8_e5m2
        codes = w if w.dtype == storage else w.contiguous().view(torch.uint8).view(storage)
        scale = sd.pop(f"{layer}.weight_scale", torch.ones((), dtype=torch.float32))
        rows = row_scale(scale, codes.shape[0], wkey)
        if storage == torch.float8_e4m3fn and codes.ndim == 2 and keep_fp8(wkey):
            sd[wkey] = codes
            quant[wkey] = PackedWeight("fp8_e4m3", rows)
        else:
            sd[wkey] = cast(codes.float() * (rows if codes.ndim == 2 else scale.float()))
    # Weights cast to fp8 without any scale (plain fp8 files, or layers a tool left unscaled): W = weight.
    for key, t in list(sd.items()):
        if t.dtype in FP8_DTYPES and key not in quant:
            scale = (
                sd.pop(key[: -len(".weight")] + ".weight_scale", None) if key.endswith(".weight") else None
            )
            if scale is not None and t.ndim == 2:
                if t.dtype == torch.float8_e4m3fn and keep_fp8(key):
                    quant[key] = PackedWeight("fp8_e4m3", row_scale(scale, t.shape[0], key))
                    continue
                sd[key] = cast(t.float() * row_scale(scale, t.shape[0], key))
            else:
                sd[key] = cast(t.float())
    return sd, quant
