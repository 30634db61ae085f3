"""Where one transformer step's GPU time goes: kernel time by class (GEMM / attention / fused Triton glue /
other) and the costliest kernels, bf16 regional compile + cuDNN, then fp8 rowwise + compile, at 1024².

    python benchmarks/profile_step.py --model dev|klein-4b [--smoke]

Writes `profile_<model>.json` under $OUT. The same FLOP model as the other scripts gives the rate each class
reaches (GEMM: 26·D²·N per block; attention: 4·N²·D per block).
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import (
    build_ours,
    forward_flops,
    kernel_breakdown,
    make_inputs,
    out_dir,
    set_dynamo_limits,
    small_cfg,
    time_cuda,
    uncompile,
)

from fluxion.accel import AccelOptions, apply
from fluxion.config import PRESETS

MODELS = {"dev": "flux2-dev", "klein-4b": "flux2-klein-4b"}


def main() -> None:
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=MODELS, default="dev")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    set_dynamo_limits()
    cuda = not args.smoke
    device = "cuda" if cuda else "cpu"
    cfg = PRESETS[MODELS[args.model]].transformer
    cfg = small_cfg(cfg) if args.smoke else cfg
    size = 64 if args.smoke else args.size
    n_img = (size // 16) ** 2
    blocks = cfg.num_double_blocks + cfg.num_single_blocks
    n = n_img + 512
    attn_tf = 4 * n * n * cfg.hidden_size * blocks / 1e12
    gemm_tf = forward_flops(cfg, n_img) / 1e12 - attn_tf
    model = build_ours(cfg, device=device)
    step = make_inputs(cfg, size, device=device)
    backend = "inductor" if cuda else "eager"
    result = dict(model=args.model, size=size, gemm_tflop=gemm_tf, attention_tflop=attn_tf)
    path = out_dir() / f"profile_{args.model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for name, fp8 in (("bf16_compiled", False), ("fp8_compiled", True)):
            uncompile(model)
            apply(
                model,
                AccelOptions(
                    attention="cudnn" if cuda else "math",
                    compile=True,
                    compile_backend=backend,
                    fp8=fp8 and cuda,
                ),
            )
            timing = time_cuda(lambda: model(*step), warmup=2, iters=5)
            prof = kernel_breakdown(lambda: model(*step), cuda)
            by = prof["by_class_ms"]
            prof["rates_tflops"] = {
                "gemm": gemm_tf / (by.get("gemm", 0) or float("nan")) * 1e3,
                "attention": attn_tf / (by.get("attention", 0) or float("nan")) * 1e3,
            }
            result[name] = dict(timing=timing, profile=prof)
            path.write_text(json.dumps(result, indent=1, default=str))
            print(
                name, f"{timing['ms']:.1f} ms/step (first call {timing['warmup_s']} s)", prof["total_ms"], by
            )
            print("   rates", prof["rates_tflops"])
            for k in prof["top"][:10]:
                print("   ", k)


if __name__ == "__main__":
    sys.exit(main())
