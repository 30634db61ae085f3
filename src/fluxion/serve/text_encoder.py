"""`fluxion serve --role text-encoder`: an HTTP service that runs only the text encoder (text/remote.py is the
client and documents the wire format). Prompts are encoded in batches of at most `max_batch`; answers are
safetensors bytes, never pickle."""

from __future__ import annotations

import asyncio

import torch
from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel, Field
from safetensors.torch import save as save_safetensors

from fluxion.text.cache import encoder_identity
from fluxion.text.remote import DTYPES, ENCODE_PATH, INFO_PATH, config_dict

MAX_PROMPTS = 64
MAX_PROMPT_CHARS = 32_000


class EncodeRequest(BaseModel):
    prompts: list[str] = Field(min_length=1, max_length=MAX_PROMPTS)
    dtype: str = "bfloat16"


def create_text_encoder_app(encoder, max_batch: int = 16) -> FastAPI:
    """`encoder`: a loaded fluxion TextEncoder (any kind)."""
    identity = encoder_identity(encoder)
    info = {"identity": identity, "config": config_dict(encoder.cfg)}
    app = FastAPI(title="fluxion text encoder", version="1")
    lock = asyncio.Lock()  # one encode at a time on the device; requests queue here

    @app.get(INFO_PATH)
    def describe() -> dict:
        return info

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.post(ENCODE_PATH)
    async def encode(req: EncodeRequest) -> Response:
        if req.dtype not in DTYPES:
            raise HTTPException(422, f"dtype must be one of {sorted(DTYPES)}, got {req.dtype!r}")
        too_long = [i for i, p in enumerate(req.prompts) if len(p) > MAX_PROMPT_CHARS]
        if too_long:
            raise HTTPException(422, f"prompts {too_long} are longer than {MAX_PROMPT_CHARS} characters")
        dtype = DTYPES[req.dtype]
        async with lock:
            parts = [
                await asyncio.to_thread(encoder.encode, req.prompts[i : i + max_batch], dtype=dtype)
                for i in range(0, len(req.prompts), max_batch)
            ]
        ctx = torch.cat(parts).to("cpu").contiguous()
        body = save_safetensors({"ctx": ctx}, metadata={"identity": identity, "kind": encoder.cfg.kind})
        return Response(body, media_type="application/octet-stream")

    return app
