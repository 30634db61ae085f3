"""fluxion's int8 storage layout (weights/formats/int8_rows.py), which the embedded fluxion-tiny models ship in:
written by the same quantizer package() uses, loaded through the ordinary transformer loader, compared with the
weights the codes and scales mean computed here in numpy, and refused with a message when a pair is broken."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fluxion.model.transformer import Flux2
from fluxion.weights.formats import int8_rows
from fluxion.weights.load import load_transformer, read_component
from fluxion.weights.safetensors_io import CheckpointError
from test_transformer import SMALL, inputs, randomize


@pytest.fixture(scope="module")
def small_sd():
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in randomize(Flux2(SMALL).eval()).state_dict().items()}


def write(tmp_path, sd, metadata=int8_rows.METADATA, name="t.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def meant(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    return codes.numpy().astype(np.float64) * scale.numpy().astype(np.float64)[:, None]


def test_codes_and_scales_are_symmetric_per_row(small_sd):
    q = int8_rows.quantize(small_sd, lambda k, w: True)
    linears = [k for k, v in small_sd.items() if k.endswith(".weight") and v.ndim == 2]
    assert linears and all(q[k].dtype == torch.int8 for k in linears)
    for k in linears:
        w = small_sd[k].double().numpy()
        codes, scale = q[k].numpy(), q[k.removesuffix("weight") + "weight_scale"].double().numpy()
        assert scale.shape == (w.shape[0],)
        np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / 127, rtol=1e-6)
        assert np.abs(codes).max() == 127  # each row's largest weight uses the full range
        # round to nearest: every weight within half a step of its code
        assert np.all(np.abs(codes * scale[:, None] - w) <= scale[:, None] / 2 * (1 + 1e-5))
    # 1-D tensors (norm scales) and anything `which` declines are kept as they are
    kept = int8_rows.quantize(small_sd, lambda k, w: not k.startswith("double_blocks."))
    for k, v in small_sd.items():
        if v.ndim != 2 or k.startswith("double_blocks."):
            assert kept[k].dtype == v.dtype and torch.equal(kept[k], v)


def test_loads_the_weights_the_file_means(tmp_path, small_sd):
    q = int8_rows.quantize({k: v.bfloat16() for k, v in small_sd.items()}, lambda k, w: True)
    path = write(tmp_path, q)
    model = load_transformer(path, SMALL, dtype=torch.float32)
    loaded = model.state_dict()
    assert set(loaded) == set(small_sd)  # no _scale keys left over, nothing missing (strict)
    for k in small_sd:
        if q[k].dtype == torch.int8:
            np.testing.assert_allclose(loaded[k].numpy(), meant(q[k], q[k + "_scale"]), rtol=1e-6, atol=0)
        else:
            assert torch.equal(loaded[k], q[k].float())
    # dtype None (read_component, convert): the weights the codes mean in fp32, the rest as stored (bf16)
    sd, layout = read_component(path, "transformer")
    assert layout == "int8-rows"
    for k, v in sd.items():
        assert v.dtype == (torch.float32 if q[k].dtype == torch.int8 else torch.bfloat16), k
    # and the model computes what the bf16 weights compute, within int8's error
    ref = Flux2(SMALL).eval()
    ref.load_state_dict({k: v.float() for k, v in small_sd.items()})
    x, ids, ctx, tids = inputs(SMALL, 1, [(3, 4)], n_txt=5)
    args = (x, ids[None], torch.tensor([0.5]), ctx, tids[None], torch.tensor([4.0]))
    with torch.no_grad():
        a, b = ref(*args), model.float()(*args)
    assert (a - b).norm() / a.norm() < 0.02


def test_broken_pairs_are_refused_with_the_key(tmp_path, small_sd):
    q = int8_rows.quantize(small_sd, lambda k, w: True)
    key = next(k for k, v in q.items() if v.dtype == torch.int8)
    no_scale = {k: v for k, v in q.items() if k != key + "_scale"}
    with pytest.raises(CheckpointError, match=rf"{key}.*_scale"):
        load_transformer(write(tmp_path, no_scale, name="a.safetensors"), SMALL)
    wrong = dict(q)
    wrong[key + "_scale"] = wrong[key + "_scale"][:-1]
    with pytest.raises(CheckpointError, match="int8_rows layout"):
        load_transformer(write(tmp_path, wrong, name="b.safetensors"), SMALL)
    float_scaled = dict(q)
    float_scaled[key] = small_sd[key]
    with pytest.raises(CheckpointError, match="not int8 codes"):
        load_transformer(write(tmp_path, float_scaled, name="c.safetensors"), SMALL)
    orphan = {**small_sd, "double_blocks.0.nonexistent.weight_scale": torch.ones(3)}
    with pytest.raises(CheckpointError, match="nonexistent.weight to scale"):
        load_transformer(write(tmp_path, orphan, name="d.safetensors"), SMALL)


def test_without_the_metadata_the_codes_are_not_loaded_as_weights(tmp_path, small_sd):
    # the same tensors without the header tag: strict loading must not take int8 codes for weights in silence
    q = int8_rows.quantize(small_sd, lambda k, w: True)
    with pytest.raises((CheckpointError, RuntimeError, ValueError)):
        load_transformer(write(tmp_path, q, metadata={}), SMALL, dtype=torch.float32)


def test_convert_keeps_the_guidance_mode_of_the_shipped_int8_model(tmp_path):
    """The embedded distilled fluxion-tiny, converted to a BFL file directly and through a diffusers folder:
    the weights come out as the int8 file means, diffusers loads the folder, and the result is still the
    distilled model (the metadata key is all that tells it from its CFG base)."""
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import load_file

    from fluxion.weights.load import convert
    from fluxion.weights.models import embedded_model_dir, file_guidance, load_models

    shipped = embedded_model_dir() / "transformer.safetensors"
    assert file_guidance(shipped) == "distilled"
    direct = convert(shipped, tmp_path / "a" / "direct.safetensors", to="bfl")
    folder = convert(shipped, tmp_path / "transformer", to="diffusers")
    back = convert(folder, tmp_path / "b" / "back.safetensors", to="bfl")
    chars = (embedded_model_dir() / "charenc.safetensors").read_bytes()  # the letters travel with the weights
    for where in (direct.parent, folder, back.parent):
        assert (where / "charenc.safetensors").read_bytes() == chars
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "charenc.safetensors").write_bytes(b"another")
    with pytest.raises(FileExistsError, match="another folder"):
        convert(shipped, tmp_path / "c" / "x.safetensors", to="bfl")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["charenc.safetensors"]  # nothing written
    q = load_file(str(shipped))
    from fluxion.request import Request
    from fluxion.sampling.pipeline import generate

    def image(models):
        return np.asarray(generate(models, Request(prompt="a red heart", seed=1))[0].image, dtype=np.float64)

    want = image(load_models())
    for path in (direct, back):
        assert file_guidance(path) == "distilled"
        sd = load_file(str(path))
        key = "double_blocks.0.img_attn.qkv.weight"
        np.testing.assert_allclose(sd[key].numpy(), meant(q[key], q[key + "_scale"]), rtol=1e-6, atol=0)
        models = load_models(path, vae=embedded_model_dir() / "vae.safetensors")  # no --preset
        assert models.spec.guidance_mode == "distilled"
        assert models.spec.vae.num_groups == 16  # not in the shapes: fluxion-tiny's, from the tiny hint
        assert np.abs(image(models) - want).max() <= 1  # the embedded model's image
    Flux2Transformer2DModel.from_pretrained(folder)  # the extra config key does not bother diffusers
