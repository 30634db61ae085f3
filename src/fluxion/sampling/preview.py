"""Cheap per-step previews: the denoised estimate x0 = x_t - t * v, projected to RGB by a fitted linear map.

A FLUX.2 latent token [128] (32 VAE channels x 2x2 patch, after the latent batch-norm) holds a 16x16-pixel block.
Its mean colour is close to an affine function of the token, so a 128 -> 3 least-squares map (plus a bias) turns
the [h, w, 128] token grid into an [h, w, 3] thumbnail with one small matmul: no VAE decode, about a
microsecond per token. The map is fitted once per VAE (`fit_preview_map`) from images the VAE itself encodes,
and shipped next to the embedded model (`preview.json`); for any other VAE it is fitted at first use (a few
small encodes) and kept on the `Models`.

Why x0 and not x_t: a few-step (distilled) model sits at t >= 0.5 for most of its steps, where x_t is mostly
noise. The Euler step gives v = (x_next - x_cur) / (t_next - t_cur), so the estimate x0 = x_next - t_next * v
needs no extra model call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

PREVIEW_FILE = "preview.json"


@dataclass(frozen=True)
class PreviewMap:
    """rgb = tokens @ weight + bias, rgb in [-1, 1]. weight [C, 3] with C the token width (128), bias [3]."""

    weight: Tensor
    bias: Tensor

    def to_dict(self) -> dict:
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> PreviewMap:
        weight = torch.tensor(d["weight"], dtype=torch.float32)
        bias = torch.tensor(d["bias"], dtype=torch.float32)
        if weight.ndim != 2 or weight.shape[1] != 3 or bias.shape != (3,):
            raise ValueError(f"a preview map needs weight [C, 3] and bias [3], got {tuple(weight.shape)}")
        return cls(weight, bias)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> PreviewMap:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def project(self, tokens: Tensor, h: int, w: int) -> Tensor:
        """tokens [B, h*w, C] -> RGB [B, 3, h, w] in [-1, 1]."""
        rgb = tokens.float() @ self.weight.to(tokens.device) + self.bias.to(tokens.device)  # [B, h*w, 3]
        return rgb.clamp(-1, 1).transpose(1, 2).reshape(tokens.shape[0], 3, h, w)

    def image(self, tokens: Tensor, h: int, w: int, index: int = 0, scale: int = 4) -> Image.Image:
        """One thumbnail as a PIL image, upscaled `scale`x with nearest neighbours (h x w is 1/16 of the size)."""
        rgb = self.project(tokens[index : index + 1], h, w)[0]
        arr = ((rgb.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        im = Image.fromarray(arr)
        return im.resize((w * scale, h * scale), Image.NEAREST) if scale > 1 else im


def denoised_estimate(x_cur: Tensor, x_next: Tensor, t_cur: float, t_next: float) -> Tensor:
    """x0 from two successive Euler states (see the module docstring); exact for the velocity the step used."""
    v = (x_next.float() - x_cur.float()) / (t_next - t_cur)
    return x_next.float() - t_next * v


def _fit_images(num: int, size: int, seed: int) -> Tensor:
    """[num, 3, size, size] in [-1, 1]: smooth random colour fields, flat colours and hard-edged shapes, so the
    fit sees both gradients and the saturated flat regions generated images have."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num, 3, 4, 4, generator=g) * 2 - 1
    img = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    flat = num // 4
    img[:flat] = (torch.rand(flat, 3, 1, 1, generator=g) * 2 - 1).expand(-1, -1, size, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(flat, 2 * flat):  # a disc of one colour on a background of another
        cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([size, size, size / 2])).tolist()
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        fg, bg = torch.rand(2, 3, 1, 1, generator=g) * 2 - 1
        img[i] = torch.where(inside, fg, bg)  # fg, bg [3, 1, 1] broadcast over the disc mask [size, size]
    return img


@torch.no_grad()
def fit_preview_map(vae, num_images: int = 48, size: int = 128, seed: int = 0, batch: int = 8) -> PreviewMap:
    """Least-squares 128 -> 3 map (with bias) from VAE latents to the mean colour of each token's pixel block.

    `vae` is a fluxion autoencoder (encode: pixels [B, 3, H, W] in [-1, 1] -> [B, C, H/f, W/f]). The fit runs
    in fp32 on the VAE's device; it costs num_images small encodes.
    """
    param = next(vae.parameters())
    device = param.device
    images = _fit_images(num_images, size, seed)
    feats, targets = [], []
    for chunk in images.split(batch):
        z = vae.encode(chunk.to(device, param.dtype)).float()  # [b, C, h, w]
        f = size // z.shape[-1]
        target = F.avg_pool2d(chunk.to(device).float(), f)  # [b, 3, h, w]: the block's mean colour
        feats.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        targets.append(target.permute(0, 2, 3, 1).reshape(-1, 3))
    X = torch.cat(feats)
    X1 = torch.cat([X, torch.ones(len(X), 1, device=device)], dim=1)
    Y = torch.cat(targets)
    # Ridge-regularised normal equations: a few thousand rows, 129 columns; the small ridge keeps a VAE whose
    # latents have near-constant channels from blowing up the map.
    A = X1.T @ X1 + 1e-3 * torch.eye(X1.shape[1], device=device)
    sol = torch.linalg.solve(A, X1.T @ Y)  # [C + 1, 3]
    return PreviewMap(weight=sol[:-1].cpu(), bias=sol[-1].cpu())


def preview_map_for(vae, folder=None) -> PreviewMap:
    """The shipped map in `folder` (the model's asset folder), or one fitted now on `vae` (about a second for
    fluxion-tiny on a CPU; a few small encodes on a GPU)."""
    if folder is not None and (Path(str(folder)) / PREVIEW_FILE).is_file():
        return PreviewMap.load(Path(str(folder)) / PREVIEW_FILE)
    return fit_preview_map(vae)


def preview_map_for_models(models, model_path=None) -> PreviewMap:
    """The map for loaded `Models`: shipped with the embedded model (or next to the checkpoint at `model_path`),
    else fitted now on its VAE."""
    from fluxion.weights.models import embedded_model_dir, is_embedded

    # The map belongs to the autoencoder: the embedded models share fluxion-tiny's (and its preview.json).
    folder = embedded_model_dir() if is_embedded(model_path) else Path(str(model_path))
    if folder is not None and not Path(str(folder)).is_dir():
        folder = Path(str(folder)).parent  # a single-file checkpoint: look beside it
    with torch.no_grad():
        return preview_map_for(models.vae, folder)
