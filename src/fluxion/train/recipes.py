"""Run configs as functions. `fluxion train RECIPE` accepts a recipe name from RECIPES, a TOML file, or a Python
file defining `config()`.

fluxion-tiny (the embedded default model) is trained in two stages on the tinyset (docs/DATASET_CARD.md):
the autoencoder first, then the transformer on the frozen autoencoder and the frozen MiniLM encoder. Its
step counts were sized for one H100 in about 20 minutes in all (docs/MODEL_CARD.md has the measured run).
"""

from __future__ import annotations

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


RECIPES = {
    "fluxion-tiny": fluxion_tiny,
    "fluxion-tiny-vae": fluxion_tiny_vae,
    "fluxion-tiny-lora": fluxion_tiny_lora,
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
