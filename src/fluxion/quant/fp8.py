"""Dynamic fp8 (e4m3) rowwise quantization of Linear layers: the only low-bit format Hopper runs faster.

    weight  W [N, K]  -> Wq (e4m3) and one fp32 scale per output row,   W ≈ Wq · s_w   (once, at conversion)
    input   x [M, K]  -> xq (e4m3) and one fp32 scale per token row,    x ≈ xq · s_x   (every call)
    y = x Wᵀ ≈ (xq Wqᵀ) · s_x · s_wᵀ        computed by `torch._scaled_mm` with rowwise scales, bf16 out

Rowwise (per token, per output channel) scales keep an outlier token or channel from flattening the rest, which
a single per-tensor scale would do. The activation quantization (amax, divide, cast) is three memory-bound passes
in eager mode; under `torch.compile` they fuse into one, which is why fp8 is meant to be combined with compile
(accel/apply.py) — the matmul itself runs at ~1.7x bf16 at FLUX.2 shapes (perf-anchors.md 1b).

`Float8Linear.forward` takes the `_scaled_mm` path on CUDA (needs sm_89+: Ada or Hopper) and the dequantized
reference path elsewhere; the reference computes the same function up to matmul rounding, and is what the CPU
tests bound against bf16. Lossy: measure against bf16 (velocity cosine, max relative error) before use.

Prequantized checkpoints (ComfyUI fp8mixed / scaled fp8, BFL's fp8 releases) load straight into Float8Linear
(weights/load.py): the file's e4m3 codes are kept bit for bit and its per-tensor scale becomes a row scale
repeated N times (the same numbers, so exact); nothing is upcast or requantized.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448.0
_MIN_AMAX = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero

FilterFn = Callable[[str, nn.Linear], bool]


def quantize_rowwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (xq [M, K] e4m3, scale [M, 1] fp32) with x ≈ xq.float() * scale (per-row amax scaling)."""
    x_f = x.float()
    scale = x_f.abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_AMAX) / E4M3_MAX
    xq = (x_f / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return xq, scale


def dequantize_rowwise(xq: Tensor, scale: Tensor) -> Tensor:
    return xq.float() * scale


class Float8Linear(nn.Module):
    """A bias-optional Linear whose weight is stored in e4m3 with one scale per output row.

    Buffers: `weight` [out, in] float8_e4m3fn, `weight_scale` [out, 1] fp32 (state-dict keys `<name>.weight` and
    `<name>.weight_scale`). Inference only: no gradients flow into the quantized weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=E4M3, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        # cuBLASLt's fast accumulation: faster, slightly less exact (each partial sum rounds in fp8-matmul
        # precision less often). Measured fine for inference at FLUX.2 shapes (docs/BENCHMARKS.md).
        self.fast_accum = True

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear) -> Float8Linear:
        """Quantize `linear`'s weight once, per output row, on the weight's own device."""
        w = linear.weight
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        wq, scale = quantize_rowwise(w)
        out.weight, out.weight_scale = wq, scale
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return out

    def dequantized_weight(self) -> Tensor:
        """The fp32 weight this layer actually applies (reference path, tests)."""
        return dequantize_rowwise(self.weight, self.weight_scale)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.is_cuda:
            xq, x_scale = quantize_rowwise(x2)
            # b must be column-major: weight [N, K] row-major, transposed, is exactly that (no copy).
            y = torch._scaled_mm(
                xq,
                self.weight.t(),
                scale_a=x_scale,
                scale_b=self.weight_scale.t(),
                out_dtype=x.dtype,
                use_fast_accum=self.fast_accum,
            )
        else:
            y = self.reference_forward(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def reference_forward(self, x2: Tensor) -> Tensor:
        """The same quantize -> matmul -> rescale computation in fp32 with dequantized operands: [M, K] -> [M, N]."""
        xq, x_scale = quantize_rowwise(x2)
        return F.linear(dequantize_rowwise(xq, x_scale), self.dequantized_weight()).to(x2.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rowwise"


def default_fp8_filter(fqn: str, linear: nn.Linear) -> bool:
    """Linear layers of the double and single blocks only (>= 98 % of the FLOPs).

    Embedders, the shared modulation and the final layer stay bf16: they are GEMVs (M = batch) or tiny, so fp8
    buys nothing there, and the output projection feeds the velocity directly.
    """
    return fqn.startswith(("double_blocks.", "single_blocks.")) and _fp8_shape_ok(linear)


def _fp8_shape_ok(linear: nn.Linear) -> bool:
    # cuBLASLt fp8 needs K and N divisible by 16.
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def convert_linears(model: nn.Module, filter_fn: FilterFn | None = None) -> list[str]:
    """Swap every `nn.Linear` for which `filter_fn(fqn, linear)` is true for a `Float8Linear`, in place.

    Converting layer by layer frees each bf16 weight as soon as its fp8 copy exists, so peak memory grows by one
    layer, not by the model. Returns the converted FQNs (model order).
    """
    filter_fn = filter_fn or default_fp8_filter
    # Names only: holding the old modules in a list would keep every bf16 weight alive until the end.
    names = [
        fqn
        for fqn, m in model.named_modules()
        if type(m) is nn.Linear and filter_fn(fqn, m)  # exact type: LoRA / already-quantized layers stay
    ]
    if "" in names:
        raise ValueError("pass the module that contains the Linear layer, not the layer itself")
    for fqn in names:
        linear = model.get_submodule(fqn)
        if not _fp8_shape_ok(linear):
            raise ValueError(f"{fqn}: fp8 needs in/out features divisible by 16, got {linear.weight.shape}")
        if linear.weight.is_cuda and torch.cuda.get_device_capability(linear.weight.device) < (8, 9):
            raise ValueError("fp8 matmuls need an sm_89+ GPU (Ada or Hopper)")
        _set_submodule(model, fqn, Float8Linear.from_float(linear))
        del linear
    return names


def _set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
