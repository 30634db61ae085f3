"""The opt-in performance layer: `apply(model, AccelOptions(...))` (house style P7, dependency rule 3).

The model file knows nothing of what happens here. Every feature has its own switch, and features are applied
in this order (each later step must see what the earlier ones produced):

    1. quantization   fp8 (dynamic e4m3 rowwise, block Linears) or weight-only int8 / int4 (all Linears).
                      Module swaps come first so compile traces, and offload packs, the final modules.
    2. attention      the model's own backend (`Flux2.set_attention_backend`): SDPA's own choice, or SDPA
                      forced to flash / cuDNN / memory-efficient, or FlashAttention-3 (custom op); "auto"
                      picks per device (`resolve_attention`).
    3. compile        regional: each double / single block gets `block.compile()` (one graph per block type,
                      shared by all blocks of that type); embedders and modulation stay eager (< 1 % of time).
    4. offload        block streaming from pinned host memory (accel/offload.py); outside the compiled blocks.
    5. cuda_graphs    whole-forward capture (accel/cuda_graphs.py) around everything above; last by construction.

Lossless (same function up to kernel rounding): attention backends, compile, offload, CUDA graphs. Lossy: fp8,
int8, int4 (measure against bf16: docs/BENCHMARKS.md). The attention backend belongs to the model (two models in
one process may differ); `apply` returns the model's previous one in `Accelerated.previous_attention`.
`AccelOptions.validate(device)` rejects combinations that cannot run on a device before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fluxion.accel.cuda_graphs import CUDAGraphed
from fluxion.accel.offload import BlockOffload, offload_blocks
from fluxion.model.attention import AttentionBackend
from fluxion.quant.fp8 import convert_linears
from fluxion.quant.weight_only import quantize_weight_only

AttentionName = Literal["auto", "sdpa", "flash", "cudnn", "efficient", "math", "fa3"]
_SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


@dataclass(frozen=True, kw_only=True)
class AccelOptions:
    """What to turn on. The defaults are the reference path (plain SDPA, eager, bf16, resident)."""

    attention: AttentionName = "sdpa"  # "sdpa" = SDPA picks (flash on Hopper); cuDNN is ~2x flash on H100;
    # "auto": FA3 if installed, else cuDNN on Hopper or newer, else SDPA's own pick (resolve_attention)
    compile: bool = False  # regional: `block.compile()` per double / single block
    compile_mode: str | None = None  # torch.compile mode for the blocks, e.g. "max-autotune-no-cudagraphs"
    compile_dynamic: bool | None = False  # False: one static graph per shape (no symbolic-shape kernels)
    compile_backend: str = "inductor"  # "eager" / "aot_eager" only trace (debugging, fast tests)
    cuda_graphs: bool = False  # capture the whole forward per input shape; inference only, CUDA only
    fp8: bool = False  # dynamic e4m3 rowwise Linear layers in the blocks (quant/fp8.py)
    fp8_filter: Callable[[str, nn.Linear], bool] | None = None  # None: quant.fp8.default_fp8_filter
    weight_only: Literal["int8", "int4"] | None = None  # weight-only quantization of every Linear
    int4_group_size: int = 128
    offload: Literal["blocks"] | None = None  # stream double/single blocks from pinned host memory
    offload_resident_gb: float = 0.0  # GB (1e9 bytes) of block weights allowed to stay on the device
    offload_slots: int = 2  # device buffers the streamed blocks rotate through
    device: str = "cuda"  # where offloaded blocks are streamed to

    def __post_init__(self) -> None:
        if self.attention not in (*_SDPA_KERNELS, "sdpa", "fa3", "auto"):
            raise ValueError(
                f"unknown attention backend {self.attention!r}; choose one of auto, sdpa, "
                f"{', '.join(_SDPA_KERNELS)}, fa3"
            )
        if self.fp8 and self.weight_only:
            raise ValueError(f"choose one of fp8 and {self.weight_only} quantization, not both")
        if self.weight_only not in (None, "int8", "int4"):
            raise ValueError(f"weight_only must be None, 'int8' or 'int4', got {self.weight_only!r}")
        if self.offload not in (None, "blocks"):
            raise ValueError(f"offload must be None or 'blocks', got {self.offload!r}")
        if self.cuda_graphs and self.offload:
            raise ValueError("CUDA graphs need resident weights: turn off offload or cuda_graphs")

    def validate(self, device: str | torch.device) -> None:
        """Raise a one-line ValueError if these options cannot run on `device`; loads nothing (call it first)."""
        device = torch.device(device)
        if device.type != "cuda":
            on = f"on a {device.type} device"
            if self.fp8:
                raise ValueError(f"fp8 needs a CUDA GPU (compute capability 8.9+); drop --fp8 {on}")
            if self.cuda_graphs:
                raise ValueError(f"CUDA graphs need a CUDA GPU; drop --cuda-graphs {on}")
            if self.compile and self.compile_backend == "inductor":
                raise ValueError(f"compiled blocks are for CUDA GPUs; drop --compile {on}")
            if self.offload:
                raise ValueError(f"block offload streams weights to a GPU; drop --offload blocks {on}")
            if self.attention not in ("auto", "sdpa", "math"):
                raise ValueError(f"attention {self.attention!r} needs a CUDA GPU; use --attention sdpa {on}")
        elif not torch.cuda.is_available():
            raise ValueError("no CUDA device is available; pass --device cpu")
        elif self.fp8 and torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError(
                "fp8 needs compute capability 8.9+ (Ada, Hopper or newer); drop --fp8 on this GPU"
            )
        if self.attention == "fa3":
            from fluxion.kernels.flash import fa3_available

            if not fa3_available():
                raise ValueError(
                    "attention 'fa3' needs FlashAttention-3 (flash_attn_interface) and a Hopper GPU; "
                    "use --attention cudnn or auto"
                )


@dataclass
class Accelerated:
    """What `apply` did. Call `.module(...)` (or this object) like the model's forward."""

    module: nn.Module  # the model, or its CUDAGraphed wrapper
    quantized: list[str] = field(default_factory=list)  # FQNs of swapped Linear layers
    compiled: int = 0  # number of compiled blocks
    offload: BlockOffload | None = None
    previous_attention: AttentionBackend | None = None

    def __call__(self, *args) -> Tensor:
        return self.module(*args)


def sdpa_backend(kernel: SDPBackend) -> AttentionBackend:
    """An attention backend that runs SDPA with only `kernel` allowed (fails loudly if it cannot run)."""

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q, k, v)

    attention.__name__ = f"sdpa_{kernel.name.lower()}"
    return attention


def resolve_attention(name: AttentionName, device: str | torch.device = "cuda") -> AttentionName:
    """ "auto" -> a concrete backend for `device`: FA3 if installed, else cuDNN on Hopper or newer (~2x SDPA's
    flash pick on H100, docs/BENCHMARKS.md), else SDPA's own pick. Other names pass through."""
    if name != "auto":
        return name
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "sdpa"
    from fluxion.kernels.flash import fa3_available

    if fa3_available():
        return "fa3"
    return "cudnn" if torch.cuda.get_device_capability(device) >= (9, 0) else "sdpa"


def attention_backend(name: AttentionName, device: str | torch.device = "cuda") -> AttentionBackend | None:
    """The backend function for `name`; None means plain SDPA (the model's default)."""
    name = resolve_attention(name, device)
    if name == "sdpa":
        return None
    if name == "fa3":
        from fluxion.kernels.flash import fa3_attention, fa3_available

        if not fa3_available():
            raise ValueError("attention='fa3' needs FlashAttention-3 (flash_attn_interface) and a Hopper GPU")
        return fa3_attention
    return sdpa_backend(_SDPA_KERNELS[name])


def compile_blocks(
    model: nn.Module, mode: str | None = None, dynamic: bool | None = False, backend: str = "inductor"
) -> int:
    """Regional compile: `torch.compile` each double / single block in place (names and state dict unchanged)."""
    blocks = [*model.double_blocks._modules.values(), *model.single_blocks._modules.values()]
    for block in blocks:
        block.compile(mode=mode, dynamic=dynamic, backend=backend)
    return len(blocks)


def apply(model: nn.Module, opts: AccelOptions) -> Accelerated:
    """Turn on the features of `opts` on `model` (in place) in the order of the module docstring."""
    result = Accelerated(module=model)
    backend = attention_backend(
        opts.attention, opts.device
    )  # first: an unavailable kernel fails before any swap
    # 1. quantization
    if opts.fp8:
        result.quantized = convert_linears(model, opts.fp8_filter)
    elif opts.weight_only:
        result.quantized = quantize_weight_only(model, opts.weight_only, group_size=opts.int4_group_size)
    # 2. attention (this model's own)
    result.previous_attention = model.set_attention_backend(backend)
    # 3. compile
    if opts.compile:
        result.compiled = compile_blocks(model, opts.compile_mode, opts.compile_dynamic, opts.compile_backend)
    # 4. offload
    if opts.offload == "blocks":
        result.offload = offload_blocks(
            model, opts.device, int(opts.offload_resident_gb * 1e9), num_slots=opts.offload_slots
        )
    # 5. CUDA graphs
    if opts.cuda_graphs:
        if not torch.cuda.is_available():
            raise ValueError("cuda_graphs=True needs a CUDA device")
        result.module = GraphedFlux2(model)
    return result


class GraphedFlux2(CUDAGraphed):
    """CUDA graphs for the plain forward; the KV extract / cached forwards (whose cache object changes per
    image) run eagerly on the wrapped model."""

    def forward_kv_extract(self, *args, **kwargs):
        return self.module.forward_kv_extract(*args, **kwargs)

    def forward_kv_cached(self, *args, **kwargs):
        return self.module.forward_kv_cached(*args, **kwargs)


@dataclass(frozen=True, kw_only=True)
class VAEAccelOptions:
    """Opt-in speed for the autoencoder (perf-anchors 4.8). Defaults are the plain path.

    Compile fuses each GroupNorm with the SiLU after it (eager runs them as separate passes over full-resolution
    activations: at 1024² the decoder's last stage holds 128 x 1024 x 1024 values per tensor); the convolutions
    stay cuDNN calls. Lossless up to kernel rounding.
    """

    compile: bool = False  # `torch.compile` of encoder and decoder, in place (state dict unchanged)
    compile_mode: str | None = None
    compile_dynamic: bool | None = None  # None: a second image size compiles one size-generic graph
    compile_backend: str = "inductor"
    channels_last: bool = False  # NHWC weights and activations (cuDNN's native conv layout)


def apply_vae(vae: nn.Module, opts: VAEAccelOptions) -> nn.Module:
    """Turn on the features of `opts` on an `AutoEncoder` in place; returns it."""
    if opts.channels_last:
        vae.to(memory_format=torch.channels_last)
    if opts.compile:
        for part in (vae.encoder, vae.decoder):
            part.compile(mode=opts.compile_mode, dynamic=opts.compile_dynamic, backend=opts.compile_backend)
    return vae
