"""fluxion vs diffusers 0.42.1, one transformer forward, same run, same GPU, same random weights (shared storage).

    python benchmarks/bench_transformer.py --suite klein   # klein-4B: eager, compiled, CUDA graphs, fp8, batch 4
    python benchmarks/bench_transformer.py --suite dev     # dev-32B: eager, compiled, fp8
    python benchmarks/bench_transformer.py --suite klein --smoke   # tiny model on CPU: checks the script runs

bf16, 512 text tokens, image tokens (size/16)². Per step = one forward; CUDA events, 2 warm-up calls (compile
included, reported as warmup_s), median of 5 (10 for klein), peak = max_memory_allocated after the warm-up.
Items run in order of importance; the JSON under $OUT is rewritten after each item, and items that would not fit
in --budget-s are skipped and listed.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
from common import (
    Report,
    accuracy,
    build_diffusers_sharing,
    build_ours,
    diffusers_call,
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
from fluxion.accel.cuda_graphs import CUDAGraphed
from fluxion.config import PRESETS
from fluxion.model.attention import set_attention_backend


class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.device = "cpu" if args.smoke else "cuda"
        self.fast_attn = "math" if args.smoke else "cudnn"
        self.backend = "eager" if args.smoke else "inductor"
        name = {"klein": "flux2-klein-4b", "dev": "flux2-dev"}[args.suite]
        cfg = PRESETS[name].transformer
        self.model_name = {"klein": "klein-4B", "dev": "dev-32B"}[args.suite]
        self.cfg = small_cfg(cfg) if args.smoke else cfg
        self.sizes = [64, 32] if args.smoke else [1024, 512]
        self.iters = 3 if args.smoke else (10 if args.suite == "klein" else 5)
        self.report = Report(out_dir() / f"bench_transformer_{args.suite}.json", args.budget_s)
        self.inputs = {s: make_inputs(self.cfg, s, device=self.device) for s in self.sizes}
        self.refs: dict = {}  # (size) -> bf16 velocity of ours (eager, fast attention): the fp8 reference

    def run(self, what: str, need_s: float, fn):
        """One item: skipped if the budget cannot hold it, errors recorded and the run continues."""
        if not self.report.has_time(need_s):
            self.report.skip(what)
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - the outermost handler of a benchmark item
            self.report.error(what, exc)
            return None
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def measure(self, impl: str, mode: str, size: int, call, ref=None, batch: int = 1, **extra):
        n_img = (size // 16) ** 2
        with torch.no_grad():
            t0 = time.perf_counter()
            out = call()  # first call: compilation / graph capture happens here
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            timing = time_cuda(call, warmup=2, iters=self.iters)
        acc = accuracy(out, ref) if ref is not None else {}
        return self.report.add(
            model=self.model_name,
            impl=impl,
            mode=mode,
            size=size,
            batch=batch,
            tokens=n_img + 512,
            **perf_fields(forward_flops(self.cfg, n_img, batch=batch), timing),
            first_call_s=first_s,
            **acc,
            **extra,
        ), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=["klein", "dev"], required=True)
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    ap.add_argument("--save-ref", default="", help="save ours' bf16 eager velocity to <prefix>_<size>.pt")
    args = ap.parse_args()
    set_dynamo_limits()
    b = Bench(args)
    R = b.report
    klein = args.suite == "klein"
    big = 1 if klein else 8  # rough time scale of an item relative to klein

    ours = build_ours(b.cfg, device=b.device)
    dm = build_diffusers_sharing(ours)
    R.data["params"] = sum(p.numel() for p in ours.parameters())

    def ours_call(size, module=None):
        m = ours if module is None else module
        return lambda: m(*b.inputs[size])

    def dm_call(size, module=None):
        m = dm if module is None else module
        return lambda: diffusers_call(m, b.inputs[size])

    # 1. eager, 1024² first: ours with SDPA's own pick (as diffusers), ours with cuDNN, diffusers.
    for size in b.sizes:

        def eager(size=size):
            set_attention_backend(None)
            if size == b.sizes[0]:
                b.measure("fluxion", "eager sdpa", size, ours_call(size))
            apply(ours, AccelOptions(attention=b.fast_attn))
            _, out = b.measure("fluxion", f"eager {b.fast_attn}", size, ours_call(size))
            b.refs[size] = out
            # The bf16 velocity, for bench_offload.py's int8 accuracy (same weights, same inputs).
            if args.save_ref:
                torch.save(out.cpu(), f"{args.save_ref}_{size}.pt")
            _, out_d = b.measure("diffusers", "eager sdpa", size, dm_call(size), ref=out)
            if klein and not b.smoke and size == b.sizes[0]:
                dm.set_attention_backend("_native_cudnn")
                b.measure("diffusers", "eager cudnn", size, dm_call(size), ref=out)
                dm.set_attention_backend("native")

        b.run(f"eager {size}", 10 * big, eager)

    # 2. compiled. Ours: regional (per block) + cuDNN attention. diffusers: klein whole-module torch.compile
    # (the setting of perf-anchors.md 1); dev regional `compile_repeated_blocks` (the whole-module compile
    # takes ~86 s for dev and runs at the same speed). Static shapes for both (dynamic=False).
    def ours_compiled():
        apply(ours, AccelOptions(attention=b.fast_attn, compile=True, compile_backend=b.backend))
        for size in b.sizes:
            b.measure("fluxion", f"compiled {b.fast_attn}", size, ours_call(size), ref=b.refs.get(size))

    b.run("ours compiled", 80 * (1 if klein else 1.5), ours_compiled)

    state = {}

    def dm_compiled():
        if klein:
            state["dmc"] = torch.compile(dm, dynamic=False, backend=b.backend)
            mode = "compiled (whole) sdpa"
        else:
            dm.compile_repeated_blocks(dynamic=False, backend=b.backend)
            state["dmc"] = dm
            mode = "compiled (regional) sdpa"
        for size in b.sizes:
            b.measure("diffusers", mode, size, dm_call(size, state["dmc"]), ref=b.refs.get(size))

    b.run("diffusers compiled", 90 * (1 if klein else 1.5), dm_compiled)

    # 3. CUDA graphs around the compiled model (klein: launch-bound glue matters more at 4608 tokens).
    if klein and not b.smoke:

        def graphs():
            g = CUDAGraphed(ours)
            for size in b.sizes:
                b.measure(
                    "fluxion",
                    f"compiled {b.fast_attn} + cuda graphs",
                    size,
                    ours_call(size, g),
                    ref=b.refs.get(size),
                )
            g._graphs.clear()

        b.run("ours cuda graphs", 40, graphs)

    # 4. fp8 (dynamic rowwise e4m3 in the blocks), against our bf16 outputs. diffusers shares our bf16 storage:
    # drop it first so the conversion frees memory as it goes (dev: 64 GB bf16 -> ~33 GB).
    state.clear()
    dm = None
    gc.collect()
    torch._dynamo.reset()
    uncompile(ours)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    def fp8():
        acc = apply(ours, AccelOptions(attention=b.fast_attn, fp8=True))
        R.data["fp8_layers"] = len(acc.quantized)
        if torch.cuda.is_available():
            R.data["fp8_weights_gib"] = torch.cuda.memory_allocated() / 2**30
        b.measure(
            "fluxion",
            f"fp8 eager {b.fast_attn}",
            b.sizes[0],
            ours_call(b.sizes[0]),
            ref=b.refs.get(b.sizes[0]),
        )

    b.run("fp8 eager", 20 * big, fp8)

    def fp8_compiled():
        apply(ours, AccelOptions(attention=b.fast_attn, compile=True, compile_backend=b.backend))
        for size in b.sizes:
            b.measure("fluxion", f"fp8 compiled {b.fast_attn}", size, ours_call(size), ref=b.refs.get(size))
        if klein and not b.smoke:
            g = CUDAGraphed(ours)
            for size in b.sizes:
                b.measure(
                    "fluxion",
                    f"fp8 compiled {b.fast_attn} + cuda graphs",
                    size,
                    ours_call(size, g),
                    ref=b.refs.get(size),
                )
            g._graphs.clear()

    b.run("fp8 compiled", 80 * (1 if klein else 1.5), fp8_compiled)

    # 5. batch 4 at 1024² (klein): a fresh bf16 pair, both compiled.
    if klein:

        def batch4():
            nonlocal ours
            del ours
            gc.collect()
            torch._dynamo.reset()
            m = build_ours(b.cfg, device=b.device)
            d = build_diffusers_sharing(m)
            size = b.sizes[0]
            args4 = make_inputs(b.cfg, size, batch=4, device=b.device)
            apply(m, AccelOptions(attention=b.fast_attn, compile=True, compile_backend=b.backend))
            _, out = b.measure("fluxion", f"compiled {b.fast_attn}", size, lambda: m(*args4), batch=4)
            dc = torch.compile(d, dynamic=False, backend=b.backend)
            b.measure(
                "diffusers",
                "compiled (whole) sdpa",
                size,
                lambda: diffusers_call(dc, args4),
                ref=out,
                batch=4,
            )

        b.run("batch 4", 120, batch4)

    R.write()
    print_table(R.data)


def print_table(data: dict) -> None:
    print(f"\n{data['env']}")
    print(
        f"{'model':9} {'impl':9} {'mode':38} {'size':>5} {'B':>2} {'ms':>8} {'TFLOP/s':>8} {'MFU':>5} "
        f"{'peakGiB':>7} {'warm s':>6} {'cos':>8}"
    )
    for r in data["rows"]:
        cos = f"{r['cosine']:.5f}" if "cosine" in r else ""
        print(
            f"{r['model']:9} {r['impl']:9} {r['mode']:38} {r['size']:>5} {r['batch']:>2} {r['ms']:8.2f} "
            f"{r['tflops']:8.1f} {r['mfu']:5.2f} {r['peak_gib']:7.2f} {r['warmup_s']:6.1f} {cos:>8}"
        )
    for s in data["skipped"]:
        print("skipped:", s)
    for e in data["errors"]:
        print("error:", e["item"], e["error"])


if __name__ == "__main__":
    sys.exit(main())
