"""klein-4B image end to end, warm: prompt tokens in -> decoded 1024² image out (goal <= 300 ms on one H100),
with each part timed alone, a kernel-time breakdown of one transformer step, and diffusers' pieces from the
same run.

    python benchmarks/bench_e2e.py [--budget-s 240] [--smoke]
    python benchmarks/bench_e2e.py --mode pipeline [--budget-s 420] [--smoke]

`--mode pipeline` times what a user gets: `fluxion.sampling.pipeline.generate` itself (prompt string in, PIL image
out, warm, median of 5), with the fast paths switched on by the same code as `fluxion generate --compile
--cuda-graphs [--fp8]` (`Models.accelerate`, which `load_models(accel=)` runs), next to the hand-built path above on the same model objects and
diffusers' `Flux2KleinPipeline` whole call (eager, then with its transformer compiled) on the same weights (its
transformer shares our storage, its VAE and Qwen3 hold copies of ours). Writes bench_e2e_pipeline.json.

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
    ap.add_argument("--mode", choices=["parts", "pipeline"], default="parts")
    args = ap.parse_args()
    set_dynamo_limits()
    if args.mode == "pipeline":
        return pipeline_main(args)
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


# --- --mode pipeline ---------------------------------------------------------------------------------------------
PROMPT = "a lighthouse on a cliff at dusk, waves breaking below, warm light in the windows"
QWEN3_TEMPLATE = (  # what Qwen3's own template renders for one user turn with enable_thinking=False
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)


def offline_qwen3_tokenizer():
    """A byte-level BPE trained in memory with Qwen3's special tokens and chat template: no hub on the GPU
    machine. Token ids differ from the real tokenizer's, the token count and the work per token do not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([PROMPT, "user assistant think"], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        chat_template=QWEN3_TEMPLATE,
    )


def pipeline_main(args) -> None:
    import copy
    import dataclasses

    from transformers import Qwen3ForCausalLM

    from fluxion.request import Request
    from fluxion.sampling import pipeline
    from fluxion.weights.models import Models

    R = Report(out_dir() / "bench_e2e_pipeline.json", args.budget_s)
    cuda = not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    spec = PRESETS["flux2-klein-4b"]
    if args.smoke:
        spec = dataclasses.replace(
            spec,
            transformer=small_cfg(spec.transformer),
            vae=DEBUG_VAE,
            text=dataclasses.replace(spec.text, hidden_size=32, max_length=64),
            default_size=(64, 64),
        )
    size = spec.default_size[0]
    steps = spec.default_steps
    L = spec.text.max_length

    # --- the same weights for everyone ---
    qcfg = qwen3_config(args.smoke)
    qcfg._attn_implementation = "sdpa"
    with default_dtype(torch.bfloat16), torch.device(device):
        full_te = Qwen3ForCausalLM(qcfg).eval().requires_grad_(False)
    tokenizer = offline_qwen3_tokenizer()
    te = TextEncoder(copy.deepcopy(full_te), tokenizer=tokenizer, cfg=spec.text)  # pruned after the last tap
    model = build_ours(spec.transformer, device=device)
    with default_dtype(torch.bfloat16), torch.device(device):
        vae = AutoEncoder(spec.vae).eval().requires_grad_(False)
    vae.bn.running_mean.zero_()
    vae.bn.running_var.fill_(1.0)
    # bf16 VAE (as the hand-built rows and diffusers' bf16 pipeline); Models.dtype is the transformer's.
    models = Models(spec=spec, transformer=model, vae=vae, text=te, device=device, dtype=torch.bfloat16)
    request = Request(prompt=PROMPT, seed=0, width=size, height=size, steps=steps)
    side = size // 16
    batch = {k: v.to(device) for k, v in te.tokenize([PROMPT]).items()}
    noise = torch.randn(1, side * side, 128, device=device, dtype=torch.bfloat16)
    x_ids, ctx_ids = image_ids(side, side, device=device), text_ids(L, device=device)
    schedule = get_schedule(steps, side * side)

    def hand_built():  # the README's former figure: tokens in, pixels out (no tokenizer, no PIL)
        ctx = te.encode_tokens(batch)
        x = denoise(models.transformer, noise, x_ids, Conditioning(ctx, ctx_ids), schedule, Guidance())
        return vae.decode(unpack(x, side, side).to(torch.bfloat16)).clamp(-1, 1)

    def ours():
        return pipeline.generate(models, request)[0].image

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
        if args.smoke:  # checks the script on a CPU; measures nothing
            warmup, iters = 1, 1
        timing = time_cuda(fn, warmup, iters)
        return R.add(model="klein-4B", part=part, size=size, steps=steps, **timing, **extra)

    def diffusers_pipe():
        import inspect

        import diffusers

        from fluxion.weights.load import diffusers_vae_config
        from fluxion.weights.vae_mapping import vae_bfl_to_diffusers

        accepted = inspect.signature(diffusers.AutoencoderKLFlux2.__init__).parameters
        kw = {k: v for k, v in diffusers_vae_config(vae.cfg).items() if k in accepted}
        with torch.device("meta"):
            dv = diffusers.AutoencoderKLFlux2(**kw)
        state = {k: v.clone() for k, v in vae.state_dict().items()}
        dv.load_state_dict(vae_bfl_to_diffusers(state), strict=True, assign=True)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            time_shift_type="exponential",
        )
        pipe = diffusers.Flux2KleinPipeline(
            scheduler=scheduler,
            vae=dv.to(device).eval(),
            text_encoder=full_te,
            tokenizer=tokenizer,
            transformer=build_diffusers_sharing(model),
            is_distilled=True,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe = {}

    def diffusers_call():
        g = torch.Generator(device).manual_seed(0)
        return pipe["p"](
            prompt=PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=1.0,
            generator=g,
            max_sequence_length=L,
            text_encoder_out_layers=spec.text.hidden_layers,
        ).images[0]

    backend = "inductor" if cuda else "eager"
    fast = dict(compile=True, compile_backend=backend, cuda_graphs=cuda, device=str(device))
    fast["attention"] = "cudnn" if cuda else "sdpa"
    with torch.no_grad():
        # 1. diffusers eager, before anything is compiled
        def diffusers_eager():
            pipe["p"] = diffusers_pipe()
            row("diffusers Flux2KleinPipeline whole call, eager", diffusers_call, warmup=1)

        item("diffusers eager", 30, diffusers_eager)
        # 2. ours bf16: pipeline.generate and the hand-built path on the same accelerated objects
        from fluxion.accel import AccelOptions, VAEAccelOptions

        def ours_bf16():
            models.accelerate(AccelOptions(**fast), VAEAccelOptions(compile=True) if cuda else None)
            row("pipeline.generate bf16 (--compile --cuda-graphs)", ours, warmup=3)
            row("hand-built e2e bf16 (same objects: tokens in, pixels out)", hand_built)

        item("ours bf16", 120, ours_bf16)

        # 3. ours fp8
        def ours_fp8():
            from common import uncompile

            uncompile(model)
            models.transformer = model
            models.accelerate(AccelOptions(**fast, fp8=cuda))  # the VAE stays compiled from the bf16 pass
            row("pipeline.generate fp8 (--fp8 --compile --cuda-graphs)", ours, warmup=3)
            row("hand-built e2e fp8 (same objects: tokens in, pixels out)", hand_built)

        item("ours fp8", 90, ours_fp8)

        # 4. diffusers with its transformer compiled (regional, as diffusers recommends)
        def diffusers_compiled():
            if "p" not in pipe:
                pipe["p"] = diffusers_pipe()
            t = pipe["p"].transformer
            if hasattr(t, "compile_repeated_blocks") and getattr(t, "_repeated_blocks", None):
                t.compile_repeated_blocks(fullgraph=True, backend=backend)
                how = "compile_repeated_blocks"
            else:
                pipe["p"].transformer = torch.compile(t, backend=backend)
                how = "torch.compile"
            row(
                f"diffusers Flux2KleinPipeline whole call, transformer compiled ({how})",
                diffusers_call,
                warmup=2,
            )

        item("diffusers compiled", 120, diffusers_compiled)
    R.write()
    for r in R.data["rows"]:
        print(f"{r['part']:75} {r['ms']:8.1f} ms  peak {r['peak_gib']:6.2f} GiB  first {r['warmup_s']} s")
    print({k: v for k, v in R.data.items() if k not in ("rows", "env")})


if __name__ == "__main__":
    sys.exit(main())
