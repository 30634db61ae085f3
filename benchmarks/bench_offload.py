"""dev-32B with int8 weight-only layers: resident vs block-streamed offload (peak GPU memory and step time).

    python benchmarks/bench_offload.py [--ref /tmp/fluxion_dev_ref] [--budget-s 300] [--smoke]

1. int8 resident (all 32.2 GB of int8 weights on the GPU), eager, cuDNN attention: the speed reference of this
   script (the bf16 resident figure comes from bench_transformer.py --suite dev, same machine).
2. offload with a resident budget chosen so the whole run fits a 24 GB card: the first blocks stay on the GPU,
   the rest stream from pinned host memory, 2 slots.
3. offload of every block (the minimum-memory setting).
Each offloaded output is checked bit-for-bit against the resident int8 output (same kernels, same weights).
If --ref points at bench_transformer's saved bf16 velocity, int8 accuracy against bf16 is reported too.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
from common import (
    Report,
    accuracy,
    build_ours_quantized,
    forward_flops,
    make_inputs,
    out_dir,
    perf_fields,
    small_cfg,
    time_cuda,
)

from fluxion.accel import AccelOptions, apply
from fluxion.accel.offload import offload_blocks
from fluxion.config import PRESETS

CARD_GIB = 24.0
HEADROOM_GIB = 2.0  # CUDA context, cuBLAS / cuDNN workspaces and allocator slack on a real 24 GB card


def tensor_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def h2d_bandwidth(gib: float = 1.0) -> float:
    """Pinned host -> device copy rate in GB/s (what full streaming is bound by)."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time_cuda(lambda: dst.copy_(src, non_blocking=True), warmup=1, iters=5)
    return n / (t["ms"] * 1e-3) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="", help="prefix of bench_transformer --save-ref files")
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    R = Report(out_dir() / "bench_offload.json", args.budget_s)
    device = "cpu" if args.smoke else "cuda"
    attn = "math" if args.smoke else "cudnn"
    cfg = PRESETS["flux2-dev"].transformer
    cfg = small_cfg(cfg) if args.smoke else cfg
    size = 64 if args.smoke else 1024
    n_img = (size // 16) ** 2
    flops = forward_flops(cfg, n_img)
    inputs = make_inputs(cfg, size, device=device)

    if not args.smoke:
        R.data["h2d_gbps"] = h2d_bandwidth()
        print("pinned H2D GB/s:", R.data["h2d_gbps"], flush=True)

    model = build_ours_quantized(cfg, "int8", device=device)
    apply(model, AccelOptions(attention=attn))
    blocks = [*model.double_blocks, *model.single_blocks]
    block_bytes = sum(tensor_bytes(b) for b in blocks)
    other_bytes = tensor_bytes(model) - block_bytes
    R.data.update(
        int8_block_gb=block_bytes / 1e9,
        other_gb=other_bytes / 1e9,
        max_block_gb=max(tensor_bytes(b) for b in blocks) / 1e9,
    )
    ref = None
    if args.ref and os.path.exists(f"{args.ref}_{size}.pt"):
        ref = torch.load(f"{args.ref}_{size}.pt").to(device)

    def row(mode, timing, out, **extra):
        acc = accuracy(out, ref) if ref is not None else {}
        return R.add(
            model="dev-32B",
            impl="fluxion",
            mode=mode,
            size=size,
            batch=1,
            **perf_fields(flops, timing),
            **acc,
            **extra,
        )

    with torch.no_grad():
        # 1. resident int8
        resident_out = model(*inputs)
        t_res = time_cuda(lambda: model(*inputs), warmup=1, iters=5)
        row("int8 resident eager cudnn", t_res, resident_out, weights_gib=tensor_bytes(model) / 2**30)
        act_bytes = t_res["peak_gib"] * 2**30 - tensor_bytes(model)

        # 2. offload with a resident budget that fits a 24 GB card
        def budgeted():
            slots = 2 * R.data["max_block_gb"] * 1e9
            keep = (CARD_GIB - HEADROOM_GIB) * 2**30 - other_bytes - slots - max(act_bytes, 0) - 0.5 * 2**30
            keep = max(int(keep), 0)
            handle = offload_blocks(model, device, resident_bytes=keep)
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            out = model(*inputs)
            t = time_cuda(lambda: model(*inputs), warmup=1, iters=5)
            row(
                f"int8 offload (<= {CARD_GIB:.0f} GB) eager cudnn",
                t,
                out,
                resident_block_gb=handle.resident_bytes / 1e9,
                streamed_blocks=len(handle.streamed),
                bit_exact_vs_resident=bool(torch.equal(out, resident_out)),
                slowdown_vs_int8_resident=t["ms"] / t_res["ms"],
            )
            handle.remove()

        if R.has_time(60):
            try:
                budgeted()
            except Exception as exc:  # noqa: BLE001 - outermost handler of an item
                R.error("offload budgeted", exc)
        else:
            R.skip("offload budgeted")

        # 3. every block streamed
        def full():
            handle = offload_blocks(model, device, resident_bytes=0)
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            out = model(*inputs)
            t = time_cuda(lambda: model(*inputs), warmup=1, iters=5)
            row(
                "int8 offload (all blocks) eager cudnn",
                t,
                out,
                streamed_blocks=len(handle.streamed),
                bit_exact_vs_resident=bool(torch.equal(out, resident_out)),
                slowdown_vs_int8_resident=t["ms"] / t_res["ms"],
            )
            handle.remove()

        if R.has_time(60):
            try:
                full()
            except Exception as exc:  # noqa: BLE001
                R.error("offload all", exc)
        else:
            R.skip("offload all")

    R.write()
    for r in R.data["rows"]:
        print(
            f"{r['mode']:42} {r['ms']:9.1f} ms  peak {r['peak_gib']:6.2f} GiB  reserved {r['reserved_gib']:6.2f} GiB"
            f"  cos {r.get('cosine', float('nan')):.5f}"
        )
    print({k: v for k, v in R.data.items() if k not in ("rows", "env")})


if __name__ == "__main__":
    sys.exit(main())
