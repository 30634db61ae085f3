"""The rectified-flow training objective (spec 2.3): x_t = (1 - t) x0 + t noise, target v = noise - x0.

Times are drawn logit-normal and then shifted with the same `time_shift` and empirical mu as the sampling
schedule, so training spends its steps where sampling does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fluxion.sampling.schedule import empirical_mu, time_shift

SCHEDULE_STEPS_FOR_MU = 50  # mu is taken at the 50-step fit, the default step count of the base models


def sample_times(
    batch: int, image_tokens: int, *, generator: torch.Generator | None = None, device=None
) -> Tensor:
    """[batch] fp32 times in (0, 1): sigmoid(N(0, 1)) shifted by mu(image_tokens)."""
    u = torch.randn(batch, generator=generator, device=device, dtype=torch.float32)
    return time_shift(empirical_mu(image_tokens, SCHEDULE_STEPS_FOR_MU), torch.sigmoid(u))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t for tokens [B, N, C] and times [B]."""
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def flow_loss(pred: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """Mean squared error to the velocity target, in fp32 whatever the compute dtype."""
    return torch.mean((pred.float() - (noise.float() - x0.float())) ** 2)
