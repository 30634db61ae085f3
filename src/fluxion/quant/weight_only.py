"""Weight-only int8 / int4 Linear layers: a memory format, not a speed-up.

Hopper has no int4 tensor-core path and bf16 GEMMs are compute-bound at FLUX.2 shapes, so these layers
dequantize to the activation dtype and run the ordinary bf16 matmul (perf-anchors.md 4.3: weight-only saves
memory, never time). What they buy is size: int8 halves the weights (dev: 64.4 -> 32.2 GB), int4 with group
size 128 quarters them (+ 3 % for scales and offsets), which is what lets dev stream from host memory or fit a
24 GB card together with block offload (accel/offload.py).

    int8: symmetric, one scale per output channel:      W ≈ q · s,        q in [-127, 127]
    int4: asymmetric, one (scale, min) per group of G   W ≈ q · s + m,    q in [0, 15], G inputs per group
          input columns; two codes packed per byte (low nibble = even column).

int8 codes are exact in bf16, so the int8 layer computes (x @ qᵀ) · s: the cast is exact and the per-channel
scale is applied to the output, a [N] multiply instead of a [N, K] one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

FilterFn = Callable[[str, nn.Linear], bool]


@torch.no_grad()
def int8_per_row(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest int8 with one scale per output row: (codes int8 [N, K], scale fp32 [N]), the
    row's absolute maximum mapped to 127 (an all-zero row gets a tiny scale and zero codes)."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8WeightOnlyLinear(nn.Module):
    """Buffers: `weight` [out, in] int8, `weight_scale` [out] fp32 (one scale per output channel), or, with
    `group_size` G, [out, in / G] fp32: one scale per G consecutive inputs of a row. The grouped form holds
    prequantized weights as stored (GGUF Q8_0: G = 32, fp16 scales widened exactly to fp32)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device=None,
        group_size: int | None = None,
    ):
        super().__init__()
        if group_size is not None and in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        scale_shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        out.weight, out.weight_scale = int8_per_row(linear.weight)
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """codes * scales in fp32, rounded once to `dtype`."""
        if self.group_size is None:
            return (self.weight.float() * self.weight_scale[:, None]).to(dtype)
        N, K, G = self.out_features, self.in_features, self.group_size
        return (self.weight.float().view(N, K // G, G) * self.weight_scale[..., None]).view(N, K).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.group_size is None:
            y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        else:
            # Scales vary along the reduction axis: rebuild the weight (same numbers as dequantizing on load).
            y = F.linear(x, self.dequantized_weight(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 {kind}"


class Int4WeightOnlyLinear(nn.Module):
    """Buffers: `weight` [out, in / 2] uint8 (packed codes), `weight_scale` and `weight_min` [out, in / G] fp32."""

    def __init__(
        self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False, device=None
    ):
        super().__init__()
        if in_features % group_size or group_size % 2:
            raise ValueError(
                f"in_features {in_features} must be a multiple of an even group_size {group_size}"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer(
            "weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.ones(out_features, groups, dtype=torch.float32, device=device)
        )
        self.register_buffer(
            "weight_min", torch.zeros(out_features, groups, dtype=torch.float32, device=device)
        )
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, group_size: int = 128) -> Int4WeightOnlyLinear:
        N, K = linear.weight.shape
        out = cls(K, N, group_size, bias=linear.bias is not None, device="meta")
        w = linear.weight.float().view(N, K // group_size, group_size)
        w_min, w_max = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((w_max - w_min) / 15.0).clamp(min=1e-12)
        q = torch.round((w - w_min[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(N, K)
        out.weight = q[:, 0::2] | (q[:, 1::2] << 4)
        out.weight_scale, out.weight_min = scale, w_min
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return out

    def codes(self) -> Tensor:
        """Unpacked codes [out, in] uint8 in [0, 15]."""
        low, high = self.weight & 0xF, self.weight >> 4
        return torch.stack([low, high], dim=-1).view(self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        N, G = self.out_features, self.group_size
        q = self.codes().view(N, -1, G).to(dtype)
        return (q * self.weight_scale[..., None].to(dtype) + self.weight_min[..., None].to(dtype)).view(N, -1)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.dequantized_weight(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 group_size={self.group_size}"
        )


def default_weight_only_filter(fqn: str, linear: nn.Linear) -> bool:
    """Every Linear except the timestep / guidance embedders.

    Weight-only quantization changes no activation, so modulation and the other embedders are fine quantized.
    The time embedders stay as they are because `Flux2.embed_time` takes the compute dtype from
    `time_in.in_layer.weight` (an int8 weight there would turn the sinusoid into integers); they hold < 0.3 % of
    the parameters.
    """
    return not fqn.startswith(("time_in.", "guidance_in."))


def quantize_weight_only(
    model: nn.Module, dtype: str = "int8", filter_fn: FilterFn | None = None, group_size: int = 128
) -> list[str]:
    """Swap matching `nn.Linear` layers for int8 or int4 weight-only layers in place; returns their FQNs.

    int4 layers whose input width is not a multiple of `group_size` are left in their original dtype.
    """
    if dtype not in ("int8", "int4"):
        raise ValueError(f"weight-only dtype must be 'int8' or 'int4', got {dtype!r}")
    filter_fn = filter_fn or default_weight_only_filter
    # Names only, so each float weight is freed as soon as its quantized copy exists.
    names = [fqn for fqn, m in model.named_modules() if type(m) is nn.Linear and filter_fn(fqn, m)]
    done = []
    if "" in names:
        raise ValueError("pass the module that contains the Linear layer, not the layer itself")
    for fqn in names:
        linear = model.get_submodule(fqn)
        if dtype == "int8":
            new: nn.Module = Int8WeightOnlyLinear.from_float(linear)
        elif linear.in_features % group_size == 0:
            new = Int4WeightOnlyLinear.from_float(linear, group_size)
        else:
            continue
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        del linear
        done.append(fqn)
    return done
