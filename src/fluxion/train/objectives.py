"""The objective protocol of the training loop, the encoders' shared helpers, and the first objective.

An objective owns what differs between training kinds: its data (a sampler of batches of samples), how a batch
becomes tensors (noise, times, conditioning; each rank passes its own generator) and the loss. The loop owns
everything else (build, parallelize, optimizer, schedule, EMA, resume, logging, samples, export).

Objectives: `FlowMatching` (here), `DiffusionDPO` (train/dpo.py), `StepDistillation` (train/distill.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from fluxion.model.transformer import Flux2
from fluxion.sampling.ids import image_ids, pack, reference_ids, text_ids
from fluxion.train.config import TrainConfig
from fluxion.train.data import BatchSampler, Sample, open_sources, text_digest, weights_digest
from fluxion.train.flow_matching import flow_loss, interpolate, sample_times
from fluxion.weights.models import Models


class Objective(Protocol):
    name: str

    def sampler(self, cfg: TrainConfig, rank: int):
        """Endless batches of samples; has next_batch(), state_dict() and load_state_dict() (for resume)."""

    def batch(self, models: Models, samples: list, gen: torch.Generator) -> dict:
        """Everything one step needs, on the device (encoders run here, under no_grad)."""

    def loss(self, model: Flux2, batch: dict) -> tuple[Tensor, dict[str, float]]:
        """The scalar to minimise and extra figures to log."""


# ---------------------------------------------------------------------------------------------------------
# Frozen encoders through `Models`, with optional disk caches (latents here, prompts in models.prompt_cache)


@torch.no_grad()
def encode_latents(models: Models, images: list[Tensor], keys: list[str] | None, cache: Path | dict | None):
    """Packed latent tokens [B, h * w, 128] of pixel images, read from / written to `cache` by key: a folder
    (disk), or a dict kept on the device (no encode and no file reads once every image was seen)."""
    if cache is None or not keys or not all(keys):
        z = models.vae.encode(torch.stack(images).to(models.device))  # [B, 128, h, w]
        return pack(z), z.shape[2], z.shape[3]
    if isinstance(cache, dict):
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            z_new = models.vae.encode(torch.stack([images[i] for i in missing]).to(models.device))
            for i, z in zip(missing, z_new):
                cache[keys[i]] = z
        z = torch.stack([cache[k] for k in keys])
        return pack(z), z.shape[2], z.shape[3]
    from safetensors.torch import load_file, save_file

    paths = [cache / (hashlib.sha1(k.encode()).hexdigest() + ".safetensors") for k in keys]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        z_new = models.vae.encode(torch.stack([images[i] for i in missing]).to(models.device)).cpu()
        cache.mkdir(parents=True, exist_ok=True)
        for i, z in zip(missing, z_new):
            save_file({"z": z.contiguous()}, str(paths[i]))
    z = torch.stack([load_file(str(p))["z"] for p in paths]).to(models.device)
    return pack(z), z.shape[2], z.shape[3]


@torch.no_grad()
def encode_context(models: Models, prompts: list[str]) -> Tensor:
    """[B, L, C_txt] fp32 prompt states (the frozen text encoder; the trained character encoder, when the model
    has one, is applied by the objective with gradients)."""
    if models.prompt_cache is not None:
        return models.prompt_cache.get_or_encode(models.text, prompts, dtype=torch.float32).to(models.device)
    return models.text.encode(prompts, dtype=torch.float32)


def precomputed_latents(samples: list[Sample], vae_path: str) -> Tensor | None:
    """[B, 128, h, w] when every sample carries a latent precomputed (fluxion curate) by the VAE weights at
    `vae_path`; None otherwise (the batch is then encoded)."""
    if not samples or any(s.latent is None for s in samples):
        return None
    digest = weights_digest(str(vae_path))
    if any(s.made_by[0] != digest for s in samples):
        return None
    return torch.stack([s.latent for s in samples])


@torch.no_grad()
def context_with_precomputed(models: Models, samples: list[Sample], prompts: list[str]) -> Tensor:
    """`encode_context(models, prompts)`, taking each prompt that is its sample's caption from the sample's
    precomputed text embedding when this text encoder made it; the others (dropped captions) are encoded."""
    if models.text is None or all(s.context is None for s in samples):
        return encode_context(models, prompts)
    digest = text_digest(models.text)
    use = [
        s.context is not None and s.made_by[1] == digest and p == s.caption and p != ""
        for s, p in zip(samples, prompts)
    ]
    if not any(use):
        return encode_context(models, prompts)
    rest = [p for p, u in zip(prompts, use) if not u]
    live = iter(encode_context(models, rest)) if rest else iter(())
    # Every prompt is padded to the encoder's max_length, so precomputed and live rows stack.
    return torch.stack(
        [s.context.to(models.device, torch.float32) if u else next(live) for s, u in zip(samples, use)]
    )


def forward_velocity(model: Flux2, x: Tensor, x_ids: Tensor, t: Tensor, ctx: Tensor, batch: dict) -> Tensor:
    """v for the output tokens of x, with the batch's references appended as at inference (spec 7.2)."""
    n_out = x.shape[1]
    chars = getattr(model, "char_encoder", None)
    ctx_ids = batch["ctx_ids"]
    if chars is not None and batch.get("char_codes") is not None:  # letters of the quoted text (charenc.py)
        ctx = torch.cat([ctx, chars(batch["char_codes"]).to(ctx.dtype)], dim=1)
        ctx_ids = text_ids(ctx.shape[1], ctx.shape[0], ctx.device)
    if batch.get("refs") is not None:
        x = torch.cat([x, batch["refs"]], dim=1)
        x_ids = torch.cat([x_ids, batch["ref_ids"]], dim=1)
    guidance = None
    if model.cfg.use_guidance_embed:  # guidance-distilled models are trained at a fixed embedded value
        guidance = torch.full_like(t, 3.5)
    return model(x, x_ids, t, ctx, ctx_ids, guidance)[:, :n_out]


def add_char_codes(cfg: TrainConfig, prompts: list[str], batch: dict, device) -> None:
    """The quoted characters of each prompt, for models with a character encoder (text/charenc.py)."""
    if cfg.char_encoder:
        from fluxion.text.charenc import char_codes

        batch["char_codes"] = char_codes(prompts, cfg.char_max, device)


def add_references(models: Models, samples: list[Sample], batch: dict, cache: Path | None) -> None:
    if not samples[0].refs:
        return
    B = len(samples)
    grids, tokens = [], []
    for k in range(len(samples[0].refs)):
        r, rh, rw = encode_latents(
            models,
            [s.refs[k] for s in samples],
            [s.ref_keys[k] if s.ref_keys else "" for s in samples],
            cache,
        )
        tokens.append(r)
        grids.append((rh, rw))
    batch["refs"] = torch.cat(tokens, dim=1)
    batch["ref_ids"] = reference_ids(grids, B, models.device)


# ---------------------------------------------------------------------------------------------------------
# Flow matching (pre-training, quality fine-tune, LoRA)


class FlowMatching:
    """Rectified flow (spec 2.3): velocity MSE at logit-normal shifted times; caption dropout for CFG."""

    name = "flow"

    def __init__(self, cfg: TrainConfig, cache: Path | None = None):
        self.cfg, self.cache = cfg, cache

    def sampler(self, cfg: TrainConfig, rank: int) -> BatchSampler:
        return BatchSampler(
            open_sources(cfg.data, cfg.pixels),
            cfg.batch_size,
            cfg.edit_fraction,
            cfg.seed + rank,
            caption_variety=cfg.caption_variety,
        )

    def batch(self, models: Models, samples: list[Sample], gen: torch.Generator) -> dict:
        device = models.device
        z = precomputed_latents(samples, self.cfg.vae)
        if z is not None:  # `fluxion curate` encoded these images with this VAE already
            x0, h, w = pack(z.to(device)), z.shape[2], z.shape[3]
        else:
            x0, h, w = encode_latents(
                models, [s.image for s in samples], [s.key for s in samples], self.cache
            )
        B = x0.shape[0]
        drop = torch.rand(B, generator=gen, device=device) < self.cfg.caption_dropout
        prompts = ["" if d else s.caption for s, d in zip(samples, drop.tolist())]
        ctx = context_with_precomputed(models, samples, prompts)
        batch = {
            "x0": x0,
            "x_ids": image_ids(h, w, batch=B, device=device),
            "ctx": ctx,
            "ctx_ids": text_ids(ctx.shape[1], B, device),
            "prompts": prompts,
            "refs": None,
            "ref_ids": None,
        }
        add_references(models, samples, batch, self.cache)
        add_char_codes(self.cfg, prompts, batch, device)
        t = sample_times(B, x0.shape[1], generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        batch.update(t=t, noise=noise, x_t=interpolate(x0, noise, t))
        return batch

    def loss(self, model: Flux2, batch: dict) -> tuple[Tensor, dict[str, float]]:
        pred = forward_velocity(model, batch["x_t"], batch["x_ids"], batch["t"], batch["ctx"], batch)
        return flow_loss(pred, batch["x0"], batch["noise"]), {}


def make_objective(cfg: TrainConfig, models: Models, cache: Path | None, device: torch.device) -> Objective:
    """The objective `cfg.objective` names; DPO and distillation load their frozen reference / teacher here."""
    if cfg.objective == "dpo":
        from fluxion.train.dpo import DiffusionDPO

        return DiffusionDPO(cfg, models, cache, device)
    if cfg.objective == "distill":
        from fluxion.train.distill import StepDistillation

        return StepDistillation(cfg, models, cache, device)
    return FlowMatching(cfg, cache)
