"""Reference images -> model-ready pixels, and the output-size rule (spec 6.5, 7.1).

Reference policy (BFL `default_prep`): RGB; both sides >= 64 px and aspect <= 8 (else an error); downscale
with LANCZOS to a pixel cap (2024^2 for one reference, 1024^2 for several: the BFL numbers, "2024" sic), then
centre-crop to multiples of 16. Small models scale the caps down (ModelSpec.reference_pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

MIN_SIDE = 64
MAX_ASPECT = 8.0
MAX_OUTPUT_PIXELS = 4 * 1024 * 1024  # the 4 MP product limit of FLUX.2 (BFL documentation)


class InputImageError(ValueError):
    """A user-supplied image or size that cannot be used; the message says what to change."""


def check_image(image: Image.Image, what: str = "reference image") -> None:
    w, h = image.size
    if min(w, h) < MIN_SIDE:
        raise InputImageError(f"{what} is {w}x{h}: both sides must be at least {MIN_SIDE} px")
    if max(w / h, h / w) > MAX_ASPECT:
        raise InputImageError(f"{what} is {w}x{h}: the aspect ratio must be at most {MAX_ASPECT:g}:1")


def prepare_reference(image: Image.Image, pixel_cap: int, multiple: int = 16) -> Image.Image:
    """Downscale to at most `pixel_cap` pixels (sizes truncated to int, as the reference does) and centre-crop
    to multiples of `multiple`."""
    image = image.convert("RGB")
    check_image(image)
    w, h = image.size
    if w * h > pixel_cap:
        s = math.sqrt(pixel_cap / (w * h))
        image = image.resize((int(w * s), int(h * s)), Image.LANCZOS)
        w, h = image.size
    w16, h16 = w // multiple * multiple, h // multiple * multiple
    left, top = (w - w16) // 2, (h - h16) // 2
    return image.crop((left, top, left + w16, top + h16))


def prepare_references(
    images: list[Image.Image], caps: tuple[int, int], multiple: int = 16
) -> list[Image.Image]:
    """caps = (cap for a single reference, cap for each of several)."""
    cap = caps[0] if len(images) == 1 else caps[1]
    return [prepare_reference(im, cap, multiple) for im in images]


def pil_to_pixels(image: Image.Image) -> Tensor:
    """PIL RGB -> [1, 3, H, W] float32 in [-1, 1] (ToTensor then 2x - 1)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0


def pixels_to_pil(x: Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images; clamp then truncate to uint8 as the reference does (spec 4.4)."""
    arr = (127.5 * (x.float().clamp(-1, 1) + 1.0)).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@dataclass(frozen=True)
class OutputSize:
    """The output-size rule. FLUX.2 generates on a 16-px grid; any other size is generated at the next multiple
    of 16 up and centre-cropped, so the image is exactly width x height and never shifted or stretched."""

    width: int
    height: int
    multiple: int = 16

    def __post_init__(self):
        if self.width < MIN_SIDE or self.height < MIN_SIDE:
            raise InputImageError(
                f"size {self.width}x{self.height}: width and height must be at least {MIN_SIDE}"
            )
        if self.width * self.height > MAX_OUTPUT_PIXELS:
            raise InputImageError(
                f"size {self.width}x{self.height} is {self.width * self.height / 1e6:.1f} MP; "
                f"the limit is {MAX_OUTPUT_PIXELS / 2**20:.0f} MP (e.g. 2048x2048)"
            )
        if max(self.width / self.height, self.height / self.width) > MAX_ASPECT:
            raise InputImageError(
                f"size {self.width}x{self.height}: aspect ratio must be at most {MAX_ASPECT:g}:1"
            )

    @property
    def generated(self) -> tuple[int, int]:
        """(width, height) actually generated: each side rounded up to the grid."""
        m = self.multiple
        return -(-self.width // m) * m, -(-self.height // m) * m

    def crop(self, x: Tensor) -> Tensor:
        """Centre-crop generated pixels [B, 3, H', W'] to [B, 3, height, width]."""
        gw, gh = self.generated
        top, left = (gh - self.height) // 2, (gw - self.width) // 2
        return x[..., top : top + self.height, left : left + self.width]
