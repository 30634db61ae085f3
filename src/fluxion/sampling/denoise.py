"""The sampling loop: plain Euler over the flow ODE with the three FLUX.2 guidance modes (spec 6.3, 6.4, 7.3).

`denoise_steps` is a generator that yields after every step (for previews and progress); `denoise` runs it to
the end. Both are pure functions of their tensor inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fluxion.model.transformer import Flux2


@dataclass(frozen=True)
class Conditioning:
    """Everything the transformer sees besides the noisy tokens; batch B matches the latents.

    ctx [B, L, C_txt] and ctx_ids [B, L, 4]: the prompt. neg_ctx: the negative prompt for true CFG (same shape)
    or None. refs [B, N_ref, 128] and ref_ids [B, N_ref, 4]: reference-image tokens, or None.
    """

    ctx: Tensor
    ctx_ids: Tensor
    neg_ctx: Tensor | None = None
    refs: Tensor | None = None
    ref_ids: Tensor | None = None


@dataclass(frozen=True)
class Guidance:
    """How a step turns model outputs into one velocity.

    mode "embedded" ([dev]): `scale` goes into the guidance embedder, one pass per step.
    mode "cfg" (klein base): v = v_uncond + scale * (v_cond - v_uncond), both halves in one batch of 2B.
    mode "distilled" (klein): one pass, no guidance input.
    kv_cache: references are encoded once on the first step and then read from the cache (klein-9B-KV).
    """

    mode: str = "distilled"
    scale: float = 1.0
    kv_cache: bool = False


StepHook = Callable[[int, float, Tensor], Tensor]  # (step index, t_next, x after the step) -> x


def _velocity(
    model: Flux2, x, x_ids, t: float | Tensor, cond: Conditioning, guidance: Guidance, state: dict
) -> Tensor:
    """v for the N_out output tokens of x [B, N_out, 128]; t one time for all rows, or a [B] tensor of times
    already in x's dtype (one per row, `euler_step_rows`)."""
    B, n_out = x.shape[:2]
    # The reference feeds t (and the guidance value) in the latents' dtype: with bf16 latents the embedded
    # time is a bf16 number, which we reproduce (spec 10).
    t_vec = t if isinstance(t, Tensor) else torch.full((B,), t, dtype=x.dtype, device=x.device)
    g_vec = (
        torch.full((B,), guidance.scale, dtype=x.dtype, device=x.device)
        if guidance.mode == "embedded"
        else None
    )
    if guidance.kv_cache and cond.refs is not None:
        if "cache" not in state:
            v, state["cache"] = model.forward_kv_extract(
                x, x_ids, t_vec, cond.ctx, cond.ctx_ids, cond.refs, cond.ref_ids, g_vec
            )
            return v
        return model.forward_kv_cached(x, x_ids, t_vec, cond.ctx, cond.ctx_ids, state["cache"], g_vec)

    img, img_ids = x, x_ids
    if cond.refs is not None:  # output tokens first, then the references (spec 7.2)
        img, img_ids = torch.cat([x, cond.refs.to(x.dtype)], dim=1), torch.cat([x_ids, cond.ref_ids], dim=1)
    if guidance.mode != "cfg":
        return model(img, img_ids, t_vec, cond.ctx, cond.ctx_ids, g_vec)[:, :n_out]
    if cond.neg_ctx is None:
        raise ValueError("true CFG needs a negative prompt embedding (the empty prompt by default)")
    both = model(
        torch.cat([img, img]),
        torch.cat([img_ids, img_ids]),
        torch.cat([t_vec, t_vec]),
        torch.cat([cond.neg_ctx, cond.ctx]),
        torch.cat([cond.ctx_ids, cond.ctx_ids]),
    )[:, :n_out]
    v_uncond, v_cond = both.chunk(2)
    return v_uncond + guidance.scale * (v_cond - v_uncond)


def denoise_steps(
    model: Flux2,
    x: Tensor,
    x_ids: Tensor,
    cond: Conditioning,
    timesteps: list[float],
    guidance: Guidance,
    after_step: StepHook | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Integrate x [B, N_out, 128] from timesteps[0] down to timesteps[-1]; yields (step index, x) per step.

    Euler: x <- x + (t_next - t_cur) * v(x, t_cur). The update is computed in fp32 and stored back in x's dtype
    (as diffusers' scheduler does; BFL multiplies in bf16, which rounds once more). `after_step` can replace x
    after each step (inpainting blends the source back in there).
    """
    state: dict = {}
    for i, (t_cur, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        v = _velocity(model, x, x_ids, t_cur, cond, guidance, state)
        x = (x.float() + (t_next - t_cur) * v.float()).to(x.dtype)
        if after_step is not None:
            x = after_step(i, t_next, x)
        yield i, x


def euler_step_rows(
    model: Flux2,
    x: Tensor,
    x_ids: Tensor,
    cond: Conditioning,
    t_cur: Sequence[float],
    t_next: Sequence[float],
    guidance: Guidance,
) -> Tensor:
    """One Euler step in which row b of x [B, N_out, 128] stands at its own time t_cur[b] and moves to
    t_next[b] (continuous batching: jobs admitted at different steps share one transformer forward).

    Row b gets the update `denoise_steps` gives it at that step alone: its time goes into the timestep
    embedding as one entry of a [B] vector (rounded straight from the Python float to x's dtype, as
    `torch.full` does there), and dt = t_next[b] - t_cur[b] is taken in double and applied in fp32, as the
    scalar update does. Only the rounding of a batched forward (other batch sizes pick other kernels)
    separates it from a solo run. No reference KV cache (references are re-encoded every step here).
    """
    B = x.shape[0]
    if len(t_cur) != B or len(t_next) != B:
        raise ValueError(f"{len(t_cur)} current and {len(t_next)} next times for a batch of {B} rows")
    if guidance.kv_cache and cond.refs is not None:
        raise ValueError("per-row steps do not support the reference KV cache; run such jobs alone")
    # non_blocking: a pageable host -> device copy without the stream synchronisation of a blocking one
    t_vec = torch.tensor(list(t_cur), dtype=x.dtype).to(x.device, non_blocking=True)
    dt = [b - a for a, b in zip(t_cur, t_next)]  # in double, as `t_next - t_cur` in denoise_steps
    dt = torch.tensor(dt, dtype=torch.float32).to(x.device, non_blocking=True).view(B, 1, 1)
    v = _velocity(model, x, x_ids, t_vec, cond, guidance, {})
    return (x.float() + dt * v.float()).to(x.dtype)


@torch.no_grad()
def denoise(
    model: Flux2,
    x: Tensor,
    x_ids: Tensor,
    cond: Conditioning,
    timesteps: list[float],
    guidance: Guidance,
    after_step: StepHook | None = None,
) -> Tensor:
    for _, x in denoise_steps(model, x, x_ids, cond, timesteps, guidance, after_step):  # noqa: B007, B020
        pass
    return x
