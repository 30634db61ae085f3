"""Position ids (T, H, W, L) for text, output and reference tokens, and packing latents into tokens (spec 2.11,
6.1, 7.2).

Text token j gets (0, 0, 0, j); output-image token (r, c) gets (0, r, c, 0); token (r, c) of reference k
(k = 0, 1, ...) gets (10 * (k + 1), r, c, 0). Every grid starts at (0, 0): references differ only along T.
"""

from __future__ import annotations

import torch
from torch import Tensor

REF_TIME_OFFSET = 10  # BFL `encode_image_refs` scale: reference k sits at T = 10 * (k + 1)


def text_ids(length: int, batch: int = 1, device=None) -> Tensor:
    """[B, L, 4] with L running along the last axis (padding positions included)."""
    ids = torch.zeros(batch, length, 4, dtype=torch.long, device=device)
    ids[..., 3] = torch.arange(length, device=device)
    return ids


def image_ids(height: int, width: int, t: int = 0, batch: int = 1, device=None) -> Tensor:
    """[B, h * w, 4] ids of an h x w token grid in row-major order (the order `pack` produces)."""
    rows, cols = torch.meshgrid(
        torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
    )
    ids = torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=-1).reshape(-1, 4)
    return ids.expand(batch, -1, -1).clone()


def reference_ids(grids: list[tuple[int, int]], batch: int = 1, device=None) -> Tensor:
    """Ids of several reference grids [(h, w), ...] concatenated in order: [B, sum(h * w), 4]."""
    parts = [image_ids(h, w, REF_TIME_OFFSET * (k + 1), batch, device) for k, (h, w) in enumerate(grids)]
    return torch.cat(parts, dim=1)


def pack(z: Tensor) -> Tensor:
    """[B, C, h, w] latents -> [B, h * w, C] tokens, row-major over (row, col)."""
    return z.flatten(2).transpose(1, 2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """[B, h * w, C] tokens -> [B, C, h, w]; inverse of `pack` (tokens must be in `image_ids` order)."""
    return tokens.transpose(1, 2).unflatten(2, (height, width))
