"""One `Models`: every loaded component of a FLUX.2 model, and `load_models`, the one way to build it from a
checkpoint (the embedded fluxion-tiny, a diffusers folder, or a BFL transformer file plus --vae / --text).
The CLI, the trainer, the evaluator and the server all load through here."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fluxion.config import ModelSpec
from fluxion.model.transformer import Flux2


@dataclass
class Models:
    """Loaded components. `text` may be None after `release_text_encoder` (prompts then come from the cache)."""

    spec: ModelSpec
    transformer: Flux2
    vae: torch.nn.Module
    text: object | None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32  # transformer compute dtype; the VAE stays fp32 (spec 4.5)
    prompt_cache: object | None = None  # fluxion.text.cache.PromptCache
    offload: bool = False  # keep components on the CPU and move each to the device only while it runs

    def release_text_encoder(self) -> None:
        """Free the text encoder (the largest component of [dev]); later prompts must be cached already."""
        self.text = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def embedded_model_dir(name: str = "fluxion-tiny"):
    """Where the weights shipped inside the package live (None when this build has none)."""
    from importlib.resources import files

    folder = files("fluxion") / "assets" / name
    return folder if (folder / "transformer.safetensors").is_file() else None


def resolve_preset(model_path, preset: str | None) -> ModelSpec:
    """The preset of a checkpoint: given, or read from diffusers' model_index.json / the BFL file name / the
    tensor shapes. Variants with identical shapes (klein vs klein base vs klein KV) need one of the first three."""
    import json
    from pathlib import Path

    from fluxion.config import PRESETS, get_preset
    from fluxion.weights.load import infer_transformer_config, presets_matching, read_component

    if preset:
        return get_preset(preset)
    path = Path(model_path)
    name = path.name.lower()
    for spec in PRESETS.values():
        if spec.bfl_filename and name == spec.bfl_filename:
            return spec
    sd, _ = read_component(path, "transformer")
    candidates = presets_matching(infer_transformer_config({k: tuple(v.shape) for k, v in sd.items()}))
    index = path / "model_index.json"
    if index.is_file() and len(candidates) > 1:
        info = json.loads(index.read_text())
        kv = info.get("_class_name") == "Flux2KleinKVPipeline"
        distilled = info.get("is_distilled", kv)
        for c in candidates:
            spec = PRESETS[c]
            if spec.kv_cache == kv and (spec.guidance_mode == "distilled") == bool(distilled):
                return spec
    if len(candidates) == 1:
        return PRESETS[candidates[0]]
    if not candidates:
        raise ValueError(f"{path} matches no known preset; pass --preset with a config that fits it")
    raise ValueError(f"{path} fits several presets ({', '.join(candidates)}); say which with --preset")


def load_models(
    model: str | None = None,
    *,
    preset: str | None = None,
    vae: str | None = None,
    text: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    offload: bool = False,
) -> Models:
    """Load transformer, VAE and text encoder. `model`: None or "fluxion-tiny" for the embedded model, a
    diffusers model folder (transformer/, vae/, text_encoder/, tokenizer/), or a BFL transformer file (then
    `vae` (ae.safetensors) and `text` (a text-encoder folder) are needed too)."""
    from pathlib import Path

    from fluxion.config import get_preset
    from fluxion.text.encoder import load_text_encoder
    from fluxion.weights.load import load_autoencoder, load_transformer

    device = torch.device(device)
    if model is None or model == "fluxion-tiny":
        folder = embedded_model_dir()
        if folder is None:
            raise FileNotFoundError(
                "this fluxion build has no embedded model; pass --model with a FLUX.2 checkpoint "
                "(a diffusers folder, or a BFL .safetensors file with --vae and --text)"
            )
        spec = get_preset("fluxion-tiny")
        tr_path, vae_path, text_path = (
            Path(str(folder / "transformer.safetensors")),
            Path(str(folder / "vae.safetensors")),
            text,
        )
    else:
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(
                f"no model at {path}: give a diffusers folder, a BFL .safetensors file or a preset"
            )
        spec = resolve_preset(path, preset)
        tr_path = path
        vae_path = Path(vae) if vae else (path / "vae" if path.is_dir() else None)
        text_path = text if text else (str(path) if path.is_dir() else None)
        if vae_path is None:
            raise ValueError(
                f"{path} is a single transformer file: pass the autoencoder with --vae ae.safetensors"
            )
        if text_path is None and spec.text.kind != "minilm":
            raise ValueError(f"{path} is a single transformer file: pass the text-encoder folder with --text")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    home = torch.device("cpu") if offload else device
    transformer = load_transformer(tr_path, spec.transformer, dtype=dtype, device=device)
    from fluxion.text.charenc import charenc_beside, load_char_encoder

    chars = charenc_beside(tr_path)
    if chars is not None:  # a model trained with letters of quoted text (fluxion-tiny v2); fp32, 2 M params
        transformer.char_encoder = load_char_encoder(chars, spec.transformer.context_in_dim, device)
    ae = load_autoencoder(vae_path, spec.vae, dtype=torch.float32, device=home)
    encoder = load_text_encoder(
        text_path, spec.text, device=home, dtype=dtype if device.type == "cuda" else torch.float32
    )
    return Models(
        spec=spec, transformer=transformer, vae=ae, text=encoder, device=device, dtype=dtype, offload=offload
    )
