"""klein-4B image end to end, warm: prompt tokens in -> decoded 1024² image out (goal <= 300 ms on one H100).

    python benchmarks/bench_e2e.py [--budget-s 200] [--smoke]

Random weights, real sizes: a Qwen3-4B-shaped text encoder (36 layers, width 2560; taps 9/18/27; 512 tokens;
tokenisation excluded), 4 Euler steps of the klein-4B transformer (`sampling.denoise`, regional compile + cuDNN
attention, optionally CUDA graphs), and the FLUX.2 VAE decoder. bf16 everywhere except where stated: the
reference decodes in fp32 (spec 4.5), reported separately. Each component is timed alone and the whole chain
is timed with CUDA events (median of 5 after 2 warm-ups).
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import Report, build_ours, default_dtype, out_dir, set_dynamo_limits, small_cfg, time_cuda

from fluxion.accel import AccelOptions, apply
from fluxion.accel.cuda_graphs import CUDAGraphed
from fluxion.config import DEBUG_VAE, FLUX2_AE, PRESETS
from fluxion.sampling.denoise import Conditioning, Guidance, denoise
from fluxion.sampling.ids import image_ids, text_ids, unpack
from fluxion.sampling.schedule import get_schedule
from fluxion.vae.autoencoder import AutoEncoder

TAPS = (9, 18, 27)


def build_text_encoder(smoke: bool, device):
    from transformers import Qwen3Config, Qwen3Model

    if smoke:
        cfg = Qwen3Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=1000,
        )
    else:  # Qwen3-4B
        cfg = Qwen3Config(
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            rope_theta=1_000_000,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        )
    cfg._attn_implementation = "sdpa"
    with default_dtype(torch.bfloat16), torch.device(device):
        te = Qwen3Model(cfg)
    return te.eval().requires_grad_(False), cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    set_dynamo_limits()
    R = Report(out_dir() / "bench_e2e.json", args.budget_s)
    device = "cpu" if args.smoke else "cuda"
    fast = "math" if args.smoke else "cudnn"
    cfg = PRESETS["flux2-klein-4b"].transformer
    cfg = small_cfg(cfg) if args.smoke else cfg
    size, steps, L = (64, 4, 512) if args.smoke else (1024, 4, 512)
    side = size // 16

    te, te_cfg = build_text_encoder(args.smoke, device)
    model = build_ours(cfg, device=device)
    apply(
        model,
        AccelOptions(attention=fast, compile=True, compile_backend="eager" if args.smoke else "inductor"),
    )
    with default_dtype(torch.bfloat16), torch.device(device):
        vae = AutoEncoder(DEBUG_VAE if args.smoke else FLUX2_AE).eval().requires_grad_(False)
    vae.bn.running_mean.zero_()
    vae.bn.running_var.fill_(1.0)
    if not args.smoke:
        vae = vae.to(memory_format=torch.channels_last)

    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, te_cfg.vocab_size, (1, L), device=device, generator=g)
    mask = torch.ones_like(tokens)
    noise = torch.randn(1, side * side, cfg.in_channels, device=device, dtype=torch.bfloat16, generator=g)
    x_ids, ctx_ids = image_ids(side, side, device=device), text_ids(L, device=device)
    schedule = get_schedule(steps, side * side)

    def encode():
        hs = te(
            input_ids=tokens, attention_mask=mask, output_hidden_states=True, use_cache=False
        ).hidden_states
        taps = torch.stack([hs[i] for i in TAPS], dim=1)  # [B, 3, L, d], layer-major as text/encoder.py
        ctx = taps.permute(0, 2, 1, 3).reshape(1, L, -1)
        if args.smoke:  # the tiny encoder's width differs from the tiny transformer's context width
            ctx = torch.nn.functional.pad(ctx, (0, cfg.context_in_dim - ctx.shape[-1]))
        return ctx.to(torch.bfloat16)

    transformer = {"module": model}

    def run_denoise(ctx):
        return denoise(
            transformer["module"],
            noise,
            x_ids,
            Conditioning(ctx, ctx_ids),
            schedule,
            Guidance(mode="distilled"),
        )

    def decode(x, v=None):
        v = vae if v is None else v
        return v.decode(unpack(x, side, side).to(v.decoder.conv_in.weight.dtype)).clamp(-1, 1)

    def e2e():
        return decode(run_denoise(encode()))

    with torch.no_grad():
        ctx = encode()
        x = run_denoise(ctx)
        parts = {
            "text encoder (Qwen3-4B shape, 512 tok)": (lambda: encode(), 10),
            f"denoise {steps} steps (compiled {fast})": (lambda: run_denoise(ctx), 120),
            "VAE decode bf16": (lambda: decode(x), 20),
            "e2e (TE + denoise + VAE bf16)": (e2e, 20),
        }
        if not args.smoke:

            def graphs_e2e():
                transformer["module"] = CUDAGraphed(model)
                return time_cuda(e2e, warmup=2, iters=5)

        for name, (fn, need) in parts.items():
            if not R.has_time(need):
                R.skip(name)
                continue
            try:
                R.add(model="klein-4B", part=name, size=size, **time_cuda(fn, warmup=2, iters=5))
            except Exception as exc:  # noqa: BLE001 - outermost handler of an item
                R.error(name, exc)
        if not args.smoke:
            if R.has_time(30):
                try:
                    R.add(model="klein-4B", part="e2e, transformer in CUDA graphs", size=size, **graphs_e2e())
                    R.add(
                        model="klein-4B",
                        part="denoise 4 steps, CUDA graphs",
                        size=size,
                        **time_cuda(lambda: run_denoise(ctx), warmup=1, iters=5),
                    )
                except Exception as exc:  # noqa: BLE001
                    R.error("graphs e2e", exc)
            if R.has_time(30):
                try:
                    vae32 = vae.float()
                    R.add(
                        model="klein-4B",
                        part="VAE decode fp32 (reference precision)",
                        size=size,
                        **time_cuda(lambda: decode(x, vae32), warmup=1, iters=5),
                    )
                except Exception as exc:  # noqa: BLE001
                    R.error("vae fp32", exc)
    R.write()
    for r in R.data["rows"]:
        print(f"{r['part']:44} {r['ms']:8.1f} ms  peak {r['peak_gib']:6.2f} GiB")
    print({k: v for k, v in R.data.items() if k not in ("rows", "env")})


if __name__ == "__main__":
    sys.exit(main())
