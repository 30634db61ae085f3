"""One `Models`: every loaded component of a FLUX.2 model, and `load_models`, the one way to build it from a
checkpoint (the embedded fluxion-tiny, a diffusers folder, or a BFL transformer file plus --vae / --text).
The CLI, the trainer, the evaluator and the server all load through here.

The spec comes from the checkpoint itself (`weights/spec.py`); the performance layer (`accel.apply`,
`accel.apply_vae`) is applied here from outside the model, after `AccelOptions.validate` has refused what cannot
run on the device, before any weight is read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from fluxion.config import ModelSpec, VAEConfig
from fluxion.model.transformer import Flux2

if TYPE_CHECKING:
    from fluxion.accel.apply import Accelerated, AccelOptions, VAEAccelOptions
    from fluxion.text.encoder import TextEncoder
    from fluxion.vae.autoencoder import AutoEncoder

OffloadMode = Literal["none", "model", "blocks"]
# Decoding needs ~4.3 kB of fp32 activations per output pixel at its peak (vae/tiling.py: 17 GiB at 2048^2).
_DECODE_BYTES_PER_PIXEL = 4400
_CPU_TILE_ABOVE = (
    2048 * 2048
)  # pixels per image above which a CPU decode is tiled (RAM, not free-memory, bound)


@dataclass
class Models:
    """Loaded components. `text` may be None after `release_text_encoder` (prompts then come from the cache)."""

    spec: ModelSpec
    transformer: Flux2
    vae: AutoEncoder
    text: TextEncoder | None  # None after release_text_encoder
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32  # transformer compute dtype; the VAE stays fp32 (spec 4.5)
    prompt_cache: object | None = None  # fluxion.text.cache.PromptCache
    offload: bool = (
        False  # keep VAE and text encoder on the CPU and move each to the device only while it runs
    )
    accelerated: Accelerated | None = None  # what accel.apply did to the transformer (None: plain path)
    tile_decode: bool | None = (
        None  # None: tile the VAE decode when the image would not fit; True / False: force
    )

    @property
    def denoiser(self):
        """What the sampler calls: `transformer` (which a caller may have wrapped, e.g. for sequence parallelism),
        or its CUDA-graph wrapper when graphs are on."""
        from fluxion.accel.apply import GraphedFlux2

        acc = self.accelerated
        return acc.module if acc is not None and isinstance(acc.module, GraphedFlux2) else self.transformer

    def release_text_encoder(self) -> None:
        """Free the text encoder (the largest component of [dev]); later prompts must be cached already."""
        self.text = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def should_tile(self, z: Tensor) -> bool:
        """Whether decoding latents z [B, 128, h, w] takes the tiled path: forced by `tile_decode`, else when the
        plain decode's peak activations would not fit in free device memory (CPU: above 2048^2 pixels)."""
        if self.tile_decode is not None:
            return self.tile_decode
        f = self.vae.cfg.downsample_factor
        pixels = z.shape[-2] * z.shape[-1] * f * f
        if self.device.type != "cuda":
            return pixels > _CPU_TILE_ABOVE
        free, _ = torch.cuda.mem_get_info(self.device)
        return z.shape[0] * pixels * _DECODE_BYTES_PER_PIXEL > 0.9 * free

    def decode_latents(self, z: Tensor) -> Tensor:
        """Normalised latents [B, 128, h, w] -> pixels [B, 3, 16h, 16w] (unclamped), tiled when needed."""
        if self.should_tile(z):
            from fluxion.vae.tiling import tiled_decode

            return tiled_decode(self.vae, z)
        return self.vae.decode(z)

    def accelerate(self, accel: AccelOptions | None, vae_accel: VAEAccelOptions | None = None) -> None:
        """Turn on the fast paths on these loaded components, in place (what `load_models(accel=, vae_accel=)`
        does once the weights are in; benchmarks call it on models built from random weights)."""
        from fluxion.accel.apply import apply, apply_vae

        if accel is not None:
            accel.validate(self.device)
            self.accelerated = apply(self.transformer, accel)
        if vae_accel is not None:
            apply_vae(self.vae, vae_accel)

    def describe(self) -> str:
        """One line per component: what was loaded and how it runs."""
        s, t, acc = self.spec, self.transformer.cfg, self.accelerated
        with torch.device("meta"):  # the unquantized count (quantized weights live in buffers)
            n = sum(p.numel() for p in Flux2(t).parameters())
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        fast = []
        if acc is not None:
            fast += [f"{len(acc.quantized)} linears quantized"] if acc.quantized else []
            fast += [f"{acc.compiled} blocks compiled"] if acc.compiled else []
            fast += ["blocks offloaded"] if acc.offload is not None else []
            fast += ["CUDA graphs"] if acc.module is not self.transformer else []
        backend = getattr(self.transformer.attention_backend, "__name__", "sdpa")
        v = self.vae.cfg
        text = (
            f"{s.text.kind} width {s.text.hidden_size}, taps {'/'.join(map(str, s.text.hidden_layers))}, "
            f"{s.text.max_length} tokens" + ("" if self.text is not None else " (released)")
        )
        return "\n".join(
            [
                f"model        {s.name} ({s.guidance_mode} guidance{', KV refs' if s.kv_cache else ''}; "
                f"defaults {s.default_steps} steps, guidance {s.default_guidance:g}; licence: {s.license or '-'})",
                f"transformer  {size} params, {t.num_double_blocks}+{t.num_single_blocks} blocks, width "
                f"{t.hidden_size}, {t.num_heads} heads; {str(self.dtype).removeprefix('torch.')} on "
                f"{self.device}; attention {backend}" + (f"; {', '.join(fast)}" if fast else ""),
                f"autoencoder  encoder {'/'.join(map(str, v.widths))}, decoder "
                f"{'/'.join(map(str, v.decoder_widths))}; tiled decode "
                f"{'auto' if self.tile_decode is None else self.tile_decode}",
                f"text         {text}" + ("; components offloaded" if self.offload else ""),
            ]
        )


# --- the embedded models -----------------------------------------------------------------------------------------
# fluxion ships fluxion-tiny inside the package (assets/fluxion-tiny/: transformer, charenc, vae). From v2 on it
# ships two models, as BFL ships klein and klein base (config.FLUXION_TINY_DISTILLED / FLUXION_TINY_BASE):
# `fluxion-tiny`, the 4-step guidance-distilled student, and `fluxion-tiny-base`, its 20-step CFG teacher, in
# assets/fluxion-tiny-base/ (transformer + charenc only: it shares fluxion-tiny's autoencoder, trained once).
#
# A tiny-shaped file is told apart by its safetensors metadata `guidance_mode` ("distilled" / "cfg"), written by
# runs/fluxion_tiny_v2.py `package()` and by the trainer's distillation exports. A file without it (v1, which
# says only {"model": "fluxion-tiny", "dtype": "bfloat16"}; fine-tunes; other exports) was never distilled, so
# it gets true CFG at 20 steps; an explicit --preset wins over all of this.
#
# The switch (`shipped_tiny`): the embedded fluxion-tiny transformer's own metadata, read once (lazily, header
# only). Until the v2 weights ship it has no `guidance_mode`, and everything stays as in v1: `fluxion-tiny` is
# CFG at 20 steps, files without metadata are `fluxion-tiny`, and `--model fluxion-tiny-base` is refused.
# `$FLUXION_ASSETS` (a folder laid out as assets/: fluxion-tiny/ and optionally fluxion-tiny-base/) replaces
# the package's assets for the embedded models: to try packaged weights before committing them, and for tests.
EMBEDDED = ("fluxion-tiny", "fluxion-tiny-base")  # --model names of the weights inside the package
ASSETS_ENV = "FLUXION_ASSETS"


def assets_root():
    """The folder holding the embedded models' folders: $FLUXION_ASSETS, else the package's assets/."""
    root = os.environ.get(ASSETS_ENV)
    if root:
        return Path(root)
    from importlib.resources import files

    return files("fluxion") / "assets"


def embedded_model_dir(name: str = "fluxion-tiny"):
    """Where the weights shipped inside the package live (None when this build has none)."""
    folder = assets_root() / name
    return folder if (folder / "transformer.safetensors").is_file() else None


def is_embedded(model) -> bool:
    """Whether a --model value names weights shipped inside the package (None: the default, fluxion-tiny)."""
    return model is None or str(model) in EMBEDDED


def embedded_files(name: str = "fluxion-tiny") -> tuple[Path, Path]:
    """(transformer, autoencoder) files of an embedded model, or FileNotFoundError saying what to do."""
    folder = embedded_model_dir(name)
    where = f" ({ASSETS_ENV}={os.environ[ASSETS_ENV]})" if os.environ.get(ASSETS_ENV) else ""
    if folder is None and name == "fluxion-tiny" and where:
        raise FileNotFoundError(
            f"{ASSETS_ENV}={os.environ[ASSETS_ENV]} has no fluxion-tiny/transformer.safetensors: point it at an "
            "assets folder (fluxion-tiny/, optionally fluxion-tiny-base/) or unset it to use the package's own"
        )
    if folder is None and name == "fluxion-tiny":
        raise FileNotFoundError(
            "this fluxion build has no embedded model; pass --model with a FLUX.2 checkpoint "
            f"(a diffusers folder, or a BFL .safetensors file with --vae and --text){where}"
        )
    if folder is None:
        raise FileNotFoundError(
            f"this fluxion build ships no {name} (no {name}/transformer.safetensors in its assets{where}): "
            "use the embedded fluxion-tiny (drop --model), or pass --model with a checkpoint"
        )
    home = folder if name == "fluxion-tiny" else embedded_model_dir("fluxion-tiny")
    if home is None:
        raise FileNotFoundError(
            f"{name} uses fluxion-tiny's autoencoder, and this build has no fluxion-tiny{where}"
        )
    return Path(str(folder / "transformer.safetensors")), Path(str(home / "vae.safetensors"))


def file_guidance(path) -> str | None:
    """The guidance mode a safetensors file's metadata declares (`guidance_mode`: "distilled" / "cfg" /
    "embedded"), or None. Header only, cached per file version."""
    p = Path(str(path))
    st = p.stat()
    return _guidance_in_header(str(p), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _guidance_in_header(path: str, mtime_ns: int, size: int) -> str | None:
    from fluxion.weights.safetensors_io import read_header

    mode = read_header(path)[1].get("guidance_mode")
    if mode not in (None, "distilled", "cfg", "embedded"):
        raise ValueError(
            f"{path}: metadata guidance_mode {mode!r} is not distilled, cfg or embedded; fix the file's "
            "metadata or pass --preset"
        )
    return mode


def shipped_tiny() -> ModelSpec:
    """THE SWITCH: the spec `fluxion-tiny` stands for in this build. The distilled student when the embedded
    transformer says `guidance_mode: distilled` (v2 weights), else v1's (true CFG, 20 steps)."""
    from fluxion.config import FLUXION_TINY_DISTILLED, PRESETS

    folder = embedded_model_dir()
    if folder is not None and file_guidance(folder / "transformer.safetensors") == "distilled":
        return FLUXION_TINY_DISTILLED
    return PRESETS["fluxion-tiny"]


def tiny_spec(guidance: str | None) -> ModelSpec:
    """The preset of a fluxion-tiny-shaped checkpoint whose metadata says `guidance` (None: nothing): distilled
    -> fluxion-tiny's student; cfg -> fluxion-tiny-base; nothing -> CFG too (never distilled), named
    fluxion-tiny-base, or fluxion-tiny in a v1 build (where that name is the CFG model)."""
    from fluxion.config import FLUXION_TINY_BASE, FLUXION_TINY_DISTILLED

    if guidance == "distilled":
        return FLUXION_TINY_DISTILLED
    if guidance == "cfg" or shipped_tiny().guidance_mode == "distilled":
        return FLUXION_TINY_BASE
    return shipped_tiny()


def embedded_spec(name: str = "fluxion-tiny") -> ModelSpec:
    """The spec of an embedded model (FileNotFoundError for fluxion-tiny-base in a build without it)."""
    from fluxion.config import FLUXION_TINY_BASE

    if name == "fluxion-tiny":
        return shipped_tiny()
    embedded_files(name)
    return FLUXION_TINY_BASE


def resolve_spec(
    model_path,
    preset: str | None = None,
    *,
    vae=None,
    vae_decoder=None,
    text=None,
) -> ModelSpec:
    """The spec of a checkpoint: the named preset when given, else derived from the checkpoint (weights/spec.py;
    a released model's name and defaults come back when it is one)."""
    from fluxion.config import get_preset
    from fluxion.weights.spec import derive_spec

    if preset:
        return get_preset(preset)
    return derive_spec(model_path, vae=vae, vae_decoder=vae_decoder, text=text)


def resolve_preset(model_path, preset: str | None = None, **components) -> ModelSpec:
    """Kept for callers of the first API (the trainer's CLI): same as `resolve_spec`."""
    return resolve_spec(model_path, preset, **components)


def _device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device is available; pass --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device} is not supported; use cpu, cuda or cuda:N")
    return device


def _offload_mode(offload: OffloadMode | bool | None) -> OffloadMode:
    if offload is True:
        return "model"
    if offload in (False, None):
        return "none"
    if offload not in ("none", "model", "blocks"):
        raise ValueError(f"offload must be none, model or blocks, not {offload!r}")
    return offload


def load_models(
    model: str | Path | None = None,
    *,
    preset: str | None = None,
    vae: str | Path | None = None,
    vae_decoder: str | Path | None = None,
    text: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    accel: AccelOptions | None = None,
    vae_accel: VAEAccelOptions | None = None,
    offload: OffloadMode | bool = "none",
    tile_decode: bool | None = None,
    loras: Sequence[tuple[str | Path, float]] = (),
) -> Models:
    """Load transformer, VAE and text encoder, then turn on the requested fast paths.

    model: None / "fluxion-tiny" / "fluxion-tiny-base" (embedded, see `shipped_tiny`), a diffusers model folder
    (transformer/, vae/, text_encoder/, tokenizer/, model_index.json), or a BFL transformer file (then `vae` and
    `text` are needed; a fluxion-tiny-shaped file needs no `text`: MiniLM).
    preset: a preset name pins the spec (else it is derived from the checkpoint). vae / text: override the
    folder's own. vae_decoder: a decoder-only file (e.g. BFL's small_decoder.safetensors) or a VAE folder whose
    decoder replaces the autoencoder's. accel: `AccelOptions` for the transformer (fp8 / int8 / int4, attention,
    compile, CUDA graphs, block offload); vae_accel: `VAEAccelOptions`. offload: "model" keeps VAE and text
    encoder on the CPU between uses; "blocks" also streams the transformer's blocks from pinned host memory.
    tile_decode: None decodes tiled only when the image would not fit (see `Models.should_tile`).
    text may also be the http(s) URL of a remote text encoder (text/remote.py).
    loras: (file, scale) pairs merged into the transformer's weights before the fast paths run (quantized layers
    take no adapters, and fp8 / int8 then quantize the merged weights: no per-step LoRA cost).
    Bad combinations raise ValueError before any weight is read."""
    from fluxion.accel.apply import AccelOptions
    from fluxion.text.encoder import load_text_encoder
    from fluxion.weights.load import bundle_components, load_transformer

    # 1. everything that can be refused without reading weights
    remote_text = str(text) if str(text).startswith(("http://", "https://")) else None
    if remote_text is not None:
        text = None  # the spec comes from the checkpoint; the served encoder is checked against it
    device = _device(device)
    mode = _offload_mode(offload)
    if mode == "blocks" or (accel is not None and accel.offload):
        accel = dataclasses.replace(accel or AccelOptions(), offload="blocks", device=str(device))
        mode = "blocks"
    elif accel is not None:
        accel = dataclasses.replace(accel, device=str(device))
    if accel is not None:
        accel.validate(device)
    if accel is not None and accel.cuda_graphs and mode != "none":
        raise ValueError("CUDA graphs need every weight resident on the GPU: drop --offload or --cuda-graphs")

    if is_embedded(model):
        name = "fluxion-tiny" if model is None else str(model)
        tr_path, vae_path = embedded_files(name)
        if preset not in (None, name) or vae is not None:
            raise ValueError(
                "--preset / --vae do not apply to the embedded model; pass --model with a checkpoint"
            )
        spec, text_path = embedded_spec(name), text
    else:
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(
                f"no model at {path}: give a diffusers folder, a BFL .safetensors file or a preset"
            )
        spec = resolve_spec(path, preset, vae=vae, vae_decoder=vae_decoder, text=text)
        tr_path = path
        parts = bundle_components(path)  # a ComfyUI all-in-one file also holds vae.* / text_encoders.*
        vae_path = (
            Path(vae) if vae else (path / "vae" if path.is_dir() else (path if "vae" in parts else None))
        )
        text_path = text if text else (str(path) if path.is_dir() or "text" in parts else None)
        if vae_path is None:
            raise ValueError(
                f"{path} is a single transformer file: pass the autoencoder with --vae ae.safetensors"
            )
        if text_path is None and remote_text is None and spec.text.kind != "minilm":
            raise ValueError(f"{path} is a single transformer file: pass the text-encoder folder with --text")

    # 2. weights
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    home = torch.device("cpu") if mode != "none" else device
    # Streamed blocks start on the host: offload_blocks packs them into pinned memory and moves the rest.
    transformer = load_transformer(
        tr_path, spec.transformer, dtype=dtype, device="cpu" if mode == "blocks" else device
    )
    from fluxion.text.charenc import charenc_beside, load_char_encoder

    chars = charenc_beside(tr_path)
    if chars is not None:  # a model trained with letters of quoted text (fluxion-tiny v2); fp32, 2 M params
        transformer.char_encoder = load_char_encoder(chars, spec.transformer.context_in_dim, device)
    ae = load_vae(vae_path, spec.vae, vae_decoder, device=home)
    if ae.cfg != spec.vae:  # the VAE file is what it is (e.g. the small decoder under a released preset)
        spec = dataclasses.replace(spec, vae=ae.cfg)
    if remote_text is not None:
        # A text encoder served by another process (`fluxion serve --role text-encoder`): nothing loaded here.
        from fluxion.text.remote import RemoteTextEncoder

        encoder = RemoteTextEncoder(remote_text, spec.text)
    else:
        encoder = load_text_encoder(
            text_path, spec.text, device=home, dtype=dtype if device.type == "cuda" else torch.float32
        )

    if loras:
        from fluxion.lora import load_lora, merge_lora, remove_lora

        for lora_path, scale in loras:
            load_lora(transformer, lora_path, scale=scale)
        merge_lora(transformer)
        remove_lora(transformer, keep_merged=True)

    models = Models(
        spec=spec,
        transformer=transformer,
        vae=ae,
        text=encoder,
        device=device,
        dtype=dtype,
        offload=mode != "none",
        tile_decode=tile_decode,
    )
    models.accelerate(accel, vae_accel)  # 3. the performance layer, from outside the model
    return models


def load_vae(path, cfg: VAEConfig, decoder=None, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The autoencoder at `path` in fp32 (spec 4.5). Its widths, depth and latent channels are read from the
    file; `cfg` gives what shapes cannot tell (GroupNorm groups, BN eps). With `decoder` (a decoder-only file,
    or a VAE file / folder whose decoder is wanted) that decoder replaces the one of `path`. The latent
    statistics (`bn.*`) stay those of `path`: a decoder file carrying different ones is refused (it was not
    trained for this encoder's latents)."""
    from fluxion.vae.autoencoder import AutoEncoder
    from fluxion.weights.load import check_state_dict, infer_vae_config, read_component
    from fluxion.weights.vae_mapping import read_decoder_file

    sd, _ = read_component(path, "vae")
    source = str(path)
    if decoder is not None:
        dec = read_decoder_file(decoder)
        for key in [k for k in dec if k.startswith("bn.")]:
            if (
                key != "bn.num_batches_tracked"
                and key in sd
                and not torch.equal(sd[key].float(), dec[key].float())
            ):
                raise ValueError(
                    f"{decoder} carries latent statistics ({key}) that differ from those of {path}: "
                    "this decoder was not trained for that encoder's latents"
                )
            dec.pop(key)
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder.")} | dec
        source = f"{path} with the decoder of {decoder}"
    found = infer_vae_config({k: tuple(v.shape) for k, v in sd.items()}, num_groups=cfg.num_groups)
    cfg = dataclasses.replace(
        cfg,
        ch=None,
        ch_mult=None,
        widths=found.widths,
        decoder_widths=found.decoder_widths,
        num_res_blocks=found.num_res_blocks,
        z_channels=found.z_channels,
    )
    # Files written by diffusers lack the BN step counter; it is never used (running stats only).
    sd.setdefault("bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))
    with torch.device("meta"):
        model = AutoEncoder(cfg)
    check_state_dict(model, sd, source)
    sd = {
        k: v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype)
        for k, v in sd.items()
    }
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)
