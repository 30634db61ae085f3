"""The one training loop: setup -> build on meta (init_weights) or load -> (LoRA) -> parallelize -> optimizer ->
resume -> steps (objective batch -> loss -> AdamW, EMA) with logging and samples -> checkpoint -> export.

What is trained and how the loss is formed is the objective's business (train/objectives.py): flow matching,
Diffusion-DPO and step distillation all run through `main`. One precision policy (train/precision.py) feeds
autocast and FSDP2. The frozen components travel in the typed `Models` of weights/models.py.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from fluxion.config import ModelSpec, get_preset
from fluxion.model.init import init_weights
from fluxion.model.transformer import Flux2
from fluxion.train.config import TrainConfig, lr_at
from fluxion.train.precision import Precision, precision_policy
from fluxion.weights.models import Models


def build_transformer(spec: ModelSpec, cfg: TrainConfig, device: torch.device) -> Flux2:
    """From scratch (built on meta, then init_weights with the run's seed) or from `cfg.init`; LoRA injected."""
    if cfg.init:
        from fluxion.weights.load import load_transformer

        model = load_transformer(cfg.init, spec.transformer, dtype=torch.float32, device=device)
    else:
        with torch.device("meta"):
            model = Flux2(spec.transformer)
        model.to_empty(device=device)
        init_weights(model, torch.Generator(device).manual_seed(cfg.seed))
    if cfg.char_encoder:
        attach_char_encoder(model, cfg, device)
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


def attach_char_encoder(model: Flux2, cfg: TrainConfig, device: torch.device) -> None:
    """`model.char_encoder`: the one shipped beside `cfg.init` if there is one, else a new one (seeded by the
    run's seed, from its own generator so nothing else's random draws move)."""
    from fluxion.text.charenc import CharEncoder, CharEncoderConfig, charenc_beside, load_char_encoder

    dim = model.cfg.context_in_dim
    found = charenc_beside(cfg.init)
    if found is not None:
        enc = load_char_encoder(found, dim, device)
    else:
        enc = CharEncoder(CharEncoderConfig(context_dim=dim, max_chars=cfg.char_max)).to(device)
        enc.reset_parameters(torch.Generator(device).manual_seed(cfg.seed + 1))
    model.char_encoder = enc


def load_frozen(spec: ModelSpec, cfg: TrainConfig, transformer: Flux2, device: torch.device) -> Models:
    """`Models` around the trained transformer: the frozen autoencoder and text encoder in fp32, and the prompt
    cache under <out>/cache/text when cache_text is on."""
    from fluxion.text.encoder import load_text_encoder
    from fluxion.weights.load import load_autoencoder

    vae = load_autoencoder(cfg.vae, spec.vae, device=device)
    text = load_text_encoder(cfg.text, spec.text, device=device, dtype=torch.float32)
    prompt_cache = None
    if cfg.cache_text:
        from fluxion.text.cache import PromptCache

        prompt_cache = PromptCache(Path(cfg.out) / "cache" / "text")
    return Models(
        spec=spec,
        transformer=transformer,
        vae=vae,
        text=text,
        device=device,
        dtype=torch.float32,
        prompt_cache=prompt_cache,
    )


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


class Utilisation:
    """Where the wall time goes between two log lines: waiting for data + encoders (host side, `batch`), the
    step itself, and (CUDA, when NVML is available) the driver's GPU-busy percentage. Printed on every log line
    so a starved GPU shows up at once."""

    def __init__(self, device: torch.device):
        self.device, self.data_s, self.step_s = device, 0.0, 0.0

    def add(self, data_s: float, step_s: float) -> None:
        self.data_s += data_s
        self.step_s += step_s

    def record(self) -> dict:
        total = self.data_s + self.step_s
        out = {"data_frac": round(self.data_s / total, 3) if total else 0.0}
        if self.device.type == "cuda":
            try:
                out["gpu_util"] = torch.cuda.utilization(self.device)
            except Exception:  # no NVML in this environment: the data fraction alone is logged
                pass
            out["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.data_s = self.step_s = 0.0
        return out


def main(cfg: TrainConfig) -> dict:
    """Train; returns a summary (final loss, steps, seconds, exported file, per-step losses)."""
    from fluxion.train.checkpoint import export_weights, load_train_state, save_train_state
    from fluxion.train.objectives import make_objective
    from fluxion.train.parallelize import parallelize

    rank, world, device = setup_distributed()
    spec = get_preset(cfg.model)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = precision_policy(cfg.compute_dtype, device)

    model = build_transformer(spec, cfg, device)
    models = load_frozen(spec, cfg, model, device)
    cache = {} if cfg.cache_latents_on_device else out / "cache" / "latents" if cfg.cache_latents else None
    objective = make_objective(cfg, models, cache, device)
    sharded = parallelize(model, cfg, world, precision)
    models.transformer = sharded
    params = [p for p in sharded.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    ema = EMA(sharded, cfg.ema) if cfg.ema else None
    # One RNG stream per rank for noise, times and caption dropout; data order likewise offset by rank.
    gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    sampler = objective.sampler(cfg, rank)
    if device.type == "cuda":  # CPU batch drawing overlaps the GPU step (same batches, same resume state)
        from fluxion.train.data import Prefetcher

        sampler = Prefetcher(sampler)

    start = load_train_state(out, sharded, opt, ema, sampler, gen, rank)
    log = (out / "log.jsonl").open("a") if rank == 0 else None
    writer = _tensorboard(out) if rank == 0 else None
    end = cfg.steps if not cfg.max_steps_this_run else min(cfg.steps, start + cfg.max_steps_this_run)
    losses, t0 = [], time.time()
    util = Utilisation(device)
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
        t_data = time.perf_counter()
        batch = objective.batch(models, sampler.next_batch(), gen)
        t_step = time.perf_counter()
        with precision.autocast():
            loss, extra = objective.loss(sharded, batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema:
            ema.update(sharded)
        loss_value = _mean_over_ranks(loss.detach())  # synchronises: the step's time is complete here
        util.add(t_step - t_data, time.perf_counter() - t_step)
        losses.append(loss_value)
        if log and (step % cfg.log_every == 0 or step == end - 1):
            record = {
                "step": step,
                "loss": loss_value,
                "lr": lr_at(cfg, step),
                "grad_norm": float(grad_norm),
                "seconds": round(time.time() - t0, 2),
                **extra,
                **util.record(),
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            if writer:
                writer.add_scalar("loss", loss_value, step)
            gpu = f"  gpu {record['gpu_util']}%" if "gpu_util" in record else ""
            print(
                f"step {step:6d}  loss {loss_value:.4f}  lr {record['lr']:.2e}  {record['seconds']}s"
                f"  data {100 * record['data_frac']:.0f}%{gpu}",
                flush=True,
            )
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            write_samples(out / "samples" / f"step-{step + 1:06d}.png", models, cfg, precision, rank)
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
def write_samples(path: Path, models: Models, cfg: TrainConfig, precision: Precision, rank: int) -> None:
    """One image per sample prompt (fixed seeds) side by side, through the real pipeline. With FSDP every rank
    runs the forward passes (they are collective); rank 0 writes the file."""
    from PIL import Image

    from fluxion.request import Request
    from fluxion.sampling.pipeline import generate

    model = models.transformer
    was_training = model.training
    model.eval()
    with precision.autocast():
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


def run_stages(configs: TrainConfig | list[TrainConfig]) -> dict:
    """Run one config, or several in order (a curriculum); returns the last summary."""
    summary: dict = {}
    for cfg in configs if isinstance(configs, list) else [configs]:
        summary = main(cfg)
    return summary
