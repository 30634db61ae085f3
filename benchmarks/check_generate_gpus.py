"""`generate` on N GPUs (accel.launch, NCCL) against one GPU, end to end with the embedded fluxion-tiny.

    python benchmarks/check_generate_gpus.py --gpus 2
    python benchmarks/check_generate_gpus.py --gpus 2 --smoke      # CPU processes (gloo)

fluxion-tiny runs true CFG, so the default layout of 2 ranks is CFG parallel; Ulysses over 2 ranks is run too.
Reports wall time of each call (process start and model loading included: this checks the path, it is not a
speed figure) and how far the images are from the one-GPU image (bf16 on GPU: a few levels are expected). Writes
check_generate_<N>gpu.json under $OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from common import environment, out_dir

from fluxion.accel.launch import generate_on_gpus
from fluxion.accel.parallel import ParallelOptions
from fluxion.request import Request
from fluxion.sampling.pipeline import generate
from fluxion.weights.models import load_models


def compare(a, b) -> dict:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return dict(
        max_abs=float(np.abs(x - y).max()), psnr_db=float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device_type = "cpu" if args.smoke else "cuda"
    request = Request(prompt="a red circle on a blue background", seed=7, steps=args.steps)
    t = time.perf_counter()
    one = generate(load_models(device="cpu" if args.smoke else "cuda:0"), request)[0].image
    rows = [dict(layout="1 device", wall_s=round(time.perf_counter() - t, 2))]
    layouts = {"default": None, f"ulysses{args.gpus}": ParallelOptions(ulysses=args.gpus)}
    for label, parallel in layouts.items():
        t = time.perf_counter()
        image = generate_on_gpus(request, args.gpus, parallel=parallel, device_type=device_type)[0].image
        rows.append(dict(layout=label, wall_s=round(time.perf_counter() - t, 2), **compare(image, one)))
    result = dict(env=environment(), gpus=args.gpus, steps=args.steps, rows=rows)
    path = out_dir() / f"check_generate_{args.gpus}gpu{'_smoke' if args.smoke else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    torch.multiprocessing.freeze_support()
    sys.exit(main())
