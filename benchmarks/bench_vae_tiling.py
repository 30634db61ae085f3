"""FLUX.2 autoencoder at 4 MP: plain vs tiled encode/decode, peak GPU memory, time, and the tiling error.

    python benchmarks/bench_vae_tiling.py [--size 2048] [--tiles 1024,512] [--dtype fp32|bf16] [--smoke]

Random weights (same compute as real); the error is the max |tiled - plain| over the output range. Writes
bench_vae_tiling.json under $OUT (default bench_out/).
"""

from __future__ import annotations

import argparse
import json

import torch
from common import environment, init_random_, out_dir, time_cuda

from fluxion.config import DEBUG_VAE, FLUX2_AE
from fluxion.vae.autoencoder import AutoEncoder
from fluxion.vae.tiling import tiled_decode, tiled_encode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tiles", default="1024,512")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--smoke", action="store_true", help="tiny VAE on the CPU")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    size, tiles = (128, [64]) if args.smoke else (args.size, [int(t) for t in args.tiles.split(",")])
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    ae = AutoEncoder(DEBUG_VAE if args.smoke else FLUX2_AE).to(device)
    init_random_(ae, seed=0)
    ae = ae.to(dtype).eval()
    x = torch.rand(1, 3, size, size, device=device, dtype=dtype) * 2 - 1
    rows = []
    with torch.no_grad():
        z = ae.encode(x)
        ref_x = ae.decode(z).float()
        for tile in [None, *tiles]:
            enc = (
                (lambda: ae.encode(x))
                if tile is None
                else (lambda t=tile: tiled_encode(ae, x, tile=t, overlap=t // 4))
            )
            dec = (
                (lambda: ae.decode(z))
                if tile is None
                else (lambda t=tile: tiled_decode(ae, z, tile=t, overlap=t // 4))
            )
            row = {"tile": tile or "plain"}
            for name, fn, ref in [("encode", enc, z.float()), ("decode", dec, ref_x)]:
                timing = time_cuda(fn, warmup=1, iters=3)
                err = ((fn().float() - ref).abs().max() / (ref.max() - ref.min())).item()
                row[name] = {"ms": timing["ms"], "peak_gib": timing["peak_gib"], "max_err_of_range": err}
            rows.append(row)
            print(json.dumps(row))
    out = out_dir()
    out.mkdir(parents=True, exist_ok=True)
    result = {"size": size, "dtype": args.dtype, "rows": rows, "environment": environment()}
    (out / "bench_vae_tiling.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
