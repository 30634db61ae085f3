"""The precompute stage: VAE latents (and text embeddings) of the kept images, beside the shards, for the trainer.

Runs after the shards are written (so only kept images are encoded, dedup included), one shard at a time:
`precomputed-<pixels>/NNNNN.safetensors` holds `latent.<key>` [128, H/16, W/16] (the VAE's normalised posterior
mean, fp32) for every image of shard NNNNN at the aspect bucket the trainer gives it for `pixels` (the same
`TarShards` code reads the image, so the pixels encoded are the pixels the trainer would encode), and
`text.<key>` [max_length, C] (fp32) of its caption when `text_embeddings` is on. The metadata names the VAE
weights and text encoder by digest (fluxion.train.data.weights_digest / text_digest); the trainer uses a latent
or embedding only when its own VAE / encoder has the same digest, and encodes otherwise. A file that exists is
complete (written to a temporary name, then renamed), so a killed run resumes at the first missing shard.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TINY = ("fluxion-tiny", "fluxion-tiny-base")  # presets whose VAE is embedded in fluxion (assets/fluxion-tiny)


@dataclass(frozen=True)
class PrecomputeConfig:
    model: str = "fluxion-tiny"  # preset: the VAE's and the text encoder's architectures
    vae: str = ""  # VAE weights (file or diffusers folder); "" = the embedded fluxion-tiny VAE (tiny presets)
    text: str = ""  # text-encoder folder; "" = the preset's default (fluxion-tiny: the bundled MiniLM)
    text_embeddings: bool = True  # also store each caption's text embedding
    pixels: int = 128 * 128  # the trainer's `pixels`: latents are made at the aspect bucket it uses
    batch_size: int = 16  # images per VAE call (one bucket size per call)
    loaders: int = 4  # threads reading and resizing the next images (Pillow releases the GIL)
    device: str = "cpu"  # "cuda" on a GPU machine

    def __post_init__(self):
        if self.pixels < 256 or self.batch_size < 1 or self.loaders < 1:
            raise ValueError("precompute.pixels must be at least 256, batch_size and loaders positive")


def vae_path(cfg: PrecomputeConfig) -> str:
    if cfg.vae:
        if not Path(cfg.vae).exists():
            raise FileNotFoundError(f"precompute.vae not found: {cfg.vae}")
        return cfg.vae
    if cfg.model not in TINY:
        raise ValueError(
            f"precompute.vae: give the VAE weights of {cfg.model!r} (only fluxion-tiny's is embedded)"
        )
    from fluxion.weights.models import embedded_model_dir

    folder = embedded_model_dir()
    if folder is None:
        raise FileNotFoundError("this fluxion build has no embedded fluxion-tiny VAE: set precompute.vae")
    return str(folder / "vae.safetensors")


def precompute(cfg: PrecomputeConfig, out: Path, num_shards: int, log=print) -> dict:
    """Encode the kept images of shards 0..num_shards-1 of the curated folder `out` that have no file yet.
    Returns {"images", "seconds", "shards"} for this run."""
    import torch
    from safetensors.torch import save_file

    from fluxion.config import get_preset
    from fluxion.train.data import (
        PRECOMPUTED_FORMAT,
        precomputed_folder,
        text_digest,
        weights_digest,
    )
    from fluxion.weights.load import load_autoencoder

    folder = precomputed_folder(out, cfg.pixels)
    pending = [s for s in range(num_shards) if not (folder / f"{s:05d}.safetensors").is_file()]
    if not pending:
        return {"images": 0, "seconds": 0.0, "shards": 0}
    spec = get_preset(cfg.model)
    path = vae_path(cfg)
    device = torch.device(cfg.device)
    vae = load_autoencoder(path, spec.vae, device=device).eval()
    meta = {"format": PRECOMPUTED_FORMAT, "vae": weights_digest(path), "text": "", "pixels": str(cfg.pixels)}
    text = None
    if cfg.text_embeddings:
        from fluxion.text.encoder import load_text_encoder

        # fp32 weights, as the trainer loads its frozen encoder (the dtype is part of the encoder's digest)
        text = load_text_encoder(cfg.text or None, spec.text, device=device, dtype=torch.float32)
        meta["text"] = text_digest(text)
    folder.mkdir(parents=True, exist_ok=True)
    start, images = time.perf_counter(), 0
    for s in pending:
        tensors = encode_shard(out / f"{s:05d}.tar", cfg, vae, text, device)
        target = folder / f"{s:05d}.safetensors"
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, target)
        n = sum(k.startswith("latent.") for k in tensors)
        images += n
        log(f"precompute: shard {s}: {n} latents")
    return {"images": images, "seconds": round(time.perf_counter() - start, 3), "shards": len(pending)}


def encode_shard(tar: Path, cfg: PrecomputeConfig, vae, text, device) -> dict:
    """{"latent.<key>": [128, h, w], "text.<key>": [L, C]} for every image of one shard, fp32 on the CPU."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from fluxion.train.data import TarShards

    out: dict = {}
    shards = TarShards(tar.parent, cfg.pixels, shards=[tar])
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(shards.sizes):
        by_size.setdefault(size, []).append(i)
    with torch.no_grad(), ThreadPoolExecutor(cfg.loaders) as pool:
        for indices in by_size.values():
            for b in range(0, len(indices), cfg.batch_size):
                chunk = indices[b : b + cfg.batch_size]
                samples = list(pool.map(shards.sample, chunk))
                stems = [shards.items[i][1].rsplit(".", 1)[0] for i in chunk]
                z = vae.encode(torch.stack([s.image for s in samples]).to(device)).float().cpu()
                for stem, zi in zip(stems, z):
                    out[f"latent.{stem}"] = zi.contiguous()
                if text is not None:
                    ctx = text.encode([s.caption for s in samples], dtype=torch.float32).cpu()
                    for stem, ci in zip(stems, ctx):
                        out[f"text.{stem}"] = ci.contiguous()
    return out
