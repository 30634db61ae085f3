"""Live previews: the fitted latent -> RGB map on the denoised estimate looks like the final image, and gets
closer to it step by step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fluxion.request import Request
from fluxion.sampling.pipeline import generate
from fluxion.sampling.preview import (
    PREVIEW_FILE,
    PreviewMap,
    denoised_estimate,
    fit_preview_map,
    preview_map_for,
)
from fluxion.weights.models import embedded_model_dir, load_models


@pytest.fixture(scope="module")
def tiny():
    return load_models()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / max(np.mean((a.astype(float) - b.astype(float)) ** 2), 1e-9)))


def test_denoised_estimate_recovers_x0_of_a_straight_path():
    # On the straight path x_t = t * noise + (1 - t) * x0, one exact Euler step from t=0.8 to t=0.5 and the
    # estimate give x0 back.
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    x_cur, x_next = 0.8 * noise + 0.2 * x0, 0.5 * noise + 0.5 * x0
    assert torch.allclose(denoised_estimate(x_cur, x_next, 0.8, 0.5), x0, atol=1e-5)


def test_shipped_map_matches_a_fresh_fit(tiny):
    # The least-squares system is ill-conditioned enough that thread-count-dependent rounding moves single
    # weights by ~1e-2, so compare what the maps draw, on images neither fit saw.
    from fluxion.sampling.preview import _fit_images

    shipped = PreviewMap.load(embedded_model_dir() / PREVIEW_FILE)
    fresh = fit_preview_map(tiny.vae)
    z = tiny.vae.encode(_fit_images(8, 128, seed=99))
    tokens = z.permute(0, 2, 3, 1).reshape(8, -1, z.shape[1])
    a, b = shipped.project(tokens, z.shape[2], z.shape[3]), fresh.project(tokens, z.shape[2], z.shape[3])
    # 117 dB in one process; less across thread counts
    assert float(10 * torch.log10(4 / ((a - b) ** 2).mean())) > 40
    assert preview_map_for(tiny.vae, embedded_model_dir()).weight.shape == (128, 3)


@pytest.mark.parametrize("name, steps", [("fluxion-tiny-base", 8), ("fluxion-tiny", 4)])
def test_previews_converge_to_the_final_image(tiny, name, steps):
    # The CFG base starts from a blur and sharpens step by step; the distilled student's first estimate is
    # already near its final image (it was trained to jump there), so it must only not drift away.
    models = tiny if name == "fluxion-tiny" else load_models(name)
    pm = preview_map_for(models.vae, embedded_model_dir())
    frames = []

    def preview(step, total, x0, h, w):
        frames.append(np.asarray(pm.image(x0, h, w, scale=1)))

    [result] = generate(
        models, Request(prompt="a yellow star on a blue background", seed=3, steps=steps), preview=preview
    )
    assert len(frames) == steps
    final = torch.from_numpy(np.array(result.image)).permute(2, 0, 1)[None].float()
    target = F.avg_pool2d(final, 16)[0].permute(1, 2, 0).round().numpy()  # the final image at preview size
    scores = [psnr(f, target) for f in frames]
    assert scores[-1] > 19, scores  # 16x16-pixel block means of the decoded image
    if name == "fluxion-tiny-base":
        assert scores[-1] > scores[0] + 3, scores
    else:
        assert scores[-1] >= max(scores) - 0.5, scores
