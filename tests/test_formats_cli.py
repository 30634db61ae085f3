"""`fluxion generate --model FILE` with the files users have (issue 10): a ComfyUI all-in-one bundle holding an
fp8mixed transformer and the VAE, and a city96 GGUF written by gguf itself. Each image must equal the image made
from plain BFL files holding the weights the quantized file means (computed independently in the tests)."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fluxion.cli import main
from fluxion.weights.safetensors_io import load_safetensors
from pipeline_fixtures import KLEIN, build_bfl_files, register_specs
from test_formats import comfy_json, fp8_per_tensor, q8_0_meaning, write_gguf

PROMPT = "A red apple on a wooden table"


@pytest.fixture(scope="module", autouse=True)
def _presets():
    with pytest.MonkeyPatch.context() as mp:
        register_specs(mp)
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_bfl_files(tmp_path_factory.mktemp("model"), KLEIN)


def generate(tmp_path, name, *model_args):
    out = tmp_path / f"{name}.png"
    argv = [
        "generate",
        PROMPT,
        "-o",
        out,
        "--preset",
        KLEIN.name,
        "--device",
        "cpu",
        "--seed",
        "3",
        "--no-watermark",  # the pixels compared are the model's
        *model_args,
    ]
    assert main([str(a) for a in argv]) == 0
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


@pytest.mark.slow
def test_comfy_bundle_fp8mixed_generates_the_meant_image(tmp_path, files):
    sd = {k: v.clone() for k, v in load_safetensors(files["model"]).items()}
    bundle, meant = {}, {}
    for k, v in sd.items():
        if k.startswith(("double_blocks.", "single_blocks.")) and v.ndim == 2:
            codes, scale = fp8_per_tensor(v)
            layer = "model.diffusion_model." + k[: -len(".weight")]
            bundle["model.diffusion_model." + k], bundle[layer + ".weight_scale"] = codes, scale
            bundle[layer + ".comfy_quant"] = comfy_json({"format": "float8_e4m3fn"})
            meant[k] = codes.float() * scale
        else:
            bundle["model.diffusion_model." + k.replace("_norm.scale", "_norm.weight")] = meant[k] = v
    bundle.update({"vae." + k: v for k, v in load_safetensors(files["vae"]).items()})
    save_file(bundle, str(tmp_path / "klein_aio_fp8.safetensors"))
    save_file(meant, str(tmp_path / "meant.safetensors"))
    want = generate(
        tmp_path,
        "want",
        "--model",
        tmp_path / "meant.safetensors",
        "--vae",
        files["vae"],
        "--text",
        files["text"],
    )
    got = generate(
        tmp_path, "got", "--model", tmp_path / "klein_aio_fp8.safetensors", "--text", files["text"]
    )
    print("bundle fp8mixed: max pixel difference", np.abs(got - want).max())
    assert np.abs(got - want).max() <= 1  # one 8-bit level for fp32 rounding


@pytest.mark.slow
def test_gguf_q8_0_generates_the_meant_image(tmp_path, files):
    import gguf

    sd = load_safetensors(files["model"])
    tensors, qtypes, meant = {}, {}, {}
    for k, v in sd.items():
        arr = v.float().numpy()
        tensors[k] = arr
        if v.ndim == 2 and v.shape[1] % 32 == 0:
            qtypes[k] = gguf.GGMLQuantizationType.Q8_0
            meant[k] = torch.from_numpy(q8_0_meaning(arr))
        else:
            meant[k] = v.float()
    write_gguf(tmp_path / "klein-Q8_0.gguf", tensors, qtypes)
    save_file(meant, str(tmp_path / "meant.safetensors"))
    common = ("--vae", files["vae"], "--text", files["text"])
    want = generate(tmp_path, "want", "--model", tmp_path / "meant.safetensors", *common)
    got = generate(tmp_path, "got", "--model", tmp_path / "klein-Q8_0.gguf", *common)
    print("GGUF Q8_0: max pixel difference", np.abs(got - want).max())
    assert np.abs(got - want).max() <= 1
