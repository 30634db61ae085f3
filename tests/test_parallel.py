"""Sequence parallelism (Ulysses, ring, both) and CFG parallelism on real CPU processes (gloo).

Every case runs the sampler (`sampling.denoise`) with the parallel wrapper on 2 (or 4) spawned processes and
compares with the same sampler on the plain single-process model (itself held to diffusers by
test_transformer.py): text to image, with references, the KV path (extract, then cached steps) and true CFG.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fluxion.accel.parallel import ParallelOptions, apply_parallel, attention_lse, default_options
from fluxion.config import DEBUG_TRANSFORMER
from fluxion.model.transformer import Flux2
from fluxion.sampling.denoise import Conditioning, Guidance, denoise
from fluxion.sampling.ids import image_ids, reference_ids, text_ids

# klein-like (no guidance embedder), 4 heads of 16 dims so that Ulysses over 2 ranks keeps 2 heads per rank.
CFG = dataclasses.replace(
    DEBUG_TRANSFORMER, use_guidance_embed=False, num_heads=4, axes_dim=(4, 4, 4, 4), num_single_blocks=2
)
STEPS = [1.0, 0.6, 0.25, 0.0]  # three Euler steps: the KV path extracts once, then reads the cache twice


def _case() -> dict:
    """Model weights and sampler inputs: 2 prompts of 8 text tokens, a 4 x 4 output grid, 2 references."""
    g = torch.Generator().manual_seed(0)
    model = Flux2(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5 if p.ndim > 1 else 1 + 0.1 * p)
    B, L = 2, 8
    return dict(
        state=model.state_dict(),
        x=torch.randn(B, 16, CFG.in_channels, generator=g),
        x_ids=image_ids(4, 4, batch=B),
        ctx=torch.randn(B, L, CFG.context_in_dim, generator=g),
        neg=torch.randn(1, L, CFG.context_in_dim, generator=g).expand(B, -1, -1),
        ctx_ids=text_ids(L, B),
        refs=torch.randn(B, 4 + 8, CFG.in_channels, generator=g),
        ref_ids=reference_ids([(2, 2), (2, 4)], B),
    )


def _runs(case: dict) -> dict:
    """name -> (conditioning, guidance, batch) of every sampler run compared."""
    full = Conditioning(case["ctx"], case["ctx_ids"], refs=case["refs"], ref_ids=case["ref_ids"])
    plain = Conditioning(case["ctx"], case["ctx_ids"])
    cfg = Conditioning(case["ctx"][:1], case["ctx_ids"][:1], neg_ctx=case["neg"][:1])
    return {
        "text_to_image": (plain, Guidance(), 2),
        "references": (full, Guidance(), 2),
        "kv_path": (full, Guidance(kv_cache=True), 2),
        "true_cfg": (cfg, Guidance(mode="cfg", scale=4.0), 1),
    }


def _sample(model, case: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, (cond, guidance, B) in _runs(case).items():
        out[name] = denoise(model, case["x"][:B], case["x_ids"][:B], cond, STEPS, guidance)
    return out


def _worker(rank: int, world: int, folder: str, layouts: list[dict]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        case = torch.load(f"{folder}/case.pt")
        model = Flux2(CFG)
        model.load_state_dict(case["state"])
        results = {}
        for layout in layouts:
            opts = ParallelOptions(**layout)
            par = apply_parallel(model, opts)
            runs = _sample(par, case)
            if opts.sp > 1:  # 3 x 5 = 15 image tokens do not split over the sequence-parallel ranks
                try:
                    par(
                        case["x"][:2, :15],
                        case["x_ids"][:2, :15],
                        torch.ones(2),
                        case["ctx"],
                        case["ctx_ids"],
                    )
                except ValueError as e:
                    runs["uneven_error"] = str(e)
            results[repr(sorted(layout.items()))] = runs
        torch.save(results, f"{folder}/out_{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, layouts: list[dict]) -> tuple[dict, list[dict]]:
    case = _case()
    with tempfile.TemporaryDirectory() as folder:
        torch.save(case, f"{folder}/case.pt")
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            mp.spawn(_worker, args=(world, folder, layouts), nprocs=world, join=True)
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = old
        outs = [torch.load(Path(folder) / f"out_{r}.pt") for r in range(world)]
    model = Flux2(CFG)
    model.load_state_dict(case["state"])
    return _sample(model, case), outs


def _check(expected: dict, outs: list[dict], layouts: list[dict]) -> None:
    for layout in layouts:
        key = repr(sorted(layout.items()))
        for rank, out in enumerate(outs):
            got = out[key]
            for name, want in expected.items():
                # fp32 rounding only: the attention sums run in another order (chunks, merged via log-sum-exp).
                where = f"{layout} {name} rank {rank}"
                torch.testing.assert_close(
                    got[name], want, rtol=1e-5, atol=1e-5, msg=lambda m, w=where: f"{w}: {m}"
                )
            if ParallelOptions(**layout).sp > 1:
                assert "15 image tokens do not split evenly over" in got["uneven_error"]


def test_two_ranks_match_one_process():
    """Ulysses 2, ring 2 (CPU flash kernel and the fp32 formula), and CFG 2, on one pair of processes."""
    layouts = [dict(ulysses=2), dict(ring=2), dict(ring=2, ring_kernel="math"), dict(cfg=2)]
    expected, outs = _spawn(2, layouts)
    _check(expected, outs, layouts)
    # The runs differ from each other, so a wrapper that ignored its inputs could not pass.
    assert (expected["kv_path"] - expected["references"]).abs().max() > 1e-3
    assert (expected["true_cfg"] - expected["text_to_image"][:1]).abs().max() > 1e-3


@pytest.mark.slow
def test_four_ranks_usp_and_cfg():
    """Ulysses x ring (USP) over 4 ranks, and CFG 2 x Ulysses 2."""
    layouts = [dict(ulysses=2, ring=2), dict(cfg=2, ulysses=2), dict(ring=4)]
    expected, outs = _spawn(4, layouts)
    _check(expected, outs, layouts)


@pytest.mark.parametrize("lq,lk", [(5, 7), (40, 33)])
def test_attention_lse_matches_sdpa_and_logsumexp(lq, lk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (lq, lk, lk))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ref_lse = torch.logsumexp(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    for kernel in ("cpu", "math"):
        out, lse = attention_lse(q, k, v, kernel)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_default_options_and_errors():
    assert default_options(2, "cfg", 24) == ParallelOptions(cfg=2)
    assert default_options(4, "cfg", 24) == ParallelOptions(cfg=2, ulysses=2)
    assert default_options(2, "embedded", 48) == ParallelOptions(ulysses=2)
    assert default_options(8, "distilled", 6) == ParallelOptions(ring=8)
    with pytest.raises(ValueError, match="cfg must be 1 or 2"):
        ParallelOptions(cfg=3)
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        apply_parallel(Flux2(CFG), ParallelOptions(ulysses=2))


@pytest.mark.slow
def test_generate_on_two_processes_matches_one():
    """The library entry of `fluxion generate --gpus 2` (gloo on CPU): the embedded fluxion-tiny (true CFG, so
    the default layout is CFG-parallel) against the one-process pipeline; a size that cannot split fails cleanly."""
    from fluxion.accel.launch import generate_on_gpus
    from fluxion.request import Request
    from fluxion.sampling.pipeline import generate
    from fluxion.weights.models import load_models

    request = Request(prompt="a red circle", seed=3, steps=3)
    want = np.asarray(generate(load_models(), request)[0].image, dtype=np.int16)
    from fluxion.cli import progress_bar  # rank 0's progress callback, built from a picklable factory

    got = generate_on_gpus(request, 2, device_type="cpu", progress=progress_bar)
    assert got[0].seed == 3 and got[0].params["prompt"] == "a red circle"
    diff = np.abs(np.asarray(got[0].image, dtype=np.int16) - want)
    assert diff.max() <= 1, diff.max()  # fp32 rounding can flip a pixel by one level
    # An image whose tokens do not split: every rank stops, the error comes back as one line.
    with pytest.raises(ValueError, match="81 image tokens do not split evenly over 2 ranks"):
        generate_on_gpus(
            replace(request, width=144, height=144), 2, device_type="cpu", parallel=ParallelOptions(ulysses=2)
        )


def test_cli_gpus_refuses_what_it_cannot_combine_yet(tmp_path, capsys):
    from fluxion.cli import main

    code = main(
        ["generate", "x", "-o", str(tmp_path / "o.png"), "--gpus", "2", "--device", "cpu", "--preview"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--gpus > 1 does not combine with --preview" in err and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_cli_gpus_2_on_cpu_processes_matches_one_process(tmp_path):
    import numpy as np
    from PIL import Image

    from fluxion.cli import main

    base = [
        "generate",
        "a red heart",
        "--device",
        "cpu",
        "--steps",
        "2",
        "-W",
        "64",
        "-H",
        "64",
        "--seed",
        "1",
    ]
    assert main([*base, "-o", str(tmp_path / "one.png"), "--no-watermark"]) == 0
    assert main([*base, "-o", str(tmp_path / "two.png"), "--no-watermark", "--gpus", "2"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=int) for n in ("one", "two"))
    assert np.abs(a - b).max() <= 1  # fp32 rounding of the split attention
