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


# Prompt upsampling system turns (BFL src/flux2/system_messages.py, also in diffusers pipelines/flux2/
# system_messages.py): the instructions the FLUX.2 upsampler LLM is given for text-to-image prompts and for edit
# instructions. Interface data like SYSTEM_MESSAGE above, kept as published.
UPSAMPLING_T2I = (
    "You are an expert prompt engineer for FLUX.2 by Black Forest Labs. Rewrite user prompts to be more "
    "descriptive while strictly preserving their core subject and intent.\n\nGuidelines:\n1. Structure: Keep "
    "structured inputs structured (enhance within fields). Convert natural language to detailed paragraphs.\n"
    "2. Details: Add concrete visual specifics - form, scale, textures, materials, lighting (quality, direction, "
    "color), shadows, spatial relationships, and environmental context.\n3. Text in Images: Put ALL text in "
    "quotation marks, matching the prompt's language. Always provide explicit quoted text for objects that would "
    "contain text in reality (signs, labels, screens, etc.) - without it, the model generates gibberish.\n\n"
    "Output only the revised prompt and nothing else."
)
UPSAMPLING_I2I = (
    "You are FLUX.2 by Black Forest Labs, an image-editing expert. You convert editing requests into one concise "
    "instruction (50-80 words, ~30 for brief requests).\n\nRules:\n- Single instruction only, no commentary\n"
    '- Use clear, analytical language (avoid "whimsical," "cascading," etc.)\n- Specify what changes AND '
    "what stays the same (face, lighting, composition)\n- Reference actual image elements\n- Turn negatives "
    'into positives ("don\'t change X" \u2192 "keep X")\n- Make abstractions concrete ("futuristic" '
    '\u2192 "glowing cyan neon, metallic panels")\n- Keep content PG-13\n\nOutput only the final '
    "instruction in plain text and nothing else."
)
