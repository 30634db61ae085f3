"""Transformer key tables BFL <-> diffusers (spec 3.2), as data, plus the conversion functions.

Three kinds of entries:
- RENAMES: same tensor, other name;
- QKV_SPLITS: one fused BFL [3D, D] q/k/v weight <-> three diffusers [D, D] weights (q, k, v row order);
- HALF_SWAPS: the final-layer modulation, whose rows are [shift ; scale] in BFL and [scale ; shift] in diffusers.
`{i}` stands for a block index. Every key must match exactly one entry: unknown keys raise, never vanish.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

RENAMES: dict[str, str] = {
    "img_in.weight": "x_embedder.weight",
    "txt_in.weight": "context_embedder.weight",
    "time_in.in_layer.weight": "time_guidance_embed.timestep_embedder.linear_1.weight",
    "time_in.out_layer.weight": "time_guidance_embed.timestep_embedder.linear_2.weight",
    "guidance_in.in_layer.weight": "time_guidance_embed.guidance_embedder.linear_1.weight",
    "guidance_in.out_layer.weight": "time_guidance_embed.guidance_embedder.linear_2.weight",
    "double_stream_modulation_img.lin.weight": "double_stream_modulation_img.linear.weight",
    "double_stream_modulation_txt.lin.weight": "double_stream_modulation_txt.linear.weight",
    "single_stream_modulation.lin.weight": "single_stream_modulation.linear.weight",
    "double_blocks.{i}.img_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_q.weight",
    "double_blocks.{i}.img_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_k.weight",
    "double_blocks.{i}.txt_attn.norm.query_norm.scale": "transformer_blocks.{i}.attn.norm_added_q.weight",
    "double_blocks.{i}.txt_attn.norm.key_norm.scale": "transformer_blocks.{i}.attn.norm_added_k.weight",
    "double_blocks.{i}.img_attn.proj.weight": "transformer_blocks.{i}.attn.to_out.0.weight",
    "double_blocks.{i}.txt_attn.proj.weight": "transformer_blocks.{i}.attn.to_add_out.weight",
    "double_blocks.{i}.img_mlp.0.weight": "transformer_blocks.{i}.ff.linear_in.weight",
    "double_blocks.{i}.img_mlp.2.weight": "transformer_blocks.{i}.ff.linear_out.weight",
    "double_blocks.{i}.txt_mlp.0.weight": "transformer_blocks.{i}.ff_context.linear_in.weight",
    "double_blocks.{i}.txt_mlp.2.weight": "transformer_blocks.{i}.ff_context.linear_out.weight",
    "single_blocks.{i}.linear1.weight": "single_transformer_blocks.{i}.attn.to_qkv_mlp_proj.weight",
    "single_blocks.{i}.linear2.weight": "single_transformer_blocks.{i}.attn.to_out.weight",
    "single_blocks.{i}.norm.query_norm.scale": "single_transformer_blocks.{i}.attn.norm_q.weight",
    "single_blocks.{i}.norm.key_norm.scale": "single_transformer_blocks.{i}.attn.norm_k.weight",
    "final_layer.linear.weight": "proj_out.weight",
}

QKV_SPLITS: dict[str, tuple[str, str, str]] = {
    "double_blocks.{i}.img_attn.qkv.weight": (
        "transformer_blocks.{i}.attn.to_q.weight",
        "transformer_blocks.{i}.attn.to_k.weight",
        "transformer_blocks.{i}.attn.to_v.weight",
    ),
    "double_blocks.{i}.txt_attn.qkv.weight": (
        "transformer_blocks.{i}.attn.add_q_proj.weight",
        "transformer_blocks.{i}.attn.add_k_proj.weight",
        "transformer_blocks.{i}.attn.add_v_proj.weight",
    ),
}

HALF_SWAPS: dict[str, str] = {"final_layer.adaLN_modulation.1.weight": "norm_out.linear.weight"}


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


def _fill(template: str, index: str | None) -> str:
    return template if index is None else template.replace("{i}", index)


def _match(key: str, templates) -> tuple[str, str | None] | None:
    """The template that matches `key` and its block index (None for global keys)."""
    for template in templates:
        m = _pattern(template).match(key)
        if m:
            return template, (m.group(1) if m.groups() else None)
    return None


def swap_halves(w: Tensor) -> Tensor:
    """[a ; b] -> [b ; a] along rows (final-layer shift/scale order differs between layouts)."""
    first, second = w.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def bfl_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """BFL transformer state dict -> diffusers `Flux2Transformer2DModel` state dict (lossless)."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if hit := _match(key, RENAMES):
            out[_fill(RENAMES[hit[0]], hit[1])] = value
        elif hit := _match(key, QKV_SPLITS):
            for name, part in zip(QKV_SPLITS[hit[0]], value.chunk(3, dim=0)):
                out[_fill(name, hit[1])] = part
        elif key in HALF_SWAPS:
            out[HALF_SWAPS[key]] = swap_halves(value)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys are not FLUX.2 transformer keys in the BFL layout: {sorted(unknown)}"
        )
    return out


def diffusers_to_bfl(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers transformer state dict -> BFL layout (concatenates q/k/v, swaps the final halves back)."""
    renames = {v: k for k, v in RENAMES.items()}
    split_parts = {part: (fused, n) for fused, parts in QKV_SPLITS.items() for n, part in enumerate(parts)}
    swaps = {v: k for k, v in HALF_SWAPS.items()}
    out: dict[str, Tensor] = {}
    pending: dict[str, list[Tensor | None]] = {}
    unknown = []
    for key, value in sd.items():
        if hit := _match(key, renames):
            out[_fill(renames[hit[0]], hit[1])] = value
        elif hit := _match(key, split_parts):
            fused, n = split_parts[hit[0]]
            pending.setdefault(_fill(fused, hit[1]), [None, None, None])[n] = value
        elif key in swaps:
            out[swaps[key]] = swap_halves(value)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys are not FLUX.2 transformer keys in the diffusers layout: {sorted(unknown)}"
        )
    for fused, parts in pending.items():
        if any(p is None for p in parts):
            raise ValueError(f"{fused}: the diffusers checkpoint lacks some of the q/k/v projections")
        out[fused] = torch.cat(parts, dim=0)
    return out


def looks_like_diffusers(keys) -> bool:
    """True when the key names are diffusers' (x_embedder, transformer_blocks, ...), not BFL's."""
    keys = set(keys)
    return "x_embedder.weight" in keys or any(k.startswith("transformer_blocks.") for k in keys)
