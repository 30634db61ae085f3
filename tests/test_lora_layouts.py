"""LoRA files as the tools write them (issue 10): each layout loads and changes the output the way the writing
tool means, checked against that tool's own forward (PEFT, LyCORIS, diffusers) or a hand formula written here,
never against fluxion's own merge. Plus key-set checks at the real klein-4B / dev sizes on the meta device, the
stacking rule for DoRA, and fluxion's own file in diffusers' Flux2 pipeline."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from fluxion.config import DEV, KLEIN_4B
from fluxion.lora import inject_lora, load_lora, lora_parameters, set_lora_scale, write_lora
from fluxion.model.transformer import Flux2
from fluxion.weights import lora_mapping as lm
from test_lora import QKV, D, forward, linear_names, model, parity
from test_transformer import SMALL, pair

TOL = 1e-5
DOUBLE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def randomize_(params, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


def by_hand(m, deltas):
    """A copy of m with W + ΔW (or W replaced, for callables) merged by hand."""
    want = copy.deepcopy(m)
    with torch.no_grad():
        for fqn, d in deltas.items():
            w = want.get_submodule(fqn).weight
            w.copy_(d(w.clone()) if callable(d) else w + d)
    return want


def dora_rows(w, delta, m, eps=0.0):
    """DoRA with one magnitude per output row, from the paper: m * V / ||V||_row, V = W + ΔW."""
    v = w + delta
    return v * (m.reshape(-1, 1) / (torch.linalg.vector_norm(v, dim=1, keepdim=True) + eps))


# ---------------------------------------------------------------------------------------------------------
# DiffSynth-Studio: PEFT `inject_adapter_in_model` on the DiT (diffusers module names), trainable tensors saved
# with the `pipe.dit.` prefix removed, adapter name kept, lora_alpha = rank (DiffSynth has no alpha option).


def test_diffsynth_real_layout(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    ref, ours = pair(SMALL, seed=11)
    targets = [*DOUBLE_TARGETS, "linear_in", "linear_out", "to_qkv_mlp_proj"]
    targets += [f"single_transformer_blocks.{i}.attn.to_out" for i in range(SMALL.num_single_blocks)]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), ref)
    randomize_([p for n, p in ref.named_parameters() if "lora_B" in n], 0.2)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items() if ".lora_" in k}
    assert "transformer_blocks.0.attn.to_q.lora_A.default.weight" in sd
    path = tmp_path / "epoch-4.safetensors"
    save_file(sd, str(path))
    report = load_lora(ours, path)
    assert report.format == "diffsynth" and not report.unmatched
    diff = parity(ref.eval(), ours)
    print(f"DiffSynth-Studio LoRA (PEFT-written): max |diff| = {diff:.2e}")
    assert diff <= TOL


# ---------------------------------------------------------------------------------------------------------
# DoRA, PEFT: written by PEFT on diffusers' model (to_q / to_k / to_v land on our fused qkv; to_k left out so its
# rows get nothing) and by PEFT's get_peft_model + save_pretrained on our own model (BFL names).


def test_peft_dora_on_diffusers_names(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref, ours = pair(SMALL, seed=12)
    targets = ["to_q", "to_v", "add_k_proj", "to_out.0", "to_qkv_mlp_proj", "x_embedder", "norm_out.linear"]
    ref.add_adapter(
        LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets), adapter_name="default"
    )
    randomize_([p for n, p in ref.named_parameters() if "lora_B" in n], 0.2)
    randomize_([p for n, p in ref.named_parameters() if "lora_magnitude" in n], 0.3, seed=1)
    sd = {f"transformer.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(ref).items()}
    assert "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector" in sd
    cfg = {f"transformer.{k}": v for k, v in ref.peft_config["default"].to_dict().items()}
    path = tmp_path / "dora.safetensors"
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(cfg, default=sorted)})
    report = load_lora(ours, path)
    assert report.format == "diffusers/dora" and not report.unmatched and not report.unsupported
    diff = parity(ref.eval(), ours)
    print(f"PEFT DoRA (diffusers names, q/v of a fused qkv, norm_out): max |diff| = {diff:.2e}")
    assert diff <= TOL
    ref.disable_adapters()
    assert parity(ref, ours) > 1e-2


def test_peft_dora_get_peft_model_save_pretrained(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = model(seed=13)
    ours = copy.deepcopy(base)
    targets = [QKV, "double_blocks.1.txt_attn.proj", "single_blocks.0.linear1", "img_in"]
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=3, lora_alpha=5, use_dora=True, target_modules=targets)
    )
    randomize_([p for n, p in peft_model.named_parameters() if "lora_B" in n], 0.2)
    randomize_([p for n, p in peft_model.named_parameters() if "lora_magnitude" in n], 0.3, seed=1)
    peft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    report = load_lora(ours, tmp_path / "adapter_model.safetensors", metadata=config)
    assert report.format == "bfl/dora" and report.applied == sorted(targets)
    diff = (forward(ours) - forward(peft_model.eval())).abs().max().item()
    print(f"PEFT get_peft_model DoRA on BFL names: max |diff| = {diff:.2e}")
    assert diff <= TOL and (forward(base) - forward(ours)).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# DoRA, ai-toolkit: `diffusion_model.<BFL>.lora_A/B.weight` + `.magnitude` [out], no alpha (peft_format). The
# reference is ai-toolkit's forward as written in toolkit/network_mixins.py + models/DoRA.py:
# y = x Wᵀ + s·x ΔWᵀ + (m / ||W + sΔW||_row - 1) · x (W + sΔW)ᵀ.


def test_ai_toolkit_dora_against_its_forward():
    base = model(seed=14)
    layers = [QKV, "double_blocks.0.img_mlp.2", "single_blocks.1.linear2"]
    g = torch.Generator().manual_seed(5)
    sd, hooks, ref = {}, [], copy.deepcopy(base)
    for fqn in layers:
        lin = base.get_submodule(fqn)
        A = torch.randn(4, lin.in_features, generator=g) * 0.1
        B = torch.randn(lin.out_features, 4, generator=g) * 0.1
        m = torch.linalg.vector_norm(lin.weight, dim=1) * (
            1 + 0.3 * torch.rand(lin.out_features, generator=g)
        )
        sd |= {f"diffusion_model.{fqn}.lora_A.weight": A, f"diffusion_model.{fqn}.lora_B.weight": B}
        sd[f"diffusion_model.{fqn}.magnitude"] = m

        def hook(module, args, out, A=A, B=B, m=m):
            (x,) = args
            W, dW = module.weight, B @ A
            norm = torch.linalg.vector_norm(W + dW, dim=1)
            return out + x @ dW.T + (m / norm - 1) * (x @ (W + dW).T)

        hooks.append(ref.get_submodule(fqn).register_forward_hook(hook))
    ours = copy.deepcopy(base)
    assert load_lora(ours, sd).format == "bfl/dora"
    diff = (forward(ours) - forward(ref)).abs().max().item()
    print(f"ai-toolkit DoRA vs its forward: max |diff| = {diff:.2e}")
    assert diff <= TOL and (forward(base) - forward(ours)).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# LyCORIS: networks created by lycoris-lora on our model and saved by it (`lycoris_<name>`, dora_scale [out, 1]
# with wd_on_output, [1, in] without), checked against LyCORIS' own forward.


@pytest.mark.parametrize(
    "algo,kwargs",
    [
        ("locon", dict(dora_wd=True, wd_on_output=True)),
        ("locon", dict(dora_wd=True, wd_on_output=False)),
        ("lokr", dict(dora_wd=True, wd_on_output=True, factor=4)),
        ("lokr", dict(factor=4)),
        ("loha", dict(dora_wd=True)),
    ],
    ids=["lora-dora", "lora-dora-in-axis", "lokr-dora", "lokr", "loha-dora"],
)
def test_lycoris_written_files(tmp_path, algo, kwargs):
    from lycoris import create_lycoris

    base = model(seed=15)
    ref = copy.deepcopy(base)
    net = create_lycoris(ref, 1.0, linear_dim=4, linear_alpha=2, algo=algo, **kwargs)
    net.apply_to()
    randomize_([p for n, p in net.named_parameters() if "dora_scale" not in n], 0.05)
    randomize_([p for n, p in net.named_parameters() if "dora_scale" in n], 0.1, seed=1)
    path = tmp_path / "lycoris.safetensors"
    net.save_weights(str(path), torch.float32, None)
    ours = copy.deepcopy(base)
    report = load_lora(ours, path)
    assert not report.unmatched and not report.unsupported and report.applied == sorted(linear_names(base))
    assert report.format.startswith("lycoris") and ("dora" in report.format) == ("dora_wd" in kwargs)
    with torch.no_grad():
        want = forward(ref.eval())
    diff = (forward(ours) - want).abs().max().item()
    print(f"LyCORIS {algo} {kwargs}: max |diff| = {diff:.2e}")
    assert diff <= TOL and (forward(base) - want).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# ComfyUI's spellings (comfy/lora.py, comfy/weight_adapter/lora.py): each key layout against the hand formula
# W + (alpha / r) · up @ down (alpha = r when absent), `.diff` added, `.set_weight` replacing.

SPELLINGS = {  # name -> (down key, up key) for module path x
    "lora_up/down": ("{x}.lora_down.weight", "{x}.lora_up.weight"),
    "_lora.up/down": ("{x}_lora.down.weight", "{x}_lora.up.weight"),
    ".lora.up/down": ("{x}.lora.down.weight", "{x}.lora.up.weight"),
    "lora_linear_layer": ("{x}.lora_linear_layer.down.weight", "{x}.lora_linear_layer.up.weight"),
    "lora_A/B.default": ("{x}.lora_A.default.weight", "{x}.lora_B.default.weight"),
    "mochi lora_A/B": ("{x}.lora_A", "{x}.lora_B"),
    "lora_A/B": ("{x}.lora_A.weight", "{x}.lora_B.weight"),
}
PREFIXES = {  # name -> module path of BFL layer `double_blocks.1.img_attn.proj` (diffusers: to_out.0)
    "diffusion_model.": "diffusion_model.double_blocks.1.img_attn.proj",
    "model.diffusion_model.": "model.diffusion_model.double_blocks.1.img_attn.proj",
    "lora_unet_": "lora_unet_double_blocks_1_img_attn_proj",
    "lycoris_": "lycoris_transformer_blocks_1_attn_to_out_0",
    "lora_transformer_": "lora_transformer_transformer_blocks_1_attn_to_out_0",
    "transformer.": "transformer.transformer_blocks.1.attn.to_out.0",
    "base_model.model.": "base_model.model.transformer_blocks.1.attn.to_out.0",
    "bare (DiffSynth)": "transformer_blocks.1.attn.to_out.0",
}
PROJ = "double_blocks.1.img_attn.proj"


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_comfy_spellings_and_prefixes(spelling, prefix):
    m = model(seed=16)
    names = linear_names(m)
    g = torch.Generator().manual_seed(len(spelling) + 7 * len(prefix))
    down, up = torch.randn(3, D, generator=g), torch.randn(D, 3, generator=g)
    x = PREFIXES[prefix]
    kd, ku = (k.format(x=x) for k in SPELLINGS[spelling])
    sd = {kd: down, ku: up, f"{x}.alpha": torch.tensor(1.5)}
    norm = lm.to_canonical(sd, names)
    assert not norm.unmatched and list(norm.adapters) == [PROJ]
    assert (norm.adapters[PROJ].delta() - 0.5 * up @ down).abs().max() <= 1e-6


def test_comfy_linear1_qkv_rows():
    """ComfyUI's Flux alias `single_blocks.N.linear1_qkv`: a LoRA on rows [0, 3D) of linear1 (offset (0, 0, 3D))."""
    m = model(seed=21)
    linears = {n: x for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)}
    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(2, D, generator=g), torch.randn(3 * D, 2, generator=g)
    x = "diffusion_model.single_blocks.1.linear1_qkv"
    sd = {f"{x}.lora_down.weight": down, f"{x}.lora_up.weight": up, f"{x}.alpha": torch.tensor(1.0)}
    norm = lm.to_canonical(sd, linears)
    delta = norm.adapters["single_blocks.1.linear1"].delta()
    assert delta.shape == linears["single_blocks.1.linear1"].weight.shape
    assert (delta[: 3 * D] - 0.5 * up @ down).abs().max() <= 1e-6 and not delta[3 * D :].any()
    assert lm.to_canonical(sd, list(linears)).unmatched == sorted(sd)  # needs the layer sizes


def test_comfy_diff_set_weight_and_refusals():
    base = model(seed=17)
    g = torch.Generator().manual_seed(3)
    diff, new = torch.randn(D, D, generator=g) * 0.1, torch.randn(D, D, generator=g) * 0.1
    sd = {
        f"diffusion_model.{PROJ}.diff": diff,
        "diffusion_model.double_blocks.0.txt_attn.proj.set_weight": new,
    }
    ours = copy.deepcopy(base)
    report = load_lora(ours, sd)
    assert report.format == "bfl/diff/replace"
    want = by_hand(base, {PROJ: diff, "double_blocks.0.txt_attn.proj": lambda w: new})
    diff_out = (forward(ours) - forward(want)).abs().max().item()
    print(f"ComfyUI .diff + .set_weight: max |diff| = {diff_out:.2e}")
    assert diff_out <= TOL
    # What is not applied is refused by the name of what it is, and nothing of that module is applied.
    refused = {
        f"diffusion_model.{PROJ}.diff_b": (torch.zeros(D), "bias delta"),
        "diffusion_model.double_blocks.0.img_attn.proj.oft_blocks": (torch.zeros(4, 16, 16), "OFT"),
        "lycoris_double_blocks_0_img_mlp_2.a1.weight": (torch.zeros(4, D), "GLoRA"),
        "diffusion_model.single_blocks.0.linear2.lora_mid.weight": (torch.zeros(4, 4, 3, 3), "lora_mid"),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (
            torch.zeros(4, 8),
            "transformer only",
        ),
    }
    for key, (t, what) in refused.items():
        with pytest.raises(ValueError, match=what):
            load_lora(copy.deepcopy(base), {key: t})
    # A DoRA of a kind not applied (LoHa with conv Tucker factors) is refused as DoRA, even with strict=False.
    stem = "lycoris_double_blocks_0_img_attn_proj"
    dora = {f"{stem}.{p}": torch.ones(2, D) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    dora |= {f"{stem}.hada_t1": torch.ones(2, 2, 1, 1), f"{stem}.dora_scale": torch.ones(D, 1)}
    ours = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="DoRA with LoHa conv Tucker"):
        with pytest.raises(ValueError, match="no adapter in it applies"):
            load_lora(ours, dora, strict=False)


# ---------------------------------------------------------------------------------------------------------
# Stacking: a DoRA normalises the layer as it computes when the DoRA is loaded (ComfyUI applies patches in load
# order); adapters loaded later add on top. scale s interpolates W -> W' (ComfyUI's strength).


def test_dora_stacking_rule_and_scale():
    base = model(seed=18)
    lin = base.get_submodule(QKV)
    g = torch.Generator().manual_seed(9)
    A, B = torch.randn(2, D, generator=g) * 0.1, torch.randn(3 * D, 2, generator=g) * 0.1
    m = torch.rand(3 * D, generator=g) + 0.5
    dA, dB = torch.randn(3, D, generator=g) * 0.1, torch.randn(3 * D, 3, generator=g) * 0.1
    dora = {f"diffusion_model.{QKV}.lora_A.weight": A, f"diffusion_model.{QKV}.lora_B.weight": B}
    dora[f"diffusion_model.{QKV}.magnitude"] = m
    plain = {f"lora_unet_{QKV.replace('.', '_')}.lora_down.weight": dA}
    plain[f"lora_unet_{QKV.replace('.', '_')}.lora_up.weight"] = dB
    W = lin.weight.detach().clone()
    # plain first, then DoRA: the DoRA sees W + ΔW_plain.
    first = copy.deepcopy(base)
    load_lora(first, plain, name="plain")
    load_lora(first, dora, name="dora")
    want = by_hand(base, {QKV: lambda w: dora_rows(W + dB @ dA, B @ A, m)})
    assert (forward(first) - forward(want)).abs().max() <= TOL
    # DoRA first, then plain: the plain adapter adds on top of W'.
    second = copy.deepcopy(base)
    load_lora(second, dora, name="dora")
    load_lora(second, plain, name="plain")
    want = by_hand(base, {QKV: lambda w: dora_rows(W, B @ A, m) + dB @ dA})
    assert (forward(second) - forward(want)).abs().max() <= TOL
    assert (forward(first) - forward(second)).abs().max() > 1e-3  # the order matters, as in ComfyUI
    set_lora_scale(second, "dora", 0.5)
    want = by_hand(base, {QKV: lambda w: W + 0.5 * (dora_rows(W, B @ A, m) - W) + dB @ dA})
    assert (forward(second) - forward(want)).abs().max() <= TOL


# ---------------------------------------------------------------------------------------------------------
# Our own files in the other tools.


def test_write_lora_formats_round_trip(tmp_path):
    m = model(seed=19)
    inject_lora(m, rank=4, alpha=2, targets=["double_blocks.*", "single_blocks.*"])
    randomize_(lora_parameters(m), 0.05)
    want = forward(m)
    for fmt, first_key in (
        ("comfy", "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"),
        ("diffusers", "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"),
    ):
        path = write_lora(m, tmp_path / f"{fmt}.safetensors", format=fmt)
        from fluxion.weights.safetensors_io import load_safetensors

        assert first_key in load_safetensors(path)
        other = model(seed=19)
        load_lora(other, path)
        assert (forward(other) - want).abs().max() <= TOL
    with pytest.raises(ValueError, match="unknown LoRA format"):
        write_lora(m, tmp_path / "x.safetensors", format="gguf")


def test_comfy_file_through_diffusers_converter(tmp_path):
    """diffusers' Flux2 converter turns our `diffusion_model.` file into its own names; loading that back gives
    the same ΔW on every layer (the converter's exact-split of the fused qkv included)."""
    from diffusers import Flux2Pipeline

    m = model(seed=20)
    names = linear_names(m)
    layers = [n for n in names if n.startswith(("double_blocks", "single_blocks"))] + ["img_in", "txt_in"]
    inject_lora(m, rank=4, alpha=2, targets=layers)
    randomize_(lora_parameters(m), 0.05)
    path = write_lora(m, tmp_path / "ours.safetensors")
    converted = Flux2Pipeline.lora_state_dict(str(path))
    assert all(k.startswith("transformer.") for k in converted)
    back = lm.to_canonical(converted, names)
    assert not back.unmatched and back.format == "diffusers"
    orig = {fqn: m.get_submodule(fqn).lora["default"].canonical() for fqn in layers}
    for fqn in layers:
        assert (back.adapters[fqn].delta() - orig[fqn].delta()).abs().max() <= 1e-6, fqn


@pytest.mark.slow
def test_fluxion_lora_in_diffusers_pipeline(tmp_path, monkeypatch):
    """A LoRA trained-and-written by fluxion (comfy layout), loaded by `Flux2KleinPipeline.load_lora_weights`,
    changes diffusers' generated image exactly as it changes fluxion's."""
    from diffusers import Flux2KleinPipeline

    from fluxion.sampling import pipeline as P
    from fluxion.weights.models import load_models
    from pipeline_fixtures import KLEIN, build_diffusers_folder, diffusers_pipeline, register_specs
    from test_pipeline import PROMPT, run_diffusers

    register_specs(monkeypatch)
    comps = build_diffusers_folder(tmp_path / "klein", KLEIN, seed=0)
    models = load_models(str(tmp_path / "klein"), preset=KLEIN.name)
    # The trainer's default targets plus the embedders; final_layer.adaLN_modulation.1 is left out because
    # diffusers' converter maps it to norm_out.linear without the [shift ; scale] half swap (spec 9.2).
    targets = ["double_blocks.*", "single_blocks.*", "img_in", "txt_in", "final_layer.linear"]
    inject_lora(models.transformer, rank=4, alpha=4, targets=targets)
    randomize_(lora_parameters(models.transformer), 0.05)
    path = write_lora(models.transformer, tmp_path / "lora.safetensors")

    seen = []
    decode = P.decode
    monkeypatch.setattr(P, "decode", lambda mo, tok, h, w: seen.append(tok.clone()) or decode(mo, tok, h, w))
    width, height, seed, steps = 64, 80, 7, 4
    req = P.Request(prompt=PROMPT, width=width, height=height, steps=steps, seed=seed, generator_device="cpu")
    P.generate(models, req)
    pipe = diffusers_pipeline(Flux2KleinPipeline, comps, is_distilled=True)
    kwargs = dict(prompt=PROMPT, height=height, width=width, guidance_scale=1.0)
    base_tokens, _ = run_diffusers(pipe, steps, [seed], KLEIN.text, **kwargs)
    pipe.load_lora_weights(str(path))
    tokens, px = run_diffusers(pipe, steps, [seed], KLEIN.text, **kwargs)
    d_tok = (seen[-1] - tokens).abs().max().item()
    print(f"fluxion LoRA in diffusers' pipeline: tokens max |diff| = {d_tok:.2e}")
    assert d_tok <= 1e-4
    assert (tokens - base_tokens).abs().max() > 1e-2  # the LoRA did change diffusers' output


# ---------------------------------------------------------------------------------------------------------
# Key sets at the real sizes, on the meta device: every layout names every layer it should, with the right
# shapes, and leaves no key unread.


def _layout_keys(model_, layout, r=4):
    """{key: tensor on meta} for a LoRA on every Linear in `layout`, built from that tool's naming rule."""
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    sd = {}
    for fqn, lin in ((n, x) for n, x in model_.named_modules() if isinstance(x, torch.nn.Linear)):
        outs = lm.diffusers_names(fqn)
        if layout in ("diffusers", "diffsynth", "peft-dora", "lycoris"):
            parts = [(n, p) for n, p, _ in outs if not n.endswith(("to_qkv", "to_added_qkv"))]
        else:
            parts = [(fqn, None)]
        for name, part in parts:
            out = lin.out_features // 3 if part is not None else lin.out_features
            down, up = meta(r, lin.in_features), meta(out, r)
            if layout == "comfy":
                sd |= {
                    f"diffusion_model.{name}.lora_A.weight": down,
                    f"diffusion_model.{name}.lora_B.weight": up,
                }
            elif layout == "ai-toolkit-dora":
                sd |= {
                    f"diffusion_model.{name}.lora_A.weight": down,
                    f"diffusion_model.{name}.lora_B.weight": up,
                }
                sd[f"diffusion_model.{name}.magnitude"] = meta(out)
            elif layout == "kohya":
                stem = "lora_unet_" + name.replace(".", "_")
                sd |= {
                    f"{stem}.lora_down.weight": down,
                    f"{stem}.lora_up.weight": up,
                    f"{stem}.alpha": torch.tensor(2.0),
                }
            elif layout == "diffusers":
                sd |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up}
            elif layout == "diffsynth":
                sd |= {f"{name}.lora_A.default.weight": down, f"{name}.lora_B.default.weight": up}
            elif layout == "peft-dora":
                sd |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up}
                sd[f"transformer.{name}.lora_magnitude_vector"] = meta(out)
            elif layout == "lycoris":  # LoKr with DoRA, diffusers names (SimpleTuner / ai-toolkit old format)
                stem = "lycoris_" + name.replace(".", "_")
                sd |= {f"{stem}.lokr_w1": meta(1, 1), f"{stem}.lokr_w2": meta(out, lin.in_features)}
                sd[f"{stem}.dora_scale"] = meta(out, 1)
    return sd


@pytest.mark.parametrize("size", ["klein-4B", "dev"])
@pytest.mark.parametrize(
    "layout", ["comfy", "ai-toolkit-dora", "kohya", "diffusers", "diffsynth", "peft-dora", "lycoris"]
)
def test_key_sets_at_real_sizes_on_meta(size, layout):
    with torch.device("meta"):
        m = Flux2(KLEIN_4B if size == "klein-4B" else DEV)
    linears = {n: x for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)}
    sd = _layout_keys(m, layout)
    with torch.device("meta"):
        norm = lm.to_canonical(sd, linears)
    assert not norm.unmatched and not norm.unsupported, norm.reasons
    assert sorted(norm.adapters) == sorted(linears)
    for fqn, a in norm.adapters.items():
        assert tuple(a.shape) == (linears[fqn].out_features, linears[fqn].in_features), fqn
        assert isinstance(a, lm.Decomposed) == ("dora" in layout or layout == "lycoris"), fqn
    assert norm.format.split("/")[0] == {
        "comfy": "bfl",
        "ai-toolkit-dora": "bfl",
        "peft-dora": "diffusers",
        "lycoris": "lycoris",
    }.get(layout, layout)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_trainer_export_writes_the_layout_others_load(tmp_path):
    """The trainer's export (train/checkpoint.py) writes `diffusion_model.` + BFL names + lora_A/B, alpha folded:
    the layout diffusers' converter and ComfyUI read; `lora_format="diffusers"` the PEFT one."""
    from fluxion.train.checkpoint import _export
    from fluxion.train.train import TrainConfig
    from fluxion.weights.safetensors_io import load_safetensors

    m = model(seed=22)
    cfg = TrainConfig(model="test", data=("d",), out=str(tmp_path), vae="v", lora_rank=4, lora_alpha=2)
    inject_lora(m, rank=4, alpha=2, targets=list(cfg.lora_targets))
    randomize_(lora_parameters(m), 0.05)
    want = forward(m)
    for fmt, prefix in (("comfy", "diffusion_model."), ("diffusers", "transformer.")):
        out = tmp_path / fmt
        path = _export(out, m, None, dataclasses.replace(cfg, lora_format=fmt), rank=0)
        keys = list(load_safetensors(path))
        assert all(k.startswith(prefix) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
        other = model(seed=22)
        load_lora(other, path)
        assert (forward(other) - want).abs().max() <= TOL
    with pytest.raises(ValueError, match="lora_format"):
        dataclasses.replace(cfg, lora_format="gguf")
