"""Tiny offline stand-ins for the FLUX.2 text encoders (Qwen3 for klein, Mistral3 for dev).

Each builder writes a random-weight LLM plus a small byte-level BPE tokenizer to a folder in the diffusers layout
(`<folder>/text_encoder/`, `<folder>/tokenizer/`) and returns the folder. Nothing touches a model hub; a build takes
about a second. The chat templates reproduce what the real ones render for the turns FLUX.2 uses (spec 5.2, 5.3):

    Qwen3, one user turn, add_generation_prompt=True, enable_thinking=False:
        <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n
    Mistral, system turn + user turn (content given as lists of {"type": "text"} parts):
        <s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]{prompt}[/INST]

The Mistral `tokenizer/` folder is laid out like a saved PixtralProcessor by default (see build_tiny_mistral3).

Usage from another test module: `from text_fixtures import build_tiny_qwen3, TINY_QWEN3` (pytest puts `tests/`
on sys.path), typically inside a module- or session-scoped fixture built on `tmp_path_factory`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# No hub access from tests: set before transformers/huggingface_hub are first imported (they read it at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from fluxion.config import TextEncoderConfig  # noqa: E402
from fluxion.text.templates import SYSTEM_MESSAGE  # noqa: E402

# Small taps on the 4-layer stand-ins (HF hidden_states indices; 0 is the embedding output).
TINY_QWEN3 = TextEncoderConfig(kind="qwen3", hidden_layers=(1, 2, 3), hidden_size=32, max_length=48)
# The Mistral template carries the 168-character system message, so it needs a longer window.
TINY_MISTRAL3 = TextEncoderConfig(kind="mistral3", hidden_layers=(1, 2, 3), hidden_size=32, max_length=96)

_CORPUS = [
    SYSTEM_MESSAGE,
    "A fluffy orange cat sitting on a windowsill",
    "A red apple on a wooden table",
    "A colorful oil painting of a cat",
    "a photo of an astronaut riding a horse on the moon, 35mm, golden hour",
    "user assistant system think",
]

QWEN3_CHAT_TEMPLATE = r"""
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}
{{- '<think>\n\n</think>\n\n' -}}
{%- endif -%}
{%- endif -%}
"""

MISTRAL_CHAT_TEMPLATE = r"""
{{- bos_token -}}
{%- for message in messages -%}
{%- if message['content'] is string -%}
{%- set text = message['content'] -%}
{%- else -%}
{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}
{%- endif -%}
{%- if message['role'] == 'system' -%}
{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' -}}
{%- elif message['role'] == 'user' -%}
{{- '[INST]' + text + '[/INST]' -}}
{%- else -%}
{{- text + eos_token -}}
{%- endif -%}
{%- endfor -%}
"""

# What a bare tokenizer template may do: plain-string content only (a content list would render as its repr).
MISTRAL_TOKENIZER_CHAT_TEMPLATE = r"""
{{- bos_token -}}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{{- '[SYSTEM_PROMPT]' + message['content'] | string + '[/SYSTEM_PROMPT]' -}}
{%- elif message['role'] == 'user' -%}
{{- '[INST]' + message['content'] | string + '[/INST]' -}}
{%- endif -%}
{%- endfor -%}
"""


def _train_bpe(special_tokens: list[str], vocab_size: int = 400) -> Tokenizer:
    """Byte-level BPE trained in memory on a few sentences (any text encodes, specials stay single tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok


def make_qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen3-style tokenizer: right padding with `<|endoftext|>`, chat markers and think tags as added tokens."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(specials),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        chat_template=QWEN3_CHAT_TEMPLATE,
    )


def make_mistral_tokenizer() -> PreTrainedTokenizerFast:
    """Mistral-style tokenizer: `<s>` BOS written by the template, left padding (spec 5.2)."""
    specials = [
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
        "[INST]",
        "[/INST]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
        "[IMG]",
    ]
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(specials),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )


def _text_config(vocab_size: int, cfg: TextEncoderConfig, num_layers: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=2 * cfg.hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=cfg.hidden_size // 4,
        max_position_embeddings=4 * cfg.max_length,
    )


def build_tiny_qwen3(folder: str | Path, *, num_layers: int = 4, seed: int = 0) -> Path:
    """Random Qwen3ForCausalLM (width TINY_QWEN3.hidden_size) + tokenizer in the diffusers layout; returns folder."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = Path(folder)
    tok = make_qwen3_tokenizer()
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**_text_config(len(tok), TINY_QWEN3, num_layers)))
    model.save_pretrained(folder / "text_encoder")
    tok.save_pretrained(folder / "tokenizer")
    return folder


def build_tiny_mistral3(
    folder: str | Path, *, num_layers: int = 4, seed: int = 0, processor: bool = True
) -> Path:
    """Random Mistral3ForConditionalGeneration (tiny Pixtral tower, unused for text) + tokenizer; returns folder.

    processor=True lays `tokenizer/` out like a saved PixtralProcessor (the diffusers FLUX.2-dev repo loads it with
    AutoProcessor): processor_config.json plus the processor's chat template in chat_template.json, while the
    tokenizer's own template (chat_template.jinja) handles only plain-string content, as a bare Mistral tokenizer
    template may. The processor itself is not built: in transformers 5 it requires torchvision.
    processor=False saves a bare tokenizer whose own template is the right one.
    """
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    folder = Path(folder)
    tok = make_mistral_tokenizer()
    text_config = dict(model_type="mistral", **_text_config(len(tok), TINY_MISTRAL3, num_layers))
    patch_size, merge = 8, 2
    vision_config = dict(
        model_type="pixtral",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=8,
        image_size=32,
        patch_size=patch_size,
    )
    config = Mistral3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=merge,
    )
    torch.manual_seed(seed)
    Mistral3ForConditionalGeneration(config).save_pretrained(folder / "text_encoder")
    tok_dir = folder / "tokenizer"
    if processor:
        tok.chat_template = MISTRAL_TOKENIZER_CHAT_TEMPLATE
        tok.save_pretrained(tok_dir)
        processor_config = dict(
            processor_class="PixtralProcessor",
            patch_size=patch_size,
            spatial_merge_size=merge,
            image_token="[IMG]",
        )
        (tok_dir / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
        (tok_dir / "chat_template.json").write_text(json.dumps({"chat_template": MISTRAL_CHAT_TEMPLATE}))
    else:
        tok.save_pretrained(tok_dir)
    return folder
