"""Autoencoder state-dict conversion: BFL `ae.safetensors` (our module names) <-> diffusers `AutoencoderKLFlux2`
(`vae/` folder), spec 4.6.

The table `VAE_KEY_RULES` is the whole mapping, as data. Each row pairs a BFL key template with a diffusers one;
placeholders match one key component:

    {l}  resolution level (BFL index)            {r}  the same decoder level in diffusers order: r = L - 1 - l
    {b}  ResNet index inside a level             {e}  `encoder` or `decoder`
    {n}  ResNet sub-layer: norm1|conv1|norm2|conv2   {p}  `weight` or `bias`

L is the number of resolution levels (4 for FLUX.2), read from the decoder keys unless given.

Decisions:
- Attention q/k/v/proj_out weights are 1x1 convs [C, C, 1, 1] in BFL and Linear [C, C] in diffusers; they are
  reshaped (views when contiguous; works on `meta` tensors too). Biases are identical.
- `bn.num_batches_tracked` has the same name on both sides and is passed through unchanged when present; it is
  never invented or dropped. A live diffusers model does have it (BatchNorm2d registers it); diffusers' converted
  `vae/` files lack it, and PyTorch's BatchNorm fills it with tensor(0) on `load_state_dict` (also `strict=True`,
  also `assign=True`), so nothing has to be fabricated here. Passing it through keeps both round trips exact,
  key sets included. The counter is never read: the latent normaliser only uses the running mean/var.
- A key that matches no row raises ValueError listing all such keys; nothing is dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

# (BFL template, diffusers template, kind); kind "attn" marks 1x1-conv <-> Linear weights.
VAE_KEY_RULES: tuple[tuple[str, str, str], ...] = (
    # encoder
    ("encoder.conv_in.{p}", "encoder.conv_in.{p}", "plain"),
    ("encoder.down.{l}.block.{b}.{n}.{p}", "encoder.down_blocks.{l}.resnets.{b}.{n}.{p}", "plain"),
    (
        "encoder.down.{l}.block.{b}.nin_shortcut.{p}",
        "encoder.down_blocks.{l}.resnets.{b}.conv_shortcut.{p}",
        "plain",
    ),
    ("encoder.down.{l}.downsample.conv.{p}", "encoder.down_blocks.{l}.downsamplers.0.conv.{p}", "plain"),
    ("encoder.quant_conv.{p}", "quant_conv.{p}", "plain"),  # top level in diffusers
    # mid blocks and output heads, identical in encoder and decoder
    ("{e}.mid.block_1.{n}.{p}", "{e}.mid_block.resnets.0.{n}.{p}", "plain"),
    ("{e}.mid.block_2.{n}.{p}", "{e}.mid_block.resnets.1.{n}.{p}", "plain"),
    ("{e}.mid.attn_1.norm.{p}", "{e}.mid_block.attentions.0.group_norm.{p}", "plain"),
    ("{e}.mid.attn_1.q.{p}", "{e}.mid_block.attentions.0.to_q.{p}", "attn"),
    ("{e}.mid.attn_1.k.{p}", "{e}.mid_block.attentions.0.to_k.{p}", "attn"),
    ("{e}.mid.attn_1.v.{p}", "{e}.mid_block.attentions.0.to_v.{p}", "attn"),
    ("{e}.mid.attn_1.proj_out.{p}", "{e}.mid_block.attentions.0.to_out.0.{p}", "attn"),
    ("{e}.norm_out.{p}", "{e}.conv_norm_out.{p}", "plain"),
    ("{e}.conv_out.{p}", "{e}.conv_out.{p}", "plain"),
    # decoder
    ("decoder.post_quant_conv.{p}", "post_quant_conv.{p}", "plain"),  # top level in diffusers
    ("decoder.conv_in.{p}", "decoder.conv_in.{p}", "plain"),
    ("decoder.up.{l}.block.{b}.{n}.{p}", "decoder.up_blocks.{r}.resnets.{b}.{n}.{p}", "plain"),
    (
        "decoder.up.{l}.block.{b}.nin_shortcut.{p}",
        "decoder.up_blocks.{r}.resnets.{b}.conv_shortcut.{p}",
        "plain",
    ),
    ("decoder.up.{l}.upsample.conv.{p}", "decoder.up_blocks.{r}.upsamplers.0.conv.{p}", "plain"),
    # latent batch-norm statistics (no affine parameters)
    ("bn.running_mean", "bn.running_mean", "plain"),
    ("bn.running_var", "bn.running_var", "plain"),
    ("bn.num_batches_tracked", "bn.num_batches_tracked", "plain"),
)

_PLACEHOLDERS = {
    "l": r"\d+",
    "r": r"\d+",
    "b": r"\d+",
    "e": "encoder|decoder",
    "n": "norm1|conv1|norm2|conv2",
    "p": "weight|bias",
}


def _compile(template: str) -> re.Pattern[str]:
    """'encoder.down.{l}.block' -> regex with named groups; literal parts (dots included) are escaped."""
    parts = re.split(r"\{(\w)\}", template)  # even indices: literal text, odd: placeholder names
    regex = "".join(
        re.escape(s) if i % 2 == 0 else f"(?P<{s}>{_PLACEHOLDERS[s]})" for i, s in enumerate(parts)
    )
    return re.compile(regex + r"\Z")


# Compiled once: (BFL regex, diffusers regex, BFL template, diffusers template, kind).
_RULES = [(_compile(bfl), _compile(dif), bfl, dif, kind) for bfl, dif, kind in VAE_KEY_RULES]
_BFL_UP = re.compile(r"decoder\.up\.(\d+)\.")
_DIF_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.")


def _num_levels(keys: list[str], up: re.Pattern[str], num_levels: int | None) -> int | None:
    """L for the decoder flip: given, or 1 + the largest decoder level index present (pass it for partial dicts)."""
    if num_levels is not None:
        return num_levels
    found = [int(m.group(1)) for k in keys if (m := up.match(k))]
    return max(found) + 1 if found else None


def _convert(sd: Mapping[str, Tensor], to_diffusers: bool, num_levels: int | None) -> dict[str, Tensor]:
    keys = list(sd)
    levels = _num_levels(keys, _BFL_UP if to_diffusers else _DIF_UP, num_levels)
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key in keys:
        for bfl_re, dif_re, bfl_t, dif_t, kind in _RULES:
            m = (bfl_re if to_diffusers else dif_re).match(key)
            if m is None:
                continue
            groups = m.groupdict()
            if "{r}" in dif_t:  # decoder level: flip l <-> L-1-l (its own inverse, so one formula both ways)
                src, dst = ("l", "r") if to_diffusers else ("r", "l")
                assert levels is not None  # the key itself matched a decoder-level pattern
                flipped = levels - 1 - int(groups[src])
                if flipped < 0:
                    raise ValueError(f"{key}: level index {groups[src]} out of range for num_levels={levels}")
                groups[dst] = str(flipped)
            new_key = (dif_t if to_diffusers else bfl_t).format(**groups)
            out[new_key] = _reshape_attn(key, sd[key], to_diffusers) if kind == "attn" else sd[key]
            break
        else:
            unknown.append(key)
    if unknown:
        side = "BFL" if to_diffusers else "diffusers"
        raise ValueError(f"{len(unknown)} {side} autoencoder key(s) match no mapping rule: {sorted(unknown)}")
    if len(out) != len(keys):  # two source keys landing on one target would lose a tensor
        raise ValueError(f"key collision: {len(keys)} keys were mapped onto {len(out)}")
    return out


def _reshape_attn(key: str, t: Tensor, to_diffusers: bool) -> Tensor:
    """Attention projection: conv weight [C, C, 1, 1] <-> linear weight [C, C]; biases pass through."""
    if key.endswith(".bias"):
        return t
    if to_diffusers:
        if t.ndim != 4 or t.shape[2:] != (1, 1):
            raise ValueError(f"{key}: expected a 1x1 conv weight [C, C, 1, 1], got {tuple(t.shape)}")
        return t.reshape(t.shape[0], t.shape[1])
    if t.ndim != 2:
        raise ValueError(f"{key}: expected a linear weight [C, C], got {tuple(t.shape)}")
    return t.reshape(t.shape[0], t.shape[1], 1, 1)


def vae_bfl_to_diffusers(sd: Mapping[str, Tensor], num_levels: int | None = None) -> dict[str, Tensor]:
    """BFL / fluxion autoencoder state dict -> diffusers `AutoencoderKLFlux2` state dict (tensors shared)."""
    return _convert(sd, to_diffusers=True, num_levels=num_levels)


def vae_diffusers_to_bfl(sd: Mapping[str, Tensor], num_levels: int | None = None) -> dict[str, Tensor]:
    """Diffusers `AutoencoderKLFlux2` state dict -> BFL / fluxion autoencoder state dict (tensors shared)."""
    return _convert(sd, to_diffusers=False, num_levels=num_levels)


# A decoder-only file (BFL's `small_decoder.safetensors`) names the decoder's tensors without the `decoder.`
# prefix ("bare" keys: conv_in.*, mid.*, up.*, norm_out.*, conv_out.*, post_quant_conv.*).
_DECODER_ROOTS = (
    "conv_in.",
    "mid.",
    "up.",
    "norm_out.",
    "conv_out.",
    "post_quant_conv.",
    "mid_block.",
    "up_blocks.",
)


def decoder_only_to_bfl(sd: Mapping[str, Tensor], source: str = "decoder file") -> dict[str, Tensor]:
    """A decoder-only state dict (bare BFL keys, `decoder.`-prefixed BFL keys, or diffusers `decoder.*` /
    `post_quant_conv.*` keys; latent `bn.*` statistics allowed) -> BFL names `decoder.*` (+ `bn.*`).
    Encoder tensors are refused: a whole autoencoder is passed as the VAE, not as a decoder."""
    if any(k.startswith(("encoder.", "quant_conv.")) for k in sd):
        raise ValueError(
            f"{source} holds an encoder too: pass it as the VAE (--vae), not as a decoder-only file"
        )
    diffusers = any(
        k.startswith(("up_blocks.", "mid_block.", "decoder.up_blocks.", "decoder.mid_block.")) for k in sd
    )
    out: dict[str, Tensor] = {}
    unknown = []
    for key, t in sd.items():
        if key.startswith(("decoder.", "bn.")):
            out[key] = t
        elif key.startswith("post_quant_conv."):  # top level in diffusers, inside the decoder in BFL
            out[key if diffusers else "decoder." + key] = t
        elif key.startswith(_DECODER_ROOTS):
            out["decoder." + key] = t
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} key(s) are not decoder tensors: {sorted(unknown)[:12]}")
    return _convert(out, to_diffusers=False, num_levels=None) if diffusers else out


def read_decoder_file(path) -> dict[str, Tensor]:
    """BFL-named tensors (mmapped) of a decoder-only safetensors file or diffusers component folder."""
    from pathlib import Path

    from fluxion.weights.safetensors_io import load_folder_weights, load_safetensors

    path = Path(path)
    if path.is_dir():
        sd = load_folder_weights(path, "diffusion_pytorch_model")
    elif path.is_file():
        sd = load_safetensors(path)
    else:
        raise FileNotFoundError(f"no decoder file at {path}")
    return decoder_only_to_bfl(sd, str(path))
