"""FlashAttention-3 (Hopper) as a `torch.library.custom_op`, registered on first use only.

FA3 ships outside PyTorch (the `flash_attn_interface` module of the flash-attention `hopper/` build). Wrapping it in
a custom op with a fake implementation lets `torch.compile` trace a block that calls it without graph breaks.
Nothing here imports FA3 or registers the op at import time: `fa3_available()` looks the module up when asked,
and `fa3_attention` registers the op the first time it runs.

Layout: fluxion's attention call site uses [B, H, L, d_h]; FA3 wants [B, L, H, d_h] with the last dim contiguous,
which a transpose of ours already is (no copy). The op returns FA3's native [B, L, H, d_h] output.
Reference for tests: `reference_attention` (plain SDPA), which FA3 must match at bf16 tolerance.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch
from torch import Tensor
from torch.nn import functional as F

_MODULE_NAMES = ("flash_attn_interface", "flash_attn_3.flash_attn_interface")
_op = None


def _find_module() -> ModuleType | None:
    for name in _MODULE_NAMES:
        root = name.split(".")[0]
        if importlib.util.find_spec(root) is None:
            continue
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def fa3_available() -> bool:
    """True when an FA3 build is importable and a Hopper GPU is present (checked when called)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return False
    return _find_module() is not None


def _register():
    global _op
    if _op is not None:
        return _op
    module = _find_module()
    if module is None:
        raise RuntimeError("FlashAttention-3 is not installed (no flash_attn_interface module)")

    @torch.library.custom_op("fluxion::fa3_attention", mutates_args=())
    def fa3_op(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v [B, L, H, d_h] -> [B, L_q, H, d_h], non-causal, scale 1/sqrt(d_h)."""
        out = module.flash_attn_func(q, k, v, causal=False)
        return (out[0] if isinstance(out, tuple) else out).contiguous()

    @fa3_op.register_fake
    def _(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])

    _op = fa3_op
    return _op


def fa3_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention backend: q, k, v [B, H, L, d_h] -> [B, H, L_q, d_h] (a transposed view of FA3's output)."""
    op = _register()
    return op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def reference_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """What `fa3_attention` must compute: unmasked SDPA, same layout."""
    return F.scaled_dot_product_attention(q, k, v)
