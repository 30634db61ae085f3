"""A text encoder served by another process (`fluxion serve --role text-encoder`), so the DiT and VAE fit a
smaller GPU: [dev]'s Mistral Small is ~48 GB in bf16, more than the transformer's fp8 weights.

Wire format: `POST {url}/v1/encode` with JSON `{"prompts": [...], "dtype": "bfloat16" | "float32"}` answers
`application/octet-stream` safetensors bytes holding one tensor `ctx` [B, max_length, context_dim] and, in the
safetensors metadata, the encoder identity and its TextEncoderConfig. Never pickle: `torch.load` of a remote
answer can run code (the remote encoder in the FLUX.2 launch material returns `torch.save` output).

The client checks the served encoder's config against the model it conditions (same kind, taps, width and token
length, else the transformer would get features it was not trained on) and, when the caller pins one, the
identity hash (which covers the weights: text/cache.py `encoder_identity`). The prompt cache sits in front of it
like in front of a local encoder, keyed by the served identity.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request

import torch
from safetensors.torch import load as load_safetensors

from fluxion.config import TextEncoderConfig

ENCODE_PATH = "/v1/encode"
INFO_PATH = "/v1/encoder"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class RemoteEncoderError(ValueError):  # a ValueError: the CLI reports it in one line
    pass


def config_dict(cfg: TextEncoderConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as they travel


class RemoteTextEncoder:
    """Duck-types `TextEncoder.encode` for the pipeline and the prompt cache."""

    def __init__(
        self, url: str, cfg: TextEncoderConfig, *, identity: str | None = None, timeout: float = 300
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote text encoder URL must start with http:// or https://, got {url!r}")
        self.url, self.cfg, self.timeout = url.rstrip("/"), cfg, timeout
        info = self._get_json(INFO_PATH)
        if info.get("config") != config_dict(cfg):
            raise RemoteEncoderError(
                f"the text encoder at {self.url} is {info.get('config')}, but this model needs {config_dict(cfg)}"
            )
        if identity is not None and info.get("identity") != identity:
            raise RemoteEncoderError(
                f"the text encoder at {self.url} has identity {info.get('identity')!r}, expected {identity!r}"
            )
        self.identity: str = info["identity"]
        self.device = torch.device("cpu")  # where encode() returns its tensors

    def _get_json(self, path: str) -> dict:
        try:
            with urllib.request.urlopen(self.url + path, timeout=self.timeout) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
            raise RemoteEncoderError(f"cannot reach the text encoder at {self.url}: {e}") from None

    @torch.no_grad()
    def encode(self, prompts, *, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        name = next((k for k, v in DTYPES.items() if v == dtype), None)
        if name is None:
            raise ValueError(f"remote encoding supports {sorted(DTYPES)}, not {dtype}")
        body = json.dumps({"prompts": prompts, "dtype": name}).encode()
        req = urllib.request.Request(
            self.url + ENCODE_PATH, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            raise RemoteEncoderError(
                f"text encoder at {self.url} answered {e.code}: {e.read()[:300]!r}"
            ) from None
        except (urllib.error.URLError, OSError) as e:
            raise RemoteEncoderError(f"cannot reach the text encoder at {self.url}: {e}") from None
        ctx = load_safetensors(data)["ctx"]
        expected = (len(prompts), self.cfg.max_length, self.cfg.context_dim)
        if tuple(ctx.shape) != expected or ctx.dtype != dtype:
            raise RemoteEncoderError(
                f"text encoder answered {tuple(ctx.shape)} {ctx.dtype}, expected {expected} {dtype}"
            )
        return ctx
