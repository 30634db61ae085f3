"""The flow-matching trainer: from scratch, full fine-tune or LoRA; one process or torchrun + FSDP2.

setup -> build on meta -> init_weights or load -> (LoRA) -> parallelize -> loop -> export. The loop reads like
DiT's: batch -> frozen VAE and text encoder -> noise, time -> velocity loss on the output tokens -> AdamW.
Reference images of edit pairs enter as extra tokens exactly as at inference; the loss covers the target only.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from fluxion.config import ModelSpec, get_preset
from fluxion.model.init import init_weights
from fluxion.model.transformer import Flux2
from fluxion.sampling.ids import image_ids, pack, reference_ids, text_ids
from fluxion.train.data import BatchSampler, Sample, open_sources
from fluxion.train.flow_matching import flow_loss, interpolate, sample_times


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: str  # preset name: fixes the transformer, VAE and text-encoder architectures
    data: tuple[str, ...]  # tinyset folders or image folders with .txt captions
    out: str  # run folder: checkpoints, logs, exported weights
    vae: str  # autoencoder weights (frozen)
    text: str | None = None  # text-encoder folder; None = the preset's bundled default (minilm)
    init: str | None = None  # transformer weights to start from; None = from scratch (init_weights)
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema: float = 0.0  # EMA decay of the trained weights; 0 disables
    caption_dropout: float = 0.1  # empty prompt this often, so the model also learns the unconditional v
    edit_fraction: float = 0.0  # share of batches drawn from edit pairs
    pixels: int = 128 * 128  # bucket size for image folders
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    # Disk caches of the frozen encoders' outputs under <out>/cache: VAE latents per image, text embeddings per
    # caption. Each image and caption is then encoded once for the whole run (and across resumed runs).
    cache_latents: bool = False
    cache_text: bool = False
    sample_every: int = 0  # write sample images every N steps (0: never)
    sample_prompts: tuple[str, ...] = ("a red heart", "a blue circle in the center")
    sample_steps: int | None = None  # None: the preset's default
    compute_dtype: str = "bfloat16"  # the one precision policy: autocast dtype on CUDA (CPU runs fp32)
    compile: bool = False  # per-block torch.compile
    activation_checkpointing: bool = False
    fsdp: bool = False  # shard with FSDP2 across the torchrun world
    lora_rank: int = 0  # > 0: train a LoRA instead of the full model
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ("*img_attn.qkv", "*img_attn.proj", "*linear1", "*linear2")
    lora_format: str = (
        "comfy"  # layout of the exported lora.safetensors: "comfy" or "diffusers" (lora.write_lora)
    )
    max_steps_this_run: int = 0  # stop after this many steps (to test resume); 0 = run to `steps`
    # Wall-clock budget for this run in seconds (0: none). The step time is measured over steps 50-100 (after
    # warm-up and compilation) and `steps` is lowered to fit, schedule included. For fixed-length GPU leases.
    time_budget_s: float = 0.0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if not 0 <= self.caption_dropout < 1 or not 0 <= self.edit_fraction <= 1:
            raise ValueError("caption_dropout must be in [0, 1) and edit_fraction in [0, 1]")
        if self.lora_format not in ("comfy", "diffusers"):
            raise ValueError(f"lora_format must be 'comfy' or 'diffusers', got {self.lora_format!r}")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def compute_context(device: torch.device, dtype_name: str):
    """The precision policy: bf16 autocast on CUDA, plain fp32 elsewhere (CPU runs are for tests)."""
    if device.type == "cuda" and dtype_name != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype_name))
    return nullcontext()


def build_transformer(spec: ModelSpec, cfg: TrainConfig, device: torch.device) -> Flux2:
    if cfg.init:
        from fluxion.weights.load import load_transformer

        model = load_transformer(cfg.init, spec.transformer, dtype=torch.float32, device=device)
    else:
        with torch.device("meta"):
            model = Flux2(spec.transformer)
        model.to_empty(device=device)
        init_weights(model, torch.Generator(device).manual_seed(cfg.seed))
    model.train()
    if cfg.lora_rank:
        from fluxion.lora.lora import inject_lora

        model.requires_grad_(False)
        inject_lora(
            model, rank=cfg.lora_rank, alpha=cfg.lora_alpha or cfg.lora_rank, targets=list(cfg.lora_targets)
        )
    else:
        model.requires_grad_(True)
    return model


class Frozen:
    """The frozen encoders: pixels -> latent tokens, prompts -> context."""

    def __init__(self, spec: ModelSpec, cfg: TrainConfig, device: torch.device):
        from fluxion.text.encoder import load_text_encoder
        from fluxion.weights.load import load_autoencoder

        self.vae = load_autoencoder(cfg.vae, spec.vae, device=device)
        self.text = load_text_encoder(cfg.text, spec.text, device=device, dtype=torch.float32)
        self.device = device
        cache = Path(cfg.out) / "cache"
        self.latent_dir = cache / "latents" if cfg.cache_latents else None
        self.prompt_cache = None
        if cfg.cache_text:
            from fluxion.text.cache import PromptCache

            self.prompt_cache = PromptCache(cache / "text")

    @torch.no_grad()
    def latents(self, images: list[Tensor], keys: list[str] | None = None) -> tuple[Tensor, int, int]:
        """Packed latent tokens [B, h * w, 128] of pixel images; read from / written to the cache by key."""
        if self.latent_dir is None or not keys or not all(keys):
            z = self.vae.encode(torch.stack(images).to(self.device))  # [B, 128, h, w]
            return pack(z), z.shape[2], z.shape[3]
        from safetensors.torch import load_file, save_file

        paths = [self.latent_dir / (hashlib.sha1(k.encode()).hexdigest() + ".safetensors") for k in keys]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        if missing:
            z_new = self.vae.encode(torch.stack([images[i] for i in missing]).to(self.device)).cpu()
            self.latent_dir.mkdir(parents=True, exist_ok=True)
            for i, z in zip(missing, z_new):
                save_file({"z": z.contiguous()}, str(paths[i]))
        z = torch.stack([load_file(str(p))["z"] for p in paths]).to(self.device)
        return pack(z), z.shape[2], z.shape[3]

    @torch.no_grad()
    def context(self, prompts: list[str]) -> Tensor:
        if self.prompt_cache is not None:
            return self.prompt_cache.get_or_encode(self.text, prompts, dtype=torch.float32).to(self.device)
        return self.text.encode(prompts, dtype=torch.float32)


def make_batch(frozen: Frozen, samples: list[Sample], gen: torch.Generator, cfg: TrainConfig) -> dict:
    """Everything one step needs, on the device. Each rank passes its own generator (its own RNG stream)."""
    device = frozen.device
    x0, h, w = frozen.latents([s.image for s in samples], [s.key for s in samples])
    B = x0.shape[0]
    drop = torch.rand(B, generator=gen, device=device) < cfg.caption_dropout
    prompts = ["" if d else s.caption for s, d in zip(samples, drop.tolist())]
    ctx = frozen.context(prompts)
    batch = {
        "x0": x0,
        "x_ids": image_ids(h, w, batch=B, device=device),
        "ctx": ctx,
        "ctx_ids": text_ids(ctx.shape[1], B, device),
        "refs": None,
        "ref_ids": None,
    }
    if samples[0].refs:
        grids, tokens = [], []
        for k in range(len(samples[0].refs)):
            r, rh, rw = frozen.latents(
                [s.refs[k] for s in samples], [s.ref_keys[k] if s.ref_keys else "" for s in samples]
            )
            tokens.append(r)
            grids.append((rh, rw))
        batch["refs"] = torch.cat(tokens, dim=1)
        batch["ref_ids"] = reference_ids(grids, B, device)
    t = sample_times(B, x0.shape[1], generator=gen, device=device)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    batch.update(t=t, noise=noise, x_t=interpolate(x0, noise, t))
    return batch


def step_loss(model: Flux2, batch: dict) -> Tensor:
    x, ids, n_out = batch["x_t"], batch["x_ids"], batch["x_t"].shape[1]
    if batch["refs"] is not None:
        x = torch.cat([x, batch["refs"]], dim=1)
        ids = torch.cat([ids, batch["ref_ids"]], dim=1)
    guidance = None
    if model.cfg.use_guidance_embed:  # guidance-distilled models are trained at a fixed embedded value
        guidance = torch.full_like(batch["t"], 3.5)
    pred = model(x, ids, batch["t"], batch["ctx"], batch["ctx_ids"], guidance)[:, :n_out]
    return flow_loss(pred, batch["x0"], batch["noise"])


class EMA:
    """Exponential moving average of the trainable parameters (kept in fp32, same device)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)


def setup_distributed() -> tuple[int, int, torch.device]:
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def shutdown_distributed() -> None:
    """Leave the process group cleanly, while the interpreter is fully alive.

    FSDP2's module state refers to the process group through reference cycles, so without a collection here the
    gloo group (and its worker threads, which may still hold finished work objects with tensors) is destroyed
    during interpreter finalization, where a thread that needs the GIL aborts the process ("terminate called
    without an active exception", seen once in CI on rank 1 after a clean run). The barrier keeps the ranks
    in step: none tears its group down while another still talks to it.
    """
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    gc.collect()


def main(cfg: TrainConfig) -> dict:
    """Train; returns a summary (final loss, steps, seconds, exported file)."""
    from fluxion.train.checkpoint import export_weights, load_train_state, save_train_state
    from fluxion.train.parallelize import parallelize

    rank, world, device = setup_distributed()
    spec = get_preset(cfg.model)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model = build_transformer(spec, cfg, device)
    frozen = Frozen(spec, cfg, device)
    sharded = parallelize(model, cfg, world)
    params = [p for p in sharded.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    ema = EMA(sharded, cfg.ema) if cfg.ema else None
    # One RNG stream per rank for noise, times and caption dropout; data order likewise offset by rank.
    gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    sampler = BatchSampler(
        open_sources(cfg.data, cfg.pixels), cfg.batch_size, cfg.edit_fraction, cfg.seed + rank
    )

    start = load_train_state(out, sharded, opt, ema, sampler, gen, rank)
    log = (out / "log.jsonl").open("a") if rank == 0 else None
    writer = _tensorboard(out) if rank == 0 else None
    end = cfg.steps if not cfg.max_steps_this_run else min(cfg.steps, start + cfg.max_steps_this_run)
    losses, t0 = [], time.time()
    step = start
    while step < end:
        if cfg.time_budget_s and step == start + 50:
            t50 = time.time()
        if cfg.time_budget_s and step == start + 100:
            per_step = (time.time() - t50) / 50
            fit = step + int((cfg.time_budget_s - (time.time() - t0)) / per_step)
            if fit < cfg.steps:
                print(f"time budget: {per_step:.3f} s/step -> {fit} steps instead of {cfg.steps}", flush=True)
                cfg = dataclasses.replace(cfg, steps=max(fit, step + 1))
                end = cfg.steps
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        batch = make_batch(frozen, sampler.next_batch(), gen, cfg)
        with compute_context(device, cfg.compute_dtype):
            loss = step_loss(sharded, batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema:
            ema.update(sharded)
        loss_value = _mean_over_ranks(loss.detach())
        losses.append(loss_value)
        if log and (step % cfg.log_every == 0 or step == end - 1):
            record = {
                "step": step,
                "loss": loss_value,
                "lr": lr_at(cfg, step),
                "grad_norm": float(grad_norm),
                "seconds": round(time.time() - t0, 2),
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            if writer:
                writer.add_scalar("loss", loss_value, step)
            print(
                f"step {step:6d}  loss {loss_value:.4f}  lr {record['lr']:.2e}  {record['seconds']}s",
                flush=True,
            )
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            write_samples(out / "samples" / f"step-{step + 1:06d}.png", spec, sharded, frozen, cfg, rank)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < end:
            save_train_state(out, sharded, opt, ema, sampler, gen, step + 1, rank)
        step += 1
    save_train_state(out, sharded, opt, ema, sampler, gen, end, rank)
    exported = export_weights(out, sharded, ema, cfg, rank) if end == cfg.steps else None
    if log:
        log.close()
    if writer:
        writer.close()
    return {
        "steps": end,
        "final_loss": losses[-1] if losses else None,
        "seconds": time.time() - t0,
        "exported": str(exported) if exported else None,
        "losses": losses,
    }


@torch.no_grad()
def write_samples(path: Path, spec: ModelSpec, model, frozen: Frozen, cfg: TrainConfig, rank: int) -> None:
    """One image per sample prompt (fixed seeds) side by side, through the real pipeline. With FSDP every rank
    runs the forward passes (they are collective); rank 0 writes the file."""
    from PIL import Image

    from fluxion.request import Request
    from fluxion.sampling.pipeline import generate
    from fluxion.weights.models import Models

    was_training = model.training
    model.eval()
    models = Models(spec=spec, transformer=model, vae=frozen.vae, text=frozen.text, device=frozen.device)
    with compute_context(frozen.device, cfg.compute_dtype):
        results = generate(models, Request(prompt=list(cfg.sample_prompts), seed=0, steps=cfg.sample_steps))
    model.train(was_training)
    if rank == 0:
        w, h = results[0].image.size
        sheet = Image.new("RGB", (w * len(results), h), "white")
        for i, r in enumerate(results):
            sheet.paste(r.image, (i * w, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path)


def _mean_over_ranks(x: Tensor) -> float:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":
            x /= dist.get_world_size()
    return float(x)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is the optional [train] extra; jsonl logging always happens
        return None
    return SummaryWriter(str(out / "tensorboard"))


def config_from_dict(values: dict) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - fields
    if unknown:
        raise ValueError(f"unknown training options: {sorted(unknown)}; valid: {sorted(fields)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return TrainConfig(**values)


def run_stages(configs: TrainConfig | list[TrainConfig]) -> dict:
    """Run one config, or several in order (a curriculum); returns the last summary."""
    summary: dict = {}
    for cfg in configs if isinstance(configs, list) else [configs]:
        summary = main(cfg)
    return summary


if __name__ == "__main__":  # torchrun --nproc_per_node N -m fluxion.train.train RECIPE (.toml or .py)
    import sys

    from fluxion.train.recipes import load_recipe_file

    try:
        summary = run_stages(load_recipe_file(sys.argv[1]))
        if summary.get("exported"):
            print(f"exported {summary['exported']}")
    finally:
        shutdown_distributed()
