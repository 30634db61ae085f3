"""One transformer forward (= one sampling step) on 1 GPU vs several: sequence parallelism and CFG parallelism.

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_parallel.py            # dev 1024² and 2048², klein-base CFG
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_parallel.py --attention cudnn --compile
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_parallel.py --smoke    # CPU, gloo: checks the script

Random weights (benchmarks/common.py, the same on every rank), bf16, 512 text tokens, (size/16)² image tokens.
In one run: rank 0 alone times the plain model (the 1-GPU figure: the other ranks wait), then every rank times
the `accel.parallel` wrapper of the same model on the same inputs, and rank 0 checks that the parallel velocity
equals the 1-GPU one (cosine, relative errors: bf16 rounding only). Items:

- dev (32B, embedded guidance, batch 1) at 1024² (4096 + 512 tokens) and 2048² (16384 + 512): Ulysses over all
  ranks, and ring over all ranks.
- klein-base-4B (true CFG: the model call has batch 2 = [uncond ; cond]) at 1024²: CFG parallel (cfg=2), and
  Ulysses over the batch-2 call, against the batch-2 call on 1 GPU.

Step time = median of --iters CUDA-event timings after 2 warm-up calls; for a parallel item the slowest rank's
median. speedup = 1-GPU ms / parallel ms, efficiency = speedup / ranks. Rank 0 writes bench_parallel_<N>gpu.json
under $OUT (rewritten after every item).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist
from common import (
    Report,
    accuracy,
    build_ours,
    build_ours_quantized,
    forward_flops,
    make_inputs,
    out_dir,
    set_dynamo_limits,
    small_cfg,
    time_cuda,
)

from fluxion.accel import AccelOptions, apply
from fluxion.accel.parallel import ParallelOptions, apply_parallel
from fluxion.config import PRESETS
from fluxion.train.train import setup_distributed, shutdown_distributed


def slowest(ms: float, device) -> float:
    t = torch.tensor([ms], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def bench_model(
    args, report, rank, world, device, name: str, sizes: list[int], batch: int, layouts: dict
) -> None:
    cfg = PRESETS[name].transformer
    cfg = small_cfg(cfg) if args.smoke else cfg
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.quant != "none" and not args.smoke:
        model = build_ours_quantized(cfg, args.quant, device=device)
    else:
        model = build_ours(cfg, device=device, dtype=dtype)
    apply(
        model,
        AccelOptions(
            attention="math" if args.smoke else args.attention,
            compile=args.compile,
            compile_backend="eager" if args.smoke else "inductor",
        ),
    )
    wrappers = {
        label: apply_parallel(model, opts) for label, opts in layouts.items()
    }  # collective: all ranks
    for size in sizes:
        inputs = make_inputs(cfg, size, batch=batch, device=device, dtype=dtype)
        n_img = (size // 16) ** 2
        flops = forward_flops(cfg, n_img, batch=batch)
        base = dict(model=name, size=size, batch=batch, tokens=n_img + 512, attention=args.attention)
        base.update(compile=args.compile, quant=args.quant)
        with torch.no_grad():
            ref = None
            one = None
            if rank == 0:
                try:
                    one = time_cuda(lambda m=model, a=inputs: m(*a), warmup=2, iters=args.iters)
                    ref = model(*inputs)
                    report.add(
                        **base,
                        layout="1gpu",
                        ranks=1,
                        ms=one["ms"],
                        peak_gib=one["peak_gib"],
                        tflops_per_gpu=flops / (one["ms"] * 1e-3) / 1e12,
                        warmup_s=one["warmup_s"],
                    )
                except torch.cuda.OutOfMemoryError as e:
                    report.error(f"{name} {size} 1gpu", e)
                gc.collect()
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
            dist.barrier()
            for label, par in wrappers.items():
                try:
                    timing = time_cuda(lambda p=par, a=inputs: p(*a), warmup=2, iters=args.iters)
                    out = par(*inputs)
                except torch.cuda.OutOfMemoryError as e:  # every rank holds the same shapes: all fail alike
                    if rank == 0:
                        report.error(f"{name} {size} {label}", e)
                    continue
                ms = slowest(timing["ms"], device)
                peak = slowest(timing["peak_gib"], device)
                if rank == 0:
                    row = dict(
                        **base,
                        layout=label,
                        ranks=world,
                        ms=ms,
                        peak_gib_max_rank=peak,
                        tflops_per_gpu=flops / (ms * 1e-3) / 1e12 / world,
                        warmup_s=timing["warmup_s"],
                    )
                    if one is not None:
                        speedup = one["ms"] / ms
                        row.update(speedup=speedup, efficiency=speedup / world, **accuracy(out, ref))
                    report.add(**row)
                dist.barrier()
            del ref
    del wrappers
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default="dev,klein-cfg", help="comma list of: dev, klein-cfg")
    ap.add_argument("--sizes", default="1024,2048", help="dev image sizes (px)")
    ap.add_argument("--attention", default="sdpa", help="local attention kernel (AccelOptions.attention)")
    ap.add_argument("--ring-kernel", default="auto", help="local attention in the ring (ParallelOptions)")
    ap.add_argument("--compile", action="store_true", help="regional compile of the blocks (both sides)")
    ap.add_argument(
        "--quant", default="none", choices=["none", "int8"], help="weight-only int8 (fits dev anywhere)"
    )
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=1500)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (gloo): checks the script")
    args = ap.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun (see the module docstring)")
    rank, world, device = setup_distributed()
    if world < 2:
        raise SystemExit("needs at least 2 ranks: torchrun --nproc_per_node 2 ...")
    set_dynamo_limits()
    name = f"bench_parallel_{world}gpu{'_smoke' if args.smoke else ''}.json"
    report = Report(out_dir() / name, args.budget_s) if rank == 0 else None  # only rank 0 reports
    items = args.items.split(",")
    sizes = [64, 128] if args.smoke else [int(s) for s in args.sizes.split(",")]
    if "dev" in items:
        layouts = {
            f"ulysses{world}": ParallelOptions(ulysses=world),
            f"ring{world}": ParallelOptions(ring=world, ring_kernel=args.ring_kernel),
        }
        bench_model(args, report, rank, world, device, "flux2-dev", sizes, 1, layouts)
    if "klein-cfg" in items:
        layouts = {"cfg2": ParallelOptions(cfg=2, ulysses=world // 2)} if world % 2 == 0 else {}
        layouts[f"ulysses{world}"] = ParallelOptions(ulysses=world)
        bench_model(args, report, rank, world, device, "flux2-klein-base-4b", sizes[:1], 2, layouts)
    shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
