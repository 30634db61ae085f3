"""Prompt upsampling: a local LLM rewrites a short prompt into the detailed kind FLUX.2 was trained on.

Off by default. Whoever turns it on gets the rewritten prompt reported next to the original (`Upsampled`), and
the pipeline records both in the image's parameters: users object when a hosted API rewrites prompts silently.

The LLM is any transformers chat model in a local folder (BFL uses Mistral Small 3.2, the [dev] text encoder
itself). Text-to-image prompts get BFL's T2I system turn; edit instructions get the I2I turn and, when the model
is a vision-language model (its folder has a processor with an image processor), the reference images too.
Decoding is greedy, so the same prompt gives the same rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from fluxion.text.templates import UPSAMPLING_I2I, UPSAMPLING_T2I


@dataclass(frozen=True)
class Upsampled:
    original: str
    prompt: str  # what the image is generated from


class PromptUpsampler:
    def __init__(self, folder: str | Path, *, device: str | torch.device = "cpu", max_new_tokens: int = 512):
        import transformers

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a transformers model folder (no config.json)")
        self.device, self.max_new_tokens = torch.device(device), max_new_tokens
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.processor = None
        try:
            proc = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
            if getattr(proc, "image_processor", None) is not None:
                self.processor = proc
        except (OSError, ValueError, TypeError):
            pass
        if self.processor is not None:
            self.model = transformers.AutoModelForImageTextToText.from_pretrained(
                folder, dtype=dtype, local_files_only=True
            )
            self.tokenizer = self.processor.tokenizer
        else:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, local_files_only=True
            )
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model.to(self.device).eval()

    @property
    def sees_images(self) -> bool:
        return self.processor is not None

    def _messages(self, prompt: str, images: list[Image.Image]) -> list[dict]:
        system = UPSAMPLING_I2I if images else UPSAMPLING_T2I
        if not self.sees_images:
            return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        return [
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": content},
        ]

    def render(self, prompt: str, images: list[Image.Image]) -> str:
        """The exact text the LLM is prompted with (system turn, user turn, generation prompt)."""
        template = (self.processor if self.sees_images else self.tokenizer).apply_chat_template
        return template(self._messages(prompt, images), add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def __call__(self, prompt: str, images: list[Image.Image] | tuple = ()) -> Upsampled:
        images = list(images)
        text = self.render(prompt, images)
        if self.sees_images:
            inputs = self.processor(text=[text], images=images or None, return_tensors="pt")
        else:
            inputs = self.tokenizer([text], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        )
        new = out[0, inputs["input_ids"].shape[1] :]
        rewritten = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        # An LLM that says nothing useful must not blank the user's prompt.
        return Upsampled(original=prompt, prompt=rewritten or prompt)
