"""LoRA as a module swap (house style P9): `LoRALinear` is an `nn.Linear` that shares the base weight and adds
named adapters, so the model file knows nothing about LoRA and parameter names stay the BFL checkpoint keys.

    y = x Wᵀ + Σ_k scale_k · (alpha_k / r_k) · up_k(down_k(dropout(x)))      (low-rank adapters)
    y = x Wᵀ + Σ_k scale_k · x ΔW_kᵀ                                         (full-diff adapters: LoKr, LoHa, .diff)

Adapters sit on the fused BFL weights (`img_attn.qkv` [3D, D], `linear1` [3D + 2·mlp, D]); files from every
ecosystem are converted to that form by `weights/lora_mapping.py`. `alpha` belongs to the file (ΔW of the
adapter), `scale` is the user's weight for it (diffusers' `set_adapters` weights, ComfyUI's strength).

Merging adds scale · ΔW to the base weight in place. Unmerging recomputes the same ΔW (a deterministic
function of the unchanged adapter tensors and the recorded scale) and subtracts it: an exact inverse up to the
rounding of the two additions, without keeping a second copy of every adapted weight in memory. (So do not
train an adapter while it is merged: its forward is skipped then anyway.)
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fluxion.weights.lora_mapping import (
    EXPORTERS,
    Adapter,
    Decomposed,
    FullDiff,
    LowRank,
    Normalized,
    Replace,
    to_canonical,
)
from fluxion.weights.safetensors_io import load_safetensors, read_header, save_safetensors

# Ready-made `targets` for inject_lora. "diffusers" is the layer set of diffusers' FLUX.2 DreamBooth scripts
# (spec 9.1): image-stream q/k/v and output projection of the double blocks, both single-block linears.
TARGET_PRESETS: dict[str, list[str]] = {
    "diffusers": [
        "double_blocks.*.img_attn.qkv",
        "double_blocks.*.img_attn.proj",
        "single_blocks.*.linear1",
        "single_blocks.*.linear2",
    ],
    "attention": ["double_blocks.*_attn.qkv", "double_blocks.*_attn.proj", "single_blocks.*.linear*"],
    "blocks": ["double_blocks.*", "single_blocks.*"],
}


class LowRankAdapter(nn.Module):
    def __init__(self, down: Tensor, up: Tensor, alpha: float, scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Parameter(down)  # [r, in]
        self.up = nn.Parameter(up)  # [out, r]
        self.alpha = float(alpha)
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(F.linear(self.dropout(x.to(self.down.dtype)), self.down), self.up)
        return (h * (self.scale * self.alpha / self.rank)).to(x.dtype)

    def delta(self, scale: float) -> Tensor:
        """scale · ΔW [out, in] in fp32."""
        return (scale * self.alpha / self.rank) * (self.up.float() @ self.down.float())

    def canonical(self) -> LowRank:
        return LowRank(self.down.detach(), self.up.detach(), self.alpha)


class DiffAdapter(nn.Module):
    def __init__(self, diff: Tensor, scale: float = 1.0):
        super().__init__()
        self.diff = nn.Parameter(diff)  # [out, in]
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.diff.to(x.dtype)) * self.scale

    def delta(self, scale: float) -> Tensor:
        return scale * self.diff.float()

    def canonical(self) -> FullDiff:
        return FullDiff(self.diff.detach())


class LoRALinear(nn.Linear):
    """A Linear sharing `weight` / `bias` with the layer it replaces, plus named adapters in `self.lora`."""

    def __init__(self, base: nn.Linear):
        # Built on meta, then the base parameters are shared, not copied: no memory is allocated here.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.lora = nn.ModuleDict()
        self.merged: dict[str, float] = {}  # adapter name -> the scale it was merged into `weight` with
        self.train(base.training)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        for name, adapter in self.lora.items():
            if name not in self.merged:
                out = out + adapter(x)
        return out

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name not in self.merged:
            scale = self.lora[name].scale
            self.weight.add_(self.lora[name].delta(scale).to(self.weight.dtype))
            self.merged[name] = scale

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name in self.merged:
            self.weight.sub_(self.lora[name].delta(self.merged.pop(name)).to(self.weight.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapters={list(self.lora)}, merged={list(self.merged)}"


@dataclass
class LoadReport:
    """What `load_lora` did. Nothing is dropped in silence: every key it did not apply is listed."""

    applied: list[str]  # BFL module names that received the adapter
    unmatched: list[str] = field(default_factory=list)  # keys naming no layer of this model, or incomplete
    format: str = ""  # detected family, e.g. "kohya", "diffusers", "bfl/lokr"
    unsupported: list[str] = field(default_factory=list)  # keys of adapter types not applied (DoRA, ...)
    name: str = ""  # adapter name to use with set_lora_scale / merge_lora / remove_lora


# ---------------------------------------------------------------------------------------------------------
# Layers


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _lora_layers(model: nn.Module, name: str | None = None) -> dict[str, LoRALinear]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if name is None:
        return layers
    found = {n: m for n, m in layers.items() if name in m.lora}
    if not found:
        names = sorted({a for m in layers.values() for a in m.lora})
        raise ValueError(f"no LoRA adapter named {name!r} in this model (adapters: {names})")
    return found


def _wrap(model: nn.Module, fqn: str) -> LoRALinear:
    layer = model.get_submodule(fqn)
    if isinstance(layer, LoRALinear):
        return layer
    parent, _, child = fqn.rpartition(".")
    wrapped = LoRALinear(layer)
    setattr(model.get_submodule(parent), child, wrapped)
    return wrapped


def _matches(pattern: str, fqn: str) -> bool:
    """`re:<regex>` is a full-match regular expression; anything else an fnmatch glob (`*` crosses dots)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], fqn) is not None
    return fnmatch.fnmatchcase(fqn, pattern)


def _check_name(model: nn.Module, name: str) -> None:
    if not name or "." in name:
        raise ValueError(f"adapter name {name!r} must be non-empty and contain no '.'")
    if any(name in m.lora for m in _lora_layers(model).values()):
        raise ValueError(f"an adapter named {name!r} is already loaded; pick another name or remove_lora it")


# ---------------------------------------------------------------------------------------------------------
# Training


def inject_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: list[str] | str,
    dropout: float = 0.0,
    name: str = "default",
    init: Literal["kaiming", "gaussian"] = "kaiming",
) -> list[str]:
    """Wrap the Linear layers whose FQN matches any of `targets` and add a trainable adapter to each.

    down is initialised kaiming-uniform (as nn.Linear and PEFT do) or gaussian with std 1/rank (PEFT's
    "gaussian", used by diffusers' FLUX.2 scripts), up with zeros: the model's output is unchanged at init.
    `targets`: FQN patterns (see `_matches`), or the name of a TARGET_PRESETS entry. Returns the wrapped FQNs;
    a pattern that matches no Linear raises ValueError.
    """
    if isinstance(targets, str):
        targets = TARGET_PRESETS.get(targets, [targets])
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    _check_name(model, name)
    linears = _linears(model)
    chosen: set[str] = set()
    for pattern in targets:
        hits = {fqn for fqn in linears if _matches(pattern, fqn)}
        if not hits:
            sample = list(linears)[:6]
            raise ValueError(f"LoRA target {pattern!r} matches no Linear layer (names look like {sample})")
        chosen |= hits
    wrapped = [fqn for fqn in linears if fqn in chosen]  # model order
    for fqn in wrapped:
        layer = _wrap(model, fqn)
        w = layer.weight
        down = torch.empty(rank, layer.in_features, dtype=w.dtype, device=w.device)
        if init == "gaussian":
            nn.init.normal_(down, std=1 / rank)
        else:
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        up = torch.zeros(layer.out_features, rank, dtype=w.dtype, device=w.device)
        # New modules start in train mode; follow the model's mode so dropout stays off in eval.
        layer.lora[name] = LowRankAdapter(down, up, alpha, dropout=dropout).train(layer.training)
    return wrapped


def lora_parameters(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    """The trainable tensors of one adapter (for the optimizer; freeze the base with requires_grad_(False))."""
    return [p for m in _lora_layers(model, name).values() for p in m.lora[name].parameters()]


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """One adapter in our lossless format: `<BFL name>.lora_down.weight` [r, in], `.lora_up.weight` [out, r]
    and `.alpha` (or `.diff` for full-diff adapters). The user `scale` is not part of it."""
    return EXPORTERS["fluxion"](_canonical(model, name))


def _canonical(model: nn.Module, name: str) -> dict[str, Adapter]:
    return {fqn: m.lora[name].canonical() for fqn, m in _lora_layers(model, name).items()}


# ---------------------------------------------------------------------------------------------------------
# Loading and saving files


def load_lora(
    model: nn.Module,
    source: str | Path | dict[str, Tensor],
    scale: float = 1.0,
    name: str | None = None,
    strict: bool = True,
    metadata: dict[str, Any] | None = None,
) -> LoadReport:
    """Load a LoRA / LoKr / LoHa / diff of any family (user-needs 3) as a new adapter, weighted by `scale`.

    Several calls stack several adapters. Keys that name no layer, or adapter types we do not apply (OFT,
    GLoRA, bias deltas, ...), raise ValueError with strict=True and give a warning plus the LoadReport with
    strict=False; a module's tensors are applied all together or not at all, so e.g. a DoRA is never applied as
    a plain LoRA. Adapters whose shapes do not fit the model always raise, naming the layer and both shapes.
    `metadata` (e.g. diffusers' PEFT config) is read from the file when `source` is a path.

    DoRA (and ComfyUI's set_weight) is merged exactly at load: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ with W the layer's
    weight as it computes at that moment, i.e. the base plus every adapter loaded before it at its scale then
    (ComfyUI's rule: patches apply in load order). Adapters loaded later add on top of W'. The result is kept
    as a full diff ΔW' = W' - W, so `scale` s gives W + s·ΔW' (ComfyUI's strength; PEFT and LyCORIS scale
    differently away from s = 1), and changing an earlier adapter's scale afterwards does not re-resolve it.
    """
    where = "LoRA state dict"
    if isinstance(source, (str, Path)):
        where = str(source)
        state_dict = load_safetensors(source)
        metadata = {**read_header(source)[1], **(metadata or {})}
        name = name or _free_name(model, re.sub(r"\W", "_", Path(source).stem), derived=True)
    else:
        state_dict = source
    linears = _linears(model)
    norm = to_canonical(state_dict, linears, metadata)
    if norm.unmatched or norm.unsupported:
        message = _not_applied(where, norm)
        if strict:
            raise ValueError(message + " (load with strict=False to apply the rest)")
        warnings.warn(message, stacklevel=2)
    if not norm.adapters:
        raise ValueError(f"{where}: no adapter in it applies to this model")
    _check_shapes(where, norm.adapters, linears)
    name = _free_name(model, name)
    for fqn, adapter in norm.adapters.items():
        layer = _wrap(model, fqn)
        w = layer.weight
        if isinstance(adapter, LowRank):
            module = LowRankAdapter(adapter.down.to(w), adapter.up.to(w), adapter.alpha, scale)
        elif isinstance(adapter, (Decomposed, Replace)):
            # DoRA and set_weight depend on the weight they modify: resolved once, here, against the layer as it
            # computes now (base + the adapters loaded before, at their scales), as ComfyUI applies its patches
            # in load order. The result is a full diff; `scale` then interpolates W -> W' linearly.
            module = DiffAdapter(adapter.resolve(_effective_weight(layer)).to(w), scale)
        else:
            module = DiffAdapter(adapter.diff.to(w), scale)
        layer.lora[name] = module.requires_grad_(False).train(layer.training)
    return LoadReport(sorted(norm.adapters), norm.unmatched, norm.format, norm.unsupported, name)


@torch.no_grad()
def _effective_weight(layer: LoRALinear) -> Tensor:
    """The weight the layer computes with now, fp32: base (with merged adapters) + the unmerged ones."""
    w = layer.weight.float()
    for n, adapter in layer.lora.items():
        if n not in layer.merged:
            w = w + adapter.delta(adapter.scale).to(w.device)
    return w


def _free_name(model: nn.Module, name: str | None, derived: bool = False) -> str:
    """An explicit name must be free; a derived one (file stem, or "lora") gets a number when taken."""
    if name is not None and not derived:
        _check_name(model, name)
        return name
    stem = name or "lora"
    taken = {a for m in _lora_layers(model).values() for a in m.lora}
    if name and name not in taken:
        return name
    return next(f"{stem}{k}" for k in range(len(taken) + 1) if f"{stem}{k}" not in taken)


def _listing(keys: list[str], limit: int = 30) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _not_applied(where: str, norm: Normalized) -> str:
    parts = [f"{where} ({norm.format}): keys not applied."]
    if norm.unmatched:
        parts.append(
            f"{len(norm.unmatched)} keys name no Linear layer of this model: {_listing(norm.unmatched)}."
        )
        text = " ".join(norm.unmatched)
        if re.search(r"img_mod|txt_mod|norm1|proj_mlp|single_blocks[._]\d+[._]modulation", text):
            parts.append("These are FLUX.1 layer names: FLUX.1 LoRAs do not apply to FLUX.2.")
        if re.search(r"(^|[ ._])(lora_te\d?_|text_encoders?[._]|te\d?\.)", text):
            parts.append("Text-encoder keys: fluxion applies LoRAs to the transformer only.")
        if re.search(r"guidance_in|guidance_embedder", text):
            parts.append("guidance_in / guidance_embedder keys: this model has no guidance embedder (klein).")
    if norm.unsupported:
        parts.append(
            f"{len(norm.unsupported)} keys are of adapter types not applied: {_listing(norm.unsupported)}."
        )
    if norm.reasons:
        parts.append(
            "Why: " + "; ".join(f"{path}: {why}" for path, why in sorted(norm.reasons.items())) + "."
        )
    return " ".join(parts)


def _check_shapes(where: str, adapters: dict[str, Adapter], linears: dict[str, nn.Linear]) -> None:
    bad = []
    for fqn, a in adapters.items():
        layer = linears[fqn]
        want = (layer.out_features, layer.in_features)
        if tuple(a.shape) != want:
            inner = a.inner if isinstance(a, Decomposed) else a
            if isinstance(inner, LowRank):
                factors = f"lora_down {list(inner.down.shape)}, lora_up {list(inner.up.shape)}"
            elif isinstance(inner, Replace):
                factors = f"set_weight {list(inner.weight.shape)}"
            else:
                factors = f"diff {list(inner.diff.shape)}"
            bad.append(
                f"{fqn}: the adapter is [{a.shape[0]}, {a.shape[1]}] ({factors}), the layer {list(want)}"
            )
    if bad:
        raise ValueError(
            f"{where}: the adapter does not fit this model: {_listing(bad, 10)}. It was made for another "
            "model: another FLUX.2 variant (dev, klein 4B and klein 9B differ in width) or FLUX.1, whose LoRAs "
            "do not apply to FLUX.2."
        )


# The one LoRA writer. "comfy" and "bfl" are one layout (`diffusion_model.<BFL name>.lora_A/B.weight`, alpha folded
# in): the trainer's default, read natively by ComfyUI, ai-toolkit and diffusers' BFL converter.
LORA_FILE_FORMATS = ("comfy", "bfl", "diffusers", "kohya", "fluxion")


def write_lora(
    adapters: dict[str, Adapter] | nn.Module,
    path: str | Path,
    format: Literal["comfy", "bfl", "diffusers", "kohya", "fluxion"] = "comfy",
    metadata: dict[str, str] | None = None,
    name: str = "default",
) -> Path:
    """Write a LoRA file that the other tools load exactly (the trainer's export and `save_lora`).

    "comfy" / "bfl" (default): `diffusion_model.<BFL name>.lora_A/lora_B.weight`, alpha folded into lora_A and no
    `.alpha` key: ComfyUI reads it natively, diffusers' `Flux2Pipeline.load_lora_weights` through its BFL
    converter (which refuses `.alpha` keys), ai-toolkit and fluxion as is. "diffusers": `transformer.<diffusers
    name>` (PEFT layout, fused qkv split exactly into to_q/to_k/to_v), for `load_lora_adapter` / PEFT. "kohya":
    sd-scripts / musubi names. "fluxion": our lossless layout (see weights/lora_mapping.py).
    `adapters` is {BFL Linear FQN: LowRank | FullDiff} or a model with adapter `name` injected.
    Written to a temporary file and renamed, so a crash never leaves half a file."""
    if format not in LORA_FILE_FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose from {list(LORA_FILE_FORMATS)}")
    canonical = _canonical(adapters, name) if isinstance(adapters, nn.Module) else adapters
    tensors = EXPORTERS["bfl" if format == "comfy" else format](canonical)
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    save_safetensors(tensors, path, metadata=meta)
    return Path(path)


def save_lora(
    model: nn.Module,
    path: str | Path,
    format: Literal["comfy", "bfl", "diffusers", "kohya", "fluxion"] = "bfl",
    name: str = "default",
    metadata: dict[str, str] | None = None,
) -> Path:
    """`write_lora` for a model with adapter `name` injected (the older argument order, kept for callers)."""
    return write_lora(model, path, format=format, metadata=metadata, name=name)


# ---------------------------------------------------------------------------------------------------------
# Using loaded adapters


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    """Change the user weight of one adapter (re-merging it if it is merged)."""
    for layer in _lora_layers(model, name).values():
        merged = name in layer.merged
        layer.unmerge(name)
        layer.lora[name].scale = float(scale)
        if merged:
            layer.merge(name)


def merge_lora(model: nn.Module, name: str | None = None) -> None:
    """Add scale · ΔW of one adapter (all when name is None) into the base weights; forward then skips it."""
    for layer in _lora_layers(model, name).values():
        for n in [name] if name else list(layer.lora):
            layer.merge(n)


def unmerge_lora(model: nn.Module, name: str | None = None) -> None:
    """Subtract what merge_lora added; the adapters are applied on the fly again."""
    for layer in _lora_layers(model, name).values():
        for n in [name] if name else list(layer.merged):
            layer.unmerge(n)


def remove_lora(model: nn.Module, name: str | None = None, keep_merged: bool = False) -> None:
    """Drop one adapter (all when name is None). Merged adapters are unmerged first unless keep_merged (which
    fuses them into the base for good). Layers left without adapters become plain nn.Linear again."""
    for fqn, layer in _lora_layers(model, name).items():
        for n in [name] if name else list(layer.lora):
            if keep_merged:
                layer.merged.pop(n, None)
            else:
                layer.unmerge(n)
            del layer.lora[n]
        if not layer.lora:
            plain = nn.Linear(
                layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
            )
            plain.weight, plain.bias = layer.weight, layer.bias
            parent, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
