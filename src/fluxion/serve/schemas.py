"""Request and response bodies of both APIs (they generate the OpenAPI document at /docs).

BFL: field names and ranges of BFL's FLUX.2 endpoints (docs.bfl.ai OpenAPI); unknown fields are refused so a
typo ("widht") is reported instead of silently ignored. OpenAI Images: the fields of /v1/images/generations;
unknown fields are ignored there, as OpenAI's SDKs send extras (`quality`, `background`, `user`, ...).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 32_000  # BFL: "up to 32K tokens"; OpenAI gpt-image: 32,000 characters
MAX_SEED = 2**32 - 1
MAX_INPUTS = 10
STATUSES = ("Pending", "Ready", "Request Moderated", "Content Moderated", "Task not found", "Error")


def _prompt(v: str) -> str:
    if not v.strip():
        raise ValueError("prompt is empty: describe the image to generate")
    return v


class LoRAChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=200, description="a name from GET /v1/loras")
    scale: float = Field(1.0, ge=-4.0, le=4.0)


class BFLRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="what to generate (or how to edit)")
    input_image: str | None = Field(None, description="base64, data URL, or an allow-listed http(s) URL")
    input_image_2: str | None = None
    input_image_3: str | None = None
    input_image_4: str | None = None
    input_image_5: str | None = None
    input_image_6: str | None = None
    input_image_7: str | None = None
    input_image_8: str | None = None
    input_image_9: str | None = None
    input_image_10: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    width: int | None = Field(None, description="multiple of 16, >= 64; 0/omitted: match the first input")
    height: int | None = Field(None, description="multiple of 16, >= 64; 0/omitted: match the first input")
    steps: int | None = Field(None, ge=1, le=50)
    guidance: float | None = Field(None, ge=0.0, le=20.0)
    safety_tolerance: int = Field(2, ge=0, le=5, description="0 strictest .. 5 least strict")
    output_format: Literal["jpeg", "png", "webp"] = "jpeg"
    prompt_upsampling: bool = Field(
        False,
        description="rewrite the prompt with the operator's local LLM first (422 when none is configured); "
        "the result reports both prompts",
    )
    mask_image: str | None = Field(
        None,
        description="fluxion extension: inpaint input_image where this mask is white (or transparent); "
        "same size as input_image",
    )
    loras: list[LoRAChoice] = Field(
        default_factory=list, max_length=8, description="fluxion extension: LoRAs from GET /v1/loras"
    )
    webhook_url: str | None = Field(None, min_length=1, max_length=2083)
    webhook_secret: str | None = Field(None, max_length=512)

    _prompt = field_validator("prompt")(classmethod(lambda cls, v: _prompt(v)))

    def images(self) -> list[str]:
        names = ["input_image"] + [f"input_image_{i}" for i in range(2, MAX_INPUTS + 1)]
        return [getattr(self, n) for n in names if getattr(self, n)]


class AsyncResponse(BaseModel):
    id: str
    polling_url: str
    cost: float | None = None
    input_mp: float | None = None
    output_mp: float | None = None


class AsyncWebhookResponse(BaseModel):
    id: str
    status: str
    webhook_url: str
    polling_url: str
    cost: float | None = None
    input_mp: float | None = None
    output_mp: float | None = None


class SampleResult(BaseModel):
    sample: str = Field(description="signed URL of the image; expires (BFL: 10 minutes)")
    seed: int
    prompt: str = Field(description="the prompt the image was made from (after upsampling, if asked for)")
    prompt_original: str | None = Field(
        None, description="the caller's prompt, when prompt_upsampling rewrote it"
    )
    start_time: float | None
    end_time: float | None
    duration: float | None


class ResultResponse(BaseModel):
    id: str
    status: str = Field(description=" | ".join(STATUSES))
    result: SampleResult | None = None
    progress: float | None = None
    details: dict | None = None
    preview: dict | None = None


class Credits(BaseModel):
    credits: float | None = Field(description="credits left on this key (None: no budget set)")
    used: float
    input_mp: float
    output_mp: float
    jobs: int


class OpenAIGeneration(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str = Field("auto", description='"WIDTHxHEIGHT" (multiples of 16) or "auto"')
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=3)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, le=50)
    num_inference_steps: int | None = Field(None, ge=1, le=50)
    guidance: float | None = Field(None, ge=0.0, le=20.0)
    guidance_scale: float | None = Field(None, ge=0.0, le=20.0)
    moderation: Literal["auto", "low"] = "auto"

    _prompt = field_validator("prompt")(classmethod(lambda cls, v: _prompt(v)))


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    output_format: str
    size: str
