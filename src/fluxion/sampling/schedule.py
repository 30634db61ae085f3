"""The FLUX.2 time schedule (spec 6.2). Flow time t is in [0, 1]: 1 is pure noise, 0 is the image.

The training code samples times with the same shift (`time_shift`), so training and sampling agree.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Empirical mu coefficients fitted by BFL (flux2 `compute_empirical_mu`): mu is linear in the number of output
# tokens S, at n = 10 and n = 200 steps, and linear in n between those two fits.
_A1, _B1 = 8.73809524e-05, 1.89833333
_A2, _B2 = 0.00016927, 0.45666666
_LARGE_IMAGE_TOKENS = 4300  # above this (about 1.1 MP) only the 200-step fit is used


def empirical_mu(image_tokens: int, num_steps: int) -> float:
    """Shift parameter mu for S = `image_tokens` output tokens (references are not counted) and n steps."""
    m200 = _A2 * image_tokens + _B2
    if image_tokens > _LARGE_IMAGE_TOKENS:
        return m200
    m10 = _A1 * image_tokens + _B1
    return m10 + (num_steps - 10) * (m200 - m10) / 190.0


def time_shift(mu: float, t: Tensor, sigma: float = 1.0) -> Tensor:
    """e^mu / (e^mu + (1/t - 1)^sigma) elementwise: pushes times toward 1 (more steps at high noise).
    Fixes 0 and 1 (1/0 = inf gives 0)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0) ** sigma)


def get_schedule(num_steps: int, image_tokens: int, mu: float | None = None) -> list[float]:
    """num_steps + 1 decreasing times from 1.0 to 0.0: shift(linspace(1, 0, n + 1)).

    Evaluated in fp32 torch, as the reference does, so the times are the reference's to the last bit."""
    if num_steps < 1:
        raise ValueError(f"steps must be at least 1, got {num_steps}")
    mu = empirical_mu(image_tokens, num_steps) if mu is None else mu
    return time_shift(mu, torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)).tolist()
