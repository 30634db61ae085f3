"""Tiny random FLUX.2 models in both implementations, for the end-to-end pipeline and CLI tests.

`build_diffusers_folder` writes a complete diffusers model folder (transformer/, vae/, text_encoder/, tokenizer/)
with random weights; diffusers' pipelines get the modules in memory and fluxion loads the very same folder with
`load_models(folder, preset=...)`, i.e. through our own readers and key mappings. `build_bfl_files` writes the
other layout (BFL transformer + ae.safetensors + a text folder) for the CLI. The `test-*` specs below must be put
into `fluxion.config.PRESETS` (`register_specs`) before `load_models` or the CLI can resolve them.

Everything is fp32 on CPU and small enough that one 4-step 64x80 generation takes well under a second.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxion.config import DEBUG_TRANSFORMER, DEBUG_VAE, PRESETS, ModelSpec
from text_fixtures import TINY_MISTRAL3, TINY_QWEN3, build_tiny_mistral3, build_tiny_qwen3

# context_in_dim = 96 = 3 taps x width 32 of the tiny text encoders; 2 + 2 blocks so that block order matters.
KLEIN_TRANSFORMER = dataclasses.replace(
    DEBUG_TRANSFORMER, num_double_blocks=2, num_single_blocks=2, use_guidance_embed=False
)
DEV_TRANSFORMER = dataclasses.replace(KLEIN_TRANSFORMER, use_guidance_embed=True)
# DEBUG_VAE = ch 32, ch_mult (1, 2, 2, 2), 1 ResNet per level, 8 groups -> this diffusers twin.
DIFFUSERS_VAE = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8)

_COMMON = dict(vae=DEBUG_VAE, default_size=(64, 64), license="test")
KLEIN = ModelSpec(
    name="test-klein",
    transformer=KLEIN_TRANSFORMER,
    text=TINY_QWEN3,
    guidance_mode="distilled",
    default_steps=4,
    default_guidance=1.0,
    max_references=4,
    **_COMMON,
)
KLEIN_BASE = dataclasses.replace(
    KLEIN, name="test-klein-base", guidance_mode="cfg", default_steps=3, default_guidance=4.0
)
KLEIN_KV = dataclasses.replace(KLEIN, name="test-klein-kv", kv_cache=True)
DEV = ModelSpec(
    name="test-dev",
    transformer=DEV_TRANSFORMER,
    text=TINY_MISTRAL3,
    guidance_mode="embedded",
    default_steps=3,
    default_guidance=4.0,
    max_references=6,
    **_COMMON,
)
SPECS = (KLEIN, KLEIN_BASE, KLEIN_KV, DEV)

# The FLUX.2 repos' scheduler/scheduler_config.json (spec 3.4: FLUX.1-dev's, copied by the conversion script).
# The pipelines always pass their own mu, so only use_dynamic_shifting and the exponential shift matter.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)


def register_specs(monkeypatch) -> None:
    """Make the test specs resolvable by name (load_models(preset=...), `fluxion --preset`)."""
    for spec in SPECS:
        monkeypatch.setitem(PRESETS, spec.name, spec)


def randomize_transformer(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, norm gains included, at a scale that keeps activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
    return model.eval()


def randomize_vae(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct norm affines and non-trivial latent BN statistics (so the latent normaliser is exercised).
    Works on ours and on diffusers' model: both name the latent batch norm `bn`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        model.bn.running_mean.copy_(0.5 * torch.randn(model.bn.running_mean.shape, generator=g))
        model.bn.running_var.copy_(0.5 + torch.rand(model.bn.running_var.shape, generator=g))
    return model.eval()


def _diffusers_transformer_kwargs(spec: ModelSpec) -> dict:
    from fluxion.weights.load import diffusers_transformer_config  # the config.json our converter writes

    return {k: v for k, v in diffusers_transformer_config(spec.transformer).items() if not k.startswith("_")}


@dataclass
class DiffusersComponents:
    """The in-memory diffusers modules of a folder written by `build_diffusers_folder`."""

    folder: Path
    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object

    def fresh_transformer(self):
        """A copy with the same weights (the KV pipeline swaps attention processors in place)."""
        from diffusers import Flux2Transformer2DModel

        copy = Flux2Transformer2DModel(**dict(self.transformer.config))
        copy.load_state_dict(self.transformer.state_dict())
        return copy.eval()


def build_diffusers_folder(folder: str | Path, spec: ModelSpec, seed: int = 0) -> DiffusersComponents:
    """Random diffusers transformer + VAE + the tiny text encoder of spec.text.kind, saved to `folder`."""
    import json

    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import AutoTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = randomize_transformer(Flux2Transformer2DModel(**_diffusers_transformer_kwargs(spec)), seed)
    vae = randomize_vae(AutoencoderKLFlux2(**DIFFUSERS_VAE), seed + 1)
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    if spec.text.kind == "qwen3":
        from transformers import Qwen3ForCausalLM

        build_tiny_qwen3(folder)
        text_encoder = Qwen3ForCausalLM.from_pretrained(folder / "text_encoder", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    else:
        from transformers import Mistral3ForConditionalGeneration

        build_tiny_mistral3(folder)
        text_encoder = Mistral3ForConditionalGeneration.from_pretrained(
            folder / "text_encoder", dtype=torch.float32
        )
        # Flux2Pipeline loads tokenizer/ with AutoProcessor (a PixtralProcessor, which needs torchvision: not
        # installed). For text-only prompts the processor only renders its chat template and tokenises with its
        # tokenizer, so the smallest honest stand-in is that tokenizer carrying the processor's template.
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        tokenizer.chat_template = json.loads((folder / "tokenizer" / "chat_template.json").read_text())[
            "chat_template"
        ]
    return DiffusersComponents(folder, transformer, vae, text_encoder.eval(), tokenizer)


def diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def diffusers_pipeline(cls, comps: DiffusersComponents, **kwargs):
    """A diffusers FLUX.2 pipeline (class `cls`) over the components, progress bar off."""
    transformer = comps.fresh_transformer() if cls.__name__ == "Flux2KleinKVPipeline" else comps.transformer
    pipe = cls(
        scheduler=diffusers_scheduler(),
        vae=comps.vae,
        text_encoder=comps.text_encoder,
        tokenizer=comps.tokenizer,
        transformer=transformer,
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_bfl_files(root: str | Path, spec: ModelSpec = KLEIN, seed: int = 0) -> dict[str, str]:
    """Our own random transformer and autoencoder saved as BFL single files, plus a tiny text-encoder folder:
    {"model": transformer.safetensors, "vae": ae.safetensors, "text": folder}."""
    from safetensors.torch import save_file

    from fluxion.model.transformer import Flux2
    from fluxion.vae.autoencoder import AutoEncoder

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    transformer = randomize_transformer(Flux2(spec.transformer), seed)
    vae = randomize_vae(AutoEncoder(spec.vae), seed + 1)
    paths = {"model": root / "transformer.safetensors", "vae": root / "ae.safetensors"}
    for module, key in ((transformer, "model"), (vae, "vae")):
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(paths[key]))
    build = build_tiny_qwen3 if spec.text.kind == "qwen3" else build_tiny_mistral3
    text = build(root / "text")
    return {"model": str(paths["model"]), "vae": str(paths["vae"]), "text": str(text)}
