"""Build on meta -> read safetensors (mmap) -> map names -> strict check -> load with assign.

Accepted inputs, detected automatically:
- a BFL single file (`flux2-dev.safetensors`, `flux-2-klein-4b.safetensors`, `ae.safetensors`), also with a
  `diffusion_model.` / `model.diffusion_model.` prefix as in ComfyUI repacks;
- a diffusers component folder (`transformer/`, `vae/`: config.json + one or sharded safetensors files);
- a diffusers model folder holding `transformer/` and `vae/`.
Missing, unexpected or mis-shaped keys raise a `CheckpointError` that lists them and names the preset the file
looks like. Nothing is ever loaded partially.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxion.config import PRESETS, TransformerConfig, VAEConfig
from fluxion.model.transformer import Flux2
from fluxion.weights import mapping
from fluxion.weights.safetensors_io import CheckpointError, load_folder_weights, load_safetensors

DIFFUSERS_STEM = "diffusion_pytorch_model"
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _is_vae(keys) -> bool:
    return any(k.startswith(("encoder.", "decoder.")) for k in keys)


def read_component(path: str | Path, component: str) -> tuple[dict[str, Tensor], str]:
    """Tensors of `component` ("transformer" or "vae") in BFL names, and the layout they came in."""
    path = Path(path)
    if path.is_dir():
        if (path / component).is_dir():
            path = path / component
        sd = load_folder_weights(path, DIFFUSERS_STEM)
    elif path.exists():
        sd = _strip_prefix(load_safetensors(path))
    else:
        raise FileNotFoundError(f"no checkpoint at {path}")
    if component == "vae" and not _is_vae(sd):
        raise CheckpointError(f"{path} holds no autoencoder weights (expected encoder.* / decoder.* keys)")
    if component == "transformer" and _is_vae(sd):
        raise CheckpointError(f"{path} is an autoencoder checkpoint, not a transformer; pass it as the VAE")
    if component == "vae":
        from fluxion.weights.vae_mapping import vae_diffusers_to_bfl

        diffusers = any(".down_blocks." in k or ".up_blocks." in k for k in sd)
        return (vae_diffusers_to_bfl(sd), "diffusers") if diffusers else (sd, "bfl")
    if mapping.looks_like_diffusers(sd):
        return mapping.diffusers_to_bfl(sd), "diffusers"
    return sd, "bfl"


def infer_transformer_config(shapes: dict[str, tuple[int, ...]]) -> TransformerConfig:
    """The transformer config implied by BFL-named tensor shapes: width, depths, heads (head dim = the QK-norm
    width), context width, MLP ratio, time-embedding width, guidance embedder or not. Not in the shapes: RoPE
    theta (2000) and the split of the head dim over the 4 RoPE axes (equal quarters, as in every FLUX.2 model)."""
    try:
        D, in_channels = shapes["img_in.weight"]
        context_in_dim = shapes["txt_in.weight"][1]
        head_dim = shapes["single_blocks.0.norm.query_norm.scale"][0]
        mlp_hidden = shapes["single_blocks.0.linear2.weight"][1] - D
        time_channels = shapes["time_in.in_layer.weight"][1]  # width of the sinusoidal embedding
    except KeyError as e:
        raise CheckpointError(f"not a FLUX.2 transformer checkpoint: key {e} is missing") from None
    count = lambda prefix: len({k.split(".")[1] for k in shapes if k.startswith(prefix)})  # noqa: E731
    axis = head_dim // 4
    return TransformerConfig(
        in_channels=in_channels,
        context_in_dim=context_in_dim,
        hidden_size=D,
        num_heads=D // head_dim,
        num_double_blocks=count("double_blocks."),
        num_single_blocks=count("single_blocks."),
        mlp_ratio=mlp_hidden / D,
        axes_dim=(axis,) * 4,
        use_guidance_embed="guidance_in.in_layer.weight" in shapes,
        time_channels=time_channels,
    )


def presets_matching(cfg: TransformerConfig) -> list[str]:
    return [name for name, spec in PRESETS.items() if spec.transformer == cfg]


def _describe(cfg: TransformerConfig) -> str:
    names = presets_matching(cfg)
    shape = (
        f"hidden {cfg.hidden_size}, {cfg.num_double_blocks} double + {cfg.num_single_blocks} single blocks, "
        f"context {cfg.context_in_dim}, guidance embedder {'yes' if cfg.use_guidance_embed else 'no'}"
    )
    return f"{' / '.join(names)} ({shape})" if names else f"no known preset ({shape})"


def check_state_dict(model: nn.Module, sd: dict[str, Tensor], source: str, looks_like: str = "") -> None:
    """Raise a CheckpointError listing missing, unexpected and mis-shaped keys (strict loading, explained)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(sd[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(sd)
        if tuple(sd[k].shape) != expected[k]
    )
    if not (missing or unexpected or wrong):
        return

    def show(items: list[str]) -> str:
        return ", ".join(items[:12]) + (f" ... (+{len(items) - 12} more)" if len(items) > 12 else "")

    parts = [f"{source} does not fit the model"]
    if looks_like:
        parts.append(f"the file looks like {looks_like}")
    if missing:
        parts.append(f"{len(missing)} missing keys: {show(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {show(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} wrong shapes: {show(wrong)}")
    raise CheckpointError("; ".join(parts))


def _assign(model: nn.Module, sd: dict[str, Tensor], dtype: torch.dtype | None, device) -> nn.Module:
    sd = {
        k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
        for k, v in sd.items()
    }
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_transformer(
    path: str | Path,
    preset: str | TransformerConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Flux2:
    """Load a FLUX.2 transformer. `preset` (a name or config) pins the architecture; without it the architecture
    is read off the tensor shapes. dtype None keeps the file's dtype."""
    sd, _ = read_component(path, "transformer")
    found = infer_transformer_config({k: tuple(v.shape) for k, v in sd.items()})
    if preset is None:
        cfg = found
    elif isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
        cfg = PRESETS[preset].transformer
    else:
        cfg = preset
    with torch.device("meta"):
        model = Flux2(cfg)
    check_state_dict(model, sd, str(path), looks_like=_describe(found) if cfg != found else "")
    return _assign(model, sd, dtype, device)


def infer_vae_config(shapes: dict[str, tuple[int, ...]], num_groups: int = 32) -> VAEConfig:
    """The autoencoder config implied by BFL-named tensor shapes: encoder and decoder widths per level (read
    separately: the small decoder is narrower than its encoder), ResNets per level, latent channels. A
    decoder-only dict gets encoder widths equal to its decoder's (callers pair it with a real encoder)."""

    def widths(prefix: str) -> tuple[int, ...]:
        levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith(prefix)})
        return tuple(shapes[f"{prefix}{lv}.block.0.conv2.weight"][0] for lv in levels)

    try:
        dec = widths("decoder.up.")
        enc = widths("encoder.down.") or dec
        if "decoder.post_quant_conv.weight" in shapes:
            z = shapes["decoder.post_quant_conv.weight"][0]
        else:
            z = shapes["encoder.quant_conv.weight"][0] // 2
    except KeyError as e:
        raise CheckpointError(f"not a FLUX.2 autoencoder checkpoint: key {e} is missing") from None
    if not dec:
        raise CheckpointError("not a FLUX.2 autoencoder checkpoint: no decoder.up.* keys")
    count = lambda prefix: len({k.split(".")[4] for k in shapes if k.startswith(prefix)})  # noqa: E731
    blocks = count("encoder.down.0.block.") or count("decoder.up.0.block.") - 1
    return VAEConfig(
        widths=enc, decoder_widths=dec, num_res_blocks=blocks, z_channels=z, num_groups=num_groups
    )


def load_autoencoder(
    path: str | Path,
    cfg: VAEConfig | None = None,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load the FLUX.2 autoencoder (BFL `ae.safetensors` or a diffusers `vae/` folder). fp32 by default, as the
    reference runs it (spec 4.5)."""
    from fluxion.vae.autoencoder import AutoEncoder

    sd, _ = read_component(path, "vae")
    # GroupNorm's group count leaves no trace in tensor shapes: take it from diffusers' config.json if present.
    groups = 32
    for folder in (Path(path), Path(path) / "vae"):
        if (folder / "config.json").is_file():
            groups = json.loads((folder / "config.json").read_text()).get("norm_num_groups", 32)
            break
    found = infer_vae_config({k: tuple(v.shape) for k, v in sd.items()}, num_groups=groups)
    cfg = cfg or found
    # Files written by diffusers lack the BN step counter; it is never used (running stats only).
    sd.setdefault("bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))
    with torch.device("meta"):
        model = AutoEncoder(cfg)
    check_state_dict(model, sd, str(path), looks_like=str(found) if cfg != found else "")
    return _assign(model, sd, dtype, device)


def diffusers_transformer_config(cfg: TransformerConfig) -> dict:
    """`transformer/config.json` for diffusers' Flux2Transformer2DModel (spec 3.3)."""
    return {
        "_class_name": "Flux2Transformer2DModel",
        "patch_size": 1,
        "in_channels": cfg.in_channels,
        "out_channels": None,
        "num_layers": cfg.num_double_blocks,
        "num_single_layers": cfg.num_single_blocks,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim,
        "timestep_guidance_channels": cfg.time_channels,
        "mlp_ratio": cfg.mlp_ratio,
        "axes_dims_rope": list(cfg.axes_dim),
        "rope_theta": cfg.theta,
        "eps": 1e-6,
        "guidance_embeds": cfg.use_guidance_embed,
    }


def diffusers_vae_config(cfg: VAEConfig) -> dict:
    """`vae/config.json` for diffusers' AutoencoderKLFlux2."""
    return {
        "_class_name": "AutoencoderKLFlux2",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": list(cfg.widths),
        **(
            {"decoder_block_out_channels": list(cfg.decoder_widths)}
            if cfg.decoder_widths != cfg.widths
            else {}
        ),
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.num_groups,
        "batch_norm_eps": cfg.bn_eps,
        "patch_size": [cfg.patch_size, cfg.patch_size],
        "mid_block_add_attention": True,
        "force_upcast": True,
        "sample_size": 1024,
    }


def convert(src: str | Path, dst: str | Path, to: str) -> Path:
    """Convert a transformer or autoencoder checkpoint between layouts, losslessly (tensors bit-identical).

    to="bfl": write one BFL-named safetensors file at `dst`. to="diffusers": write a component folder at `dst`
    (config.json + diffusion_pytorch_model[-0000k-of-0000n].safetensors)."""
    from fluxion.weights.safetensors_io import save_safetensors, save_sharded

    if to not in ("bfl", "diffusers"):
        raise ValueError(f"--to must be 'bfl' or 'diffusers', not {to!r}")
    component = "vae" if _component_of(src) == "vae" else "transformer"
    sd, _ = read_component(src, component)
    dst = Path(dst)
    if to == "bfl":
        if dst.suffix != ".safetensors":
            raise ValueError(f"a BFL checkpoint is one .safetensors file; got {dst}")
        save_safetensors(sd, dst)
        return dst
    if dst.suffix:
        raise ValueError(f"a diffusers component is a folder; got {dst} (drop the suffix)")
    if component == "vae":
        from fluxion.weights.vae_mapping import vae_bfl_to_diffusers

        config = diffusers_vae_config(infer_vae_config({k: tuple(v.shape) for k, v in sd.items()}))
        out = vae_bfl_to_diffusers(sd)
    else:
        config = diffusers_transformer_config(
            infer_transformer_config({k: tuple(v.shape) for k, v in sd.items()})
        )
        out = mapping.bfl_to_diffusers(sd)
    save_sharded(out, dst, DIFFUSERS_STEM)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def _component_of(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            name = json.loads((path / "config.json").read_text()).get("_class_name", "")
            return "vae" if "Autoencoder" in name else "transformer"
        if (path / "transformer").is_dir():
            return "transformer"
        if (path / "vae").is_dir():
            return "vae"
        raise FileNotFoundError(f"{path} holds neither config.json nor transformer/ or vae/")
    from fluxion.weights.safetensors_io import read_shapes

    return "vae" if _is_vae(read_shapes(path)) else "transformer"
