"""Training state: sharded save and exact resume with torch.distributed.checkpoint, and the final export.

A checkpoint folder `checkpoint/step-N/` holds the DCP shards of model, optimizer and EMA, plus one small file
per rank with that rank's RNG streams (noise generator and data-order RNG), so a resumed run draws exactly what
the uninterrupted run would have drawn. `checkpoint/latest` names the newest complete one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from fluxion.lora.lora import write_lora
from fluxion.weights.lora_mapping import LowRank


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_train_state(out: Path, model, opt, ema, sampler, gen: torch.Generator, step: int, rank: int) -> Path:
    folder = out / "checkpoint" / f"step-{step}"
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    if ema is not None:
        state["ema"] = ema.shadow
    dcp.save(state, checkpoint_id=str(folder))
    rng = {"step": step, "sampler": sampler.state_dict()["rng"]}
    (folder / f"rng-{rank}.json").write_text(json.dumps(rng))
    save_file({"generator": gen.get_state()}, str(folder / f"rng-{rank}.safetensors"))
    _barrier()
    if rank == 0:  # written last: a crash mid-save leaves `latest` on the previous complete checkpoint
        (out / "checkpoint" / "latest").write_text(folder.name)
    _barrier()
    return folder


def load_train_state(out: Path, model, opt, ema, sampler, gen: torch.Generator, rank: int) -> int:
    """Restore the newest checkpoint under `out` if there is one; returns the step to continue from."""
    latest = out / "checkpoint" / "latest"
    if not latest.is_file():
        return 0
    folder = out / "checkpoint" / latest.read_text().strip()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    if ema is not None:
        state["ema"] = ema.shadow
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = folder / f"rng-{rank}.json"
    if not rng_file.is_file():
        raise ValueError(
            f"{folder} was saved by fewer processes (no {rng_file.name}); resume with the same world size"
        )
    rng = json.loads(rng_file.read_text())
    sampler.load_state_dict({"rng": _as_tuple(rng["sampler"])})
    gen.set_state(load_file(str(folder / f"rng-{rank}.safetensors"))["generator"])
    return int(rng["step"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list) else x


def _export(out: Path, model, ema, cfg, rank: int) -> Path | None:
    """`transformer.safetensors` (the EMA weights when EMA is on), or `lora.safetensors` for a LoRA run."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    if ema is not None:
        for name, value in ema.shadow.items():
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            full[name] = value.detach().cpu()
    if rank != 0:
        return None
    chars = {k.removeprefix("char_encoder."): v for k, v in full.items() if k.startswith("char_encoder.")}
    full = {k: v for k, v in full.items() if not k.startswith("char_encoder.")}
    if chars and not cfg.lora_rank:  # shipped beside the transformer (text/charenc.py), never inside it
        from fluxion.text.charenc import FILENAME

        heads = str(model.char_encoder.cfg.heads)
        save_file(
            {k: v.contiguous() for k, v in chars.items()}, str(out / FILENAME), metadata={"heads": heads}
        )
    if cfg.lora_rank:
        # Adapter parameters are `<layer>.lora.default.{down,up}`. Written in the layout ComfyUI, diffusers'
        # Flux2 pipeline and fluxion all load exactly: `diffusion_model.<layer>.lora_A/B.weight` (lora.write_lora).
        alpha = float(cfg.lora_alpha or cfg.lora_rank)
        layers = [k.removesuffix(".lora.default.down") for k in full if k.endswith(".lora.default.down")]
        adapters = {
            n: LowRank(full[f"{n}.lora.default.down"], full[f"{n}.lora.default.up"], alpha) for n in layers
        }
        meta = {"fluxion_model": cfg.model}
        return write_lora(adapters, out / "lora.safetensors", format=cfg.lora_format, metadata=meta)
    path = out / "transformer.safetensors"
    tensors = {k: v for k, v in full.items() if ".lora." not in k}
    meta = {"fluxion_model": cfg.model}
    if cfg.objective == "distill":
        # A guidance-distilled student: loading it picks the one-pass sampler by this key (weights/spec.py;
        # fluxion-tiny's student vs its CFG base: weights/models.py). Metadata only: the tensors are unchanged.
        meta["guidance_mode"] = "distilled"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def export_weights(out: Path, model, ema, cfg, rank: int) -> Path | None:
    """Write the trained weights once, in BFL names (see `_export`). Collective: every rank calls it, rank 0
    writes, and no rank returns before the file is complete."""
    try:
        return _export(out, model, ema, cfg, rank)
    finally:
        _barrier()
