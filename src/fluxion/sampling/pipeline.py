"""generate / edit / inpaint: prompt (+ images) -> encode -> noise -> denoise -> decode.

The one orchestration layer: the CLI, the trainer's sample images and the evaluation all call these functions.
Components come in already loaded (`fluxion.weights.models.load_models`); the request contract is
`fluxion.request`, image rules are `fluxion.images`. Nothing here reads files.

Noise (`Request.noise`): "fluxion" (default) draws each image from its own generator seeded seed + i, so any
image of a batch can be re-made alone; "diffusers" draws the whole batch [B, 128, h, w] in one `torch.randn` from
one generator seeded `seed`, as diffusers' Flux2 pipelines do (`prepare_latents` -> `randn_tensor`), so the same
seed and generator device give diffusers' latents. Both draw in the packed 128-channel space in the model dtype.

What the caller should know is said through `warnings`: `fluxion.request.Note` for stated facts (CFG off at
guidance <= 1, a reference resized, an all-black mask), UserWarning for likely mistakes (a prompt longer than the
encoder reads, a size far from the model's).
"""

from __future__ import annotations

import random
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from fluxion.config import ModelSpec
from fluxion.editing.references import prepare_references
from fluxion.images import (
    InputImageError,
    OutputSize,
    check_image,
    model_pixel_range,
    pil_to_pixels,
    pixels_to_pil,
)
from fluxion.request import Note, ProgressFn, Request, Result
from fluxion.sampling.denoise import Conditioning, Guidance, denoise_steps
from fluxion.sampling.ids import image_ids, pack, reference_ids, text_ids, unpack
from fluxion.sampling.preview import denoised_estimate
from fluxion.sampling.schedule import get_schedule
from fluxion.weights.models import Models

__all__ = ["Models", "Request", "Result", "decode", "draw_noise", "encode_prompts", "generate", "inpaint"]


def resolve_guidance(spec: ModelSpec, guidance: float | None, allow_override: bool) -> Guidance:
    g = spec.default_guidance if guidance is None else guidance
    if g < 0:
        raise ValueError(f"guidance must be >= 0, got {g}")
    if spec.guidance_mode == "cfg" and g <= 1:
        # diffusers' Flux2KleinPipeline: do_classifier_free_guidance = guidance_scale > 1 (and not distilled).
        warnings.warn(
            f"guidance {g:g} <= 1 turns classifier-free guidance off for {spec.name} (as in diffusers): "
            "one forward per step, no negative prompt",
            Note,
            stacklevel=3,
        )
        return Guidance(mode="distilled", scale=g, kv_cache=spec.kv_cache)
    if spec.guidance_mode == "distilled" and g != spec.default_guidance:
        if not allow_override:
            raise ValueError(
                f"{spec.name} is guidance-distilled: its guidance is fixed at {spec.default_guidance:g} "
                f"(asked for {g:g}); drop the guidance option, or allow the override explicitly"
            )
        warnings.warn(
            f"overriding the fixed guidance of {spec.name} ({spec.default_guidance:g} -> {g:g}); "
            "the model was not trained for it",
            stacklevel=3,
        )
    return Guidance(mode=spec.guidance_mode, scale=g, kv_cache=spec.kv_cache)


def _warn_ignored(spec: ModelSpec, request: Request, guidance: Guidance) -> None:
    if request.negative_prompt and guidance.mode != "cfg" and spec.guidance_mode != "cfg":
        warnings.warn(f"{spec.name} does not use true CFG: the negative prompt is ignored", stacklevel=3)


def _warn_size(spec: ModelSpec, width: int, height: int) -> None:
    low, high = model_pixel_range(spec)
    if not low <= width * height <= high:
        dw, dh = spec.default_size
        warnings.warn(
            f"{width}x{height} is far from the sizes {spec.name} handles (made for about {dw}x{dh}); "
            "expect repeated patterns or lost detail",
            stacklevel=3,
        )


def _warn_long_prompts(models: Models, prompts: list[str]) -> None:
    """One warning per prompt longer than the text encoder reads (the rest is cut off, as in the reference)."""
    count = getattr(models.text, "token_counts", None)
    if count is None:  # released encoder (prompts from the cache) or a stand-in without a tokenizer
        return
    limit = models.text.cfg.max_length
    unique = list(dict.fromkeys(prompts))
    for prompt, n in zip(unique, count(unique)):
        if n > limit:
            head = prompt if len(prompt) <= 40 else prompt[:37] + "..."
            warnings.warn(
                f"prompt {head!r} is {n} tokens; the text encoder reads {limit}: the last {n - limit} "
                "tokens are dropped",
                stacklevel=3,
            )


def _prompts(request: Request) -> list[str]:
    prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
    if not prompts:
        raise ValueError("no prompt given")
    if request.num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {request.num_images}")
    return [p for p in prompts for _ in range(request.num_images)]


def _seeds(request: Request, batch: int) -> list[int]:
    """Image i of each prompt uses seed + i (noise "fluxion"); with noise "diffusers" every image reports the
    one generator's seed. A missing seed is drawn (and reported in the results)."""
    if request.seeds is not None:  # explicit per-image seeds (a batch of unrelated jobs)
        if len(request.seeds) != batch:
            raise ValueError(f"{len(request.seeds)} seeds given for a batch of {batch} images")
        return list(request.seeds)
    seed = request.seed if request.seed is not None else random.randrange(2**32)
    if request.noise == "diffusers":
        return [seed] * batch
    return [seed + i for i in range(request.num_images)] * (batch // request.num_images)


def _noise_params(request: Request, index: int, batch: int) -> dict:
    if request.noise == "fluxion":
        return {}
    return {"noise": request.noise, "batch_index": index, "batch_size": batch}


def _conditioning(models: Models, request: Request, guidance: Guidance, prompts: list[str], refs, ref_ids):
    """Prompt (and, for true CFG, negative prompt) embeddings plus references, for a batch of len(prompts)."""
    B, device = len(prompts), models.device
    ctx = encode_prompts(models, prompts)
    neg = None
    if guidance.mode == "cfg":  # one negative for the whole batch: encode it once
        neg = encode_prompts(models, [request.negative_prompt]).expand(B, -1, -1)
    return Conditioning(
        ctx=ctx, ctx_ids=text_ids(ctx.shape[1], B, device), neg_ctx=neg, refs=refs, ref_ids=ref_ids
    )


def encode_prompts(models: Models, prompts: list[str]) -> Tensor:
    """[B, L, C_txt] in the transformer dtype, through the prompt cache when there is one (which also serves
    cached prompts after `release_text_encoder`)."""
    if models.prompt_cache is not None:
        with _on_device(models, models.text):
            ctx = models.prompt_cache.get_or_encode(models.text, prompts, dtype=torch.float32)
    elif models.text is not None:
        with _on_device(models, models.text):
            ctx = models.text.encode(prompts, dtype=torch.float32)
    else:
        raise ValueError("the text encoder was released and there is no prompt cache to read prompts from")
    ctx = ctx.to(models.device, models.dtype)
    chars = getattr(models.transformer, "char_encoder", None)
    if chars is not None:  # letters of the quoted text, after the text encoder's tokens (text/charenc.py)
        ctx = torch.cat([ctx, chars.encode(prompts).to(models.device, models.dtype)], dim=1)
    return ctx


class _on_device:
    """With offload on, move a component to the device for the duration of a block, then back to the CPU."""

    def __init__(self, models: Models, component):
        self.models, self.module = models, getattr(component, "backbone", component)

    def __enter__(self):
        if self.models.offload and isinstance(self.module, torch.nn.Module):
            self.module.to(self.models.device)

    def __exit__(self, *exc):
        if self.models.offload and isinstance(self.module, torch.nn.Module):
            self.module.to("cpu")


def encode_images(models: Models, images: list[Image.Image]) -> tuple[Tensor, list[tuple[int, int]]]:
    """Reference tokens [1, sum N_k, 128] (VAE in fp32, tokens cast to the compute dtype) and their grids."""
    tokens, grids = [], []
    with _on_device(models, models.vae), torch.no_grad():
        for im in images:
            z = models.vae.encode(pil_to_pixels(im).to(models.device, _vae_dtype(models)))  # [1, 128, h, w]
            tokens.append(pack(z))
            grids.append((z.shape[2], z.shape[3]))
    return torch.cat(tokens, dim=1).to(models.dtype), grids


def _vae_dtype(models: Models) -> torch.dtype:
    """The VAE's weight dtype (fp32 unless the loader chose otherwise); its inputs are cast to it."""
    p = next(models.vae.parameters(), None)
    return p.dtype if p is not None else torch.float32


def decode(models: Models, tokens: Tensor, h: int, w: int) -> Tensor:
    """[B, 3, 16h, 16w] pixels (`Models.decode_latents` picks the tiled path when the image would not fit)."""
    with _on_device(models, models.vae), torch.no_grad():
        return models.decode_latents(
            unpack(tokens, h, w).to(_vae_dtype(models))
        )  # tiled when it would not fit


def draw_noise(
    spec: ModelSpec,
    seeds: list[int],
    h: int,
    w: int,
    device,
    dtype,
    generator_device=None,
    mode: str = "fluxion",
) -> Tensor:
    """[B, h * w, 128] tokens; noise drawn directly in the packed 128-channel space. mode "fluxion": one
    generator per image (seed s -> the same image as the reference with that seed, spec 6.1); "diffusers": one
    [B, 128, h, w] draw from one generator seeded seeds[0] (diffusers' `prepare_latents`)."""
    gen_device = torch.device(generator_device) if generator_device else torch.device(device)
    if mode == "diffusers":
        g = torch.Generator(gen_device).manual_seed(seeds[0])
        shape = (len(seeds), spec.transformer.in_channels, h, w)
        return pack(torch.randn(shape, generator=g, dtype=dtype, device=gen_device)).to(device)
    out = []
    for s in seeds:
        g = torch.Generator(gen_device).manual_seed(s)
        z = torch.randn((1, spec.transformer.in_channels, h, w), generator=g, dtype=dtype, device=gen_device)
        out.append(pack(z).to(device))
    return torch.cat(out)


@torch.no_grad()
def generate(
    models: Models, request: Request, progress: ProgressFn | None = None, preview=None
) -> list[Result]:
    """Text-to-image, or editing when `request.references` is non-empty (1 to spec.max_references images)."""
    spec, device, dtype = models.spec, models.device, models.dtype
    width = spec.default_size[0] if request.width is None else request.width
    height = spec.default_size[1] if request.height is None else request.height
    size = OutputSize(width, height, spec.vae.downsample_factor)
    steps = spec.default_steps if request.steps is None else request.steps
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    guidance = resolve_guidance(spec, request.guidance, request.allow_override)
    if len(request.references) > spec.max_references:
        raise InputImageError(
            f"{len(request.references)} reference images given; {spec.name} takes at most {spec.max_references}"
        )
    prompts = _prompts(request)
    B = len(prompts)
    seeds = _seeds(request, B)
    _warn_ignored(spec, request, guidance)
    _warn_size(spec, width, height)
    _warn_long_prompts(models, prompts)
    refs = ref_ids = None
    if request.references:
        prepared = prepare_references(
            list(request.references), spec.reference_pixels, spec.vae.downsample_factor
        )
        _note_resized(spec, request.references, prepared)
        tokens, grids = encode_images(models, prepared)
        refs, ref_ids = tokens.expand(B, -1, -1), reference_ids(grids, B, device)

    gw, gh = size.generated
    f = spec.vae.downsample_factor
    h, w = gh // f, gw // f
    x = draw_noise(spec, seeds, h, w, device, dtype, request.generator_device, request.noise)
    cond = _conditioning(models, request, guidance, prompts, refs, ref_ids)
    timesteps = get_schedule(steps, h * w)
    x = _run(
        models, x, image_ids(h, w, batch=B, device=device), cond, timesteps, guidance, progress, preview, h, w
    )
    pixels = size.crop(decode(models, x, h, w))
    params = {
        "model": spec.name,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": guidance.scale,
        "negative_prompt": request.negative_prompt if guidance.mode == "cfg" else None,
        "references": len(request.references),
    }
    return [
        Result(image, s, {**params, "prompt": p, "seed": s, **_noise_params(request, i, B)})
        for i, (image, s, p) in enumerate(zip(pixels_to_pil(pixels), seeds, prompts))
    ]


def _note_resized(spec: ModelSpec, originals, prepared) -> None:
    """A note for each reference far larger than the model takes (more than 4x its pixel cap)."""
    cap = spec.reference_pixels[0] if len(originals) == 1 else spec.reference_pixels[1]
    for k, (orig, prep) in enumerate(zip(originals, prepared), start=1):
        w, h = orig.size
        if w * h > 4 * cap:
            warnings.warn(
                f"reference image {k} is {w}x{h}; resized to {prep.size[0]}x{prep.size[1]} "
                f"({spec.name} takes at most {cap / 1e6:.2g} MP per reference here)",
                Note,
                stacklevel=3,
            )


def _run(models, x, x_ids, cond, timesteps, guidance, progress, preview, h, w, after_step=None) -> Tensor:
    total, t0 = len(timesteps) - 1, time.perf_counter()
    out = prev = x
    for i, out in denoise_steps(models.denoiser, x, x_ids, cond, timesteps, guidance, after_step):
        if models.device.type == "cuda" and (progress or preview):  # timing a step needs it finished
            torch.cuda.synchronize()
        now = time.perf_counter()
        if progress:
            progress(i + 1, total, now - t0)
        if preview:  # gets the denoised estimate x0 [B, h*w, 128], not the noisy state (sampling/preview.py)
            preview(i + 1, total, denoised_estimate(prev, out, timesteps[i], timesteps[i + 1]), h, w)
        prev, t0 = out, now
    return out


@torch.no_grad()
def inpaint(
    models: Models,
    request: Request,
    image: Image.Image,
    mask: Image.Image,
    strength: float = 0.8,
    composite: bool = True,
    progress: ProgressFn | None = None,
    preview=None,
) -> list[Result]:
    """Repaint the white part of `mask` in `image` (klein inpaint behaviour, spec 7.4).

    The source is noised to the first used time of a schedule truncated by `strength`, and after every step the
    unmasked tokens are reset to the source noised to the next time. The source is also reference 1 (and
    `request.references[0]`, if given, reference 2). With `composite` the returned pixels outside the mask are
    the source's exactly. Output size = the source size (it must be >= 64 px per side).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    check_image(image, "source image")
    if mask.size != image.size:
        raise InputImageError(
            f"mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}"
        )
    if len(request.references) > 1:
        raise InputImageError(
            f"inpainting takes at most one extra reference image (the source is the first); got {len(request.references)}"
        )
    spec, device, dtype = models.spec, models.device, models.dtype
    f = spec.vae.downsample_factor
    size = OutputSize(*image.size, multiple=f)
    gw, gh = size.generated
    # Pad by edge replication to the 16-px grid (the crop afterwards restores the exact size).
    src = F.pad(pil_to_pixels(image.convert("RGB")), _pad(size), mode="replicate")
    binary = _gray(mask) >= 0.5  # [H, W] True = repaint
    if not binary.any():
        warnings.warn(
            "the mask is all black: nothing is repainted (white marks what to repaint); "
            "the output keeps the source",
            Note,
            stacklevel=3,
        )
    m_px = F.pad(torch.from_numpy(binary).float()[None, None], _pad(size), mode="replicate")
    h, w = gh // f, gw // f
    steps = spec.default_steps if request.steps is None else request.steps
    guidance = resolve_guidance(spec, request.guidance, request.allow_override)
    _warn_ignored(spec, request, guidance)
    prompts = _prompts(request)
    B = len(prompts)
    seeds = _seeds(request, B)
    _warn_long_prompts(models, prompts)

    with _on_device(models, models.vae):
        x0 = (
            pack(models.vae.encode(src.to(device, _vae_dtype(models)))).to(dtype).expand(B, -1, -1)
        )  # [B, N, 128]
    extra = (
        prepare_references(list(request.references[:1]), spec.reference_pixels, f)
        if request.references
        else []
    )
    ref_tokens, grids = encode_images(models, extra) if extra else (None, [])
    refs = torch.cat([x0[:1]] + ([ref_tokens] if ref_tokens is not None else []), dim=1).expand(B, -1, -1)
    ref_ids = reference_ids([(h, w), *grids], B, device)
    mask_tok = pack(F.interpolate(m_px, size=(h, w), mode="bilinear")).to(device, dtype)  # [1, N, 1]

    full = get_schedule(steps, h * w)
    start = int(max(steps - min(steps * strength, steps), 0))  # the SD3-style truncation diffusers uses
    timesteps = full[start:]
    noise = draw_noise(spec, seeds, h, w, device, dtype, request.generator_device, request.noise)
    noise_f, x0_f = noise.float(), x0.float()  # the source noised to time t: t * noise + (1 - t) * x0
    x = (timesteps[0] * noise_f + (1 - timesteps[0]) * x0_f).to(dtype)

    def keep_source(i: int, t_next: float, x: Tensor) -> Tensor:
        source_t = (t_next * noise_f + (1 - t_next) * x0_f).to(dtype)
        return (1 - mask_tok) * source_t + mask_tok * x

    cond = _conditioning(models, request, guidance, prompts, refs, ref_ids)
    x = _run(
        models,
        x,
        image_ids(h, w, batch=B, device=device),
        cond,
        timesteps,
        guidance,
        progress,
        preview,
        h,
        w,
        keep_source,
    )
    images = pixels_to_pil(size.crop(decode(models, x, h, w)))
    if composite:
        # In uint8, not in float: source pixels through [-1, 1] and back with the BFL truncation come out one
        # level low for most values (v / 255 * 2 - 1 is inexact), so a float composite would not be exact.
        keep = _gray(mask)[..., None] < 0.5  # [H, W, 1] the unmasked pixels, binarised as above
        source = np.asarray(image.convert("RGB"))
        images = [Image.fromarray(np.where(keep, source, np.asarray(im))) for im in images]
    params = {
        "model": spec.name,
        "width": size.width,
        "height": size.height,
        "steps": steps,
        "guidance": guidance.scale,
        "strength": strength,
        "mode": "inpaint",
    }
    return [
        Result(im, s, {**params, "prompt": p, "seed": s, **_noise_params(request, i, B)})
        for i, (im, s, p) in enumerate(zip(images, seeds, prompts))
    ]


def _pad(size: OutputSize) -> tuple[int, int, int, int]:
    gw, gh = size.generated
    left, top = (gw - size.width) // 2, (gh - size.height) // 2
    return (left, gw - size.width - left, top, gh - size.height - top)


def _gray(mask: Image.Image):
    return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
