"""Image I/O and validation, one place for the CLI, the pipeline, the trainer and the evaluator.

- `load_image`: open and fully decode a file, with a decompression-bomb guard (`MAX_INPUT_PIXELS`) checked on the
  header before any pixel is decoded; every failure is one ValueError / FileNotFoundError line.
- `check_image`: the limits a model input must meet (sides >= 64 px, aspect <= 8:1).
- `pil_to_pixels` / `pixels_to_pil`: PIL <-> [B, 3, H, W] float in [-1, 1] (the reference's conversions).
- `OutputSize`: the output-size rule (any size >= 64 px up to 4 MP; a size off the 16-px grid is generated at the
  next multiple up and centre-cropped), and `fit_size` (an input image's size as an output size).
- `model_pixel_range`: the pixel counts a model handles well (outside it: a warning, not an error).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MIN_SIDE = 64
MAX_ASPECT = 8.0
MAX_OUTPUT_PIXELS = 4 * 1024 * 1024  # the 4 MP product limit of FLUX.2 (BFL documentation)
# Inputs larger than this are refused before decoding (8192x8192; a 48 MP phone photo passes). Below Pillow's own
# warning threshold (89 MP), so Pillow never warns first; a 20000x20000 PNG would need 1.2 GB to decode.
MAX_INPUT_PIXELS = 8192 * 8192


class InputImageError(ValueError):
    """A user-supplied image or size that cannot be used; the message says what to change."""


def load_image(path: str | Path, what: str = "image") -> Image.Image:
    """Open and fully decode an image file. Errors (missing, not an image, truncated, too many pixels) are one
    line each: FileNotFoundError or ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_input_pixels(im.size, f"{what} {path}")
                im.load()  # decode now: a truncated file fails here, not halfway through a generation
                return im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise too_large(f"{what} {path}", e) from None
    except UnidentifiedImageError:
        raise ValueError(f"{what} {path} is not an image (or not a format Pillow reads)") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{what} {path} is damaged or truncated ({e})") from None


def too_large(what: str, error: Exception) -> InputImageError:
    """The one-line error for Pillow's decompression-bomb refusal (raised on the header, before ours runs; its
    message carries the pixel count, not the sides)."""
    count = re.search(r"\((\d+) pixels\)", str(error))
    size = f" ({int(count[1]) / 1e6:.0f} MP)" if count else ""
    return InputImageError(
        f"{what} is too large{size}: fluxion reads images of at most {_mp(MAX_INPUT_PIXELS)}; downscale it first"
    )


def check_input_pixels(size: tuple[int, int], what: str) -> None:
    """The decompression-bomb guard, on a header's (width, height) before decoding."""
    w, h = size
    if w * h > MAX_INPUT_PIXELS:
        raise InputImageError(
            f"{what} is {w}x{h} ({w * h / 1e6:.0f} MP): fluxion reads images of at most "
            f"{_mp(MAX_INPUT_PIXELS)}; downscale it first"
        )


def _mp(pixels: int) -> str:
    side = math.isqrt(pixels)
    return f"{side}x{side} pixels" if side * side == pixels else f"{pixels / 1e6:.0f} MP"


def check_image(image: Image.Image, what: str = "reference image") -> None:
    w, h = image.size
    if min(w, h) < MIN_SIDE:
        raise InputImageError(f"{what} is {w}x{h}: both sides must be at least {MIN_SIDE} px")
    if max(w / h, h / w) > MAX_ASPECT:
        raise InputImageError(f"{what} is {w}x{h}: the aspect ratio must be at most {MAX_ASPECT:g}:1")


def pil_to_pixels(image: Image.Image):
    """PIL RGB -> [1, 3, H, W] float32 in [-1, 1] (ToTensor then 2x - 1)."""
    import torch

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0


def pixels_to_pil(x) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images; clamp then truncate to uint8 as the reference does (spec 4.4)."""
    import torch

    arr = (127.5 * (x.float().clamp(-1, 1) + 1.0)).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def check_size(width: int, height: int) -> None:
    """The output limits that do not depend on the model (>= 64 px a side, <= 4 MP, aspect <= 8:1)."""
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InputImageError(f"size {width}x{height}: width and height must be at least {MIN_SIDE}")
    if width * height > MAX_OUTPUT_PIXELS:
        raise InputImageError(
            f"size {width}x{height} is {width * height / 1e6:.1f} MP; "
            f"the limit is {MAX_OUTPUT_PIXELS / 2**20:.0f} MP (e.g. 2048x2048)"
        )
    if max(width / height, height / width) > MAX_ASPECT:
        raise InputImageError(f"size {width}x{height}: aspect ratio must be at most {MAX_ASPECT:g}:1")


@dataclass(frozen=True)
class OutputSize:
    """The output-size rule. FLUX.2 generates on a 16-px grid; any other size is generated at the next multiple
    of 16 up and centre-cropped, so the image is exactly width x height and never shifted or stretched."""

    width: int
    height: int
    multiple: int = 16

    def __post_init__(self):
        check_size(self.width, self.height)

    @property
    def generated(self) -> tuple[int, int]:
        """(width, height) actually generated: each side rounded up to the grid."""
        m = self.multiple
        return -(-self.width // m) * m, -(-self.height // m) * m

    def crop(self, x):
        """Centre-crop generated pixels [B, 3, H', W'] to [B, 3, height, width]."""
        gw, gh = self.generated
        top, left = (gh - self.height) // 2, (gw - self.width) // 2
        return x[..., top : top + self.height, left : left + self.width]


def fit_size(image: Image.Image, max_pixels: int = MAX_OUTPUT_PIXELS) -> tuple[int, int]:
    """An input image's size as the output size, scaled down (aspect kept) to at most `max_pixels`."""
    w, h = image.size
    s = min(1.0, math.sqrt(min(max_pixels, MAX_OUTPUT_PIXELS) / (w * h)))
    return max(int(w * s), MIN_SIDE), max(int(h * s), MIN_SIDE)


def model_pixel_range(spec) -> tuple[int, int]:
    """(low, high) output pixel counts a model handles well: from 1/8 of its default size's area up to 4x it, or
    its single-reference cap if larger (klein and dev: 2024², i.e. the whole 4 MP range). Far outside, a DiT
    trained at one resolution repeats tiles or loses detail: callers warn, they do not refuse."""
    area = spec.default_size[0] * spec.default_size[1]
    return area // 8, max(4 * area, spec.reference_pixels[0])
