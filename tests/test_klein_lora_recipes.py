"""The klein-base-4B LoRA recipes for Diffusion-DPO and step distillation (train/recipes.py): the settings they
promise, valid TrainConfigs, adapters on the attention layers of the real klein-4B shapes (built on meta, no
weights), and selectable as `fluxion train` selects every recipe (a .py file defining config(), CLI flags on top).
"""

import pytest
import torch

from fluxion.cli import main
from fluxion.config import PRESETS
from fluxion.train import recipes
from fluxion.train.train import TrainConfig

FILES = dict(init="flux-2-klein-base-4b.safetensors", vae="ae.safetensors", text="FLUX.2-klein-base-4B")


def test_dpo_recipe():
    cfg = recipes.klein_base_lora_dpo(["pairs"], "runs/dpo", **FILES)
    assert isinstance(cfg, TrainConfig) and cfg.model in PRESETS
    assert PRESETS[cfg.model].guidance_mode == "cfg"  # klein base, not the distilled klein
    assert (cfg.objective, cfg.reference, cfg.lora_rank, cfg.lora_alpha) == ("dpo", None, 16, 16)
    assert (cfg.batch_size, cfg.pixels, cfg.compute_dtype, cfg.lr) == (1, 1024 * 1024, "bfloat16", 1e-4)
    tiny = recipes.tiny_v2_dpo(["pairs"], "o", "v", "i", 60.0)
    assert cfg.dpo_beta == tiny.dpo_beta and cfg.caption_dropout == 0.0
    assert cfg.data == ("pairs",) and (cfg.init, cfg.vae, cfg.text) == tuple(FILES.values())


def test_distill_recipe():
    cfg = recipes.klein_base_lora_distill(["images"], "runs/distill", **FILES)
    assert cfg.model in PRESETS and cfg.objective == "distill"
    assert cfg.teacher is None and cfg.teacher_model is None  # the teacher is the base, adapters off
    assert (cfg.teacher_steps, cfg.student_steps, cfg.teacher_guidance) == (20, 4, 4.0)
    assert (cfg.lora_rank, cfg.batch_size, cfg.pixels, cfg.compute_dtype, cfg.lr) == (
        16, 1, 1024 * 1024, "bfloat16", 1e-4,
    )  # fmt: skip


@pytest.mark.parametrize("recipe", [recipes.klein_base_lora_dpo, recipes.klein_base_lora_distill])
def test_recipes_put_adapters_on_every_attention_layer_of_klein_4b(recipe):
    """The targets match the qkv and output projections of both streams of every double block and both linears
    of every single block of the real klein-4B transformer, and nothing else."""
    from fluxion.lora.lora import inject_lora
    from fluxion.model.transformer import Flux2

    cfg = recipe(["d"], "o", **FILES)
    spec = PRESETS[cfg.model].transformer
    with torch.device("meta"):
        model = Flux2(spec)
    wrapped = inject_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=list(cfg.lora_targets))
    expected = {
        f"double_blocks.{i}.{s}_attn.{p}"
        for i in range(spec.num_double_blocks)
        for s in ("img", "txt")
        for p in ("qkv", "proj")
    } | {f"single_blocks.{i}.linear{j}" for i in range(spec.num_single_blocks) for j in (1, 2)}
    assert set(wrapped) == expected


@pytest.mark.parametrize(
    "name, data", [("klein_base_lora_dpo", "pairs"), ("klein_base_lora_distill", "images")]
)
def test_recipes_are_selected_by_fluxion_train(name, data, tmp_path):
    """As every recipe: `fluxion train file.py` with config() calling it; command-line flags override fields."""
    from pathlib import Path

    from fluxion.cli import _recipe

    path = tmp_path / "recipe.py"
    path.write_text(
        "from fluxion.train import recipes\n\n\ndef config():\n"
        f"    return recipes.{name}([{data!r}], 'runs/x', init='base.safetensors', vae='ae.safetensors')\n"
    )
    cfg = _recipe(Path(path), {"steps": 7})
    assert cfg == getattr(recipes, name)(
        [data], "runs/x", init="base.safetensors", vae="ae.safetensors", steps=7
    )
    assert recipes.RECIPES[name.replace("_", "-")] is getattr(recipes, name)


def test_distill_without_a_teacher_is_one_line_at_the_cli(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'model = "flux2-klein-base-4b"\ndata = ["d"]\nout = "o"\nvae = "v"\nobjective = "distill"\n'
    )
    code = main(["train", str(recipe)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert "teacher=" in err[0] and "lora_rank= with init=" in err[0]
