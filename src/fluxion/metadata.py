"""PNG metadata: a generation's parameters written into its PNG, and read back (`fluxion generate --from`).

Text chunks (tEXt, or iTXt when a value is not Latin-1), visible to `exiftool`, ImageMagick `identify -verbose`
and `PIL.Image.open(path).text`:

    prompt, seed, steps, guidance, width, height, model   one value each, as text, for people and tools
    fluxion_version                                       the fluxion version that wrote the file
    Software                                              "fluxion <version>" (the standard PNG keyword)
    fluxion_params                                        JSON of every parameter: the copy `read_params` uses

The seed stored is the seed of that image (image i of a batch used seed + i), so `--from` reproduces it alone.
LoRAs the image was made with are stored as `loras`: [{"path": ..., "scale": ...}] (`--from` loads them again).
Files are written to a temporary name next to the target and renamed, so an interrupted save leaves nothing.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from fluxion import __version__

PARAMS_KEY = "fluxion_params"
VERSION_KEY = "fluxion_version"
TEXT_KEYS = ("prompt", "seed", "steps", "guidance", "width", "height", "model")


def png_info(params: dict) -> PngInfo:
    info = PngInfo()
    for key in TEXT_KEYS:
        if params.get(key) is not None:
            info.add_text(key, str(params[key]))  # PIL switches to iTXt for non-Latin-1 text
    info.add_text(VERSION_KEY, __version__)
    info.add_text("Software", f"fluxion {__version__}")
    info.add_text(PARAMS_KEY, json.dumps({**params, VERSION_KEY: __version__}, sort_keys=True))
    return info


def save_png(result, path: str | Path, watermark: bool = False) -> Path:
    """Write `result.image` (a `fluxion.request.Result`) to `path` (.png) with its parameters; returns the path.
    `watermark`: embed the invisible fluxion mark first (fluxion.provenance; images under 64 px are left
    unmarked with a warning). The file appears whole or not at all (written to a temporary name, then renamed)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: fluxion writes PNG (the parameters go into its metadata); use a .png name")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = result.image
    if watermark:
        from fluxion.provenance import watermark_if_possible

        image = watermark_if_possible(image)
    info = png_info({**result.params, "seed": result.seed})
    # open() rather than mkstemp: the file gets the usual umask permissions, not 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave a half-written file behind
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_params(path: str | Path) -> dict:
    """The parameters stored by `save_png`. Raises FileNotFoundError, or ValueError for a file that is not a
    readable PNG or carries no fluxion parameters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    from fluxion.images import check_input_pixels, too_large

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_input_pixels(im.size, str(path))  # the bomb guard, before decoding
                im.load()  # text chunks after the image data are read only by load(); a truncated file fails here
                text = dict(getattr(im, "text", {}))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise too_large(str(path), e) from None
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path} is damaged or truncated ({e})") from None
    if PARAMS_KEY not in text:
        raise ValueError(
            f"{path} holds no fluxion parameters (not written by fluxion, or its metadata was stripped)"
        )
    try:
        params = json.loads(text[PARAMS_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the stored parameters are not valid JSON ({e})") from None
    if not isinstance(params, dict) or not isinstance(params.get("prompt"), (str, list)):
        raise ValueError(f"{path}: the stored parameters have no prompt")
    return params
