"""The request contract: what a caller asks for (`Request`), what comes back (`Result`), and the params dict
that round-trips through PNG metadata and job stores (`request_from_params`). Shared by the CLI, the server,
the trainer's samples and the evaluator.

A Request checks everything that does not need the model when it is built (sizes, steps, guidance, seed range,
text encoding), so a bad request fails before any weights are loaded. The comment after each field is its help
text on the command line (`fluxion generate --help`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from PIL import Image

ProgressFn = Callable[[int, int, float], None]  # (step, total steps, seconds for this step)

MAX_STEPS = 1000  # beyond this the Euler steps are far below the model's error; almost surely a typo
MAX_GUIDANCE = 100.0  # the released models use 1..10; 1e30 only ever produces a black image
MAX_SEED = 2**64 - 1  # torch generators take unsigned 64-bit seeds
NoiseMode = Literal["fluxion", "diffusers"]


class Note(UserWarning):
    """Something the caller should know that is not a problem (the CLI prints it as `note: ...`)."""


@dataclass(frozen=True, kw_only=True)
class Request:
    prompt: str | list[str]  # prompt(s); several prompts make a batch
    width: int | None = None  # output width in px (default: the model's; for edits the first image's)
    height: int | None = None  # output height in px (>= 64; off the 16-px grid: made larger, cropped)
    steps: int | None = None  # denoising steps, 1..1000 (default: the model's, e.g. 4 for distilled klein)
    guidance: float | None = None  # guidance scale (default: the model's; fixed for distilled models)
    seed: int | None = None  # seed, 0..2**64-1 (default: random; always printed and stored in the PNG)
    num_images: int = 1  # images per prompt; image i uses seed + i (with --noise fluxion)
    negative_prompt: str = ""  # negative prompt for true-CFG models (klein base)
    references: tuple[Image.Image, ...] = ()
    noise: NoiseMode = (
        "fluxion"  # fluxion: one generator per image (seed + i); diffusers: one draw for the batch
    )
    generator_device: str | None = None  # where noise is drawn: cpu or cuda (default: the model's device)
    allow_override: bool = False  # let a distilled model run with another guidance
    seeds: tuple[int, ...] | None = None  # one explicit seed per image (overrides seed; e.g. a server batch)

    def __post_init__(self) -> None:
        from fluxion.images import InputImageError, check_size

        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        for text, what in [*((p, "prompt") for p in prompts), (self.negative_prompt, "negative prompt")]:
            _check_text(text, what)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 64):
                raise InputImageError(f"{name} {value}: width and height must be at least 64 (px)")
        if self.width is not None and self.height is not None:
            check_size(self.width, self.height)
        if self.steps is not None and not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be at least 1 and at most {MAX_STEPS}, got {self.steps}")
        if self.guidance is not None:
            if not math.isfinite(self.guidance):
                raise ValueError(f"guidance must be a finite number, got {self.guidance}")
            if self.guidance < 0:
                raise ValueError(f"guidance must be >= 0, got {self.guidance:g}")
            if self.guidance > MAX_GUIDANCE:
                raise ValueError(f"guidance must be at most {MAX_GUIDANCE:g}, got {self.guidance:g}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {self.num_images}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED - (self.num_images - 1):
            raise ValueError(f"seed must be in 0..2**64-1 (and seed + num_images - 1 too), got {self.seed}")
        if self.noise not in ("fluxion", "diffusers"):
            raise ValueError(f"noise must be 'fluxion' or 'diffusers', got {self.noise!r}")


def _check_text(text: str, what: str) -> None:
    """Text must be encodable as UTF-8: command-line bytes that are not UTF-8 arrive as lone surrogates."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} is not valid UTF-8 (bad byte at character {e.start}); check the terminal's encoding"
        ) from None


@dataclass
class Result:
    image: Image.Image
    seed: int
    params: dict  # everything needed to reproduce it (written into PNG metadata by `save`)

    def save(self, path) -> object:
        """Write the image as PNG with its parameters in the metadata (what `fluxion generate --from` reads);
        returns the path. `result.image.save()` would drop them."""
        from fluxion.metadata import save_png

        return save_png(self, path)


def request_from_params(params: dict, **overrides) -> Request:
    """Rebuild a Request from a Result's params (e.g. read back from PNG metadata)."""
    # params["references"] is a count (the images themselves are not stored): never a Request field value.
    known = {f for f in Request.__dataclass_fields__} - {"references"}
    values = {k: v for k, v in params.items() if k in known and v is not None}
    return replace(Request(prompt=params["prompt"]), **{**values, **overrides})
