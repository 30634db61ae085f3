"""klein-4B LoRA training step of each objective: time and peak memory at 1024², bf16 (flow-matching goal
<= 0.25 s/step on H100).

    python benchmarks/bench_lora_train.py [--objectives fm,dpo,distill] [--budget-s 540] [--smoke]

Rank 16 (alpha 16) on the attention projections of the double blocks (img/txt qkv and proj) and on both
linears of the single blocks (`TARGET_PRESETS["attention"]`); base weights frozen, bf16 (klein-base-4B's
transformer; random weights, real size). Latents and text embeddings are cached in training, so random here,
same shapes: 4096 image tokens + 512 text tokens per image. No activation checkpointing. One optimizer step
(fused AdamW on the adapters) ends every objective's step. The objectives' own code computes the loss:

- fm: flow matching, batch 1: forward + `flow_loss` + backward + step.
- dpo: Diffusion-DPO (`train/dpo.py`), batch 1 pair: `DiffusionDPO.loss`, i.e. the policy (adapters on) on
  winner and loser as one forward of batch 2 with grad, the frozen reference (`adapters_off`: the base, no
  second copy) on both as one batch-2 forward under no_grad, `per_sample_error` + `dpo_loss` (beta from the
  `klein_base_lora_dpo` recipe); then backward + step.
- distill: step distillation (`train/distill.py`, its LoRA path: no separate teacher), batch 1: inside `StepDistillation.loss` the teacher (the base, `adapters_off`) integrates
  one student segment with `teacher_segment` under no_grad: teacher_steps / student_steps of the
  `klein_base_lora_distill` recipe (20 / 4 = 5) Euler sub-steps, each true CFG at klein-base's default scale 4 (cond
  and uncond as one batch-2 forward: 10 image forwards in 5 calls); then `StepDistillation.loss` (the
  student, adapters on, one forward with grad) + backward + step.

Variants: eager SDPA and eager cuDNN attention (fm only: both), regional compile with SDPA's default, then
with cuDNN (fm only). All eager rows run first and compiled cuDNN last: a CUDA error poisons the process, so
later variants are then lost (the JSON keeps what ran).
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import (
    Report,
    build_ours,
    forward_flops,
    make_inputs,
    out_dir,
    perf_fields,
    set_dynamo_limits,
    small_cfg,
    time_cuda,
    uncompile,
)

from fluxion.accel import AccelOptions, apply
from fluxion.config import PRESETS
from fluxion.lora.lora import inject_lora
from fluxion.sampling.schedule import get_schedule
from fluxion.train.distill import StepDistillation
from fluxion.train.dpo import DiffusionDPO
from fluxion.train.flow_matching import flow_loss, interpolate, sample_times
from fluxion.train.precision import Precision
from fluxion.train.recipes import klein_base_lora_distill, klein_base_lora_dpo

OBJECTIVES = ("fm", "dpo", "distill")
PRESET = "flux2-klein-base-4b"  # the LoRA's base: true CFG, so it is also the distillation teacher


def objective(cls, **state):
    """An objective with only what its `loss` reads: its __init__ loads a reference / teacher from disk,
    which this benchmark replaces by the base with its adapters off."""
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated: fm,dpo,distill")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    chosen = [o.strip() for o in args.objectives.split(",") if o.strip()]
    unknown = [o for o in chosen if o not in OBJECTIVES]
    if unknown or not chosen:
        ap.error(
            f"--objectives takes a comma-separated subset of {','.join(OBJECTIVES)}, got {args.objectives!r}"
        )
    set_dynamo_limits()
    R = Report(out_dir() / "bench_lora_train.json", args.budget_s)
    device = "cpu" if args.smoke else "cuda"
    fast = "math" if args.smoke else "cudnn"
    spec = PRESETS[PRESET]
    cfg = small_cfg(spec.transformer) if args.smoke else spec.transformer
    size = 64 if args.smoke else 1024

    model = build_ours(cfg, device=device)
    wrapped = inject_lora(model, rank=16, alpha=16, targets="attention")
    model.train()
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert params and all(".lora." in n for n, p in model.named_parameters() if p.requires_grad)
    R.data.update(lora_layers=len(wrapped), trainable_params=sum(p.numel() for p in params))
    opt = torch.optim.AdamW(params, lr=1e-4, fused=not args.smoke)

    last = {}

    def optimizer_step(loss):
        last["loss"] = loss.detach()  # read after timing: no extra host sync inside the step
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    gen = torch.Generator(device=device).manual_seed(0)
    x0, x_ids, _, ctx, ctx_ids, _ = make_inputs(cfg, size, device=device)
    n_img = x0.shape[1]
    # Training FLOPs of a batch-1 step ≈ forward + backward through the activations (no weight gradients for
    # the frozen base) = 2x forward for the GEMMs; attention backward ≈ 2.5x its forward. LoRA GEMMs are < 1 %.
    fwd = forward_flops(cfg, n_img)
    attn = 4 * (n_img + 512) ** 2 * cfg.hidden_size * (cfg.num_double_blocks + cfg.num_single_blocks)
    train = 2 * (fwd - attn) + 3.5 * attn

    # fm: one image.
    noise = torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype)
    t = sample_times(1, n_img, generator=gen, device=device).to(x0.dtype)
    x_t = interpolate(x0, noise, t)

    def fm_step():
        optimizer_step(flow_loss(model(x_t, x_ids, t, ctx, ctx_ids), x0, noise))

    # dpo: one pair, winner and loser share the prompt, the time and the noise (the layout of
    # DiffusionDPO.batch: winners first, then losers, as one batch of 2).
    dpo = objective(DiffusionDPO, cfg=klein_base_lora_dpo(["-"], "-", "-", "-"), reference=None)
    x_lose = torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype)
    pair_x0, pair_noise, pair_t = torch.cat([x0, x_lose]), torch.cat([noise, noise]), torch.cat([t, t])
    dpo_batch = {
        "x0": pair_x0,
        "noise": pair_noise,
        "t": pair_t,
        "x_t": interpolate(pair_x0, pair_noise, pair_t),
        "x_ids": torch.cat([x_ids, x_ids]),
        "ctx": torch.cat([ctx, ctx]),
        "ctx_ids": torch.cat([ctx_ids, ctx_ids]),
        "refs": None,
    }

    def dpo_step():
        loss, _ = dpo.loss(model, dpo_batch)  # reference = the base: adapters_off inside, under no_grad
        optimizer_step(loss)

    # distill: one image at the start of a student segment (segment k = 1 of the 4-step schedule; every
    # segment costs the same), as StepDistillation.batch builds it.
    dcfg = klein_base_lora_distill(["-"], "-", "-", "-")
    substeps = dcfg.teacher_steps // dcfg.student_steps
    scale = dcfg.teacher_guidance if dcfg.teacher_guidance is not None else spec.default_guidance
    # teacher=None: the trainer's LoRA path, where `loss` runs the teacher segment on the base (adapters off)
    policy = Precision(torch.bfloat16, device)  # bf16 autocast, as the trainer runs on CUDA (the smoke too)
    distill = objective(
        StepDistillation, cfg=dcfg, teacher=None, substeps=substeps, scale=scale, precision=policy
    )
    schedule = torch.tensor(get_schedule(dcfg.student_steps, n_img), device=device)
    s_from, s_to = schedule[1:2], schedule[2:3]
    neg = torch.randn(ctx.shape, generator=gen, device=device, dtype=ctx.dtype)  # the empty prompt's encoding
    x_seg = (1 - s_from).view(-1, 1, 1) * x0.float() + s_from.view(-1, 1, 1) * noise.float()
    distill_batch = {
        "x": x_seg.to(x0.dtype),
        "x_ids": x_ids,
        "ctx": ctx,
        "neg_ctx": neg,
        "ctx_ids": ctx_ids,
        "t": s_from.to(x0.dtype),
        "t_to": s_to.to(x0.dtype),
        "refs": None,
        "ref_ids": None,
    }

    def distill_step():
        loss, _ = distill.loss(model, distill_batch)  # no "target" in the batch: the teacher runs in here
        optimizer_step(loss)

    teacher_desc = (
        f"teacher {dcfg.teacher_steps}/{dcfg.student_steps} = {substeps} Euler sub-steps x CFG {scale:g} "
        f"(cond+uncond, {2 * substeps} fwd in {substeps} batch-2 calls) + student fwd/bwd"
    )
    steps = {
        "fm": (fm_step, train, "LoRA r16 train step", 1),
        "dpo": (
            dpo_step,
            2 * train + 2 * fwd,
            "LoRA r16 DPO step (policy fwd/bwd + ref fwd, batch-2 pair)",
            1,
        ),
        "distill": (distill_step, 2 * substeps * fwd + train, f"LoRA r16 distill step ({teacher_desc})", 1),
    }
    # (objective, variant, attention, compiled, seconds it needs): eager rows first, compiled cuDNN last.
    # 2026-11-24 H100: fm "compiled cudnn" died with an illegal memory access in an inductor RoPE-backward
    # kernel (docs/BENCHMARKS.md); the SDPA-default compiled variants run first so one crash loses less.
    plan = [
        ("fm", "eager sdpa", "sdpa", False, 20),
        ("fm", "eager " + fast, fast, False, 20),
        ("dpo", "eager " + fast, fast, False, 40),
        ("distill", "eager " + fast, fast, False, 60),
        ("fm", "compiled sdpa", "sdpa", True, 150),
        ("dpo", "compiled sdpa", "sdpa", True, 200),
        ("distill", "compiled sdpa", "sdpa", True, 200),
        ("fm", "compiled " + fast, fast, True, 150),
    ]
    for name, mode, attention, compiled, need in plan:
        if name not in chosen:
            continue
        step, flops, what, batch = steps[name]
        if not R.has_time(need):
            R.skip(f"{name} {mode}")
            continue
        try:
            if not compiled:
                uncompile(model)
            apply(
                model,
                AccelOptions(
                    attention=attention,
                    compile=compiled,
                    compile_backend="eager" if args.smoke else "inductor",
                ),
            )
            last.clear()
            timing = time_cuda(step, warmup=3, iters=3 if args.smoke else 10)
            R.add(
                model="klein-4B",  # klein and klein-base share the transformer
                impl="fluxion",
                objective=name,
                mode=f"{what}, {mode}",
                size=size,
                batch=batch,
                **perf_fields(flops, timing),
                s_per_step=timing["ms"] / 1e3,
                last_loss=float(last["loss"]),
            )
        except Exception as exc:  # noqa: BLE001 - outermost handler of an item
            R.error(f"{name} {mode}", exc)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    R.write()
    for r in R.data["rows"]:
        print(
            f"{r['objective']:8} {r['s_per_step']:7.3f} s/step  peak {r['peak_gib']:6.2f} GiB  "
            f"{r['tflops']:6.1f} TFLOP/s  {r['mode']}"
        )
    print({k: v for k, v in R.data.items() if k not in ("rows", "env")})


if __name__ == "__main__":
    sys.exit(main())
