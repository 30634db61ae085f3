"""The training run's settings (one frozen dataclass) and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: str  # preset name: fixes the transformer, VAE and text-encoder architectures
    data: tuple[str, ...]  # tinyset folders or image folders with .txt captions
    out: str  # run folder: checkpoints, logs, exported weights
    vae: str  # autoencoder weights (frozen)
    text: str | None = None  # text-encoder folder; None = the preset's bundled default (minilm)
    init: str | None = None  # transformer weights to start from; None = from scratch (init_weights)
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema: float = 0.0  # EMA decay of the trained weights; 0 disables
    caption_dropout: float = 0.1  # empty prompt this often, so the model also learns the unconditional v
    edit_fraction: float = 0.0  # share of batches drawn from edit pairs
    # Letters reach the model: a character encoder of the quoted text (text/charenc.py), trained with the
    # transformer; its tokens follow the text encoder's. Off: the model is exactly a plain FLUX.2 model.
    char_encoder: bool = False
    char_max: int = 32  # characters (and extra context tokens) per prompt
    caption_variety: float = 0.0  # chance a tinyset caption is rephrased when drawn (curate.tinyset.captions)
    pixels: int = 128 * 128  # bucket size for image folders
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    # Disk caches of the frozen encoders' outputs under <out>/cache: VAE latents per image, text embeddings per
    # caption. Each image and caption is then encoded once for the whole run (and across resumed runs).
    cache_latents: bool = False
    # The latent cache in device memory instead of on disk, for datasets that fit (the 14.7 k tinyset images at
    # 128² are ~0.5 GB of fp32 latents): the VAE encodes each image once and no step reads files for latents.
    cache_latents_on_device: bool = False
    cache_text: bool = False
    sample_every: int = 0  # write sample images every N steps (0: never)
    sample_prompts: tuple[str, ...] = ("a red heart", "a blue circle in the center")
    sample_steps: int | None = None  # None: the preset's default
    compute_dtype: str = "bfloat16"  # the one precision policy: autocast dtype on CUDA (CPU runs fp32)
    compile: bool = False  # per-block torch.compile
    activation_checkpointing: bool = False
    fsdp: bool = False  # shard with FSDP2 across the torchrun world
    lora_rank: int = 0  # > 0: train a LoRA instead of the full model
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ("*img_attn.qkv", "*img_attn.proj", "*linear1", "*linear2")
    lora_format: str = (
        "comfy"  # layout of the exported lora.safetensors: one of lora.LORA_FILE_FORMATS (lora.write_lora)
    )
    max_steps_this_run: int = 0  # stop after this many steps (to test resume); 0 = run to `steps`
    # Wall-clock budget for this run in seconds (0: none). The step time is measured over steps 50-100 (after
    # warm-up and compilation) and `steps` is lowered to fit, schedule included. For fixed-length GPU leases.
    time_budget_s: float = 0.0
    # The objective the loop runs (train/objectives.py): "flow" (rectified flow, pre-training and fine-tuning),
    # "dpo" (Diffusion-DPO on preference pairs against a frozen reference), "distill" (few-step student from a
    # CFG teacher, guidance distilled in).
    objective: str = "flow"
    reference: str | None = (
        None  # DPO: frozen reference weights; None = `init` (LoRA: the base, adapters off)
    )
    dpo_beta: float = 1000.0  # DPO: KL strength beta (per-element mean MSE, so errors differences are ~1e-3)
    teacher: str | None = (
        None  # distill: teacher weights (true-CFG model); LoRA: None = the base, adapters off
    )
    teacher_model: str | None = None  # distill: the teacher's preset; None = `model`
    teacher_steps: int = 20  # distill: Euler steps of the teacher over the whole schedule
    teacher_guidance: float | None = None  # distill: CFG scale of the teacher; None = its preset's default
    student_steps: int = 4  # distill: the student's step count (one forward per step)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if not 0 <= self.caption_dropout < 1 or not 0 <= self.edit_fraction <= 1:
            raise ValueError("caption_dropout must be in [0, 1) and edit_fraction in [0, 1]")
        from fluxion.train.precision import COMPUTE_DTYPES

        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}")
        from fluxion.lora import LORA_FILE_FORMATS

        if self.lora_format not in LORA_FILE_FORMATS:
            raise ValueError(
                f"lora_format must be one of {', '.join(LORA_FILE_FORMATS)}, got {self.lora_format!r}"
            )
        if self.objective not in ("flow", "dpo", "distill"):
            raise ValueError(f"objective {self.objective!r}: choose flow, dpo or distill")
        if self.objective == "distill":
            if not self.teacher and not (self.lora_rank and self.init):
                raise ValueError(
                    "objective distill needs teacher= (the CFG teacher's transformer weights), or lora_rank= "
                    "with init= (the teacher is then the base model, adapters off)"
                )
            if (
                self.lora_rank
                and self.teacher in (None, self.init)
                and self.teacher_model not in (None, self.model)
            ):
                raise ValueError(
                    f"teacher_model={self.teacher_model!r}: a LoRA run's teacher is its own base ({self.model}); "
                    "give teacher= weights for another model"
                )
            if not 1 <= self.student_steps <= self.teacher_steps or self.teacher_steps % self.student_steps:
                raise ValueError("student_steps must divide teacher_steps (e.g. 4 of 20)")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def config_from_dict(values: dict) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - fields
    if unknown:
        raise ValueError(f"unknown training options: {sorted(unknown)}; valid: {sorted(fields)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return TrainConfig(**values)
