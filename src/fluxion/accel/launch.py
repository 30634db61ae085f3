"""`generate` on several devices: one process per device, the transformer wrapped by `accel.parallel`.

    results = generate_on_gpus(Request(prompt="a lighthouse", seed=1), 2, model="flux2-dev/")

Every rank loads the whole model (sequence parallelism splits the tokens, not the weights; use `offload` for the
text encoder of [dev] as on one GPU), encodes the prompt, samples with the same noise and decodes; rank 0's
results come back to the calling process. The ranks meet through a file in a temporary folder (no port to pick),
over NCCL on CUDA and gloo on CPU (the CPU mode is what the tests run).

A user error in any rank (a size whose tokens do not split, a missing file) stops every rank and is raised here
as the same one-line error (ValueError, FileNotFoundError or OSError); anything else is raised as a
RuntimeError carrying the rank's traceback.
"""

from __future__ import annotations

import argparse
import queue as queue_module
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace

import torch

from fluxion.accel.parallel import ParallelOptions
from fluxion.request import ProgressFn, Request, Result

_USER_ERRORS = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError, "OSError": OSError}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _rank_main(
    rank: int,
    world: int,
    folder: str,
    results,  # a spawn-context Queue
    request: Request,
    load_options: dict,
    parallel: ParallelOptions | None,
    device_type: str,
    progress: Callable[[], ProgressFn] | None,
) -> None:
    import torch.distributed as dist

    from fluxion.accel.parallel import apply_parallel, default_options
    from fluxion.sampling.pipeline import generate
    from fluxion.weights.models import load_models

    if device_type == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device(device_type)
    backend = "nccl" if device_type == "cuda" else "gloo"
    options = dict(load_options)
    prompt_cache = options.pop("prompt_cache", None)
    dist.init_process_group(backend, init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        models = load_models(**options, device=device)
        if prompt_cache:
            from fluxion.text.cache import PromptCache

            models.prompt_cache = PromptCache(prompt_cache)
        spec = models.spec
        opts = parallel or default_options(world, spec.guidance_mode, spec.transformer.num_heads)
        models.transformer = apply_parallel(models.transformer, opts)
        out = generate(models, request, progress=progress() if progress and rank == 0 else None)
        if rank == 0:
            results.put(("ok", out))
    except tuple(_USER_ERRORS.values()) as e:
        kind = next(name for name, cls in _USER_ERRORS.items() if isinstance(e, cls))
        results.put(("error", kind, f"rank {rank}: {e}"))
    finally:
        dist.destroy_process_group()


def generate_on_gpus(
    request: Request,
    gpus: int,
    *,
    model: str | None = None,
    preset: str | None = None,
    vae: str | None = None,
    text: str | None = None,
    dtype: torch.dtype | str | None = None,
    offload: bool = False,
    prompt_cache: str | None = None,
    parallel: ParallelOptions | None = None,
    device_type: str = "cuda",
    progress: Callable[[], ProgressFn] | None = None,
) -> list[Result]:
    """`sampling.pipeline.generate` over `gpus` devices (model options as `weights.models.load_models`).

    `parallel`: the grid (default `accel.parallel.default_options`: the CFG branches on two ranks for true-CFG
    models, Ulysses for the rest). `progress`: a picklable factory (e.g. a module-level function) of rank 0's
    progress callback. A request without a seed gets one drawn here, so every rank samples the same noise.
    """
    import torch.multiprocessing as mp

    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    if device_type == "cuda" and torch.cuda.device_count() < gpus:
        raise ValueError(
            f"--gpus {gpus} needs {gpus} CUDA devices; this machine has {torch.cuda.device_count()}"
        )
    if parallel is not None and parallel.world != gpus:
        raise ValueError(f"the parallel layout covers {parallel.world} ranks, not --gpus {gpus}")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if request.seed is None:
        request = replace(request, seed=random.randrange(2**32))
    load_options = dict(
        model=model,
        preset=preset,
        vae=vae,
        text=text,
        dtype=dtype,
        offload=offload,
        prompt_cache=prompt_cache,
    )
    folder = tempfile.mkdtemp(prefix="fluxion-ranks-")
    results = mp.get_context("spawn").Queue()
    args = (gpus, folder, results, request, load_options, parallel, device_type, progress)
    ranks = mp.start_processes(_rank_main, args=args, nprocs=gpus, join=False, start_method="spawn")
    answer = None
    try:
        while True:
            try:  # read while the ranks run: a result larger than a pipe buffer blocks its sender until read
                answer = results.get(timeout=0.2)
            except queue_module.Empty:
                pass
            if answer is not None and answer[0] == "error":
                break
            try:
                if ranks.join(timeout=0.1):
                    break
            except mp.ProcessRaisedException as e:
                raise RuntimeError(f"a rank failed:\n{e}") from None
            except mp.ProcessExitedException as e:
                raise RuntimeError(f"a rank died: {e}") from None
    finally:
        for process in ranks.processes:  # after an error the other ranks may wait in a collective: stop them
            if process.is_alive():
                process.terminate()
        for process in ranks.processes:
            process.join()
        shutil.rmtree(folder, ignore_errors=True)
    if answer is None:
        raise RuntimeError("the ranks finished without a result")
    if answer[0] == "error":
        raise _USER_ERRORS[answer[1]](answer[2])
    return answer[1]


def cli_options(args: argparse.Namespace) -> dict:
    """The model options of a `fluxion generate` namespace, as keyword arguments of `generate_on_gpus`."""
    names = ("model", "preset", "vae", "text", "dtype", "offload", "prompt_cache")
    options = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if str(getattr(args, "device", None) or "").startswith("cpu"):  # --device cpu: CPU processes over gloo
        options["device_type"] = "cpu"
    return options
