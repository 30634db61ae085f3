"""klein-4B LoRA training step: time and peak memory at 1024², batch 1, bf16 (goal <= 0.25 s/step on H100).

    python benchmarks/bench_lora_train.py [--budget-s 200] [--smoke]

Rank 16 (alpha 16) on the attention projections of the double blocks (img/txt qkv and proj) and on both
linears of the single blocks (`TARGET_PRESETS["attention"]`); base weights frozen, bf16. One step = forward +
flow-matching loss + backward + fused AdamW on the adapters, with cached latents and text embeddings (random
here, same shapes: 4096 image tokens + 512 text tokens). No activation checkpointing.
Variants: eager SDPA, eager cuDNN attention, regional compile with SDPA's default, then with cuDNN.
A CUDA error poisons the process: later variants are then lost (the JSON keeps what ran).
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import (
    Report,
    build_ours,
    forward_flops,
    make_inputs,
    out_dir,
    perf_fields,
    set_dynamo_limits,
    small_cfg,
    time_cuda,
)

from fluxion.accel import AccelOptions, apply
from fluxion.config import PRESETS
from fluxion.lora.lora import inject_lora
from fluxion.train.flow_matching import flow_loss, interpolate, sample_times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    set_dynamo_limits()
    R = Report(out_dir() / "bench_lora_train.json", args.budget_s)
    device = "cpu" if args.smoke else "cuda"
    fast = "math" if args.smoke else "cudnn"
    cfg = PRESETS["flux2-klein-4b"].transformer
    cfg = small_cfg(cfg) if args.smoke else cfg
    size = 64 if args.smoke else 1024

    model = build_ours(cfg, device=device)
    wrapped = inject_lora(model, rank=16, alpha=16, targets="attention")
    model.train()
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert params and all(".lora." in n for n, p in model.named_parameters() if p.requires_grad)
    R.data.update(lora_layers=len(wrapped), trainable_params=sum(p.numel() for p in params))
    opt = torch.optim.AdamW(params, lr=1e-4, fused=not args.smoke)

    x0, x_ids, _, ctx, ctx_ids, _ = make_inputs(cfg, size, device=device)
    noise = torch.randn_like(x0)
    n_img = x0.shape[1]
    t = sample_times(1, n_img, device=device).to(x0.dtype)
    x_t = interpolate(x0, noise, t)

    def step():
        loss = flow_loss(model(x_t, x_ids, t, ctx, ctx_ids), x0, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Training FLOPs ≈ forward + backward through the activations (no weight gradients for the frozen base)
    # = 2x forward for the GEMMs; attention backward ≈ 2.5x its forward. LoRA GEMMs are < 1 %.
    fwd = forward_flops(cfg, n_img)
    attn = 4 * (n_img + 512) ** 2 * cfg.hidden_size * (cfg.num_double_blocks + cfg.num_single_blocks)
    flops = 2 * (fwd - attn) + 3.5 * attn

    variants = [
        ("eager sdpa", "sdpa", False, 20),
        ("eager " + fast, fast, False, 20),
        # 2026-11-24 H100: "compiled cudnn" died with an illegal memory access in an inductor RoPE-backward
        # kernel (docs/BENCHMARKS.md); the SDPA-default compiled variant runs first so one crash loses less.
        ("compiled sdpa", "sdpa", True, 150),
        ("compiled " + fast, fast, True, 150),
    ]
    for mode, attention, compiled, need in variants:
        if not R.has_time(need):
            R.skip(mode)
            continue
        try:
            apply(
                model,
                AccelOptions(
                    attention=attention,
                    compile=compiled,
                    compile_backend="eager" if args.smoke else "inductor",
                ),
            )
            timing = time_cuda(step, warmup=3, iters=3 if args.smoke else 10)
            R.add(
                model="klein-4B",
                impl="fluxion",
                mode=f"LoRA r16 train step, {mode}",
                size=size,
                batch=1,
                **perf_fields(flops, timing),
                s_per_step=timing["ms"] / 1e3,
            )
        except Exception as exc:  # noqa: BLE001 - outermost handler of an item
            R.error(mode, exc)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    R.write()
    for r in R.data["rows"]:
        print(
            f"{r['mode']:44} {r['ms']:8.1f} ms/step  peak {r['peak_gib']:6.2f} GiB  {r['tflops']:6.1f} TFLOP/s"
        )
    print({k: v for k, v in R.data.items() if k not in ("rows", "env")})


if __name__ == "__main__":
    sys.exit(main())
