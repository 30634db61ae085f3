"""The exact text each FLUX.2 text encoder tokenises for a prompt (spec 5.2 dev/Mistral, 5.3 klein/Qwen3).

The chat markup itself comes from the tokenizer's own chat template (shipped in the `tokenizer/` folder); this
module only builds the conversation and the template flags the references use.
"""

from __future__ import annotations

import hashlib
from typing import Any

# Interface constant, kept verbatim: the [dev] transformer was trained on Mistral hidden states of prompts wrapped
# in exactly this system turn, so any edit (even the newline between "object" and "attribution" becoming a space,
# as in an unmerged BFL PR) changes the conditioning. Source: BFL src/flux2/system_messages.py, identical in
# diffusers pipelines/flux2/system_messages.py. 168 characters; SHA-256 below is from spec 5.2.
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)
SYSTEM_MESSAGE_SHA256 = "d43d93082f24034d9c7f4e5b65cdeceb1e082c64c9cf95dfae5be89c31e1320d"

assert hashlib.sha256(SYSTEM_MESSAGE.encode("utf-8")).hexdigest() == SYSTEM_MESSAGE_SHA256


def mistral_messages(prompt: str, system_message: str = SYSTEM_MESSAGE) -> list[dict[str, Any]]:
    """dev conversation: system turn + user turn, content as lists of text parts (the Pixtral processor's format).

    The literal `[IMG]` is removed from the prompt first, as BFL and diffusers do: with truncation on, the Pixtral
    processor counts image tokens and fails when truncation changes that count.
    """
    return [
        {"role": "system", "content": [{"type": "text", "text": system_message}]},
        {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
    ]


def render_mistral(tokenizer: Any, prompt: str) -> str:
    """`<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{prompt}[/INST]` (no generation prompt).

    `tokenizer` is anything with `apply_chat_template` (a tokenizer or the Pixtral processor).
    """
    return tokenizer.apply_chat_template(
        mistral_messages(prompt), tokenize=False, add_generation_prompt=False
    )


def render_qwen3(tokenizer: Any, prompt: str) -> str:
    """`<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`.

    One user turn, no system turn; the empty think block comes from `enable_thinking=False`.
    """
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )


def render_prompt(kind: str, tokenizer: Any, prompt: str) -> str:
    """The text fed to the tokenizer for one prompt; MiniLM (fluxion-tiny) takes the raw prompt."""
    if kind == "mistral3":
        return render_mistral(tokenizer, prompt)
    if kind == "qwen3":
        return render_qwen3(tokenizer, prompt)
    if kind == "minilm":
        return prompt
    raise ValueError(f"unknown text encoder kind {kind!r}")
