"""Training a FLUX.2-architecture autoencoder from scratch (for fluxion-tiny), then fitting its latent batch norm.

Objective: L1 + MSE reconstruction, an L1 penalty on image gradients (keeps glyph edges sharp, since we have no
perceptual network offline), and a very small KL term so the posterior stays a well-scaled Gaussian. After
training, the batch-norm running statistics are set to the per-channel mean and variance of the patchified
latent means over the data: that is what normalises the transformer's input to about unit variance (spec 4.3).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from fluxion.config import get_preset
from fluxion.train.data import BatchSampler, open_sources
from fluxion.train.precision import precision_policy
from fluxion.vae.autoencoder import AutoEncoder, patchify


@dataclass(frozen=True, kw_only=True)
class VAETrainConfig:
    model: str  # preset whose VAE config is trained
    data: tuple[str, ...]
    out: str
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-4
    warmup: int = 100
    kl_weight: float = 1e-6
    edge_weight: float = 0.5
    stats_images: int = 4096  # images used to fit the latent batch-norm statistics
    seed: int = 0
    log_every: int = 50
    compute_dtype: str = "bfloat16"  # the trainer's one precision policy (train/precision.py)


def reconstruction_loss(rec: Tensor, x: Tensor, edge_weight: float) -> Tensor:
    loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
    if edge_weight:
        for dim in (2, 3):
            loss = loss + edge_weight * F.l1_loss(rec.diff(dim=dim), x.diff(dim=dim))
    return loss


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    logvar = logvar.clamp(-30.0, 20.0)
    return 0.5 * torch.mean(mean**2 + logvar.exp() - 1.0 - logvar)


@torch.no_grad()
def fit_latent_norm(ae: AutoEncoder, batches) -> None:
    """Set bn.running_mean / running_var to the statistics of the patchified posterior means (one pass)."""
    total, total_sq, count = 0.0, 0.0, 0
    for x in batches:
        moments = ae.encoder(x)
        z = patchify(moments[:, : ae.cfg.z_channels], ae.cfg.patch_size).double()  # [B, 128, h, w]
        total = total + z.sum(dim=(0, 2, 3))
        total_sq = total_sq + (z**2).sum(dim=(0, 2, 3))
        count += z.shape[0] * z.shape[2] * z.shape[3]
    mean = total / count
    ae.bn.running_mean.copy_(mean.float())
    ae.bn.running_var.copy_((total_sq / count - mean**2).clamp_min(1e-8).float())


def main(cfg: VAETrainConfig) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    spec = get_preset(cfg.model)
    ae = AutoEncoder(spec.vae).to(device).train()
    precision = precision_policy(cfg.compute_dtype, device)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sampler = BatchSampler(open_sources(cfg.data), cfg.batch_size, seed=cfg.seed)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "vae_log.jsonl").open("w")
    t0, losses = time.time(), []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        x = torch.stack([s.image for s in sampler.next_batch()]).to(device)
        with precision.autocast():
            moments = ae.encoder(x)
            mean, logvar = moments.float().chunk(2, dim=1)
            z = mean + torch.randn(mean.shape, generator=gen, device=device) * (0.5 * logvar).exp()
            rec = ae.decoder(z).float()
        loss = reconstruction_loss(rec, x, cfg.edge_weight) + cfg.kl_weight * kl_divergence(mean, logvar)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            psnr = float(10 * torch.log10(4.0 / F.mse_loss(rec.clamp(-1, 1), x)))
            record = {"step": step, "loss": losses[-1], "psnr": psnr, "seconds": round(time.time() - t0, 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(f"vae step {step:6d}  loss {losses[-1]:.4f}  psnr {psnr:.2f} dB", flush=True)
    ae.eval()
    stats_batches = max(1, cfg.stats_images // cfg.batch_size)
    fit_latent_norm(
        ae, (torch.stack([s.image for s in sampler.next_batch()]).to(device) for _ in range(stats_batches))
    )
    path = out / "vae.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in ae.state_dict().items()}, str(path))
    log.close()
    return {"steps": cfg.steps, "final_loss": losses[-1], "seconds": time.time() - t0, "exported": str(path)}
