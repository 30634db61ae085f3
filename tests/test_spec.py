"""Loading any FLUX.2-architecture checkpoint: the spec derived from the checkpoint's own config (not a preset),
`load_models` with the performance layer applied from outside, and the done-proof of issue 9: a diffusers folder
with a non-preset config, written by diffusers' own `Flux2KleinPipeline.save_pretrained`, generates through
`load_models(DIR)` and `fluxion generate --model DIR`, and matches diffusers' pipeline on the same folder.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fluxion.accel import AccelOptions
from fluxion.config import DEBUG_TRANSFORMER, DEV, FLUX2_AE, KLEIN_4B, KLEIN_9B, PRESETS, VAEConfig
from fluxion.sampling import pipeline as P
from fluxion.weights.load import diffusers_transformer_config, diffusers_vae_config
from fluxion.weights.models import load_models
from fluxion.weights.spec import default_taps, derive_spec
from pipeline_fixtures import diffusers_scheduler, randomize_transformer, randomize_vae
from text_fixtures import build_tiny_qwen3

# Non-preset on purpose: odd depths, width 96 with 3 heads of 32, VAE widths 16/24/32/32, a 6-layer Qwen3.
ODD_TRANSFORMER = dataclasses.replace(
    DEBUG_TRANSFORMER,
    hidden_size=96,
    num_heads=3,
    num_double_blocks=3,
    num_single_blocks=5,
    use_guidance_embed=False,
)
ODD_VAE = dict(block_out_channels=(16, 24, 32, 32), layers_per_block=1, norm_num_groups=8)
TEXT_LAYERS = 6  # taps spread BFL's way: round(6 i / 4) = 2, 3, 4 (Python rounds halves to even)


def test_default_taps_are_bfl_taps():
    assert default_taps(36, 3) == (9, 18, 27)  # Qwen3-4B / 8B (BFL text_encoder.py)
    assert default_taps(40, 3) == (10, 20, 30)  # Mistral Small 3.x
    assert default_taps(4, 3) == (1, 2, 3) and default_taps(TEXT_LAYERS, 3) == (2, 3, 4)
    with pytest.raises(ValueError):
        default_taps(2, 3)


def _config_folder(root, transformer, text_width, text_layers, index, vae=FLUX2_AE):
    """A diffusers model folder of config files only (what derive_spec reads; no weights needed). Mistral3 (the
    [dev] encoder, chosen here by the guidance embedder) nests its LLM config under text_config."""
    llm = {"hidden_size": text_width, "num_hidden_layers": text_layers}
    if transformer.use_guidance_embed:
        text = {"model_type": "mistral3", "text_config": llm}
    else:
        text = {"model_type": "qwen3", **llm}
    for name, config in [
        ("transformer", diffusers_transformer_config(transformer)),
        ("vae", diffusers_vae_config(vae)),
        ("text_encoder", text),
    ]:
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize(
    "transformer, width, index, expected",
    [
        (KLEIN_4B, 2560, {"_class_name": "Flux2KleinPipeline", "is_distilled": True}, "flux2-klein-4b"),
        (KLEIN_4B, 2560, {"_class_name": "Flux2KleinPipeline", "is_distilled": False}, "flux2-klein-base-4b"),
        (KLEIN_9B, 4096, {"_class_name": "Flux2KleinKVPipeline"}, "flux2-klein-9b-kv"),
        (KLEIN_9B, 4096, {"_class_name": "Flux2KleinPipeline", "is_distilled": True}, "flux2-klein-9b"),
        (DEV, 5120, {"_class_name": "Flux2Pipeline"}, "flux2-dev"),
    ],
)
def test_released_configs_come_back_as_their_presets(tmp_path, transformer, width, index, expected):
    layers = 40 if transformer.use_guidance_embed else 36
    spec = derive_spec(_config_folder(tmp_path, transformer, width, layers, index))
    assert spec == PRESETS[expected]


def test_a_new_config_gets_its_own_spec(tmp_path):
    wider = dataclasses.replace(KLEIN_4B, num_single_blocks=21)
    small = VAEConfig(decoder_widths=(96, 192, 384, 384))
    folder = _config_folder(
        tmp_path / "my-klein",
        wider,
        2560,
        36,
        {"_class_name": "Flux2KleinPipeline", "is_distilled": True},
        small,
    )
    spec = derive_spec(folder)
    assert spec.name == "my-klein" and spec.transformer == wider and spec.vae == small
    assert (spec.guidance_mode, spec.default_steps, spec.default_guidance) == ("distilled", 4, 1.0)
    assert spec.text.hidden_layers == (9, 18, 27) and spec.text.hidden_size == 2560
    # the small decoder under a released transformer keeps the preset's name and defaults, with its own VAE
    folder = _config_folder(
        tmp_path / "k4",
        KLEIN_4B,
        2560,
        36,
        {"_class_name": "Flux2KleinPipeline", "is_distilled": True},
        small,
    )
    spec = derive_spec(folder)
    assert spec.name == "flux2-klein-4b" and spec.vae == small


def test_text_width_must_fit_the_context(tmp_path):
    folder = _config_folder(tmp_path, KLEIN_4B, 2048, 36, {"_class_name": "Flux2KleinPipeline"})
    with pytest.raises(ValueError, match="text encoder that belongs"):
        derive_spec(folder)


# --- the done-proof: a non-preset diffusers folder written by diffusers itself -------------------------------------


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """(folder, in-memory diffusers pipeline) of the odd model, saved by Flux2KleinPipeline.save_pretrained."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("odd")
    build_tiny_qwen3(root / "text", num_layers=TEXT_LAYERS)
    torch.manual_seed(0)
    config = {k: v for k, v in diffusers_transformer_config(ODD_TRANSFORMER).items() if not k.startswith("_")}
    pipe = Flux2KleinPipeline(
        scheduler=diffusers_scheduler(),
        vae=randomize_vae(AutoencoderKLFlux2(**ODD_VAE), 1),
        text_encoder=Qwen3ForCausalLM.from_pretrained(
            root / "text" / "text_encoder", dtype=torch.float32
        ).eval(),
        tokenizer=AutoTokenizer.from_pretrained(root / "text" / "tokenizer"),
        transformer=randomize_transformer(Flux2Transformer2DModel(**config), 0),
        is_distilled=True,
    )
    pipe.set_progress_bar_config(disable=True)
    folder = root / "odd-klein"
    pipe.save_pretrained(folder)
    return folder, pipe


def test_odd_folder_derives_its_spec(odd):
    folder, _ = odd
    spec = derive_spec(folder)
    assert spec.name == "odd-klein" and spec.name not in PRESETS
    assert spec.transformer == ODD_TRANSFORMER
    assert spec.vae.widths == (16, 24, 32, 32) and spec.vae.num_groups == 8
    assert (spec.text.kind, spec.text.hidden_size, spec.text.hidden_layers) == ("qwen3", 32, (2, 3, 4))
    assert (spec.guidance_mode, spec.default_steps) == ("distilled", 4)


def test_odd_folder_matches_diffusers_pipeline(odd):
    """Same folder, same seed: our pipeline and diffusers' Flux2KleinPipeline (harness of test_pipeline.py)."""
    from test_pipeline import TOL, run_diffusers, to_unit

    folder, pipe = odd
    models = load_models(folder)
    seen = {}
    decode = P.decode

    def keep(m, tokens, h, w):
        seen["tokens"], seen["pixels"] = tokens.clone(), decode(m, tokens, h, w)
        return seen["pixels"]

    P.decode = keep
    try:
        P.generate(
            models,
            P.Request(prompt="a red apple", width=64, height=80, steps=2, seed=3, generator_device="cpu"),
        )
    finally:
        P.decode = decode
    want_tokens, want_px = run_diffusers(
        pipe, 2, [3], models.spec.text, prompt="a red apple", width=64, height=80, guidance_scale=1.0
    )
    d_tok = (seen["tokens"] - want_tokens).abs().max().item()
    d_px = (to_unit(seen["pixels"]) - want_px).abs().max().item()
    print(f"\n[odd folder vs Flux2KleinPipeline] tokens {d_tok:.2e}, pixels {d_px:.2e}")
    assert d_tok <= TOL and d_px <= TOL and want_tokens.abs().max() > 1 and want_px.std() > 0.02


def test_odd_folder_through_the_cli(odd, tmp_path):
    from PIL import Image

    from fluxion.cli import main

    folder, _ = odd
    out = tmp_path / "out.png"
    assert (
        main(
            ["generate", "x", "--model", str(folder), "-o", str(out), "--steps", "2", "-W", "64", "-H", "80"]
        )
        == 0
    )
    assert Image.open(out).size == (64, 80)


def test_bfl_single_file_with_odd_depths(tmp_path):
    """Our own odd transformer and autoencoder (widths 64/96/128/128, 32 groups as BFL files imply) written as BFL
    single files load with --vae / --text; without a model_index the guidance mode is true CFG."""
    from safetensors.torch import save_file

    from fluxion.model.transformer import Flux2
    from fluxion.vae.autoencoder import AutoEncoder

    cfg = dataclasses.replace(ODD_TRANSFORMER, num_double_blocks=1, num_single_blocks=3)
    vae_cfg = VAEConfig(widths=(64, 96, 128, 128), decoder_widths=(32, 64, 96, 96), num_res_blocks=1)
    save_file(randomize_transformer(Flux2(cfg), 0).state_dict(), str(tmp_path / "odd.safetensors"))
    vae_sd = randomize_vae(AutoEncoder(vae_cfg), 1).state_dict()
    save_file({k: v.contiguous() for k, v in vae_sd.items()}, str(tmp_path / "ae.safetensors"))
    build_tiny_qwen3(tmp_path / "text", num_layers=TEXT_LAYERS)
    with pytest.raises(ValueError, match="--vae"):
        load_models(tmp_path / "odd.safetensors")
    models = load_models(
        tmp_path / "odd.safetensors", vae=tmp_path / "ae.safetensors", text=tmp_path / "text"
    )
    assert models.spec.name == "odd" and models.spec.transformer == cfg and models.spec.vae == vae_cfg
    assert models.spec.guidance_mode == "cfg"
    (r,) = P.generate(models, P.Request(prompt="x", width=64, height=64, steps=2, seed=0))
    assert r.image.size == (64, 64)


# --- the performance layer through load_models ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(accel=AccelOptions(fp8=True)), "fp8 needs a CUDA GPU"),
        (dict(accel=AccelOptions(cuda_graphs=True)), "CUDA graphs need a CUDA GPU"),
        (dict(accel=AccelOptions(compile=True)), "drop --compile"),
        (dict(accel=AccelOptions(attention="cudnn")), "needs a CUDA GPU"),
        (dict(offload="blocks"), "block offload"),
        (dict(device="foo"), "unknown device"),
        (dict(offload="all"), "offload must be"),
    ],
)
def test_bad_combinations_fail_before_loading(kwargs, message):
    # the model path does not exist: the error must come from the option check, before anything is read
    with pytest.raises(ValueError, match=message):
        load_models("/nonexistent/model", **{"device": "cpu", **kwargs})


def test_option_errors_are_one_line():
    for make in (
        lambda: AccelOptions(fp8=True, weight_only="int4"),
        lambda: AccelOptions(attention="xformers"),
        lambda: AccelOptions(cuda_graphs=True, offload="blocks"),
    ):
        with pytest.raises(ValueError) as e:
            make()
        assert "\n" not in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            AccelOptions().validate("cuda")


def test_accel_and_attention_belong_to_the_model(odd):
    """int8 weight-only + a recording attention backend on one loaded model; a second model stays plain."""
    folder, _ = odd
    calls = []

    def recording(q, k, v):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    fast = load_models(folder, accel=AccelOptions(weight_only="int8", compile=True, compile_backend="eager"))
    plain = load_models(folder)
    assert fast.accelerated.quantized and fast.accelerated.compiled == 8
    fast.transformer.set_attention_backend(recording)
    request = P.Request(prompt="x", width=64, height=64, steps=1, seed=0)
    P.generate(plain, request)
    assert not calls and plain.transformer.attention_backend is None
    P.generate(fast, request)
    assert len(calls) == 8  # one per block, one step
    assert "int8" in fast.describe() or "quantized" in fast.describe()


def test_decode_tiles_by_itself_above_the_threshold(odd):
    folder, _ = odd
    models = load_models(folder)
    assert not models.should_tile(torch.empty(1, 128, 4, 4, device="meta"))
    assert models.should_tile(torch.empty(1, 128, 129, 128, device="meta"))  # > 2048^2 pixels on a CPU
    models.tile_decode = True  # forced: the tiled path, which equals the plain one when the image fits a tile
    z = torch.randn(1, 128, 3, 4)
    assert torch.equal(models.decode_latents(z), models.vae.decode(z))


@pytest.mark.gpu
def test_fast_paths_on_a_gpu(odd):
    """On CUDA: fp8 + compile + CUDA graphs + auto attention, then int8 + block offload, against the plain bf16
    path of the same folder (cosine of the decoded pixels; lossy quantization keeps it high, not exact)."""
    folder, _ = odd
    request = P.Request(prompt="a red apple", width=128, height=128, steps=2, seed=3)

    def pixels(**kwargs):
        models = load_models(folder, device="cuda", **kwargs)
        (r,) = P.generate(models, request)
        return torch.tensor(list(r.image.getdata()), dtype=torch.float32).flatten()

    plain = pixels()
    for kwargs in (
        dict(accel=AccelOptions(attention="auto", compile=True, cuda_graphs=True)),
        dict(accel=AccelOptions(fp8=True, attention="cudnn")),
        dict(accel=AccelOptions(weight_only="int8"), offload="blocks"),
    ):
        got = pixels(**kwargs)
        cos = torch.nn.functional.cosine_similarity(got - 127.5, plain - 127.5, dim=0).item()
        print(f"\n[fast path {kwargs}] pixel cosine vs plain bf16 = {cos:.5f}")
        assert cos > 0.98


def test_small_decoder_file_through_load_models(odd, tmp_path):
    """load_models(DIR, vae_decoder=FILE): a decoder-only file (bare BFL keys) with its own widths decodes."""
    from diffusers import AutoencoderKLFlux2
    from safetensors.torch import save_file

    from fluxion.weights.vae_mapping import vae_diffusers_to_bfl

    folder, _ = odd
    torch.manual_seed(0)
    small = randomize_vae(AutoencoderKLFlux2(**{**ODD_VAE, "block_out_channels": (8, 16, 16, 24)}), 5)
    sd = vae_diffusers_to_bfl(small.state_dict())
    bare = {k.removeprefix("decoder."): v.contiguous() for k, v in sd.items() if k.startswith("decoder.")}
    save_file(bare, str(tmp_path / "small_decoder.safetensors"))
    spec = derive_spec(folder, vae_decoder=tmp_path / "small_decoder.safetensors")
    assert spec.vae.decoder_widths == (8, 16, 16, 24)
    models = load_models(folder, vae_decoder=tmp_path / "small_decoder.safetensors")
    assert models.vae.cfg.widths == (16, 24, 32, 32) and models.vae.cfg.decoder_widths == (8, 16, 16, 24)
    assert models.spec.vae == models.vae.cfg == spec.vae
    (r,) = P.generate(models, P.Request(prompt="x", width=64, height=64, steps=1, seed=0))
    assert r.image.size == (64, 64)
