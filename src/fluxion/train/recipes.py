"""Run configs as functions. `fluxion train RECIPE` accepts a recipe name from RECIPES, a TOML file, or a Python
file defining `config()`.

fluxion-tiny (the embedded default model) is trained in two stages on the tinyset (docs/DATASET_CARD.md):
the autoencoder first, then the transformer on the frozen autoencoder and the frozen MiniLM encoder. Its
step counts were sized for one H100 in about 20 minutes in all (docs/MODEL_CARD.md has the measured run).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from fluxion.train.train import TrainConfig
from fluxion.train.vae import VAETrainConfig


def fluxion_tiny_vae(data: list[str], out: str, steps: int = 4000) -> VAETrainConfig:
    return VAETrainConfig(
        model="fluxion-tiny", data=tuple(data), out=out, steps=steps, batch_size=64, lr=4e-4
    )


def fluxion_tiny(
    data: list[str], out: str, vae: str, steps: int = 12000, text: str | None = None
) -> TrainConfig:
    return TrainConfig(
        model="fluxion-tiny",
        data=tuple(data),
        out=out,
        vae=vae,
        text=text,
        steps=steps,
        batch_size=256,
        lr=6e-4,
        warmup=500,
        min_lr_ratio=0.05,
        weight_decay=0.01,
        grad_clip=1.0,
        ema=0.999,
        caption_dropout=0.1,
        edit_fraction=0.25,
        log_every=100,
        save_every=2000,
        compile=True,
    )


def fluxion_tiny_lora(data: list[str], out: str, init: str, vae: str, steps: int = 300) -> TrainConfig:
    """A LoRA fine-tune of fluxion-tiny on a folder of ~20 captioned images (the 'your own style' use case)."""
    return TrainConfig(
        model="fluxion-tiny",
        data=tuple(data),
        out=out,
        vae=vae,
        init=init,
        steps=steps,
        batch_size=8,
        lr=1e-3,
        warmup=20,
        caption_dropout=0.05,
        lora_rank=16,
        lora_alpha=16,
        log_every=10,
    )


# ---------------------------------------------------------------------------------------------------------
# Diffusion-DPO and step distillation on a klein-base-4B LoRA (docs/MODEL_CARD.md, "Alignment and distillation
# on a klein-base LoRA"). The frozen reference / teacher is the base itself with the adapters off: one 4B copy in
# memory. Rank 16 on the attention layers (lora.TARGET_PRESETS["attention"], as benchmarks/bench_lora_train.py
# measures), bf16 autocast, batch 1 at 1024², a checkpoint every 250 steps for resuming on time-limited leases.

KLEIN_BASE = "flux2-klein-base-4b"  # true CFG: the DPO reference and the distillation teacher


def _klein_base_lora(data: list[str], out: str, init: str, vae: str, text: str | None, steps: int, rank: int,
                     lr: float, **objective) -> TrainConfig:  # fmt: skip
    from fluxion.lora.lora import TARGET_PRESETS

    return TrainConfig(
        model=KLEIN_BASE,
        data=tuple(data),
        out=out,
        vae=vae,
        text=text,
        init=init,
        steps=steps,
        batch_size=1,
        pixels=1024 * 1024,
        lr=lr,
        warmup=50,
        compute_dtype="bfloat16",
        lora_rank=rank,
        lora_alpha=rank,
        lora_targets=tuple(TARGET_PRESETS["attention"]),
        log_every=10,
        save_every=250,
        **objective,
    )


def klein_base_lora_dpo(pairs: list[str], out: str, init: str, vae: str, text: str | None = None,
                        steps: int = 1000, rank: int = 16, lr: float = 1e-4,
                        beta: float = 1000.0) -> TrainConfig:  # fmt: skip
    """Diffusion-DPO of a klein-base-4B LoRA on preference-pair folders (train/pairs.py writes them); the
    reference is the base, adapters off. beta as tiny_v2_dpo."""
    return _klein_base_lora(
        pairs, out, init, vae, text, steps, rank, lr, objective="dpo", dpo_beta=beta, caption_dropout=0.0
    )


def klein_base_lora_distill(data: list[str], out: str, init: str, vae: str, text: str | None = None,
                            steps: int = 2000, rank: int = 16, lr: float = 1e-4) -> TrainConfig:  # fmt: skip
    """A 4-step LoRA student with guidance distilled in, from the base as its 20-step CFG teacher (scale 4,
    adapters off): sample the base + this LoRA with --steps 4 --guidance 1 (one forward per step)."""
    return _klein_base_lora(
        data,
        out,
        init,
        vae,
        text,
        steps,
        rank,
        lr,
        objective="distill",
        teacher=None,
        teacher_steps=20,
        student_steps=4,
        teacher_guidance=4.0,
        caption_dropout=0.05,
    )


RECIPES = {
    "fluxion-tiny": fluxion_tiny,
    "fluxion-tiny-vae": fluxion_tiny_vae,
    "fluxion-tiny-lora": fluxion_tiny_lora,
    "klein-base-lora-dpo": klein_base_lora_dpo,
    "klein-base-lora-distill": klein_base_lora_distill,
}


def curriculum(base: TrainConfig, stages: list[tuple[int, tuple[str, ...], int]]) -> list[TrainConfig]:
    """A progressive-resolution curriculum: (steps, data folders, pixels per image) per stage. Stage k writes
    to `<out>/stage-k` and starts from the weights stage k-1 exported; `run_stages` runs them in order."""
    out = []
    for k, (steps, data, pixels) in enumerate(stages):
        init = str(Path(base.out) / f"stage-{k - 1}" / "transformer.safetensors") if k else base.init
        out.append(
            replace(
                base,
                steps=steps,
                data=tuple(data),
                pixels=pixels,
                init=init,
                out=str(Path(base.out) / f"stage-{k}"),
            )
        )
    return out


def load_recipe_file(path: str | Path) -> TrainConfig | list[TrainConfig]:
    """A TOML file of TrainConfig fields, or a Python file with a `config()` function returning a TrainConfig
    (or `stages()` returning a list of them, run one after the other)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training recipe not found: {path}")
    if path.suffix == ".toml":
        import tomllib

        from fluxion.train.train import config_from_dict

        return config_from_dict(tomllib.loads(path.read_text()))
    if path.suffix == ".py":
        import runpy

        namespace = runpy.run_path(str(path))
        if "stages" in namespace:
            return list(namespace["stages"]())
        if "config" not in namespace:
            raise ValueError(
                f"{path} must define config() returning a TrainConfig (or stages() returning a list)"
            )
        return namespace["config"]()
    raise ValueError(f"{path}: a recipe is a .toml or .py file")


# ---------------------------------------------------------------------------------------------------------
# fluxion-tiny v2: the FLUX.2 recipe end to end (runs/fluxion_tiny_v2.py chains these; docs/MODEL_CARD.md).
# Each stage is sized by wall-clock (`time_budget_s`: steps are fitted after 100 measured steps, schedule
# included) so the whole recipe fits two calls of under 9 minutes on one H100.


def _tiny_v2(data: list[str], out: str, vae: str, text: str | None, init: str | None, budget_s: float,
             **stage) -> TrainConfig:  # fmt: skip
    """What every v2 stage shares: the fluxion-tiny architecture with its character encoder, compiled blocks,
    a wall-clock budget; `stage` is the rest. The stages before distillation make the CFG model that ships as
    fluxion-tiny-base (so its preset: training samples use true CFG even where fluxion-tiny is distilled)."""
    model = "fluxion-tiny" if stage.get("objective") == "distill" else "fluxion-tiny-base"
    return TrainConfig(model=model, data=tuple(data), out=out, vae=vae, text=text, init=init,
                       char_encoder=True, compile=True, time_budget_s=budget_s, **stage)  # fmt: skip


def tiny_v2_pretrain(data: list[str], out: str, vae: str, budget_s: float, init: str | None = None,
                     text: str | None = None, steps: int = 20000) -> TrainConfig:  # fmt: skip
    """Pre-training stage (64² first, then 128² + aspect buckets from the 64² weights): flow matching, letters
    of quoted text through the character encoder, rephrased captions, compiled blocks."""
    return _tiny_v2(
        data,
        out,
        vae,
        text,
        init,
        budget_s,
        steps=steps,
        batch_size=256,
        lr=6e-4 if init is None else 3e-4,
        warmup=300 if init is None else 100,
        min_lr_ratio=0.05,
        weight_decay=0.01,
        ema=0.999,
        caption_dropout=0.1,
        caption_variety=0.7,
        edit_fraction=0.2,
        cache_latents=False,
        cache_latents_on_device=True,  # the first H100 run spent 50-74 % of each step encoding (GPU util ~35 %)
        log_every=100,
    )


def tiny_v2_finetune(data: list[str], out: str, vae: str, init: str, budget_s: float,
                     text: str | None = None) -> TrainConfig:  # fmt: skip
    """Quality fine-tune on the best subset (runs/fluxion_tiny_v2.py quality_subset): low LR, EMA."""
    return replace(
        tiny_v2_pretrain(data, out, vae, budget_s, init=init, text=text, steps=4000),
        lr=1e-4,
        warmup=50,
        edit_fraction=0.1,
        ema=0.995,
    )


def tiny_v2_dpo(pairs: list[str], out: str, vae: str, init: str, budget_s: float,
                text: str | None = None, num_pairs: int | None = None, epochs: float = 2.0) -> TrainConfig:  # fmt: skip
    """Diffusion-DPO on self-generated pairs judged by OCR / colour / retrieval rewards. With `num_pairs`, the
    run is `epochs` passes over the pairs (the first run's 405 steps over 107 pairs, ~240 passes, drove the loss
    to 0.005 and made colour worse); the time budget still caps it."""
    steps = 2000 if not num_pairs else max(10, math.ceil(epochs * num_pairs / 64))
    return _tiny_v2(
        pairs,
        out,
        vae,
        text,
        init,
        budget_s,
        objective="dpo",
        dpo_beta=1000.0,
        steps=steps,
        batch_size=64,
        lr=2e-5,
        warmup=min(20, steps // 10),
        min_lr_ratio=0.5,
        caption_dropout=0.0,
        log_every=10 if num_pairs else 50,
    )


def tiny_v2_distill(data: list[str], out: str, vae: str, teacher: str, budget_s: float,
                    text: str | None = None) -> TrainConfig:  # fmt: skip
    """4-step student with guidance distilled in, from the 20-step CFG teacher (initialised from it)."""
    return _tiny_v2(
        data,
        out,
        vae,
        text,
        teacher,
        budget_s,
        objective="distill",
        teacher=teacher,
        teacher_model="fluxion-tiny-base",  # the CFG teacher (fluxion-tiny is the distilled student from v2 on)
        teacher_steps=20,
        student_steps=4,
        steps=6000,
        batch_size=128,
        lr=5e-5,
        warmup=50,
        ema=0.99,
        caption_dropout=0.05,
        caption_variety=0.7,
        log_every=100,
    )
