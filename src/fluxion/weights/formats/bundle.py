"""Which tensors of a file belong to which component, for single-component files and ComfyUI all-in-one bundles.

ComfyUI's CheckpointSave writes a FLUX.2 model as one file (comfy/supported_models.py, class Flux2):
    model.diffusion_model.<BFL transformer name>
    vae.<BFL autoencoder name>
    text_encoders.<qwen3_4b | qwen3_8b | mistral3_24b>.transformer.<HF name, e.g. model.layers.0...>
Repacks of a single component may carry one of those prefixes (or `diffusion_model.`, or the SD-era
`first_stage_model.` for the VAE) or none. Newer ComfyUI and InvokeAI name the q/k RMSNorm gains `.weight`
where BFL says `.scale`; `bfl_norm_names` maps them back.
"""

from __future__ import annotations

from torch import Tensor

from fluxion.weights.safetensors_io import CheckpointError

PREFIXES = {
    "transformer": ("model.diffusion_model.", "diffusion_model."),
    "vae": ("vae.", "first_stage_model."),
    "text": ("text_encoders.",),
}


def component_prefix(keys, component: str) -> str | None:
    """The prefix under which `component` sits in a file with these keys ("" for a bare single-component file,
    None when the file is a bundle without that component)."""
    keys = list(keys)
    for prefix in PREFIXES[component]:
        if any(k.startswith(prefix) for k in keys):
            if component == "text":
                # text_encoders.<name>.transformer. : one encoder per bundle in FLUX.2
                names = sorted({k.split(".")[1] for k in keys if k.startswith(prefix)})
                if len(names) != 1:
                    raise CheckpointError(f"the file holds several text encoders ({', '.join(names)})")
                inner = f"{prefix}{names[0]}."
                return (
                    inner + "transformer."
                    if any(k.startswith(inner + "transformer.") for k in keys)
                    else inner
                )
            return prefix
    others = [p for c, ps in PREFIXES.items() if c != component for p in ps]
    if any(k.startswith(tuple(others)) for k in keys):
        bare = [k for k in keys if not k.startswith(tuple(others))]
        return "" if bare else None
    return ""


def select(sd: dict[str, Tensor], component: str, source: str = "") -> tuple[dict[str, Tensor], str]:
    """(the component's tensors with the prefix removed, the prefix)."""
    prefix = component_prefix(sd, component)
    if prefix is None:
        names = {"transformer": "a transformer (model.diffusion_model.*)", "vae": "an autoencoder (vae.*)"}
        raise CheckpointError(f"{source}: this ComfyUI bundle holds no {names.get(component, component)}")
    if not prefix:
        others = tuple(p for c, ps in PREFIXES.items() if c != component for p in ps)
        return {k: v for k, v in sd.items() if not k.startswith(others)}, ""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, prefix


def bfl_norm_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """`...query_norm.weight` / `...key_norm.weight` -> `.scale` (the BFL name); everything else unchanged."""
    out = {}
    for k, v in sd.items():
        if k.endswith(("query_norm.weight", "key_norm.weight")):
            k = k[: -len("weight")] + "scale"
        if k in out:
            raise CheckpointError(f"the file holds both {k} and its `.weight` spelling")
        out[k] = v
    return out
