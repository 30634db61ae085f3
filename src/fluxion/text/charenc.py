"""A small character-level encoder for quoted text: the letters of what must be drawn reach the transformer.

MiniLM's WordPiece sees one lower-cased token per common word, so "Hello", "HELLO" and "hello" are one
token and a random string like "QXBR" is a few opaque pieces: the transformer never sees letters. This
encoder reads the characters of the prompt's quoted spans ("...", '...', and curly quotes) and returns
`max_chars` extra context tokens of the transformer's context width, concatenated after the MiniLM states:

    ctx = cat([text_encoder(prompt) [B, L, C], CharEncoder(char_codes(prompt)) [B, max_chars, C]], dim=1)

It is trained with the transformer from scratch (about 2 M parameters, 4 MB in bf16) and shipped next to it as
`charenc.safetensors`. Models without that file are unchanged: the extra tokens exist only when it is there.
Training keeps it on the transformer as the attribute `char_encoder` (so checkpoints, EMA and FSDP treat it as
part of the model); exports split it back out, so transformer files keep their BFL keys only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

PAD, SEP, UNKNOWN = 0, 1, 2
_FIRST = 3  # printable ASCII 32..126 -> 3..97
VOCAB = _FIRST + 95
_SPANS = re.compile(r'"([^"]+)"|\u201c([^\u201d]+)\u201d|(?<![A-Za-z])\'([^\']+)\'')


@dataclass(frozen=True, kw_only=True)
class CharEncoderConfig:
    context_dim: int  # the transformer's context_in_dim (output width)
    max_chars: int = 32  # characters read per prompt (all quoted spans, separated); also the token count
    width: int = 256
    layers: int = 2
    heads: int = 4


def quoted_spans(prompt: str) -> list[str]:
    return [next(g for g in m.groups() if g is not None) for m in _SPANS.finditer(prompt)]


def char_codes(prompts: list[str], max_chars: int, device=None) -> Tensor:
    """[B, max_chars] int64 codes of the quoted characters (case kept), spans separated by SEP, PAD after."""
    out = torch.zeros(len(prompts), max_chars, dtype=torch.long)
    for i, p in enumerate(prompts):
        codes: list[int] = []
        for k, span in enumerate(quoted_spans(p)):
            if k:
                codes.append(SEP)
            codes.extend(_FIRST + ord(c) - 32 if 32 <= ord(c) <= 126 else UNKNOWN for c in span)
        codes = codes[:max_chars]
        out[i, : len(codes)] = torch.tensor(codes, dtype=torch.long)
    return out.to(device) if device is not None else out


class CharEncoder(nn.Module):
    """Embedding + learned positions -> pre-norm transformer encoder -> projection to the context width."""

    def __init__(self, cfg: CharEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(VOCAB, cfg.width)
        self.pos = nn.Parameter(torch.zeros(cfg.max_chars, cfg.width))
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.context_dim)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Small random embeddings and positions; the output projection starts small, so the new tokens
        start as nearly constant context and grow as they become useful."""
        with torch.no_grad():
            self.embed.weight.normal_(0, 0.02, generator=generator)
            self.pos.normal_(0, 0.02, generator=generator)
            self.proj.weight.normal_(0, 0.002, generator=generator)
            self.proj.bias.zero_()

    def forward(self, codes: Tensor) -> Tensor:
        """codes [B, max_chars] -> [B, max_chars, context_dim] (fp32 parameters; autocast decides the math)."""
        h = self.embed(codes) + self.pos[: codes.shape[1]]
        h = self.encoder(h, src_key_padding_mask=None)  # PAD positions are read too: "no letter here"
        return self.proj(self.norm(h))

    def encode(self, prompts: list[str]) -> Tensor:
        return self(char_codes(prompts, self.cfg.max_chars, self.pos.device))


FILENAME = "charenc.safetensors"


def charenc_beside(transformer_path: str | Path | None) -> Path | None:
    """The character encoder shipped next to a transformer file (or inside a model folder), if any."""
    if transformer_path is None:
        return None
    p = Path(str(transformer_path))
    candidate = p / FILENAME if p.is_dir() else p.parent / FILENAME
    return candidate if candidate.is_file() else None


def load_char_encoder(path: str | Path, context_dim: int, device=None) -> CharEncoder:
    """Strict load; the config (width, layers, max_chars) is read from the shapes and the file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    sd = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    width = sd["embed.weight"].shape[1]
    cfg = CharEncoderConfig(
        context_dim=context_dim,
        max_chars=sd["pos"].shape[0],
        width=width,
        layers=1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")),
        heads=int(meta.get("heads", 4)),
    )
    if sd["proj.weight"].shape[0] != context_dim:
        raise ValueError(
            f"{path}: the character encoder outputs {sd['proj.weight'].shape[0]} channels, the transformer "
            f"reads {context_dim}: it belongs to another model"
        )
    enc = CharEncoder(cfg)
    enc.load_state_dict(sd, strict=True)
    return enc.to(device) if device is not None else enc
