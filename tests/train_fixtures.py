"""Tiny training setups shared by the trainer and LoRA-training tests: a preset, VAE weights, a text encoder and a
small tinyset folder, all built in a second or two."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fluxion.config import DEBUG_TRANSFORMER, DEBUG_VAE, ModelSpec
from fluxion.vae.autoencoder import AutoEncoder
from text_fixtures import TINY_QWEN3, build_tiny_qwen3

TRAIN_SPEC = ModelSpec(
    name="test-train",
    transformer=dataclasses.replace(DEBUG_TRANSFORMER, use_guidance_embed=False),
    vae=DEBUG_VAE,
    text=TINY_QWEN3,
    guidance_mode="cfg",
    default_steps=4,
    default_guidance=2.0,
)

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 230), "yellow": (240, 220, 40)}


def build_components(root: Path, size: int = 32) -> dict:
    """Write VAE weights, a text encoder and a tinyset (solid squares + recolour edit pairs) under root."""
    root = Path(root)
    torch.manual_seed(0)
    vae = AutoEncoder(DEBUG_VAE)
    vae.bn.running_var.fill_(0.5)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(root / "vae.safetensors"))
    text = build_tiny_qwen3(root / "text")
    data = root / "data"
    data.mkdir()
    images, captions = [], []
    for name, rgb in COLOURS.items():
        img = np.full((size, size, 3), 255, np.uint8)
        img[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = rgb
        images.append(img)
        captions.append({"caption": f"a {name} square", "kind": "shape"})
    np.save(data / "images.npy", np.stack(images))
    (data / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions) + "\n")
    names = list(COLOURS)
    edits = [
        {"refs": [i], "target": (i + 1) % 4, "caption": f"make it {names[(i + 1) % 4]}"} for i in range(4)
    ]
    (data / "edits.jsonl").write_text("\n".join(json.dumps(e) for e in edits) + "\n")
    return {"vae": str(root / "vae.safetensors"), "text": str(text), "data": str(data)}
