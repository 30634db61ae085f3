"""Prequantized fp8 checkpoints on the GPU: does a ComfyUI fp8mixed file (the layout of Comfy-Org's
`*_fp8mixed` and BFL's fp8 releases) load straight into the fp8 fast path, and what does it cost/buy?

    python benchmarks/bench_prequantized.py [--preset flux2-klein-4b] [--size 1024] [--smoke]

Builds a random bf16 transformer, writes it as an fp8mixed file (block Linears: per-tensor e4m3 codes +
`weight_scale` + `.comfy_quant`, everything else bf16; ComfyUI's recipe scale = amax / 448), then loads it
    keep:       prequantized="keep"        block Linears become Float8Linear holding the file's codes as stored
    dequantize: prequantized="dequantize"  bf16 weights = codes * scale (exact in fp32, one rounding to bf16)
and reports load time, weight memory, one forward (eager; compiled with --compile) of each, and keep vs dequantize
velocity accuracy (the only difference is activation quantization). Also checks that no layer was requantized:
every Float8Linear's codes equal the file's bytes. Writes bench_prequantized.json under $OUT. --smoke: tiny
config on CPU (Float8Linear's reference path).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from common import Report, accuracy, build_ours, make_inputs, out_dir, small_cfg, time_cuda
from safetensors.torch import save_file

from fluxion.config import PRESETS
from fluxion.quant.fp8 import Float8Linear
from fluxion.weights.load import load_transformer


def write_fp8mixed(model, path) -> dict:
    """The model's block Linears as per-tensor e4m3 + scale in ComfyUI's layout; returns {key: codes} kept."""
    out, codes_of, layers = {}, {}, {}
    for k, v in model.state_dict().items():
        name = "model.diffusion_model." + k
        if k.startswith(("double_blocks.", "single_blocks.")) and v.ndim == 2:
            layer = name[: -len(".weight")]
            scale = v.float().abs().amax() / 448.0
            codes = (v.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[name], out[layer + ".weight_scale"] = codes.cpu(), scale.cpu()
            out[layer + ".input_scale"] = torch.tensor(1.0)
            out[layer + ".comfy_quant"] = torch.tensor(
                list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8
            )
            layers[layer] = {"format": "float8_e4m3fn"}
            codes_of[k] = codes.cpu()
        else:
            out[name] = v.cpu()
    save_file(out, str(path), metadata={"_quantization_metadata": json.dumps({"layers": layers})})
    return codes_of


def weight_gib(model) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flux2-klein-4b")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    cfg = PRESETS[args.preset].transformer
    if args.smoke:
        cfg, args.size = small_cfg(cfg), 64
    folder = out_dir()
    report = Report(folder / "bench_prequantized.json", budget_s=540)
    report.data["config"] = dict(preset=args.preset, size=args.size, cfg=dataclasses.asdict(cfg))
    path = folder / "fp8mixed.safetensors"
    base = build_ours(cfg, device=device, dtype=torch.bfloat16)
    codes_of = write_fp8mixed(base, path)
    del base
    if cuda:
        torch.cuda.empty_cache()
    inputs = make_inputs(cfg, args.size, device=device)
    outs = {}
    try:
        for mode in ("keep", "dequantize"):
            t0 = time.perf_counter()
            model = load_transformer(path, dtype=torch.bfloat16, device=device, prequantized=mode)
            load_s = time.perf_counter() - t0
            fp8 = {n: m for n, m in model.named_modules() if isinstance(m, Float8Linear)}
            as_stored = all(
                torch.equal(m.weight.cpu().view(torch.uint8), codes_of[n + ".weight"].view(torch.uint8))
                for n, m in fp8.items()
            )
            if args.compile:
                for block in [*model.double_blocks, *model.single_blocks]:
                    block.compile()
            with torch.no_grad():
                timing = time_cuda(lambda m=model: m(*inputs), warmup=2 if not args.compile else 3, iters=5)
                outs[mode] = model(*inputs).float().cpu()
            report.add(
                mode=mode,
                fp8_layers=len(fp8),
                codes_as_stored=as_stored,
                load_s=load_s,
                weight_gib=weight_gib(model),
                **timing,
            )
            del model
            if cuda:
                torch.cuda.empty_cache()
        report.data["keep_vs_dequantize"] = accuracy(outs["keep"], outs["dequantize"])
        report.write()
        print("keep vs dequantize:", report.data["keep_vs_dequantize"])
    except Exception as e:  # noqa: BLE001 - reported in the JSON, then re-raised
        report.error("run", e)
        raise
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
