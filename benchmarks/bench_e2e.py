"""klein-4B image end to end, warm: prompt tokens in -> decoded 1024² image out (goal <= 300 ms on one H100),
with each part timed alone, a kernel-time breakdown of one transformer step, and diffusers' pieces from the
same run.

    python benchmarks/bench_e2e.py [--budget-s 240] [--smoke]

Random weights, real sizes: a Qwen3-4B-shaped text encoder (36 layers, width 2560; taps 9/18/27; 512 tokens;
tokenisation excluded) run through fluxion's `TextEncoder` (which drops the 9 layers after the last tap), 4 Euler
steps of the klein-4B transformer (`sampling.denoise`), and the FLUX.2 VAE decoder. bf16 everywhere except
where a row says fp8 / fp32. Items run in order of importance and each is skipped once the budget is spent.

Rows (all CUDA-event medians of 5 after warm-up; first-call compile times in `warmup_s`):
  text encoder    all 36 layers (what diffusers runs) vs pruned after the last tap (ours); outputs compared
  denoise         bf16 regional compile + cuDNN (+ CUDA graphs); fp8 rowwise + compile + CUDA graphs
  diffusers       its transformer (same storage) eager, one step; its AutoencoderKLFlux2 decode, eager
  VAE decode      eager NCHW, eager channels_last, compiled (accel.apply_vae)
  e2e             TE (pruned) + denoise + best VAE decode, bf16 and fp8
  profile         kernel time of one step by class (GEMM / attention / fused Triton glue / other), top kernels
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import (
    Report,
    build_diffusers_sharing,
    build_ours,
    default_dtype,
    diffusers_call,
    kernel_breakdown,
    make_inputs,
    out_dir,
    set_dynamo_limits,
    small_cfg,
    time_cuda,
)

from fluxion.accel import AccelOptions, VAEAccelOptions, apply, apply_vae
from fluxion.accel.cuda_graphs import CUDAGraphed
from fluxion.config import DEBUG_VAE, FLUX2_AE, PRESETS, TextEncoderConfig
from fluxion.sampling.denoise import Conditioning, Guidance, denoise
from fluxion.sampling.ids import image_ids, text_ids, unpack
from fluxion.sampling.schedule import get_schedule
from fluxion.text.encoder import TextEncoder
from fluxion.vae.autoencoder import AutoEncoder, unpatchify

TAPS = (9, 18, 27)


def qwen3_config(smoke: bool):
    from transformers import Qwen3Config

    if smoke:
        return Qwen3Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=36,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=1000,
        )
    return Qwen3Config(  # Qwen3-4B
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


def build_text_encoder(smoke: bool, device):
    """(full HF backbone, fluxion TextEncoder over a copy of it pruned after the last tap)."""
    import copy

    from transformers import Qwen3ForCausalLM

    cfg = qwen3_config(smoke)
    cfg._attn_implementation = "sdpa"
    with default_dtype(torch.bfloat16), torch.device(device):
        full = Qwen3ForCausalLM(cfg).eval().requires_grad_(False)
    te_cfg = TextEncoderConfig(kind="qwen3", hidden_layers=TAPS, hidden_size=cfg.hidden_size)
    ours = TextEncoder(copy.deepcopy(full), tokenizer=None, cfg=te_cfg)  # deepcopy: the full one stays intact
    return full.model, ours, cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    set_dynamo_limits()
    R = Report(out_dir() / "bench_e2e.json", args.budget_s)
    cuda = not args.smoke
    device = "cuda" if cuda else "cpu"
    fast = "cudnn" if cuda else "math"
    backend = "inductor" if cuda else "eager"
    if cuda:
        torch.backends.cudnn.benchmark = True  # conv algorithm search for the VAE (one size: pays once)
    cfg = PRESETS["flux2-klein-4b"].transformer
    cfg = small_cfg(cfg) if args.smoke else cfg
    size, steps, L = (64, 4, 512) if args.smoke else (1024, 4, 512)
    side = size // 16

    full_te, te, te_cfg = build_text_encoder(args.smoke, device)
    model = build_ours(cfg, device=device)
    with default_dtype(torch.bfloat16), torch.device(device):
        vae = AutoEncoder(DEBUG_VAE if args.smoke else FLUX2_AE).eval().requires_grad_(False)
    vae.bn.running_mean.zero_()
    vae.bn.running_var.fill_(1.0)

    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, te_cfg.vocab_size, (1, L), device=device, generator=g)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    noise = torch.randn(1, side * side, cfg.in_channels, device=device, dtype=torch.bfloat16, generator=g)
    x_ids, ctx_ids = image_ids(side, side, device=device), text_ids(L, device=device)
    schedule = get_schedule(steps, side * side)

    def fit(ctx):  # the tiny smoke encoder's width differs from the tiny transformer's context width
        if args.smoke:
            ctx = torch.nn.functional.pad(
                ctx[..., : cfg.context_in_dim], (0, max(0, cfg.context_in_dim - ctx.shape[-1]))
            )
        return ctx

    def encode():
        return fit(te.encode_tokens(batch))

    def encode_full():  # what diffusers' _get_qwen3_prompt_embeds runs: every layer
        hs = full_te(**batch, output_hidden_states=True, use_cache=False).hidden_states
        return fit(torch.stack([hs[i] for i in TAPS], 1).permute(0, 2, 1, 3).reshape(1, L, -1))

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

    def item(name, need_s, fn):
        if not R.has_time(need_s):
            R.skip(name)
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - outermost handler of an item
            R.error(name, exc)
            return None

    def row(part, fn, warmup=2, iters=5, **extra):
        return R.add(
            model="klein-4B", part=part, size=size, **time_cuda(fn, warmup=warmup, iters=iters), **extra
        )

    best_vae = {"name": "VAE decode bf16 NCHW eager"}
    with torch.no_grad():
        # --- text encoder: full vs pruned (lossless) ---
        def te_rows():
            a, b = encode_full(), encode()
            diff = (a.float() - b.float()).abs().max().item()
            row("text encoder, all 36 layers (as diffusers)", encode_full)
            row(f"text encoder, pruned after layer {max(TAPS)} (ours)", encode, max_abs_diff_vs_full=diff)

        item("text encoder", 15, te_rows)
        full_te = None  # frees the unpruned copy (8 GB) before the transformer runs
        ctx = encode()

        # --- bf16 transformer: regional compile + cuDNN, then CUDA graphs ---
        apply(model, AccelOptions(attention=fast, compile=True, compile_backend=backend))
        item(
            "denoise bf16 compiled",
            60,
            lambda: row(f"denoise {steps} steps bf16 (compiled, {fast})", lambda: run_denoise(ctx)),
        )
        step_args = make_inputs(cfg, size, device=device)

        def profile(name: str) -> None:  # kernel time of one step of the model as it is now
            R.data.setdefault("profile", {})[name] = kernel_breakdown(lambda: model(*step_args), cuda)
            R.write()

        item("profile bf16 step", 20, lambda: profile("bf16_compiled"))

        def graphs_rows():
            transformer["module"] = CUDAGraphed(model)
            row(f"denoise {steps} steps bf16 (compiled + CUDA graphs)", lambda: run_denoise(ctx))

        if cuda:
            item("denoise bf16 graphs", 20, graphs_rows)

        # --- diffusers transformer, eager, same storage: one step ---
        def diffusers_step():
            dm = build_diffusers_sharing(model)
            row(
                "diffusers transformer, one step, eager (same weights)", lambda: diffusers_call(dm, step_args)
            )
            ours = make_inputs(cfg, size, device=device)
            row("ours transformer, one step, bf16 compiled", lambda: model(*ours))

        item("diffusers step", 20, diffusers_step)

        x = run_denoise(ctx)

        # --- VAE decode variants ---
        item("vae nchw", 15, lambda: row("VAE decode bf16 NCHW eager", lambda: decode(x)))

        def vae_diffusers():
            import inspect

            import diffusers

            from fluxion.weights.load import diffusers_vae_config
            from fluxion.weights.vae_mapping import vae_bfl_to_diffusers

            accepted = inspect.signature(diffusers.AutoencoderKLFlux2.__init__).parameters
            kw = {k: v for k, v in diffusers_vae_config(vae.cfg).items() if k in accepted}
            with torch.device("meta"):
                dv = diffusers.AutoencoderKLFlux2(**kw)
            sd = {k: v for k, v in vae.state_dict().items()}
            dv.load_state_dict(vae_bfl_to_diffusers(sd), strict=True, assign=True)
            dv = dv.to(device).eval()
            z = unpatchify(unpack(x, side, side), vae.cfg.patch_size).to(torch.bfloat16)
            row("diffusers AutoencoderKLFlux2 decode bf16 eager", lambda: dv.decode(z, return_dict=False)[0])

        item("vae diffusers", 20, vae_diffusers)

        def vae_cl():
            apply_vae(vae, VAEAccelOptions(channels_last=True))
            r = row("VAE decode bf16 channels_last eager", lambda: decode(x))
            nchw = next(q for q in R.data["rows"] if q["part"] == "VAE decode bf16 NCHW eager")
            if r["ms"] < nchw["ms"]:
                best_vae["name"] = r["part"]
            else:
                vae.to(memory_format=torch.contiguous_format)

        item("vae channels_last", 15, vae_cl)

        def vae_compiled():
            ref = decode(x)
            apply_vae(vae, VAEAccelOptions(compile=True, compile_dynamic=False, compile_backend=backend))
            out = decode(x)
            diff = (out.float() - ref.float()).abs().max().item()
            r = row(
                f"VAE decode bf16 compiled ({best_vae['name'].split()[-2]})",
                lambda: decode(x),
                max_abs_diff_vs_eager=diff,
            )
            best = next(q for q in R.data["rows"] if q["part"] == best_vae["name"])
            if r["ms"] < best["ms"]:
                best_vae["name"] = r["part"]
            else:  # back to eager
                vae.encoder._compiled_call_impl = None
                vae.decoder._compiled_call_impl = None

        item("vae compiled", 70, vae_compiled)

        # --- bf16 end to end ---
        item(
            "e2e bf16",
            15,
            lambda: row(
                f"e2e bf16: TE pruned + denoise (compiled + graphs) + {best_vae['name']}",
                lambda: decode(run_denoise(encode())),
            ),
        )

        # --- fp8 transformer ---
        def fp8_rows():
            from common import uncompile

            transformer["module"] = model
            uncompile(model)
            apply(model, AccelOptions(attention=fast, compile=True, compile_backend=backend, fp8=cuda))
            if cuda:
                transformer["module"] = CUDAGraphed(model)
            row(f"denoise {steps} steps fp8 (compiled + CUDA graphs)", lambda: run_denoise(ctx))
            row(
                f"e2e fp8: TE pruned + fp8 denoise + {best_vae['name']}",
                lambda: decode(run_denoise(encode())),
            )

        item("fp8", 45, fp8_rows)
        item("profile fp8 step", 15, lambda: profile("fp8_compiled"))
    R.write()
    for r in R.data["rows"]:
        print(f"{r['part']:80} {r['ms']:8.1f} ms  peak {r['peak_gib']:6.2f} GiB  first {r['warmup_s']} s")
    for name, p in R.data.get("profile", {}).items():
        print(name, p["total_ms"], p["by_class_ms"])
        for k in p["top"][:8]:
            print("   ", k)
    print({k: v for k, v in R.data.items() if k not in ("rows", "env", "profile")})


if __name__ == "__main__":
    sys.exit(main())
