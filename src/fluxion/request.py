"""The request contract: what a caller asks for (`Request`), what comes back (`Result`), and the params dict
that round-trips through PNG metadata and job stores (`request_from_params`). Shared by the CLI, the server,
the trainer's samples and the evaluator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from PIL import Image

ProgressFn = Callable[[int, int, float], None]  # (step, total steps, seconds for this step)


@dataclass(frozen=True, kw_only=True)
class Request:
    prompt: str | list[str]
    width: int | None = None
    height: int | None = None
    steps: int | None = None  # None: the model's default
    guidance: float | None = None  # None: the model's default
    seed: int | None = None  # None: a random seed, reported in the result
    num_images: int = 1  # per prompt; image i of a prompt uses seed + i
    negative_prompt: str = ""  # true-CFG models only
    references: tuple[Image.Image, ...] = ()
    generator_device: str | None = None  # where the noise is drawn; None: the model device (as BFL does)
    allow_override: bool = False  # let a distilled model run with other than its fixed guidance
    seeds: tuple[int, ...] | None = None  # one explicit seed per image (overrides seed; e.g. a server batch)


@dataclass
class Result:
    image: Image.Image
    seed: int
    params: dict  # everything needed to reproduce it (written into PNG metadata by the CLI)


def request_from_params(params: dict, **overrides) -> Request:
    """Rebuild a Request from a Result's params (e.g. read back from PNG metadata)."""
    # params["references"] is a count (the images themselves are not stored): never a Request field value.
    known = {f for f in Request.__dataclass_fields__} - {"references"}
    values = {k: v for k, v in params.items() if k in known and v is not None}
    return replace(Request(prompt=params["prompt"]), **{**values, **overrides})
