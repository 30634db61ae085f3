"""Reference images -> model-ready pixels (spec 6.5, 7.1).

Reference policy (BFL `default_prep`): RGB; both sides >= 64 px and aspect <= 8 (else an error); downscale
with LANCZOS to a pixel cap (2024^2 for one reference, 1024^2 for several: the BFL numbers, "2024" sic), then
centre-crop to multiples of 16. Small models scale the caps down (ModelSpec.reference_pixels).

Image loading, the limits, pixel conversion and the output-size rule live in `fluxion.images` (re-exported here
for callers of the old names).
"""

from __future__ import annotations

import math

from PIL import Image

from fluxion.images import (  # noqa: F401 - re-exported names
    MAX_ASPECT,
    MAX_OUTPUT_PIXELS,
    MIN_SIDE,
    InputImageError,
    OutputSize,
    check_image,
    pil_to_pixels,
    pixels_to_pil,
)

# Beyond this downscale factor in area (8x a side) Pillow first box-reduces by an integer factor, then applies
# LANCZOS to at most 3x the target ("reducing_gap"): ~10x faster on a 48 MP photo, within 2 levels of the
# plain LANCZOS result. Below it the resize is the reference's exactly.
FAST_REDUCE_AREA = 64


def prepare_reference(image: Image.Image, pixel_cap: int, multiple: int = 16) -> Image.Image:
    """Downscale to at most `pixel_cap` pixels (sizes truncated to int, as the reference does) and centre-crop
    to multiples of `multiple`."""
    image = image.convert("RGB")
    check_image(image)
    w, h = image.size
    if w * h > pixel_cap:
        s = math.sqrt(pixel_cap / (w * h))
        gap = 3.0 if w * h > FAST_REDUCE_AREA * pixel_cap else None
        image = image.resize((int(w * s), int(h * s)), Image.LANCZOS, reducing_gap=gap)
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
