"""Whole-forward CUDA graph capture for fixed shapes (inference only).

A step of a small model at low resolution is a few hundred kernel launches; replaying them as one graph
removes the launch gaps. `CUDAGraphed(model)` captures one graph per input signature (shapes, dtypes, devices,
non-tensor arguments) on first use, after `warmup` eager calls on a side stream (these also trigger
`torch.compile` and cuDNN plan creation, which must not happen during capture). Later calls copy the inputs into
the graph's static input buffers, replay, and return a clone of the static output, so a result is never
overwritten by the next call (the clone is ~1 MB at 1024²).

Constraints: the captured forward must not synchronise with the host or change shapes; the weights must stay
where they are (no block offload); call it under `torch.no_grad()` / `torch.inference_mode()`. All graphs share
one memory pool.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _signature(args: tuple) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, Tensor) else ("value", a) for a in args)


class CUDAGraphed(nn.Module):
    """Wraps a module; `forward(*args)` replays a captured CUDA graph of `module(*args)`."""

    def __init__(self, module: nn.Module, warmup: int = 3):
        super().__init__()
        self.module = module
        self.warmup = warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple, Tensor]] = {}
        self._pool = None

    def forward(self, *args):
        if torch.is_grad_enabled():
            raise RuntimeError("CUDAGraphed is for inference: call it under torch.no_grad()")
        key = _signature(args)
        if key not in self._graphs:
            self._graphs[key] = self._capture(args)
        graph, static_in, static_out = self._graphs[key]
        for dst, src in zip(static_in, args):
            if isinstance(dst, Tensor):
                dst.copy_(src, non_blocking=True)
        graph.replay()
        return static_out.clone()

    def _capture(self, args: tuple):
        static_in = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.module(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self.module(*static_in)
        return graph, static_in, static_out
