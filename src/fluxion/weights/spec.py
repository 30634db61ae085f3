"""A checkpoint's `ModelSpec`, derived from the checkpoint itself (not matched against a list of presets).

Sources, in the order they are read (all small: JSON files and safetensors headers, never the weights):
- a diffusers model folder: `transformer/config.json`, `vae/config.json`, `text_encoder/config.json`, and
  `model_index.json` (pipeline class and `is_distilled` -> guidance mode; `Flux2KleinKVPipeline` -> KV path);
- a BFL single file: its tensor shapes (depths, width, heads from the QK-norm width, context width, guidance
  embedder present or not), plus the VAE file / folder and the text-encoder folder given next to it; its
  safetensors metadata `guidance_mode` when fluxion wrote one (v2 packaging, distillation exports). A
  fluxion-tiny-shaped file gets fluxion-tiny or fluxion-tiny-base by that key (`weights.models.tiny_spec`).

Presets stay what they are good for: names of the released models and their sampling defaults (steps, guidance,
licence, reference limits). When the derived architecture and guidance mode equal a preset's, that preset's
defaults are used; otherwise a spec named after the checkpoint gets defaults by guidance mode (`_DEFAULTS`).
The scheduler folder is not read: every FLUX.2 pipeline computes its own schedule (spec 6.2), as we do.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fluxion.config import (
    PRESETS,
    TINY_TRANSFORMER,
    GuidanceMode,
    ModelSpec,
    TextEncoderConfig,
    TransformerConfig,
    VAEConfig,
)

# Sampling defaults of a checkpoint that is no released model, by guidance mode (as the released ones use them).
_DEFAULTS: dict[str, dict] = {
    "distilled": dict(default_steps=4, default_guidance=1.0, max_references=4),
    "cfg": dict(default_steps=50, default_guidance=4.0, max_references=4),
    "embedded": dict(default_steps=50, default_guidance=4.0, max_references=10),
}
_UNKNOWN_LICENSE = "unknown: see the checkpoint's own licence"


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from None


def transformer_config_from_diffusers(
    config: dict, source: str = "transformer/config.json"
) -> TransformerConfig:
    """`Flux2Transformer2DModel` config.json -> TransformerConfig (missing keys take diffusers' defaults)."""
    c = {k: v for k, v in config.items() if not k.startswith("_")}
    if c.get("patch_size", 1) != 1 or c.get("out_channels") not in (None, c.get("in_channels", 128)):
        raise ValueError(
            f"{source}: patch_size != 1 or out_channels != in_channels is not a FLUX.2 transformer"
        )
    heads, head_dim = c.get("num_attention_heads", 48), c.get("attention_head_dim", 128)
    return TransformerConfig(
        in_channels=c.get("in_channels", 128),
        context_in_dim=c.get("joint_attention_dim", 15360),
        hidden_size=heads * head_dim,
        num_heads=heads,
        num_double_blocks=c.get("num_layers", 8),
        num_single_blocks=c.get("num_single_layers", 48),
        mlp_ratio=float(c.get("mlp_ratio", 3.0)),
        axes_dim=tuple(c.get("axes_dims_rope", (32, 32, 32, 32))),
        theta=int(c.get("rope_theta", 2000)),
        use_guidance_embed=bool(c.get("guidance_embeds", True)),
        time_channels=c.get("timestep_guidance_channels", 256),
    )


def vae_config_from_diffusers(config: dict) -> VAEConfig:
    """`AutoencoderKLFlux2` config.json -> VAEConfig (decoder widths from `decoder_block_out_channels`)."""
    patch = config.get("patch_size", (2, 2))
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    dec = config.get("decoder_block_out_channels")
    return VAEConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        widths=tuple(config.get("block_out_channels", (128, 256, 512, 512))),
        decoder_widths=tuple(dec) if dec else None,
        num_res_blocks=config.get("layers_per_block", 2),
        z_channels=config.get("latent_channels", 32),
        num_groups=config.get("norm_num_groups", 32),
        bn_eps=config.get("batch_norm_eps", 1e-4),
        patch_size=patch,
    )


def default_taps(num_layers: int, count: int) -> tuple[int, ...]:
    """Hidden-state taps spread as BFL spreads them: layers n/4, n/2, 3n/4 of n (Qwen3 36 -> 9/18/27,
    Mistral Small 40 -> 10/20/30), i.e. i * n / (count + 1) for i = 1..count."""
    taps = tuple(round(i * num_layers / (count + 1)) for i in range(1, count + 1))
    if len(set(taps)) != count or taps[0] < 1:
        raise ValueError(f"cannot spread {count} hidden-state taps over a {num_layers}-layer text encoder")
    return taps


def text_config_from_folder(folder: str | Path, context_dim: int) -> TextEncoderConfig:
    """The text encoder in `folder` (diffusers `text_encoder/` or flat) tapped to give `context_dim` features."""
    folder = Path(folder)
    for candidate in (folder / "text_encoder" / "config.json", folder / "config.json"):
        config = _read_json(candidate)
        if config is not None:
            break
    else:
        raise FileNotFoundError(f"no text encoder config in {folder} (expected text_encoder/config.json)")
    model_type = config.get("model_type", "")
    inner = config.get("text_config", config) if model_type == "mistral3" else config
    kind = {"qwen3": "qwen3", "mistral3": "mistral3", "bert": "minilm"}.get(model_type)
    if kind is None:
        raise ValueError(
            f"{candidate}: text encoder type {model_type!r} is not one FLUX.2 uses (qwen3, mistral3, bert/MiniLM)"
        )
    width, layers = inner["hidden_size"], inner["num_hidden_layers"]
    if context_dim % width:
        raise ValueError(
            f"the transformer expects {context_dim} text features, not a whole number of {width}-wide hidden "
            f"states of the text encoder in {folder}: pass the text encoder that belongs to this model"
        )
    count = context_dim // width
    max_length = 64 if kind == "minilm" else 512
    return TextEncoderConfig(
        kind=kind, hidden_layers=default_taps(layers, count), hidden_size=width, max_length=max_length
    )


def guidance_from_index(index: dict | None, use_guidance_embed: bool) -> tuple[GuidanceMode, bool, bool]:
    """(guidance mode, KV path, known) from model_index.json. The guidance embedder decides [dev]-style
    embedded guidance; klein's distilled vs base is `is_distilled` (diffusers' default: False, i.e. true CFG)."""
    if use_guidance_embed:
        return "embedded", False, True
    if not index:
        return "cfg", False, False
    if index.get("_class_name") == "Flux2KleinKVPipeline":
        return "distilled", True, True
    # Distilled klein repos say `"is_distilled": true`; base repos leave it out (spec 3.4): absent means base.
    return ("distilled" if index.get("is_distilled", False) else "cfg"), False, True


def spec_from_parts(
    name: str,
    transformer: TransformerConfig,
    vae: VAEConfig,
    text: TextEncoderConfig,
    guidance_mode: GuidanceMode,
    kv_cache: bool = False,
    hint: ModelSpec | None = None,
) -> ModelSpec:
    """The released preset these parts are (its sampling defaults, its text taps, the given VAE), or a new
    spec named `name` with defaults by guidance mode. `hint` (e.g. from a BFL file name) wins over a match."""
    matches = [
        p
        for p in ([hint] if hint else PRESETS.values())
        if p.transformer == transformer
        and p.guidance_mode == guidance_mode
        and p.kv_cache == kv_cache
        and (p.text.kind, p.text.hidden_size, len(p.text.hidden_layers))
        == (text.kind, text.hidden_size, len(text.hidden_layers))
    ]
    if len(matches) == 1:
        return dataclasses.replace(matches[0], vae=vae)
    return ModelSpec(
        name=name,
        transformer=transformer,
        vae=vae,
        text=text,
        guidance_mode=guidance_mode,
        kv_cache=kv_cache,
        license=_UNKNOWN_LICENSE,
        **_DEFAULTS[guidance_mode],
    )


def derive_spec(
    source: str | Path,
    *,
    vae: str | Path | None = None,
    vae_decoder: str | Path | None = None,
    text: str | Path | None = None,
) -> ModelSpec:
    """The spec of a diffusers model folder, or of a BFL transformer file with `vae` and `text` beside it.
    `vae` / `text` override the folder's own components; `vae_decoder` is a decoder-only file that replaces the
    VAE's decoder (its widths come from its shapes)."""
    from fluxion.weights.load import infer_transformer_config, infer_vae_config

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no model at {source}: give a diffusers folder or a BFL .safetensors file")
    folder = source if source.is_dir() else None
    hint = next(
        (p for p in PRESETS.values() if p.bfl_filename and p.bfl_filename == source.name.lower()), None
    )

    # transformer: config.json of a diffusers folder, else the tensor shapes
    tr_json = _read_json(source / "transformer" / "config.json") if folder else None
    if tr_json is not None:
        transformer = transformer_config_from_diffusers(tr_json, str(source / "transformer" / "config.json"))
    else:
        transformer = infer_transformer_config(_bfl_shapes(source, "transformer"))

    # autoencoder: the given file / folder, else the model folder's vae/
    vae_path = Path(vae) if vae else (source / "vae" if folder else None)
    if vae_path is None:
        raise ValueError(
            f"{source} is a single transformer file: pass the autoencoder with --vae ae.safetensors"
        )
    vae_json = _read_json(vae_path / "config.json") if vae_path.is_dir() else None
    if vae_json is not None:
        vae_cfg = vae_config_from_diffusers(vae_json)
    else:
        vae_cfg = infer_vae_config(_bfl_shapes(vae_path, "vae"))
    if vae_decoder is not None:
        shapes = decoder_shapes(vae_decoder)
        decoder = infer_vae_config(shapes, num_groups=vae_cfg.num_groups)
        vae_cfg = dataclasses.replace(vae_cfg, decoder_widths=decoder.decoder_widths)

    # guidance mode: model_index.json of a folder; a single file's own metadata (`guidance_mode`, which fluxion
    # writes: v2 packaging, distillation exports); else the released model's (hint) or true CFG
    index = _read_json(source / "model_index.json") if folder else None
    mode, kv, known = guidance_from_index(index, transformer.use_guidance_embed)
    if not known and folder is None and source.suffix == ".safetensors":
        from fluxion.weights.models import file_guidance

        own = file_guidance(source)
        if own == "embedded":  # `known` already for a transformer with a guidance embedder
            raise ValueError(
                f"{source}: its metadata says guidance_mode 'embedded', but it has no guidance embedder; "
                "pass --preset"
            )
        if own is not None:
            mode, known = own, True
    if hint is None and transformer == TINY_TRANSFORMER:  # fluxion-tiny or its base: same shapes
        from fluxion.weights.models import tiny_spec

        hint = tiny_spec(mode if known else None)
    if hint is not None and not known:
        mode, kv = hint.guidance_mode, hint.kv_cache
    # GroupNorm's group count is not in the tensor shapes (infer_vae_config assumes FLUX.2's 32): an autoencoder
    # file shaped like the hinted model's is that model's (fluxion-tiny's has 16 groups)
    if (
        vae_json is None
        and hint is not None
        and dataclasses.replace(vae_cfg, num_groups=hint.vae.num_groups) == hint.vae
    ):
        vae_cfg = hint.vae

    # text encoder
    text_path = Path(text) if text else folder
    if text_path is None:
        if hint is not None and hint.text.kind == "minilm":
            text_cfg = hint.text
        else:
            raise ValueError(
                f"{source} is a single transformer file: pass the text-encoder folder with --text"
            )
    else:
        text_cfg = text_config_from_folder(text_path, transformer.context_in_dim)

    name = (source.name if folder else source.stem) or "model"
    return spec_from_parts(name, transformer, vae_cfg, text_cfg, mode, kv, hint=hint)


def _bfl_shapes(path: Path, component: str) -> dict[str, tuple[int, ...]]:
    """BFL-named logical shapes of a component from headers only: nothing is read or dequantized (a GGUF, fp8
    or nf4 file is not decoded just to derive its spec)."""
    from fluxion.weights.load import component_shapes

    return component_shapes(path, component)


def decoder_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """BFL-named shapes of a decoder-only file (see `weights.vae_mapping.decoder_only_to_bfl`)."""
    from fluxion.weights.vae_mapping import read_decoder_file

    return {k: tuple(v.shape) for k, v in read_decoder_file(path).items()}
