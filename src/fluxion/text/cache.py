"""On-disk cache of prompt embeddings: one safetensors file per (encoder identity, prompt, dtype).

Layout: `<directory>/<identity digest[:16]>/<sha256(dtype, prompt)>.safetensors`, holding one tensor
`prompt_embeds` [max_length, context_dim] and the prompt in the metadata (for humans; the key is the hash).

The identity is either given by the caller or derived from what determines the output: the TextEncoderConfig
(kind, taps, width, max_length), the LLM's weight dtype, the bytes of every tokenizer file (templates live
there), and the names and sizes of the model folder's files (weights are too large to hash on every run).
Not in the key: the device and attention backend, whose numerics differ slightly; use an explicit identity if
that matters.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fluxion.text.encoder import TextEncoder

# Bump when the encoding logic changes in a way that alters embeddings, to invalidate old caches.
_FORMAT = "fluxion-text-v1"


@functools.lru_cache(maxsize=16)
def _folders_digest(model_dir: Path, tok_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in tok_dir.iterdir() if p.is_file()):
        h.update(f"tok:{f.name}:".encode())
        h.update(f.read_bytes())
    # A single-file encoder (ComfyUI text_encoders/*.safetensors) is its own only model file.
    files = [model_dir] if model_dir.is_file() else sorted(p for p in model_dir.rglob("*") if p.is_file())
    for f in files:
        h.update(
            f"model:{f.relative_to(model_dir) if f != model_dir else f.name}:{f.stat().st_size}\n".encode()
        )
    return h.hexdigest()


def encoder_identity(encoder: TextEncoder) -> str:
    """A stable string for an encoder loaded from disk (see the module docstring for what goes in). A remote
    encoder (text/remote.py) carries the identity its server computed this way."""
    if isinstance(getattr(encoder, "identity", None), str):
        return encoder.identity
    if encoder.sources is None:
        raise ValueError("this encoder was not loaded from a folder: give PromptCache an explicit identity")
    cfg = json.dumps(dataclasses.asdict(encoder.cfg), sort_keys=True)
    weights_dtype = next(
        encoder.backbone.parameters()
    ).dtype  # a bf16 and an fp32 LLM give different embeddings
    return f"{_FORMAT}|{cfg}|{weights_dtype}|{_folders_digest(*encoder.sources)}"


class PromptCache:
    """`get_or_encode(encoder, prompts)` returns what `encoder.encode(prompts)` would, reading and writing the cache."""

    def __init__(self, directory: str | Path, identity: str | None = None) -> None:
        self.directory = Path(directory)
        self.identity = identity  # None: derive from the encoder's folders (encoder_identity)
        self._seen: str | None = None  # the identity of the last encoder used, so it can be released later

    def folder(self, encoder: TextEncoder | None) -> Path:
        if self.identity is not None:
            identity = self.identity
        elif encoder is not None:
            identity = self._seen = encoder_identity(encoder)
        elif self._seen is not None:
            identity = self._seen
        else:
            raise ValueError(
                "no text encoder and no cache identity: load the encoder once, or give an identity"
            )
        return self.directory / hashlib.sha256(identity.encode()).hexdigest()[:16]

    @staticmethod
    def _name(prompt: str, dtype: torch.dtype) -> str:
        return hashlib.sha256(f"{dtype}\0{prompt}".encode()).hexdigest() + ".safetensors"

    def get_or_encode(
        self,
        encoder: TextEncoder | None,
        prompts: str | Sequence[str],
        *,
        dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        """[B, max_length, context_dim] on the encoder's device; misses are encoded in one batch and stored.
        With `encoder=None` (released to save memory) every prompt must already be cached."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        folder = self.folder(encoder)
        rows: dict[str, torch.Tensor] = {}
        for prompt in prompts:
            path = folder / self._name(prompt, dtype)
            if prompt not in rows and path.exists():
                rows[prompt] = load_file(path)["prompt_embeds"]
        missing = list(dict.fromkeys(p for p in prompts if p not in rows))  # unique, order kept
        if missing and encoder is None:
            raise ValueError(
                f"the text encoder was released and {len(missing)} prompt(s) are not cached: {missing[:3]}"
            )
        if missing:
            encoded = encoder.encode(missing, dtype=dtype).cpu()
            for prompt, row in zip(missing, encoded):
                rows[prompt] = row
                self._save(folder / self._name(prompt, dtype), prompt, row)
        return torch.stack([rows[p] for p in prompts]).to(encoder.device if encoder is not None else "cpu")

    @staticmethod
    def _save(path: Path, prompt: str, row: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"prompt_embeds": row.contiguous()}, tmp, metadata={"prompt": prompt})
        os.replace(tmp, path)  # atomic: concurrent writers (e.g. curation ranks) never leave a torn file
