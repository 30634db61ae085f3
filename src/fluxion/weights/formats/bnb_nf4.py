"""bitsandbytes 4-bit weights (nf4 / fp4) as diffusers and transformers save them, dequantized without
bitsandbytes (facts from bitsandbytes' QuantState.as_dict / from_dict and its blockwise kernels).

Per quantized Linear `L` a state dict holds:
    L.weight                                uint8 [ceil(numel / 2), 1]: two 4-bit codes per byte, the first
                                            element of each pair in the HIGH nibble, over the row-major weight
    L.weight.quant_map                      fp32 [16]: the code book (NF4 or FP4 values, in [-1, 1])
    L.weight.absmax                         one scale per `blocksize` consecutive elements: fp32, or, when the
                                            statistics are double-quantized, uint8 codes of a second quantizer
    L.weight.nested_absmax                  fp32, one per `nested_blocksize` absmax codes (double quant only)
    L.weight.nested_quant_map               fp32 [256]: the second quantizer's code book (double quant only)
    L.weight.quant_state.bitsandbytes__nf4  uint8 bytes of a JSON object: quant_type, blocksize, dtype, shape,
                                            and with double quant nested_blocksize, nested_dtype, nested_offset
Values:  absmax = nested_quant_map[code] * nested_absmax[i // nested_blocksize] + nested_offset (double quant)
         W.flat[j] = quant_map[code_j] * absmax[j // blocksize],  reshaped to `shape`, cast to `dtype`.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from fluxion.weights.safetensors_io import CheckpointError

_STATE = ".quant_state.bitsandbytes__"
_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def is_bnb_4bit(keys) -> bool:
    return any(_STATE in k for k in keys)


def is_bnb_8bit(keys) -> bool:
    return any(k.endswith(".SCB") for k in keys)


def quant_state(sd: dict[str, Tensor], weight_key: str) -> dict:
    raw = next(v for k, v in sd.items() if k.startswith(weight_key + _STATE))
    return json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))


def dequantize_4bit(packed: Tensor, parts: dict[str, Tensor], state: dict) -> Tensor:
    """fp32 weight of the shape in `state` from the packed codes and the quant-state tensors."""
    shape = tuple(state["shape"])
    numel = 1
    for s in shape:
        numel *= s
    blocksize = int(state["blocksize"])
    absmax = parts["absmax"]
    if "nested_absmax" in parts:
        nested_bs = int(state["nested_blocksize"])
        codes = absmax.to(torch.uint8).long().flatten()
        nested = parts["nested_absmax"].float().flatten()
        index = torch.arange(codes.numel(), device=codes.device) // nested_bs
        absmax = parts["nested_quant_map"].float()[codes] * nested[index] + float(state["nested_offset"])
    absmax = absmax.float().flatten()
    b = packed.to(torch.uint8).flatten()
    codes4 = torch.stack([b >> 4, b & 0xF], dim=-1).flatten()[:numel].long()
    values = parts["quant_map"].float()[codes4]
    scale = absmax[torch.arange(numel, device=absmax.device) // blocksize]
    return (values * scale).reshape(shape)


def dequantize_state_dict(sd: dict[str, Tensor], source: str = "") -> dict[str, Tensor]:
    """Every bnb 4-bit weight replaced by its value (in the dtype its quant state records); other tensors kept."""
    if is_bnb_8bit(sd):
        raise CheckpointError(
            f"{source}: bitsandbytes 8-bit (LLM.int8, `.SCB` scales) weights are not read; use the bf16 or the "
            "bitsandbytes 4-bit (nf4) checkpoint"
        )
    out = dict(sd)
    weights = sorted({k.split(_STATE)[0] for k in sd if _STATE in k})
    for wkey in weights:
        state_key = next(k for k in sd if k.startswith(wkey + _STATE))
        kind = state_key.split(_STATE)[1]
        if kind not in ("nf4", "fp4"):
            raise CheckpointError(
                f"{source}: {wkey} uses bitsandbytes quant type {kind!r}; nf4 and fp4 are read"
            )
        state = quant_state(sd, wkey)
        parts = {p: out.pop(f"{wkey}.{p}") for p in _PARTS if f"{wkey}.{p}" in out}
        out.pop(state_key)
        if "absmax" not in parts or "quant_map" not in parts:
            raise CheckpointError(f"{source}: {wkey} lacks its bitsandbytes absmax / quant_map tensors")
        dtype = getattr(torch, str(state.get("dtype", "float32")).replace("torch.", ""))
        out[wkey] = dequantize_4bit(out[wkey], parts, state).to(dtype)
    return out
