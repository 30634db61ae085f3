"""RoPE tables, their application, and `attention()`: the only attention call site in fluxion.

Every attention in the transformer goes through `attention()`. It runs plain SDPA unless the calling model carries
a faster backend (`Flux2.set_attention_backend`, done from outside by `accel.apply`: this module never picks one).
The backend belongs to the model, so two models in one process (a server) can run different kernels.
`set_attention_backend` below is only the process-wide fallback for models that carry none (benchmarks use it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# A backend takes q, k, v as [B, H, L, d_h] and returns [B, H, L_q, d_h], like SDPA without mask or dropout.
AttentionBackend = Callable[[Tensor, Tensor, Tensor], Tensor]


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


_backend: AttentionBackend = _sdpa


def set_attention_backend(fn: AttentionBackend | None) -> AttentionBackend:
    """Install `fn` as the fallback kernel of models without their own backend (None restores SDPA). Returns
    the previous fallback. Prefer the per-model `Flux2.set_attention_backend`."""
    global _backend
    previous = _backend
    _backend = _sdpa if fn is None else fn
    return previous


def get_attention_backend() -> AttentionBackend:
    return _backend


def attention(q: Tensor, k: Tensor, v: Tensor, backend: AttentionBackend | None = None) -> Tensor:
    """Non-causal, unmasked attention with scale 1/sqrt(d_h) (spec 2.12), run by `backend` (the model's own;
    None: the process fallback, plain SDPA unless changed).

    q: [B, H, L_q, d_h], k and v: [B, H, L_k, d_h] -> [B, L_q, H * d_h] (heads concatenated, head-major).
    """
    out = (backend or _backend)(q, k, v)
    return out.transpose(1, 2).flatten(2)


def rope(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """RoPE table for 4-axis position ids (spec 2.11), as unit complex numbers e^{i angle}.

    ids: [B, N, n_axes] integer positions (T, H, W, L). Returns complex64 [B, 1, N, d_h / 2]: entry i of axis a's
    block has angle pos_a * theta^(-2i / axis_width). The head dims are split into contiguous per-axis chunks, and
    inside a chunk the pairs (2i, 2i+1) rotate together, i.e. each pair is one complex number.
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids have {ids.shape[-1]} axes, the model expects {len(axes_dim)}")
    angles = []
    for axis, width in enumerate(axes_dim):
        # fp32 on purpose: the BFL reference computes omega and the angles in fp32 (spec 10).
        exponent = torch.arange(0, width, 2, dtype=torch.float32, device=ids.device) / width
        omega = 1.0 / (theta**exponent)  # [width / 2]
        angles.append(ids[..., axis].to(torch.float32)[..., None] * omega)  # [B, N, width / 2]
    angle = torch.cat(angles, dim=-1).unsqueeze(1)  # [B, 1, N, d_h / 2]
    return torch.polar(torch.ones_like(angle), angle)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate interleaved pairs of x [B, H, N, d_h] by the table pe, in fp32; returns x's dtype.

    (x0 + i x1) * (cos + i sin) = (x0 cos - x1 sin) + i (x0 sin + x1 cos): the reference's rotation. One
    complex multiply instead of a stack of elementwise ops (also what keeps torch.compile's backward sane)."""
    if torch.compiler.is_compiling() and not torch.is_grad_enabled():
        # Inductor generates no code for complex ops: the multiply below would run as separate eager kernels
        # inside a compiled block (1.7 ms of a klein-4B step, 7.3 ms of dev, H200). The same products written
        # out in real arithmetic fuse into the QK-norm kernel. Inference only: the training backward keeps the
        # complex form, the one measured to compile (the real form's backward once crashed inductor).
        cos_sin = torch.view_as_real(pe)  # [B, 1, N, d_h / 2, 2]
        c, s = cos_sin[..., 0], cos_sin[..., 1]
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).type_as(x)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # [B, H, N, d_h / 2]
    return torch.view_as_real(pairs * pe).flatten(-2).type_as(x)


def cat_pe(*tables: Tensor) -> Tensor:
    """Concatenate RoPE tables along the sequence axis (e.g. text first, then image)."""
    return torch.cat(tables, dim=2)
