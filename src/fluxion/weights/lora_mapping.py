"""LoRA files of every ecosystem family -> one canonical form in BFL module names, and back (user-needs 3).

Canonical form: `{BFL Linear FQN: LowRank | FullDiff | Decomposed | Replace}`, where
- `LowRank(down [r, in], up [out, r], alpha)` means ΔW = (alpha / r) · up @ down on the *fused* BFL weight
  (`img_attn.qkv` [3D, D], `linear1` [3D + 2·mlp, D]);
- `FullDiff(diff [out, in])` is ΔW itself (ComfyUI `.diff` files, and LyCORIS LoKr / LoHa, materialised);
- `Decomposed` (DoRA) and `Replace` (`.set_weight`) depend on the layer weight and are resolved against it when
  loaded (`resolve(W)` gives W' - W).

Families read (user-needs 3 A-G), in any mix, told apart per key rather than per file:
- A  diffusers / PEFT: `transformer.` or `base_model.model.` + diffusers module names + `lora_A/lora_B.weight`;
     separate q/k/v adapters are fused (down = cat(A_q, A_k, A_v), up = block-diag(B_q, B_k, B_v));
     `norm_out.linear` rows are half-swapped back to the BFL [shift ; scale] order (spec 9.2 caveat).
- B  BFL / ai-toolkit / ComfyUI: `diffusion_model.` + BFL names + `lora_A/B` or `lora_down/up` (+ `.alpha`).
- C  kohya / musubi: `lora_unet_` + BFL names with `_` for `.` (+ `.alpha`).
- D  diffusers names under `diffusion_model.`, fal's `sformer_blocks.` alias, mixed `_`/`.` separators
     (musubi -> Comfy `img_attn_proj`), LyCORIS `lycoris_` names.
- E  LoKr (`lokr_w1[_a/_b]`, `lokr_w2[_a/_b]`), LoHa (`hada_w1_a/b`, `hada_w2_a/b`), full diffs (`.diff`),
     whole replacements (ComfyUI `.set_weight`).
- F  DiffSynth-Studio: bare diffusers module names with PEFT's adapter name kept (`lora_A.default.weight`).
- G  DoRA on any of the above: ai-toolkit `.magnitude` [out], PEFT `lora_magnitude_vector` [out], LyCORIS /
     ComfyUI `.dora_scale` ([out, 1] normalised per output row, or [1, in] per input column), with LoRA, LoKr,
     LoHa or a full diff as the direction update (see `Decomposed`).
Every spelling of the two LoRA factors that ComfyUI's loader accepts is read: `lora_A/B.weight`,
`lora_down/up.weight`, `lora.down/up.weight`, `_lora.down/up.weight`, `lora_linear_layer.down/up.weight`,
`lora_A/B.<adapter>.weight` (PEFT adapter name kept), bare `lora_A/B` (Mochi-style).
Not applied but reported by name (never dropped in silence): bias deltas (`diff_b`, `lora_B.bias`: FLUX.2 layers
have no bias), the conv-only CP tensors (`lokr_t2`, `hada_t1/t2`, `lora_mid`), and the adapter families OFT,
BOFT, GLoRA, (IA)³ and ComfyUI's `reshape_weight` / `w_norm`.

Module names are resolved against the model's own Linear list, with `.` and `_` treated alike and the longest
known name that ends the key winning: kohya's `double_blocks_0_img_attn_qkv` cannot be split naively, because
BFL names contain underscores themselves (`img_attn`, `adaLN_modulation`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fluxion.weights.mapping import HALF_SWAPS, QKV_SPLITS, RENAMES, swap_halves


@dataclass
class LowRank:
    """ΔW = (alpha / rank) · up @ down."""

    down: Tensor  # [r, in]
    up: Tensor  # [out, r]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def delta(self) -> Tensor:
        return (self.alpha / self.rank) * (self.up.float() @ self.down.float())


@dataclass
class FullDiff:
    """ΔW stored whole."""

    diff: Tensor  # [out, in]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.diff.shape)

    def delta(self) -> Tensor:
        return self.diff.float()


@dataclass
class Block:
    """DoRA rows [start, stop) of a layer, normalised together: W'[rows] = m ⊙ V / (‖V‖ + eps), V = (W + ΔW)[rows].

    axis "out": one norm per output row (over the input dim), magnitude [stop - start] (PEFT, ai-toolkit,
    LyCORIS' default wd_on_out=True). axis "in": one norm per input column over these rows, magnitude [in]
    (LyCORIS wd_on_out=False). eps is what the writing tool adds to the norm (0 for PEFT and ai-toolkit,
    float32 eps for LyCORIS, which computes the norm in float32)."""

    start: int
    stop: int
    magnitude: Tensor
    axis: str  # "out" | "in"
    eps: float


@dataclass
class Decomposed:
    """DoRA: the direction update `inner` (ΔW, any adapter kind) plus magnitudes for row blocks. It depends on
    the layer weight W, so it is resolved against that weight when loaded (`resolve`): rows in a block become
    m ⊙ (W + ΔW) / ‖W + ΔW‖, rows in no block (the plain-LoRA q/k/v parts of a fused qkv) become W + ΔW."""

    inner: LowRank | FullDiff
    blocks: list[Block]

    @property
    def shape(self) -> tuple[int, int]:
        return self.inner.shape

    def resolve(self, weight: Tensor) -> Tensor:
        """W' - W in fp32 for the layer weight W [out, in]."""
        w = weight.float()
        v = w + self.inner.delta().to(w.device)
        new = v.clone()
        for b in self.blocks:
            rows = v[b.start : b.stop]
            m = b.magnitude.float().to(w.device)
            if b.axis == "out":
                new[b.start : b.stop] = rows * (m.reshape(-1, 1) / (rows.norm(dim=1, keepdim=True) + b.eps))
            else:
                new[b.start : b.stop] = rows * (m.reshape(1, -1) / (rows.norm(dim=0, keepdim=True) + b.eps))
        return new - w


@dataclass
class Replace:
    """ComfyUI `.set_weight`: the layer weight is replaced whole; ΔW = new - W, resolved against W at load."""

    weight: Tensor  # [out, in]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def resolve(self, weight: Tensor) -> Tensor:
        return self.weight.float().to(weight.device) - weight.float()


Adapter = LowRank | FullDiff | Decomposed | Replace


@dataclass
class Normalized:
    """What `to_canonical` made of a file: the adapters, and every key it could not use, by name."""

    adapters: dict[str, Adapter]
    unmatched: list[str] = field(default_factory=list)  # keys naming no module of this model
    unsupported: list[str] = field(default_factory=list)  # keys of a known module but an adapter type we skip
    format: str = ""
    reasons: dict[str, str] = field(default_factory=dict)  # module path in the file -> why it was not used


# ---------------------------------------------------------------------------------------------------------
# Module-name tables (derived from the transformer tables in mapping.py, so they cannot drift apart)

_WEIGHT = ".weight"
# Diffusers' run-time fused projections (`fuse_qkv_projections`); diffusers' own LoKr converter targets them.
_FUSED_QKV = {
    "double_blocks.{i}.img_attn.qkv": "transformer_blocks.{i}.attn.to_qkv",
    "double_blocks.{i}.txt_attn.qkv": "transformer_blocks.{i}.attn.to_added_qkv",
}
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")


def _template(fqn: str) -> tuple[str, str | None]:
    """`double_blocks.3.img_attn.qkv` -> (`double_blocks.{i}.img_attn.qkv`, "3")."""
    m = _BLOCK.match(fqn)
    if m is None:
        return fqn, None
    return f"{m.group(1)}.{{i}}." + fqn[m.end() :], m.group(2)


def _fill(template: str, index: str | None) -> str:
    return template if index is None else template.replace("{i}", index)


class _Target(NamedTuple):
    fqn: str  # BFL module the adapter lands on
    part: int | str | None  # q/k/v row chunk of a fused qkv, "head" for the leading rows, None for all
    swap: bool  # rows stored [scale ; shift] (diffusers norm_out) and must be half-swapped
    naming: str  # "bfl" | "diffusers"


def diffusers_names(fqn: str) -> list[tuple[str, int | None, bool]]:
    """Diffusers module name(s) of a BFL Linear: [(name, q/k/v part or None, half swap)]."""
    template, i = _template(fqn)
    key = template + _WEIGHT
    if key in RENAMES:
        return [(_fill(RENAMES[key][: -len(_WEIGHT)], i), None, False)]
    if key in QKV_SPLITS:
        parts = [(_fill(name[: -len(_WEIGHT)], i), n, False) for n, name in enumerate(QKV_SPLITS[key])]
        return parts + [(_fill(_FUSED_QKV[template], i), None, False)]
    if key in HALF_SWAPS:
        return [(HALF_SWAPS[key][: -len(_WEIGHT)], None, True)]
    return []


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _index(module_names: Iterable[str]) -> dict[str, _Target]:
    """Underscored module name (BFL and diffusers spellings) -> target, for every Linear of the model."""
    index: dict[str, _Target] = {}
    for fqn in module_names:
        entries = [(fqn, None, False, "bfl")] + [(n, p, s, "diffusers") for n, p, s in diffusers_names(fqn)]
        if _template(fqn)[0] == "single_blocks.{i}.linear1":
            # ComfyUI's Flux-family alias for the q/k/v rows [0, 3D) of linear1 (comfy/lora.py `linear1_qkv`).
            entries.append((fqn + "_qkv", "head", False, "bfl"))
        for name, part, swap, naming in entries:
            flat = _flat(name)
            clash = index.get(flat)
            assert clash is None or clash.fqn == fqn, f"{flat} names both {clash.fqn} and {fqn}"
            index[flat] = _Target(fqn, part, swap, naming)
    return index


# ---------------------------------------------------------------------------------------------------------
# Reading

# Every spelling of a parameter -> its role. The two LoRA factors are spelled as ComfyUI's loader accepts them
# (comfy/weight_adapter/lora.py); "down" is A [r, in], "up" is B [out, r].
_LORA_PARAMS = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora.down.weight": "down",  # diffusers' older attention-processor LoRAs; also `<x>_lora.down.weight`
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",  # transformers-style LoRACompatibleLinear
    "lora_linear_layer.up.weight": "up",
    "lora_A": "down",  # Mochi-style, without `.weight`
    "lora_B": "up",
    "alpha": "alpha",
}
# PEFT's raw module state dict keeps the adapter name: `lora_A.default.weight` (DiffSynth-Studio files).
_PEFT_NAMED = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.([A-Za-z0-9_-]+)\.weight$")
_PEFT_ROLES = {"lora_A": "down", "lora_B": "up", "lora_magnitude_vector": "magnitude:peft"}
# DoRA magnitudes, by the tool that writes each spelling (the norm eps and axis rule differ, see Block).
_MAGNITUDE_PARAMS = {
    "magnitude": "magnitude:ai-toolkit",
    "lora_magnitude_vector": "magnitude:peft",
    "lora_magnitude_vector.weight": "magnitude:peft",
    "dora_scale": "magnitude:lycoris",
}
_DELTA_PARAMS = {
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "diff": ("diff",),
    "replace": ("set_weight",),
}
# Parameters of adapter types not applied, with the name of what they are (for the error message).
_UNSUPPORTED_PARAMS = {
    "lora_A.bias": "LoRA bias (PEFT lora_bias)",
    "lora_B.bias": "LoRA bias (PEFT lora_bias)",
    "lora_up.bias": "LoRA bias",
    "diff_b": "bias delta (.diff_b)",
    "lora_mid.weight": "LoCon conv Tucker factor (lora_mid)",
    "lokr_t2": "LoKr conv Tucker factor (lokr_t2)",
    "hada_t1": "LoHa conv Tucker factor (hada_t1)",
    "hada_t2": "LoHa conv Tucker factor (hada_t2)",
    "reshape_weight": "ComfyUI reshape_weight (weight padding)",
    "w_norm": "norm-layer diff (w_norm)",
    "b_norm": "norm-layer diff (b_norm)",
    "oft_blocks": "OFT (oft_blocks)",
    "oft_diag": "OFT (oft_diag)",
    "rescale": "OFT / BOFT rescale",
    "oft_R.weight": "OFT (PEFT oft_R)",
    "oft_r": "OFT (oft_r)",
    "boft_R": "BOFT (boft_R)",
    "boft_s": "BOFT (boft_s)",
    "a1.weight": "GLoRA (a1/a2/b1/b2)",
    "a2.weight": "GLoRA (a1/a2/b1/b2)",
    "b1.weight": "GLoRA (a1/a2/b1/b2)",
    "b2.weight": "GLoRA (a1/a2/b1/b2)",
    "ia3_l": "(IA)³ (ia3_l)",
    "ia3_l.weight": "(IA)³ (ia3_l)",
}
_BIAS_PARAMS = ("lora_A.bias", "lora_B.bias", "lora_up.bias", "diff_b")
_ROLES = {
    **_LORA_PARAMS,
    **_MAGNITUDE_PARAMS,
    **{p: p for ps in _DELTA_PARAMS.values() for p in ps},
    **{p: p for p in _UNSUPPORTED_PARAMS},
}
# Longest first so that e.g. `lokr_w1_a` is not read as `lokr_w1`, `lora_A.weight` not as `lora_A`.
_ALL_PARAMS = sorted(_ROLES, key=len, reverse=True)
_UNDERSCORE_OK = ("lora.down.weight", "lora.up.weight")  # ComfyUI's `<x>_lora.up.weight` spelling
_KOHYA_PREFIXES = ("lora_unet", "lora_transformer")
_FAL_ALIAS = re.compile(r"(^|_)sformer_blocks_")  # fal's truncated `transformer_blocks.` (diffusers#13484)
_EPS32 = float(torch.finfo(torch.float32).eps)


def _split_key(key: str) -> tuple[str, str, bool] | None:
    """`a.b.lora_A.weight` -> (`a.b`, "down", named) where `named` says PEFT's adapter name was kept."""
    m = _PEFT_NAMED.search(key)
    if m is not None:
        return key[: m.start()], _PEFT_ROLES[m.group(1)], True
    for param in _ALL_PARAMS:
        if key.endswith(param) and len(key) > len(param):
            sep = key[-len(param) - 1]
            if sep == "." or (sep == "_" and param in _UNDERSCORE_OK):
                return key[: -len(param) - 1], _ROLES[param], False
    return None


def _resolve(path: str, index: dict[str, _Target]) -> tuple[str, _Target] | None:
    """(prefix, target) for the longest known module name that ends `path` on a `.`/`_` boundary."""
    flat = _FAL_ALIAS.sub(r"\1transformer_blocks_", _flat(path))
    words = flat.split("_")
    for start in range(len(words)):
        target = index.get("_".join(words[start:]))
        if target is not None:
            return "_".join(words[:start]), target
    return None


def _naming(prefix: str, target: _Target) -> str:
    if prefix.startswith(_KOHYA_PREFIXES):
        return "kohya"
    if prefix.startswith("lycoris"):
        return "lycoris"
    return target.naming


def _peft_config(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The PEFT LoraConfig dict diffusers writes into safetensors metadata (`lora_adapter_metadata`, keys
    prefixed `transformer.`), or a bare PEFT config passed as metadata; {} when there is none."""
    if not metadata:
        return {}
    config: Mapping[str, Any] = metadata
    if "lora_adapter_metadata" in metadata:
        raw = metadata["lora_adapter_metadata"]
        config = json.loads(raw) if isinstance(raw, str) else raw
    prefixed = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    return prefixed or dict(config)


def _lora_alpha(path: str, rank: int, alpha: Tensor | None, peft: dict[str, Any]) -> float:
    """`.alpha` tensor, else the PEFT config (alpha_pattern, rsLoRA), else alpha = rank (scale 1)."""
    if alpha is not None:
        return float(alpha.item())
    if "lora_alpha" not in peft:
        return float(rank)
    module = path.removeprefix("base_model.model.").removeprefix("transformer.")
    value = peft["lora_alpha"]
    for pattern, pattern_alpha in (peft.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # PEFT's own pattern rule (peft get_pattern_key)
            value = pattern_alpha
            break
    # rsLoRA scales by alpha / sqrt(r); expressed as our alpha / r.
    return float(value) * (math.sqrt(rank) if peft.get("use_rslora") else 1.0)


def lokr_delta(p: dict[str, Tensor], alpha: Tensor | None) -> Tensor:
    """LyCORIS LoKr: ΔW = kron(w1, w2) · scale, w = w_a @ w_b when a factor is decomposed.

    scale = alpha / rank where rank is that of the decomposed factor; with both factors full, LyCORIS applies
    no alpha scaling (it sets alpha = rank), and neither do we."""
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"].float() @ p["lokr_w1_b"].float()
    w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"].float() @ p["lokr_w2_b"].float()
    decomposed = p.get("lokr_w2_b", p.get("lokr_w1_b"))
    scale = 1.0
    if decomposed is not None and alpha is not None:
        scale = float(alpha.item()) / decomposed.shape[0]
    return torch.kron(w1.float(), w2.float()) * scale


def loha_delta(p: dict[str, Tensor], alpha: Tensor | None) -> Tensor:
    """LyCORIS LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / rank (alpha = rank when absent)."""
    rank = p["hada_w1_b"].shape[0]
    scale = 1.0 if alpha is None else float(alpha.item()) / rank
    w1 = p["hada_w1_a"].float() @ p["hada_w1_b"].float()
    w2 = p["hada_w2_a"].float() @ p["hada_w2_b"].float()
    return w1 * w2 * scale


def _complete(kind: str, params: set[str]) -> bool:
    if kind == "lora":
        return {"down", "up"} <= params
    if kind == "lokr":
        return all(f"lokr_w{n}" in params or {f"lokr_w{n}_a", f"lokr_w{n}_b"} <= params for n in (1, 2))
    return set(_DELTA_PARAMS[kind]) <= params


def _magnitude_block(path: str, source: str, m: Tensor, shape: tuple[int, int]) -> Block:
    """The DoRA block of a whole layer [out, in] from a magnitude tensor, its axis told by its shape."""
    out, inp = shape
    dims = tuple(m.shape)
    if dims in ((out,), (out, 1)):
        axis = "out"
    elif dims == (1, inp) and source == "lycoris":
        axis = "in"
    else:
        raise ValueError(
            f"{path}: the DoRA magnitude is {list(dims)}, which fits neither the output rows [{out}] nor (LyCORIS "
            f"wd_on_out=False) the input columns [1, {inp}] of this [{out}, {inp}] adapter"
        )
    # LyCORIS (and ComfyUI) add float32 eps to the norm; PEFT and ai-toolkit add nothing.
    return Block(0, out, m.reshape(-1), axis, _EPS32 if source == "lycoris" else 0.0)


def _group_adapter(
    path: str, params: dict[str, Tensor], peft: dict[str, Any]
) -> tuple[str, Adapter | None, str]:
    """(kind, adapter or None, why not) for the tensors of one module of the file."""
    magnitudes = [p for p in params if p.startswith("magnitude:")]
    dora = "DoRA with " if magnitudes else ""
    found = sorted({_UNSUPPORTED_PARAMS[p] for p in params if p in _UNSUPPORTED_PARAMS})
    if found:
        why = f"unsupported adapter parameters: {dora}{', '.join(found)}"
        if any(p in _BIAS_PARAMS for p in params):
            why += " (FLUX.2 layers have no bias: this file was made for another model)"
        return "unsupported", None, why
    if len(magnitudes) > 1:
        return "unsupported", None, f"two DoRA magnitudes {sorted(magnitudes)}"
    magnitude = (magnitudes[0].split(":")[1], params.pop(magnitudes[0])) if magnitudes else None
    alpha = params.pop("alpha", None)
    kinds = {k for k, names in _DELTA_PARAMS.items() if any(p in names for p in params)}
    kinds |= {"lora"} if any(p in ("down", "up") for p in params) else set()
    if len(kinds) > 1:
        return "unsupported", None, f"mixes adapter types {sorted(kinds)}"
    kind = kinds.pop() if kinds else "lora"
    lora = {p: t for p, t in params.items() if p in ("down", "up")}
    if not _complete(kind, set(lora) if kind == "lora" else set(params)):
        have = (
            sorted(params) + (["alpha"] if alpha is not None else []) + (["magnitude"] if magnitude else [])
        )
        # An incomplete DoRA is reported as an unapplied DoRA, never half-applied as something else.
        return (
            ("unsupported" if magnitude else kind),
            None,
            f"incomplete {dora}{kind} adapter (has only {have})",
        )
    if kind == "lora":
        down, up = lora["down"], lora["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ValueError(
                f"{path}: lora_down {list(down.shape)} and lora_up {list(up.shape)} do not form a "
                "[r, in] / [out, r] pair (conv LoRAs and mismatched ranks are not FLUX.2 LoRAs)"
            )
        adapter: Adapter = LowRank(down, up, _lora_alpha(path, down.shape[0], alpha, peft))
    elif kind == "lokr":
        adapter = FullDiff(lokr_delta(params, alpha))
    elif kind == "loha":
        adapter = FullDiff(loha_delta(params, alpha))
    elif kind == "diff":
        adapter = FullDiff(params["diff"])
    else:
        if magnitude:
            return (
                "unsupported",
                None,
                "DoRA with a set_weight replacement: not a DoRA layout any tool writes",
            )
        return kind, Replace(params["set_weight"]), ""
    if magnitude:
        block = _magnitude_block(path, magnitude[0], magnitude[1], adapter.shape)
        return kind, Decomposed(adapter, [block]), ""
    return kind, adapter, ""


def _swapped(adapter: Adapter) -> Adapter:
    """The adapter with its output rows half-swapped (diffusers' norm_out [scale ; shift] -> BFL [shift ; scale])."""
    if isinstance(adapter, LowRank):
        return LowRank(adapter.down, swap_halves(adapter.up), adapter.alpha)
    if isinstance(adapter, FullDiff):
        return FullDiff(swap_halves(adapter.diff))
    if isinstance(adapter, Replace):
        return Replace(swap_halves(adapter.weight))
    # A DoRA on the whole layer: output-row magnitudes move with their rows; input-column norms span all rows
    # and do not change under a row permutation.
    blocks = [
        Block(b.start, b.stop, swap_halves(b.magnitude) if b.axis == "out" else b.magnitude, b.axis, b.eps)
        for b in adapter.blocks
    ]
    return Decomposed(_swapped(adapter.inner), blocks)


def _fuse_inner(fqn: str, parts: dict[int, LowRank | FullDiff], D: int) -> LowRank | FullDiff:
    """Separate q/k/v adapters -> one adapter on the fused [3D, D] weight; missing parts are zero blocks.

    Low rank stays low rank: down = cat(A_q, A_k, A_v) [Σr, D], up = block-diag(B_q, B_k, B_v) [3D, Σr].
    Per-part scales alpha_p / r_p are kept in alpha when they agree, else folded into the up blocks."""
    order = sorted(parts)
    first = parts[order[0]]
    if not all(isinstance(parts[p], LowRank) for p in order):
        device = first.up.device if isinstance(first, LowRank) else first.diff.device
        diff = torch.zeros(3 * D, first.shape[1], dtype=torch.float32, device=device)
        for p in order:
            diff[p * D : (p + 1) * D] = parts[p].delta()
        return FullDiff(diff)
    loras: list[LowRank] = [parts[p] for p in order]
    scales = [a.alpha / a.rank for a in loras]
    same = all(s == scales[0] for s in scales)
    total = sum(a.rank for a in loras)
    up = torch.zeros(3 * D, total, dtype=loras[0].up.dtype, device=loras[0].up.device)
    col = 0
    for p, a, s in zip(order, loras, scales):
        up[p * D : (p + 1) * D, col : col + a.rank] = a.up if same else a.up * s
        col += a.rank
    down = torch.cat([a.down.to(loras[0].down.dtype) for a in loras])
    return LowRank(down, up, scales[0] * total if same else float(total))


def _fuse_qkv(fqn: str, parts: dict[int, Adapter]) -> Adapter:
    """Separate q/k/v adapters -> one on the fused qkv. DoRA parts keep their own row blocks, shifted to the
    part's rows (a per-output-row magnitude is simply concatenated; a per-input-column one stays per part)."""
    outs = {a.shape[0] for a in parts.values()}
    if len(outs) != 1:
        raise ValueError(f"{fqn}: the q/k/v adapters have different output sizes {sorted(outs)}")
    D = outs.pop()
    if any(isinstance(a, Replace) for a in parts.values()):
        raise ValueError(
            f"{fqn}: a set_weight replacement of one q/k/v part cannot be fused; give the whole qkv"
        )
    inner = {p: a.inner if isinstance(a, Decomposed) else a for p, a in parts.items()}
    fused = _fuse_inner(fqn, inner, D)
    blocks = [
        Block(b.start + p * D, b.stop + p * D, b.magnitude, b.axis, b.eps)
        for p, a in sorted(parts.items())
        if isinstance(a, Decomposed)
        for b in a.blocks
    ]
    return Decomposed(fused, blocks) if blocks else fused


def _pad_rows(adapter: Adapter, out: int) -> Adapter:
    """An adapter on the leading rows of a layer with `out` rows -> one on the whole layer (zero elsewhere)."""
    if isinstance(adapter, Decomposed):
        return Decomposed(_pad_rows(adapter.inner, out), adapter.blocks)
    if isinstance(adapter, Replace):
        raise ValueError(
            "a set_weight replacement of part of a layer cannot be applied; give the whole layer"
        )
    full = adapter.up if isinstance(adapter, LowRank) else adapter.diff
    if full.shape[0] > out:
        raise ValueError(f"an adapter on the leading {full.shape[0]} rows of a layer with only {out} rows")
    padded = torch.zeros(out, full.shape[1], dtype=full.dtype, device=full.device)
    padded[: full.shape[0]] = full
    return LowRank(adapter.down, padded, adapter.alpha) if isinstance(adapter, LowRank) else FullDiff(padded)


def to_canonical(
    state_dict: Mapping[str, Tensor], module_names: Iterable[str], metadata: Mapping[str, Any] | None = None
) -> Normalized:
    """Normalise a LoRA / LoKr / LoHa / DoRA / diff state dict of any family to {BFL Linear FQN: adapter}.

    `module_names`: the Linear FQNs of the target model (BFL names), or {FQN: nn.Linear} (then adapters on part
    of a layer, ComfyUI's `linear1_qkv`, can be placed). Keys that name none of them, or are not adapter
    tensors, land in `unmatched`; keys of adapter types we do not apply land in `unsupported`.
    """
    sizes = {n: m.out_features for n, m in module_names.items()} if isinstance(module_names, Mapping) else {}
    index = _index(module_names)
    peft = _peft_config(metadata)
    groups: dict[str, dict[str, Tensor]] = {}
    keys_of: dict[str, list[str]] = {}
    named: set[str] = set()
    unmatched: list[str] = []
    for key, value in state_dict.items():
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        path, role, peft_named = split
        if role in groups.setdefault(path, {}):
            raise ValueError(f"{key}: a second {role!r} tensor for {path} (two spellings of one parameter)")
        groups[path][role] = value
        keys_of.setdefault(path, []).append(key)
        if peft_named:
            named.add(path)

    unsupported: list[str] = []
    reasons: dict[str, str] = {}
    namings: set[str] = set()
    kinds: set[str] = set()
    placed: dict[str, dict[int | None, Adapter]] = {}  # fqn -> q/k/v part (None: whole) -> adapter
    for path, params in groups.items():
        hit = _resolve(path, index)
        if hit is None:
            unmatched.extend(keys_of[path])
            continue
        prefix, target = hit
        kind, adapter, why = _group_adapter(path, dict(params), peft)
        if adapter is None:
            reasons[path] = why
            (unsupported if kind == "unsupported" else unmatched).extend(keys_of[path])
            continue
        if target.part == "head" and target.fqn not in sizes:
            reasons[path] = (
                "an adapter on part of a layer needs the model's layer sizes (pass {name: Linear})"
            )
            unmatched.extend(keys_of[path])
            continue
        if adapter.shape[0] % 2 and target.swap:
            raise ValueError(f"{path}: {adapter.shape[0]} rows cannot be the [scale ; shift] halves")
        if target.swap:
            adapter = _swapped(adapter)
        parts = placed.setdefault(target.fqn, {})
        if target.part in parts or None in parts or (target.part is None and parts):
            raise ValueError(f"{path}: a second adapter for {target.fqn} in the same file (ambiguous)")
        parts[target.part] = adapter
        naming = _naming(prefix, target)
        if naming == "diffusers" and path in named and not prefix:
            naming = "diffsynth"  # bare diffusers names + PEFT adapter name: what DiffSynth-Studio saves
        namings.add(naming)
        kinds.add(kind)
        if isinstance(adapter, Decomposed):
            kinds.add("dora")

    adapters = {
        fqn: parts[None]
        if None in parts
        else _pad_rows(parts["head"], sizes[fqn])
        if "head" in parts
        else _fuse_qkv(fqn, parts)
        for fqn, parts in placed.items()
    }
    fmt = "+".join(sorted(namings)) + "".join(f"/{k}" for k in sorted(kinds - {"lora"}))
    return Normalized(adapters, sorted(unmatched), sorted(unsupported), fmt or "unknown", reasons)


# ---------------------------------------------------------------------------------------------------------
# Writing


def _folded(a: LowRank) -> Tensor:
    """down · alpha / r: for formats without an alpha (diffusers, ai-toolkit), so that alpha = rank."""
    return a.down if a.alpha == a.rank else a.down * (a.alpha / a.rank)


def _only_low_rank(canonical: Mapping[str, Adapter], fmt: str) -> None:
    full = sorted(k for k, a in canonical.items() if not isinstance(a, LowRank))
    if full:
        raise ValueError(f"the {fmt} format has no full-diff adapters (from LoKr / LoHa / .diff): {full}")


def to_fluxion(canonical: Mapping[str, Adapter]) -> dict[str, Tensor]:
    """Our own lossless format: bare BFL names, `lora_down` / `lora_up` / `alpha`, or `diff`."""
    out: dict[str, Tensor] = {}
    for fqn, a in canonical.items():
        if isinstance(a, FullDiff):
            out[f"{fqn}.diff"] = a.diff
            continue
        out[f"{fqn}.lora_down.weight"] = a.down
        out[f"{fqn}.lora_up.weight"] = a.up
        out[f"{fqn}.alpha"] = torch.tensor(float(a.alpha))
    return out


def to_bfl(canonical: Mapping[str, Adapter], prefix: str = "diffusion_model.") -> dict[str, Tensor]:
    """ai-toolkit / ComfyUI layout: `diffusion_model.<BFL name>.lora_A/B.weight`, alpha folded into A (both
    diffusers' BFL converter, which rejects `.alpha` keys, and ComfyUI read it); full diffs as `.diff`."""
    out: dict[str, Tensor] = {}
    for fqn, a in canonical.items():
        if isinstance(a, FullDiff):
            out[f"{prefix}{fqn}.diff"] = a.diff
            continue
        out[f"{prefix}{fqn}.lora_A.weight"] = _folded(a)
        out[f"{prefix}{fqn}.lora_B.weight"] = a.up
    return out


def to_kohya(canonical: Mapping[str, Adapter]) -> dict[str, Tensor]:
    """kohya / musubi: `lora_unet_<BFL name with _>.lora_down/lora_up.weight` + `.alpha` (kept exact)."""
    out: dict[str, Tensor] = {}
    for fqn, a in canonical.items():
        stem = "lora_unet_" + _flat(fqn)
        if isinstance(a, FullDiff):
            out[f"{stem}.diff"] = a.diff
            continue
        out[f"{stem}.lora_down.weight"] = a.down
        out[f"{stem}.lora_up.weight"] = a.up
        out[f"{stem}.alpha"] = torch.tensor(float(a.alpha))
    return out


def _qkv_blocks(a: LowRank) -> list[tuple[Tensor, Tensor]] | None:
    """The (down, up) of each q/k/v part when the fused up is block diagonal with equal ranks (as `_fuse_qkv`
    builds it, or kohya's "rank-split" qkv), else None."""
    if a.rank % 3:
        return None
    r, D = a.rank // 3, a.up.shape[0] // 3
    blocks = a.up.reshape(3, D, 3, r)
    off = torch.ones(3, 3, dtype=torch.bool) ^ torch.eye(3, dtype=torch.bool)
    if blocks.permute(0, 2, 1, 3)[off].any():
        return None
    return [(a.down[p * r : (p + 1) * r], blocks[p, :, p]) for p in range(3)]


def to_diffusers(canonical: Mapping[str, Adapter], prefix: str = "transformer.") -> dict[str, Tensor]:
    """diffusers / PEFT layout, loadable by `Flux2Transformer2DModel.load_lora_adapter`: alpha folded into A
    (PEFT's no-alpha default is alpha = r); fused qkv split exactly into q/k/v (A copied to each and B split in
    row chunks, or the blocks themselves when B is block diagonal); `norm_out.linear` B rows half-swapped."""
    _only_low_rank(canonical, "diffusers")
    out: dict[str, Tensor] = {}
    for fqn, a in canonical.items():
        names = diffusers_names(fqn)
        if not names:
            raise ValueError(f"{fqn} has no diffusers counterpart")
        down, up = _folded(a), a.up
        if names[0][1] is None:  # rename or half swap
            name, _, swap = names[0]
            out[f"{prefix}{name}.lora_A.weight"] = down
            out[f"{prefix}{name}.lora_B.weight"] = swap_halves(up) if swap else up
            continue
        blocks = _qkv_blocks(LowRank(down, up, float(a.rank)))
        # A copied, not shared: safetensors refuses to write tensors that share memory.
        parts = blocks or [(down.clone(), chunk) for chunk in up.chunk(3, dim=0)]
        for (name, _, _), (part_down, part_up) in zip(names[:3], parts):
            out[f"{prefix}{name}.lora_A.weight"] = part_down.contiguous()
            out[f"{prefix}{name}.lora_B.weight"] = part_up.contiguous()
    return out


EXPORTERS = {"fluxion": to_fluxion, "bfl": to_bfl, "kohya": to_kohya, "diffusers": to_diffusers}
