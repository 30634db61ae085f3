"""FSDP2 full fine-tune step across GPUs: time per step, throughput per GPU, peak memory per GPU.

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_fsdp.py [--model klein-4b] [--steps 8]
    torchrun --standalone --nproc_per_node 1 benchmarks/bench_fsdp.py      # the one-GPU figure to compare
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_fsdp.py --smoke   # CPU, gloo: checks the script

The trainer's own pieces (`train.parallelize`: per-block `fully_shard` then the root, bf16 compute with fp32
master weights and fp32 gradient reduction; `flow_matching`), random weights and random cached latents / text
embeddings of the real shapes (1024²: 4096 image + 512 text tokens), batch `--batch` per GPU, fused AdamW.
Each rank draws its own noise and times. Rank 0 writes `bench_fsdp_<model>_<world>gpu.json` under $OUT. A run
that runs out of device memory (klein-9B on one GPU: 36 GB fp32 weights + 36 GB gradients + 72 GB AdamW state)
writes the same file with `"oom": true` and the memory it had reached, and exits with code 3 (torchrun then
stops the other ranks, which may wait in a collective).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from common import default_dtype, environment, forward_flops, init_random_, out_dir, small_cfg, time_cuda

from fluxion.config import PRESETS
from fluxion.model.transformer import Flux2
from fluxion.sampling.ids import image_ids, text_ids
from fluxion.train.flow_matching import flow_loss, interpolate
from fluxion.train.parallelize import parallelize
from fluxion.train.train import compute_context, setup_distributed, shutdown_distributed

MODELS = {"klein-4b": "flux2-klein-4b", "klein-9b": "flux2-klein-base-9b", "dev": "flux2-dev"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=MODELS, default="klein-4b")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1, help="images per GPU per step")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after 3 warm-up steps)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun (see the module docstring)")
    rank, world, device = setup_distributed()
    cuda = device.type == "cuda"
    cfg = PRESETS[MODELS[args.model]].transformer
    cfg = small_cfg(cfg) if args.smoke else cfg
    size = 64 if args.smoke else args.size
    side = size // 16

    with default_dtype(torch.float32), torch.device("meta"):
        model = Flux2(cfg)
    model.to_empty(device=device)
    init_random_(model, seed=0)  # same weights on every rank before sharding
    model.train()
    options = SimpleNamespace(activation_checkpointing=args.checkpointing, compile=False, fsdp=True)
    sharded = parallelize(model, options, world)
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-5, fused=cuda)

    g = torch.Generator(device).manual_seed(1000 + rank)
    B, L = args.batch, 512
    x0 = torch.randn(B, side * side, cfg.in_channels, device=device, generator=g)
    ctx = torch.randn(B, L, cfg.context_in_dim, device=device, generator=g)
    x_ids, ctx_ids = image_ids(side, side, batch=B, device=device), text_ids(L, batch=B, device=device)
    guidance = torch.full((B,), 3.5, device=device) if cfg.use_guidance_embed else None

    def step() -> float:
        t = torch.rand(B, device=device, generator=g)
        noise = torch.randn(x0.shape, device=device, generator=g)
        with compute_context(device, "bfloat16"):
            pred = sharded(interpolate(x0, noise, t), x_ids, t, ctx, ctx_ids, guidance)
            loss = flow_loss(pred, x0, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sharded.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    try:
        timing = time_cuda(step, warmup=3, iters=args.steps)  # CUDA events; host clock on the CPU smoke run
    except torch.cuda.OutOfMemoryError as e:
        report_oom(args, model, rank, world, size, e)
        raise SystemExit(3) from None
    ms = torch.tensor([timing["ms"]], device=device)
    peak = torch.tensor([timing["peak_gib"]], device=device)
    all_ms = [torch.zeros_like(ms) for _ in range(world)]
    all_peak = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(all_ms, ms)
    dist.all_gather(all_peak, peak)
    if rank == 0:
        step_ms = max(float(m) for m in all_ms)  # the step ends when the slowest rank's does
        n_img = side * side
        # Training FLOPs ~ 3x the forward (forward + backward), +1 forward with activation checkpointing.
        flops = forward_flops(cfg, n_img, batch=B) * (4 if args.checkpointing else 3)
        result = dict(
            env=environment(),
            model=args.model,
            size=size,
            world=world,
            batch_per_gpu=B,
            checkpointing=args.checkpointing,
            params=sum(p.numel() for p in model.parameters()),
            step_ms_median_per_rank=[round(float(m), 2) for m in all_ms],
            step_ms=round(step_ms, 2),
            images_per_s_per_gpu=round(B / (step_ms / 1e3), 3),
            tokens_per_s_per_gpu=round(B * (n_img + L) / (step_ms / 1e3)),
            tflops_per_gpu=round(flops / (step_ms / 1e3) / 1e12, 1),
            peak_gib_per_rank=[round(float(p), 2) for p in all_peak],
        )
        path = out_dir() / f"bench_fsdp_{args.model}_{world}gpu.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))
        print(json.dumps({k: v for k, v in result.items() if k != "env"}))
    shutdown_distributed()


def report_oom(args, model, rank, world, size, error) -> None:
    """Out of memory: each rank reports what it held when it failed (no collective: another rank may be stuck)."""
    result = dict(
        env=environment(),
        model=args.model,
        size=size,
        world=world,
        rank=rank,
        batch_per_gpu=args.batch,
        checkpointing=args.checkpointing,
        params=sum(p.numel() for p in model.parameters()),
        oom=True,
        error=str(error).splitlines()[0][:300],
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        device_total_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
    )
    path = out_dir() / f"bench_fsdp_{args.model}_{world}gpu{'' if rank == 0 else f'_rank{rank}'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "env"}))


if __name__ == "__main__":
    sys.exit(main())
