"""Shared pieces of the benchmark scripts: random-weight builders (ours and diffusers sharing storage), CUDA-event
timing, the FLOP model of perf-anchors.md section 2, and an append-as-you-go JSON report.

Benchmarks are scripts, never timed tests. Every figure is one transformer forward (or one training step) at the
stated shapes; see docs/BENCHMARKS.md for the method.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch
from torch import nn

from fluxion.config import TransformerConfig
from fluxion.model.transformer import Flux2
from fluxion.sampling.ids import image_ids, text_ids

H100_PEAK_BF16 = 989.4  # TFLOP/s, dense (datasheet)
H100_MEASURED_BF16 = 777.0  # TFLOP/s, 8192^3 bf16 matmul on our H100 (perf-anchors.md 1)
TXT_TOKENS = 512


# ---- FLOP model (perf-anchors.md 2) -------------------------------------------------------------------------


def forward_flops(cfg: TransformerConfig, n_img: int, n_txt: int = TXT_TOKENS, batch: int = 1) -> float:
    """Dense GEMMs (13·D² MACs per token per block) + joint attention (4·N²·D per block); glue ignored."""
    blocks = cfg.num_double_blocks + cfg.num_single_blocks
    n = n_img + n_txt
    D = cfg.hidden_size
    return batch * (2 * blocks * 13 * D * D * n + 4 * n * n * D * blocks)


# ---- building models with random weights ------------------------------------------------------------------


def _seed(base: int, name: str) -> int:
    return (base * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def init_random_(module: nn.Module, prefix: str = "", seed: int = 0) -> None:
    """Deterministic random weights keyed by parameter name, independent of how the model was built.

    Matrices ~ N(0, 1/fan_in) (keeps activations O(1), so the fp8 / int8 accuracy figures mean something),
    vectors (QK-norm gains) = 1. Same compute as real weights.
    """
    for name, p in module.named_parameters(prefix=prefix.rstrip(".")):
        if p.ndim == 1:
            p.fill_(1.0)
            continue
        g = torch.Generator(device=p.device).manual_seed(_seed(seed, name))
        p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
    for _, b in module.named_buffers():
        if b.is_floating_point():
            b.zero_()


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_ours(cfg: TransformerConfig, device="cuda", dtype=torch.bfloat16, seed: int = 0) -> Flux2:
    """Flux2 built on meta, materialised directly in `dtype` on `device` (no fp32 copy), random weights."""
    with default_dtype(dtype), torch.device("meta"):
        model = Flux2(cfg)
    model.to_empty(device=device)
    init_random_(model, seed=seed)
    return model.eval().requires_grad_(False)


def build_ours_quantized(cfg: TransformerConfig, kind: str, device="cuda", seed: int = 0) -> Flux2:
    """The same random model (same names, same seeds), weight-only quantized block by block, so that the bf16
    model never has to exist in full on the device (dev: 64.4 GB bf16 -> 32.2 GB int8)."""
    from fluxion.quant.weight_only import quantize_weight_only

    with default_dtype(torch.bfloat16), torch.device("meta"):
        model = Flux2(cfg)
    from fluxion.quant.weight_only import default_weight_only_filter

    block_lists = ("double_blocks", "single_blocks")
    for name, child in model.named_children():
        if name not in block_lists:
            child.to_empty(device=device)
            init_random_(child, prefix=name + ".", seed=seed)
    quantize_weight_only(  # everything outside the blocks (same filter as a whole-model call)
        model,
        kind,
        filter_fn=lambda fqn, m: not fqn.startswith(block_lists) and default_weight_only_filter(fqn, m),
    )
    for name in block_lists:
        for i, block in enumerate(getattr(model, name)):  # one bf16 block on the device at a time
            block.to_empty(device=device)
            init_random_(block, prefix=f"{name}.{i}.", seed=seed)
            quantize_weight_only(block, kind)  # frees this block's bf16 weights
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return model.eval().requires_grad_(False)


def diffusers_kwargs(cfg: TransformerConfig) -> dict:
    from fluxion.weights.load import diffusers_transformer_config

    return {k: v for k, v in diffusers_transformer_config(cfg).items() if not k.startswith("_")}


def build_diffusers_sharing(ours: Flux2):
    """diffusers' Flux2Transformer2DModel holding the *same storage* as `ours` (q/k/v are chunks of our fused
    qkv; only the final layer's swapped halves are copied), so both fit on one card even for dev."""
    from diffusers import Flux2Transformer2DModel

    from fluxion.weights.mapping import bfl_to_diffusers

    with torch.device("meta"):
        dm = Flux2Transformer2DModel(**diffusers_kwargs(ours.cfg))
    dm.load_state_dict(bfl_to_diffusers(ours.state_dict()), strict=True, assign=True)
    return dm.eval().requires_grad_(False)


def make_inputs(
    cfg: TransformerConfig, size: int, batch: int = 1, device="cuda", dtype=torch.bfloat16, seed=0
):
    """(x, x_ids, t, ctx, ctx_ids, guidance) for a size x size image: (size/16)² image tokens + 512 text tokens."""
    side = size // 16
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, side * side, cfg.in_channels, device=device, dtype=dtype, generator=g)
    ctx = torch.randn(batch, TXT_TOKENS, cfg.context_in_dim, device=device, dtype=dtype, generator=g)
    t = torch.full((batch,), 0.75, device=device, dtype=dtype)
    guidance = torch.full((batch,), 4.0, device=device, dtype=dtype) if cfg.use_guidance_embed else None
    return (
        x,
        image_ids(side, side, batch=batch, device=device),
        t,
        ctx,
        text_ids(TXT_TOKENS, batch=batch, device=device),
        guidance,
    )


def diffusers_call(dm, args):
    x, x_ids, t, ctx, ctx_ids, guidance = args
    return dm(
        hidden_states=x,
        encoder_hidden_states=ctx,
        timestep=t,
        img_ids=x_ids,
        txt_ids=ctx_ids,
        guidance=guidance,
        return_dict=False,
    )[0]


def uncompile(model: Flux2) -> None:
    """Drop the per-block compiled wrappers set by `block.compile()` (back to eager)."""
    for block in [*model.double_blocks._modules.values(), *model.single_blocks._modules.values()]:
        block._compiled_call_impl = None


# ---- timing -----------------------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_cuda(fn, warmup: int = 2, iters: int = 5) -> dict:
    """Warm-up calls (timed on the host, compile included), then `iters` calls timed with CUDA events
    (host clock on a CPU-only smoke run). Peak memory is `max_memory_allocated` after a reset that follows
    the warm-up."""
    cuda = torch.cuda.is_available()
    _sync()
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync()
    warm_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return dict(
        ms=statistics.median(times),
        ms_min=min(times),
        ms_max=max(times),
        warmup_s=round(warm_s, 2),
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
    )


def accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Velocity cosine and relative errors of `out` against the bf16 reference `ref`."""
    o, r = out.float().flatten(), ref.float().flatten()
    return dict(
        cosine=torch.nn.functional.cosine_similarity(o, r, dim=0).item(),
        max_rel_err=((o - r).abs().max() / r.abs().max()).item(),
        rel_l2_err=((o - r).norm() / r.norm()).item(),
    )


# ---- profile ------------------------------------------------------------------------------------------------


_GEMM = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "f8f8", "scaled_mm", "wgmma")
_ATTN = ("flash", "fmha", "sdpa", "attention", "attn")


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in _ATTN):
        return "attention"
    if any(k in n for k in _GEMM):
        return "gemm"
    if n.startswith("triton"):
        return "triton (fused glue)"
    return "other"


def kernel_breakdown(fn, cuda: bool) -> dict:
    """Device time of one call of `fn`, summed by kernel class, plus the 15 costliest kernels (ms)."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    fn()  # warm (already compiled / captured by the caller)
    with profile(activities=[activity]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    by_class: dict[str, float] = collections.defaultdict(float)
    kernels = []
    for e in prof.key_averages():
        if cuda and getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue  # CPU-side ops: their device time is the kernels below, counted once there
        if cuda:
            us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        else:  # smoke run: CPU self time of each op (checks the script, measures nothing)
            us = e.self_cpu_time_total
        if us <= 0:
            continue
        by_class[kernel_class(e.key)] += us / 1e3
        kernels.append((us / 1e3, e.count, e.key[:120]))
    kernels.sort(reverse=True)
    return dict(
        total_ms=round(sum(by_class.values()), 3),
        by_class_ms={k: round(v, 3) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        top=[dict(ms=round(ms, 3), calls=c, name=n) for ms, c, n in kernels[:15]],
    )


# ---- report -----------------------------------------------------------------------------------------------


def environment() -> dict:
    env = dict(
        date=time.strftime("%Y-%m-%d"),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
    )
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
        env["cudnn"] = torch.backends.cudnn.version()
    with contextlib.suppress(ImportError):
        import diffusers

        env["diffusers"] = diffusers.__version__
    return env


class Report:
    """Rows appended one at a time and the JSON rewritten after each, so a timeout loses at most one row."""

    def __init__(self, path: str | Path, budget_s: float):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.data = dict(env=environment(), rows=[], skipped=[], errors=[])
        self.write()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def has_time(self, need_s: float) -> bool:
        return self.elapsed() + need_s <= self.budget_s

    def add(self, **row) -> dict:
        row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        self.data["rows"].append(row)
        self.write()
        print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        return row

    def skip(self, what: str, why: str = "time budget") -> None:
        self.data["skipped"].append(dict(item=what, why=why))
        self.write()
        print(f"SKIP {what}: {why}", flush=True)

    def error(self, what: str, exc: BaseException) -> None:
        self.data["errors"].append(dict(item=what, error=repr(exc)[:500], tb=traceback.format_exc()[-3000:]))
        self.write()
        print(f"ERROR {what}: {exc!r}", file=sys.stderr, flush=True)

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


def out_dir() -> Path:
    return Path(os.environ.get("OUT", "bench_out"))


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def perf_fields(flops: float, timing: dict) -> dict:
    tf = tflops(flops, timing["ms"])
    return dict(tflops=tf, mfu=tf / H100_PEAK_BF16, of_measured=tf / H100_MEASURED_BF16, **timing)


def set_dynamo_limits() -> None:
    """Regional compile shares one code object between all blocks; allow enough cached graphs per shape mix."""
    import torch._dynamo

    for name in (
        "cache_size_limit",
        "recompile_limit",
        "accumulated_cache_size_limit",
        "accumulated_recompile_limit",
    ):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


def small_cfg(cfg: TransformerConfig) -> TransformerConfig:
    """A tiny model with the real layout, for `--smoke` runs on CPU."""
    return dataclasses.replace(
        cfg,
        hidden_size=64,
        num_heads=2,
        num_double_blocks=1,
        num_single_blocks=2,
        axes_dim=(8, 8, 8, 8),
        context_in_dim=96,
    )
