"""Prompt upsampling plumbing with a tiny random chat LLM (its text is noise; what is checked is the wiring):
BFL's system turn for text-to-image vs edits, greedy determinism, and that an empty rewrite keeps the prompt."""

from __future__ import annotations

import pytest
from PIL import Image

from fluxion.text.templates import UPSAMPLING_I2I, UPSAMPLING_T2I
from fluxion.text.upsample import PromptUpsampler
from text_fixtures import build_tiny_qwen3


@pytest.fixture(scope="module")
def upsampler(tmp_path_factory):
    folder = build_tiny_qwen3(tmp_path_factory.mktemp("llm"), num_layers=2)
    flat = folder / "text_encoder"
    for f in (folder / "tokenizer").iterdir():  # a chat model folder holds its tokenizer
        (flat / f.name).write_bytes(f.read_bytes())
    return PromptUpsampler(flat, max_new_tokens=12)


def test_system_turns_and_determinism(upsampler):
    t2i = upsampler.render("a cat", [])
    i2i = upsampler.render("make it blue", [Image.new("RGB", (64, 64))])
    assert UPSAMPLING_T2I in t2i and UPSAMPLING_I2I not in t2i and "a cat" in t2i
    assert UPSAMPLING_I2I in i2i and "make it blue" in i2i
    assert not upsampler.sees_images  # a text-only LLM gets the instruction without the pixels
    a, b = upsampler("a cat"), upsampler("a cat")
    assert a == b and a.original == "a cat" and isinstance(a.prompt, str) and a.prompt


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a transformers model folder"):
        PromptUpsampler(tmp_path)
