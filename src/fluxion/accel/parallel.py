"""Several devices for one generation: sequence parallelism and CFG parallelism through torch.distributed.

`apply_parallel(model, ParallelOptions(...))` wraps a built `Flux2` (every rank holds the full weights) in a
`ParallelFlux2` with the model's three entry points (`forward`, `forward_kv_extract`, `forward_kv_cached`), so
`sampling.denoise` and `sampling.pipeline` run it unchanged. Nothing in `model/` knows about it: the only hook is
the attention backend of `model.attention`, which the wrapper swaps for a distributed one for the duration of
each call (the backend that was installed before, e.g. by `accel.apply`, does the local attention).

Layout. The ranks form a (cfg, ring, ulysses) grid, ulysses fastest: global rank = (c * ring + r) * ulysses + u.

- CFG parallel (cfg = 2): the batch of each model call is split in cfg parts, one per grid plane. True-CFG
  sampling calls the model on [uncond ; cond] (`denoise._velocity`), so the two branches run on two ranks.
- Sequence parallel (sp = ring * ulysses): text tokens, image tokens and reference tokens are each split in sp
  equal contiguous parts; rank (r, u) holds part s = r * ulysses + u of each. Every per-token layer (linears,
  norms, modulation, RoPE with the rank's own position ids) then runs on 1/sp of the tokens with no
  communication. Only attention needs the other tokens:
  - Ulysses: one all-to-all turns [B, H, L/u, d_h] (all heads, part of the tokens) into [B, H/u, L, d_h] (part
    of the heads, all tokens of the Ulysses group), the local attention runs, and a second all-to-all turns the
    result back. Needs H divisible by u (dev 48 heads, klein-4B 24, klein-9B 32).
  - Ring: each rank keeps its queries and passes its K/V chunk around the ring (send to the next rank, receive
    from the previous one, overlapped with the attention of the chunk at hand); partial outputs are merged with
    their log-sum-exp in fp32, so the result is exact. Memory per rank stays 1/ring of the keys.
  - Both (USP): Ulysses inside, ring across: after the all-to-all each rank holds H/u heads of its ring part.
  Attention has no mask and no position bias (RoPE is applied before), so the order in which key tokens arrive
  does not change the result; the all-to-all back restores each rank's own queries.
- The output tokens of every rank are all-gathered at the end of each call: every rank returns the full
  velocity, so the sampler's state stays identical on all ranks (same noise, same steps).

Token counts must split evenly: the text length (512 for the real models) and the image / reference token counts
(width/16 x height/16) divisible by sp. The KV path keeps a per-rank cache: each rank stores the K/V of its own
reference tokens, which are exactly the keys it contributes on later steps.

With `accel.apply(compile=True)` the Ulysses all-to-alls (functional collectives) are traced into the compiled
blocks; the ring's point-to-point sends are not traceable and run eagerly inside them (`torch.compiler.disable`).
Checked on CPU processes with the aot_eager backend (same velocities as the one-process model); not a test: it
takes minutes on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fluxion.model.attention import AttentionBackend, get_attention_backend
from fluxion.model.transformer import Flux2, KVCache

RingKernel = Literal["auto", "flash", "cudnn", "efficient", "cpu", "math"]


@dataclass(frozen=True, kw_only=True)
class ParallelOptions:
    """How the ranks of the default process group share one generation; cfg * ring * ulysses = world size."""

    ulysses: int = 1  # sequence-parallel degree through all-to-all over heads (fast links: one node)
    ring: int = 1  # sequence-parallel degree through a K/V ring (long sequences, memory per rank)
    cfg: int = 1  # 1, or 2: the two true-CFG branches (the batch halves of each model call) on two ranks
    ring_kernel: RingKernel = "auto"  # local attention with log-sum-exp inside the ring (see attention_lse)

    def __post_init__(self) -> None:
        for name in ("ulysses", "ring", "cfg"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelOptions.{name} must be >= 1, got {getattr(self, name)}")
        if self.cfg not in (1, 2):
            raise ValueError(
                f"cfg parallelism splits the two CFG branches: cfg must be 1 or 2, got {self.cfg}"
            )
        if self.ring_kernel not in ("auto", "flash", "cudnn", "efficient", "cpu", "math"):
            raise ValueError(f"unknown ring_kernel {self.ring_kernel!r}")

    @property
    def sp(self) -> int:
        return self.ring * self.ulysses

    @property
    def world(self) -> int:
        return self.cfg * self.sp


def default_options(world: int, guidance_mode: str, num_heads: int) -> ParallelOptions:
    """The split of `world` ranks for a model: the two CFG branches apart when the model runs true CFG (and the
    world is even), the rest Ulysses when the heads divide, else ring."""
    if world < 1:
        raise ValueError(f"need at least one rank, got {world}")
    cfg = 2 if guidance_mode == "cfg" and world % 2 == 0 else 1
    sp = world // cfg
    if num_heads % sp == 0:
        return ParallelOptions(cfg=cfg, ulysses=sp)
    return ParallelOptions(cfg=cfg, ring=sp)


# ---- process groups -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """This rank's place in the (cfg, ring, ulysses) grid and the process groups along each axis."""

    opts: ParallelOptions
    cfg_index: int
    ring_index: int
    ulysses_index: int
    cfg_group: dist.ProcessGroup | None  # ranks with the same sequence part, different batch parts
    sp_group: dist.ProcessGroup | None  # ranks with the same batch part (ordered by sequence part)
    ring_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    ring_ranks: tuple[int, ...]  # global ranks of this rank's ring, in ring order

    @property
    def sp_index(self) -> int:
        return self.ring_index * self.opts.ulysses + self.ulysses_index


def make_grid(opts: ParallelOptions) -> Grid:
    """Create the process groups of `opts` (a collective: every rank of the default group must call it)."""
    if not dist.is_initialized():
        raise ValueError("parallel inference needs torch.distributed initialised (one process per device)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if opts.world != world:
        raise ValueError(
            f"cfg {opts.cfg} x ring {opts.ring} x ulysses {opts.ulysses} = {opts.world} ranks, "
            f"but the process group has {world}"
        )
    C, R, U = opts.cfg, opts.ring, opts.ulysses

    def gid(c: int, r: int, u: int) -> int:
        return (c * R + r) * U + u

    c0, rest = divmod(rank, R * U)
    r0, u0 = divmod(rest, U)
    mine: dict[str, tuple[dist.ProcessGroup | None, tuple[int, ...]]] = {}
    # new_group is collective over the default group: every rank creates every group, in the same order.
    axes = {
        "cfg": [[gid(c, r, u) for c in range(C)] for r in range(R) for u in range(U)],
        "sp": [[gid(c, r, u) for r in range(R) for u in range(U)] for c in range(C)],
        "ring": [[gid(c, r, u) for r in range(R)] for c in range(C) for u in range(U)],
        "ulysses": [[gid(c, r, u) for u in range(U)] for c in range(C) for r in range(R)],
    }
    for axis, groups in axes.items():
        for ranks in groups:
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                mine[axis] = (group, tuple(ranks))
    return Grid(
        opts=opts,
        cfg_index=c0,
        ring_index=r0,
        ulysses_index=u0,
        cfg_group=mine["cfg"][0],
        sp_group=mine["sp"][0],
        ring_group=mine["ring"][0],
        ulysses_group=mine["ulysses"][0],
        ring_ranks=mine["ring"][1],
    )


# ---- distributed attention ------------------------------------------------------------------------------------


def _all_to_all(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Equal-split all-to-all along dim 0 (chunk p goes to rank p of the group); traceable by torch.compile."""
    import torch.distributed._functional_collectives as funcol

    out = funcol.all_to_all_single(x.contiguous(), None, None, group)
    return funcol.wait_tensor(out) if hasattr(funcol, "wait_tensor") else out


def _seq_to_heads(x: Tensor, group: dist.ProcessGroup, P: int) -> Tensor:
    """[n, B, H, L, d] (n stacked tensors, this rank's L tokens) -> [n, B, H/P, P*L, d] (head group = rank)."""
    n, B, H, L, d = x.shape
    if H % P:
        raise ValueError(
            f"Ulysses over {P} ranks needs the head count ({H}) divisible by {P}: use ring instead"
        )
    x = x.reshape(n, B, P, H // P, L, d).permute(2, 0, 1, 3, 4, 5)  # [P (head group), n, B, H/P, L, d]
    x = _all_to_all(x, group)  # [P (source rank = token part), n, B, H/P, L, d]
    return x.permute(1, 2, 3, 0, 4, 5).reshape(n, B, H // P, P * L, d)


def _heads_to_seq(x: Tensor, group: dist.ProcessGroup, P: int) -> Tensor:
    """[B, H/P, P*L, d] -> [B, H, L, d]: the inverse of `_seq_to_heads` for one tensor."""
    B, h, PL, d = x.shape
    x = x.reshape(B, h, P, PL // P, d).permute(2, 0, 1, 3, 4)  # [P (token part), B, H/P, L, d]
    x = _all_to_all(x, group)  # [P (head group), B, H/P, L, d]
    return x.permute(1, 0, 2, 3, 4).reshape(B, P * h, PL // P, d)


def attention_lse(q: Tensor, k: Tensor, v: Tensor, kernel: RingKernel = "auto") -> tuple[Tensor, Tensor]:
    """Unmasked attention that also returns the log-sum-exp of the scaled scores.

    q [B, H, Lq, d], k and v [B, H, Lk, d] -> (out [B, H, Lq, d] in q's dtype, lse [B, H, Lq] fp32). "auto":
    flash on CUDA in bf16 / fp16, memory-efficient on CUDA in fp32, the CPU flash kernel on CPU. "math" is the
    plain fp32 formula (the reference the fused kernels are tested against).
    """
    B, H, Lq, _ = q.shape
    if kernel == "auto":
        if q.device.type == "cuda":
            kernel = "flash" if q.dtype in (torch.bfloat16, torch.float16) else "efficient"
        else:
            kernel = "cpu" if q.device.type == "cpu" else "math"
    if kernel == "math":
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        lse = torch.logsumexp(s, dim=-1)
        return torch.matmul(torch.exp(s - lse[..., None]), v.float()).to(q.dtype), lse
    aten = torch.ops.aten
    if kernel == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    elif kernel == "flash":
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    elif kernel == "cudnn":
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    elif kernel == "efficient":
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    else:
        raise ValueError(f"unknown attention kernel {kernel!r}")
    # The memory-efficient kernel pads the lse to a multiple of 32 queries; cuDNN's may carry a trailing 1.
    return out, lse.reshape(B, H, -1)[..., :Lq].float()


def _merge(out: Tensor | None, lse: Tensor | None, o: Tensor, l: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions over disjoint key sets (fp32): softmax weights rescaled by exp(lse)."""
    if out is None:
        return o.float(), l
    new = torch.logaddexp(lse, l)
    return out * torch.exp(lse - new)[..., None] + o.float() * torch.exp(l - new)[..., None], new


@torch.compiler.disable  # point-to-point sends are not traceable: a compiled block runs this part eagerly
def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, ranks: tuple[int, ...], kernel: RingKernel
) -> Tensor:
    """Attention of this rank's queries over the keys of every rank of the ring: [B, H, Lq, d] -> same.

    K and V travel together as one [2, B, H, Lk, d] message to the next rank while this rank computes on the
    chunk it holds; after len(ranks) - 1 hops every chunk was seen once. Chunks must have equal shapes.
    """
    n, me = len(ranks), ranks.index(dist.get_rank())
    nxt, prv = ranks[(me + 1) % n], ranks[(me - 1) % n]
    kv = torch.stack([k, v]).contiguous()
    out = lse = None
    for hop in range(n):
        pending = []
        if hop < n - 1:
            incoming = torch.empty_like(kv)
            pending = dist.batch_isend_irecv(
                [dist.P2POp(dist.isend, kv, nxt, group), dist.P2POp(dist.irecv, incoming, prv, group)]
            )
        o, l = attention_lse(q, kv[0], kv[1], kernel)
        out, lse = _merge(out, lse, o, l)
        for request in pending:
            request.wait()
        if hop < n - 1:
            kv = incoming
    return out.to(q.dtype)


def distributed_attention(grid: Grid, inner: AttentionBackend) -> AttentionBackend:
    """The attention backend of a sequence-parallel rank: q/k/v hold this rank's tokens (all heads)."""
    U, R = grid.opts.ulysses, grid.opts.ring

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if U > 1:
            if q.shape == k.shape:  # one all-to-all for q, k and v
                q, k, v = _seq_to_heads(torch.stack([q, k, v]), grid.ulysses_group, U).unbind(0)
            else:  # the KV-cached path: more keys than queries
                q = _seq_to_heads(q[None], grid.ulysses_group, U)[0]
                k, v = _seq_to_heads(torch.stack([k, v]), grid.ulysses_group, U).unbind(0)
        if R > 1:
            out = ring_attention(q, k, v, grid.ring_group, grid.ring_ranks, grid.opts.ring_kernel)
        else:
            out = inner(q, k, v)
        return _heads_to_seq(out, grid.ulysses_group, U) if U > 1 else out

    attention.__name__ = f"sequence_parallel_u{U}_r{R}_{getattr(inner, '__name__', 'attention')}"
    return attention


# ---- the model wrapper ----------------------------------------------------------------------------------------


def _part(t: Tensor, dim: int, parts: int, index: int, what: str) -> Tensor:
    n = t.shape[dim]
    if n % parts:
        raise ValueError(
            f"{n} {what} do not split evenly over {parts} ranks: choose sizes whose token counts are multiples of "
            f"{parts} (image tokens = width/16 x height/16), or fewer sequence-parallel ranks"
        )
    return t.narrow(dim, index * (n // parts), n // parts)


def _gather(t: Tensor, dim: int, group: dist.ProcessGroup | None, parts: int) -> Tensor:
    """Concatenate the `parts` ranks' tensors along `dim` (in group rank order)."""
    if group is None:
        return t
    t = t.movedim(dim, 0).contiguous()
    out = t.new_empty((parts * t.shape[0], *t.shape[1:]))
    # all_gather_single is the newer name (torch >= 2.10) of all_gather_into_tensor
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)
    return out.movedim(0, dim)


class ParallelFlux2(nn.Module):
    """A `Flux2` run by all ranks of a grid together; call it like the model (see the module docstring)."""

    def __init__(self, model: Flux2, grid: Grid):
        super().__init__()
        self.model = model
        self.grid = grid
        self.cfg = model.cfg
        self._backends: dict[
            AttentionBackend, AttentionBackend
        ] = {}  # one per inner backend (compile guards)

    @contextlib.contextmanager
    def _attention(self) -> Iterator[None]:
        if self.grid.opts.sp == 1:
            yield
            return
        # The model's own kernel (set per model by accel.apply), else the process-wide fallback.
        inner = self.model.attention_backend or get_attention_backend()
        if inner not in self._backends:
            self._backends[inner] = distributed_attention(self.grid, inner)
        previous = self.model.set_attention_backend(self._backends[inner])
        try:
            yield
        finally:
            self.model.set_attention_backend(previous)

    def _batch(self, *tensors: Tensor | None) -> list[Tensor | None]:
        C = self.grid.opts.cfg
        if C == 1:
            return list(tensors)
        B = next(t for t in tensors if t is not None).shape[0]
        if B % C:
            raise ValueError(
                f"CFG parallelism splits each model call's batch in {C}: this call has batch {B} "
                "(is the model a true-CFG model? use cfg=1 otherwise)"
            )
        return [None if t is None else _part(t, 0, C, self.grid.cfg_index, "batch items") for t in tensors]

    def _tokens(self, t: Tensor, what: str) -> Tensor:
        return _part(t, 1, self.grid.opts.sp, self.grid.sp_index, what)

    def _collect(self, out: Tensor) -> Tensor:
        out = _gather(out, 1, self.grid.sp_group, self.grid.opts.sp)
        return _gather(out, 0, self.grid.cfg_group, self.grid.opts.cfg)

    def forward(self, x, x_ids, timesteps, ctx, ctx_ids, guidance=None) -> Tensor:
        x, x_ids, timesteps, ctx, ctx_ids, guidance = self._batch(x, x_ids, timesteps, ctx, ctx_ids, guidance)
        x, x_ids = self._tokens(x, "image tokens"), self._tokens(x_ids, "image tokens")
        ctx, ctx_ids = self._tokens(ctx, "text tokens"), self._tokens(ctx_ids, "text tokens")
        with self._attention():
            out = self.model(x, x_ids, timesteps, ctx, ctx_ids, guidance)
        return self._collect(out)

    def forward_kv_extract(
        self, x, x_ids, timesteps, ctx, ctx_ids, ref, ref_ids, guidance=None, ref_time: float = 0.0
    ) -> tuple[Tensor, KVCache]:
        """As `Flux2.forward_kv_extract`; the returned cache holds this rank's part (for `forward_kv_cached`)."""
        x, x_ids, timesteps, ctx, ctx_ids, ref, ref_ids, guidance = self._batch(
            x, x_ids, timesteps, ctx, ctx_ids, ref, ref_ids, guidance
        )
        x, x_ids = self._tokens(x, "image tokens"), self._tokens(x_ids, "image tokens")
        ctx, ctx_ids = self._tokens(ctx, "text tokens"), self._tokens(ctx_ids, "text tokens")
        ref, ref_ids = self._tokens(ref, "reference tokens"), self._tokens(ref_ids, "reference tokens")
        with self._attention():
            out, cache = self.model.forward_kv_extract(
                x, x_ids, timesteps, ctx, ctx_ids, ref, ref_ids, guidance, ref_time
            )
        return self._collect(out), cache

    def forward_kv_cached(self, x, x_ids, timesteps, ctx, ctx_ids, cache: KVCache, guidance=None) -> Tensor:
        x, x_ids, timesteps, ctx, ctx_ids, guidance = self._batch(x, x_ids, timesteps, ctx, ctx_ids, guidance)
        x, x_ids = self._tokens(x, "image tokens"), self._tokens(x_ids, "image tokens")
        ctx, ctx_ids = self._tokens(ctx, "text tokens"), self._tokens(ctx_ids, "text tokens")
        with self._attention():
            out = self.model.forward_kv_cached(x, x_ids, timesteps, ctx, ctx_ids, cache, guidance)
        return self._collect(out)


def apply_parallel(model: Flux2, opts: ParallelOptions) -> ParallelFlux2:
    """Wrap `model` (the same weights on every rank) for the grid `opts` over the default process group.

    Collective: every rank calls it. Apply the single-device features (`accel.apply`: attention kernel,
    compile, quantization) to `model` before or after; the wrapper's attention uses whatever backend is
    installed when it runs.
    """
    if opts.ulysses > 1 and model.cfg.num_heads % opts.ulysses:
        raise ValueError(
            f"Ulysses over {opts.ulysses} ranks needs the head count ({model.cfg.num_heads}) divisible by it; "
            "use ring for the rest"
        )
    return ParallelFlux2(model, make_grid(opts))
