"""The one precision policy of training: which dtype autocast computes in, what FSDP2 casts parameters to for
compute and reduces gradients in, and the same for the autoencoder trainer. Master weights are always fp32.

CUDA with a non-fp32 compute dtype: autocast to it, FSDP2 param_dtype = it, reduce_dtype = fp32.
CPU (tests, gloo): plain fp32 everywhere, so CPU runs are exact and reproducible.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype | None  # None: fp32 throughout (no autocast, no FSDP casting)
    device_type: str = "cpu"

    def autocast(self):
        """The context every forward pass of training runs in."""
        if self.compute is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)

    def fsdp_mixed_precision(self):
        """FSDP2's MixedPrecisionPolicy (None: keep fp32 parameters and reductions)."""
        if self.compute is None:
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.compute, reduce_dtype=torch.float32)


def precision_policy(dtype_name: str, device: torch.device) -> Precision:
    if dtype_name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype {dtype_name!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    if device.type == "cuda" and dtype_name != "float32":
        return Precision(getattr(torch, dtype_name), "cuda")
    return Precision(None, device.type)


def compute_context(device: torch.device, dtype_name: str):
    """Shorthand: the autocast context of the policy for this device and dtype name."""
    return precision_policy(dtype_name, device).autocast()
