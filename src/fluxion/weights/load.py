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
from typing import Literal

import torch
from torch import Tensor, nn

from fluxion.config import PRESETS, TransformerConfig, VAEConfig
from fluxion.model.transformer import Flux2
from fluxion.weights import mapping
from fluxion.weights.formats import QuantInfo
from fluxion.weights.safetensors_io import (
    CheckpointError,
    load_folder_weights,
    load_safetensors,
    read_header,
)

DIFFUSERS_STEM = "diffusion_pytorch_model"
Prequantized = Literal["auto", "dequantize", "keep"]


def _is_vae(keys) -> bool:
    return any(k.startswith(("encoder.", "decoder.")) for k in keys)


def _keep_fp8(key: str) -> bool:
    # The block Linears only (quant/fp8.py's default filter): embedders and the final layer stay in the compute
    # dtype, and `Flux2.embed_time` takes its dtype from time_in's weight.
    return key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight")


def _keep_int8(key: str) -> bool:
    # Every Linear but the timestep / guidance embedders (quant/weight_only.py's default filter).
    return key.endswith(".weight") and not key.startswith(("time_in.", "guidance_in."))


def _on_meta(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Shapes and dtypes only (meta tensors), except the small per-layer JSON configs the readers must parse."""
    return {
        k: v
        if k.endswith(".comfy_quant") or ".quant_state.bitsandbytes__" in k
        else torch.empty(v.shape, dtype=v.dtype, device="meta")
        for k, v in sd.items()
    }


def _read_file(
    path: Path,
    component: str,
    *,
    dtype: torch.dtype | None,
    keep_fp8: bool,
    keep_q8_0: bool,
    meta: bool = False,
) -> tuple[dict[str, Tensor], QuantInfo, str]:
    """One checkpoint file -> (the component's tensors, packed weights, layout name). Dispatches on the
    container (safetensors / GGUF), then on the layout inside (bundle prefixes, ComfyUI quantization)."""
    from fluxion.weights import formats
    from fluxion.weights.formats import bundle, comfy_quant, int8_rows

    kind = formats.sniff(path)
    quant: QuantInfo = {}
    if kind == "gguf":
        from fluxion.weights.formats import gguf_io

        sd, quant = gguf_io.read(path, dtype=dtype, keep_q8_0=_keep_int8 if keep_q8_0 else lambda k: False)
        layout = "gguf"
    else:
        if kind == "unknown":
            formats.refuse_unknown(path)
        _, metadata, _ = read_header(path)  # refuses pickles and non-safetensors files with their own message
        raw = load_safetensors(path)
        sd, prefix = bundle.select(_on_meta(raw) if meta else raw, component, str(path))
        layout = "comfy-bundle" if prefix.startswith(("vae.", "model.")) else "bfl"
        fp8 = any(v.dtype in comfy_quant.FP8_DTYPES for v in sd.values())
        if int8_rows.is_int8_rows(metadata):  # fluxion's own int8 storage (the embedded models)
            sd = int8_rows.read(sd, dtype, str(path))
            layout = "int8-rows"
        elif fp8 or comfy_quant.is_comfy_quantized(sd, metadata):
            sd, quant = comfy_quant.unpack(
                sd,
                metadata,
                keep_fp8=_keep_fp8 if keep_fp8 else lambda k: False,
                dtype=dtype,
                prefixes=tuple(p for p in (prefix, *bundle.PREFIXES[component]) if p),
                source=str(path),
            )
            layout = "comfy-quantized"
    if component == "transformer":
        from fluxion.weights.formats.bundle import bfl_norm_names

        sd = bfl_norm_names(sd)
    return sd, quant, layout


def _read(
    path: str | Path,
    component: str,
    *,
    dtype: torch.dtype | None = None,
    keep_fp8: bool = False,
    keep_q8_0: bool = False,
    meta: bool = False,
) -> tuple[dict[str, Tensor], QuantInfo, str]:
    path = Path(path)
    quant: QuantInfo = {}
    if path.is_dir():
        if (path / component).is_dir():
            path = path / component
        sd = load_folder_weights(path, DIFFUSERS_STEM)
        sd = _on_meta(sd) if meta else sd
        layout = "diffusers"
        from fluxion.weights.formats import bnb_nf4

        if bnb_nf4.is_bnb_4bit(sd) or bnb_nf4.is_bnb_8bit(sd):
            sd = bnb_nf4.dequantize_state_dict(sd, str(path))
            layout = "diffusers-bnb-4bit"
    elif path.exists():
        sd, quant, layout = _read_file(
            path, component, dtype=dtype, keep_fp8=keep_fp8, keep_q8_0=keep_q8_0, meta=meta
        )
    else:
        raise FileNotFoundError(f"no checkpoint at {path}")
    if component == "vae" and not _is_vae(sd):
        raise CheckpointError(f"{path} holds no autoencoder weights (expected encoder.* / decoder.* keys)")
    if component == "transformer" and _is_vae(sd):
        raise CheckpointError(f"{path} is an autoencoder checkpoint, not a transformer; pass it as the VAE")
    if component == "vae":
        from fluxion.weights.vae_mapping import vae_diffusers_to_bfl

        if any(".down_blocks." in k or ".up_blocks." in k for k in sd):
            return vae_diffusers_to_bfl(sd), quant, "diffusers"
        return sd, quant, layout
    if mapping.looks_like_diffusers(sd):
        from fluxion.weights.formats import dequantize_all

        # q/k/v are fused on the way to BFL names: packed weights with separate scales are dequantized first.
        return mapping.diffusers_to_bfl(dequantize_all(sd, quant, dtype)), {}, layout
    return sd, quant, layout


def read_component(path: str | Path, component: str) -> tuple[dict[str, Tensor], str]:
    """Tensors of `component` ("transformer" or "vae") in BFL names, and the layout they came in. Quantized files
    (ComfyUI fp8 / NVFP4, GGUF, bitsandbytes 4-bit) come back dequantized exactly, in fp32."""
    sd, _, layout = _read(path, component)
    return sd, layout


def read_transformer_state(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    keep_fp8: bool = False,
    keep_q8_0: bool = False,
) -> tuple[dict[str, Tensor], QuantInfo | None]:
    """The transformer's tensors in BFL names, and the packed weights among them (None if there are none).

    Quantized weights are dequantized to `dtype` (fp32 if None), except e4m3 block Linears when `keep_fp8` and
    GGUF Q8_0 Linears when `keep_q8_0`: their entry holds the codes and QuantInfo their scales
    (`formats.dequantize_packed` turns one into the weight the file means)."""
    sd, quant, _ = _read(path, "transformer", dtype=dtype, keep_fp8=keep_fp8, keep_q8_0=keep_q8_0)
    return sd, (quant or None)


def bundle_components(path: str | Path) -> set[str]:
    """Which components ("transformer", "vae", "text") one safetensors file holds, from its header alone."""
    from fluxion.weights import formats
    from fluxion.weights.formats.bundle import PREFIXES

    path = Path(path)
    if not path.is_file() or formats.sniff(path) != "safetensors":
        return set()
    header, _, _ = read_header(path)
    return {c for c, prefixes in PREFIXES.items() if any(k.startswith(prefixes) for k in header)}


def component_shapes(path: str | Path, component: str) -> dict[str, tuple[int, ...]]:
    """BFL-named logical tensor shapes of a component, with nothing dequantized or read beyond headers and the
    small per-layer configs (the readers run on meta tensors; GGUF: its header)."""
    from fluxion.weights import formats

    path = Path(path)
    if path.is_file() and formats.sniff(path) == "gguf":
        from fluxion.weights.formats import bundle, gguf_io

        return dict(bundle.bfl_norm_names(gguf_io.read_shapes(path)))
    sd, _, _ = _read(path, component, meta=True)
    return {k: tuple(v.shape) for k, v in sd.items()}


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


def _assign(
    model: nn.Module,
    sd: dict[str, Tensor],
    dtype: torch.dtype | None,
    device,
    keep: frozenset[str] = frozenset(),
) -> nn.Module:
    """Move `sd` to `device` (floating tensors cast to `dtype`, except the packed codes and scales in `keep`) and
    load it strictly, taking the tensors over (no copy)."""
    sd = {
        k: v.to(
            device=device,
            dtype=dtype if dtype is not None and v.is_floating_point() and k not in keep else v.dtype,
        )
        for k, v in sd.items()
    }
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _install_packed(model: nn.Module, sd: dict[str, Tensor], quant: QuantInfo) -> frozenset[str]:
    """Swap each packed Linear for the quantized layer that runs its codes as stored (on meta, before loading), and
    add the scales to `sd`. Returns the keys `_assign` must not cast."""
    from fluxion.quant.fp8 import Float8Linear
    from fluxion.quant.weight_only import Int8WeightOnlyLinear

    keep = set()
    for key, packed in quant.items():
        fqn = key[: -len(".weight")]
        linear = model.get_submodule(fqn)
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{key}: a quantized weight for a module that is not a Linear layer")
        args = (linear.in_features, linear.out_features)
        if packed.format == "fp8_e4m3":
            new: nn.Module = Float8Linear(*args, bias=linear.bias is not None, device="meta")
        else:
            new = Int8WeightOnlyLinear(*args, bias=linear.bias is not None, group_size=32, device="meta")
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        sd[f"{fqn}.weight_scale"] = packed.scale
        keep |= {key, f"{fqn}.weight_scale"}
    return frozenset(keep)


def _fp8_capable(device) -> bool:
    device = torch.device(device)
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability(device) >= (8, 9)
    )


def load_transformer(
    path: str | Path,
    preset: str | TransformerConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prequantized: Prequantized = "auto",
) -> Flux2:
    """Load a FLUX.2 transformer. `preset` (a name or config) pins the architecture; without it the architecture
    is read off the tensor shapes. dtype None keeps the file's dtype.

    Quantized files: "dequantize" computes every weight the file means (exact, fp32 then one rounding to dtype);
    "keep" runs fp8 e4m3 block weights as stored through quant/fp8.py's Float8Linear and GGUF Q8_0 weights through
    int8 weight-only layers (one scale per 32 inputs, the file's own blocks); "auto" keeps fp8 for bf16 on sm_89+
    GPUs and dequantizes everything else. LoRAs attach to plain Linear layers: load with "dequantize" to use them."""
    # auto keeps fp8 only for bf16 inference on fp8-capable GPUs (never for fp32, e.g. a training init).
    keep_fp8 = prequantized == "keep" or (
        prequantized == "auto" and dtype == torch.bfloat16 and _fp8_capable(device)
    )
    if prequantized not in ("auto", "dequantize", "keep"):
        raise ValueError(f"prequantized must be 'auto', 'dequantize' or 'keep', not {prequantized!r}")
    sd, quant = read_transformer_state(path, dtype=dtype, keep_fp8=keep_fp8, keep_q8_0=prequantized == "keep")
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
    keep = _install_packed(model, sd, quant) if quant else frozenset()
    return _assign(model, sd, dtype, device, keep)


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
    (config.json + diffusion_pytorch_model[-0000k-of-0000n].safetensors). A quantized source (ComfyUI fp8 /
    NVFP4, GGUF, bitsandbytes 4-bit, fluxion's int8_rows) is written as the fp32 weights it means. A transformer's
    `guidance_mode` (safetensors metadata, or `_fluxion_guidance_mode` in a converted folder's config.json) is
    carried over: it is what tells a distilled fluxion-tiny from its CFG base."""
    from fluxion.weights.safetensors_io import save_safetensors, save_sharded

    if to not in ("bfl", "diffusers"):
        raise ValueError(f"--to must be 'bfl' or 'diffusers', not {to!r}")
    component = "vae" if _component_of(src) == "vae" else "transformer"
    sd, _ = read_component(src, component)
    # the guidance mode fluxion recorded (a distilled fluxion-tiny is told from its CFG base only by this key)
    guidance = _guidance_of(Path(src)) if component == "transformer" else None
    dst = Path(dst)
    # checked before anything is written: a refused conversion leaves nothing behind
    chars = (
        _char_encoder_to_copy(Path(src), dst.parent if to == "bfl" else dst)
        if component == "transformer"
        else None
    )
    if to == "bfl":
        if dst.suffix != ".safetensors":
            raise ValueError(f"a BFL checkpoint is one .safetensors file; got {dst}")
        save_safetensors(sd, dst, metadata={"guidance_mode": guidance} if guidance else None)
        _copy(chars)
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
        if guidance:  # diffusers skips config keys that start with "_"
            config[GUIDANCE_CONFIG_KEY] = guidance
    save_sharded(out, dst, DIFFUSERS_STEM)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    _copy(chars)
    return dst


def _char_encoder_to_copy(src: Path, dest_dir: Path) -> tuple[Path, Path] | None:
    """A transformer trained with a character encoder (fluxion-tiny v2) needs its charenc.safetensors beside it
    (text/charenc.py: loaded from there, absent = no letters), so it travels with the converted weights:
    (source, target), or None when there is none or the same file is there already. A different one at the
    destination is not overwritten."""
    from fluxion.text.charenc import FILENAME, charenc_beside

    chars, target = charenc_beside(src), dest_dir / FILENAME
    if chars is None or (target.exists() and target.read_bytes() == chars.read_bytes()):
        return None
    if target.exists():
        raise FileExistsError(
            f"{target} exists and is not {chars}, the character encoder the converted weights need: "
            "convert into another folder"
        )
    return chars, target


def _copy(pair: tuple[Path, Path] | None) -> None:
    """Copy beside the target, then rename: never a half-written file under the real name."""
    import shutil

    if pair is not None:
        source, target = pair
        part = target.with_name(f".{target.name}.part")
        shutil.copyfile(source, part)
        part.replace(target)


GUIDANCE_CONFIG_KEY = "_fluxion_guidance_mode"  # a diffusers component's config.json: what `convert` carries


def _guidance_of(src: Path) -> str | None:
    """`guidance_mode` of a transformer checkpoint: a safetensors file's metadata, or (a diffusers component
    folder written by `convert`) its config.json."""
    from fluxion.weights.models import file_guidance

    if src.is_file():
        return file_guidance(src) if src.suffix == ".safetensors" else None
    for config in (src / "config.json", src / "transformer" / "config.json"):
        if config.is_file():
            return json.loads(config.read_text()).get(GUIDANCE_CONFIG_KEY)
    return None


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
    from fluxion.weights import formats
    from fluxion.weights.safetensors_io import read_shapes

    if formats.sniff(path) == "gguf":
        return "transformer"  # city96 GGUF files hold diffusion models
    return "vae" if _is_vae(read_shapes(path)) and not bundle_components(path) else "transformer"
