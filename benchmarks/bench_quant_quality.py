"""Image quality of the lossy paths on a trained model: fluxion-tiny images with fp8 rowwise, int8 and int4
weight-only transformers vs the plain model, same prompts and seeds (perf-anchors 5: PSNR on a trained model).
Also two storage layouts, dequantized on load as fluxion reads them: `int8_rows` (how the embedded models ship:
every 2-D weight, one scale per row) and ComfyUI's fp8 e4m3 with one scale per tensor.

    python benchmarks/bench_quant_quality.py [--n 24]
    python benchmarks/bench_quant_quality.py --model WORK/distill/transformer.safetensors --preset fluxion-tiny \
        --vae src/fluxion/assets/fluxion-tiny/vae.safetensors     # a run's unquantized export as the reference

Runs on the CPU. fp8 there is `Float8Linear.reference_forward`: the same e4m3 rowwise quantization of weights
and activations as the GPU path, with the products summed in fp32 (the GPU's `_scaled_mm` sums in its own
order, fast accumulation on), so this bounds the quantization error, not the GPU's accumulation error.
Prompts: the `fluxion eval` colour and typography sets. Writes `bench_quant_quality.json` under $OUT.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys

import numpy as np
import torch
from common import environment, out_dir

from fluxion.evaluate.prompts import colour_set, typography_set
from fluxion.quant.fp8 import convert_linears
from fluxion.quant.weight_only import quantize_weight_only
from fluxion.request import Request
from fluxion.sampling.pipeline import generate
from fluxion.weights.formats import int8_rows
from fluxion.weights.models import load_models


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def int8_rows_round_trip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return int8_rows.read(int8_rows.quantize(sd), torch.float32, "bench")


def fp8_per_tensor(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's per-tensor fp8 recipe: scale = amax / 448, codes = weight / scale in e4m3."""
    out = {}
    for k, w in sd.items():
        if w.ndim == 2 and k.endswith(".weight"):
            scale = w.float().abs().amax() / 448.0
            w = (w.float() / scale).to(torch.float8_e4m3fn).float() * scale
        out[k] = w
    return out


def stored(model: torch.nn.Module, layout) -> list[str]:
    """Replace the model's weights by what a file in `layout` gives back; the 2-D weights it changed."""
    sd = {k: v.float() for k, v in model.state_dict().items()}
    back = layout(sd)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in back.items()})
    return [k for k, v in sd.items() if v.ndim == 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24, help="prompts (half colour, half typography)")
    ap.add_argument("--model", default=None, help="default: the embedded fluxion-tiny (already int8-stored)")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--vae", default=None)
    args = ap.parse_args()
    prompts = [p["prompt"] for p in colour_set(args.n // 2)] + [
        p["prompt"] for p in typography_set(args.n // 2)
    ]
    models = load_models(args.model, preset=args.preset, vae=args.vae)
    base = models.transformer

    def images(transformer) -> list[np.ndarray]:
        models.transformer = transformer
        return [
            np.asarray(generate(models, Request(prompt=p, seed=i))[0].image.convert("RGB"))
            for i, p in enumerate(prompts)
        ]

    ref = images(base)
    variants = {
        "fp8 rowwise (blocks)": lambda m: convert_linears(m),
        "int8 weight-only": lambda m: quantize_weight_only(m, "int8"),
        "int4 weight-only (group 128)": lambda m: quantize_weight_only(m, "int4"),
        "int8_rows storage (every 2-D weight)": lambda m: stored(m, int8_rows_round_trip),
        "fp8 e4m3 storage, one scale per tensor (ComfyUI)": lambda m: stored(m, fp8_per_tensor),
    }
    rows = []
    for name, quantize in variants.items():
        model = copy.deepcopy(base)
        layers = quantize(model)
        scores = [psnr(a, b) for a, b in zip(images(model), ref)]
        finite = [s for s in scores if s != float("inf")]
        row = dict(
            variant=name,
            layers=len(layers),
            psnr_median_db=round(statistics.median(scores), 2),
            psnr_min_db=round(min(scores), 2),
            psnr_mean_db=round(statistics.mean(finite), 2) if finite else None,
            identical_images=len(scores) - len(finite),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = dict(
        env=environment(),
        model=args.model or "fluxion-tiny",
        reference=f"plain model, {base.img_in.weight.dtype} weights, compute {models.dtype}",
        prompts=len(prompts),
        torch_threads=torch.get_num_threads(),
        rows=rows,
    )
    path = out_dir() / "bench_quant_quality.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
