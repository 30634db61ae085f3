"""Loading real-format checkpoints: BFL single files, diffusers folders, conversion, and bad input."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from fluxion.config import PRESETS
from fluxion.model.transformer import Flux2
from fluxion.weights import mapping
from fluxion.weights.load import convert, infer_transformer_config, load_transformer
from fluxion.weights.safetensors_io import CheckpointError, load_safetensors
from test_transformer import SMALL, diffusers_model, inputs, randomize


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return randomize(Flux2(SMALL).eval())


@pytest.fixture()
def bfl_file(tmp_path, small_model):
    path = tmp_path / "flux-2-small.safetensors"
    save_file({k: v.contiguous() for k, v in small_model.state_dict().items()}, str(path))
    return path


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_bfl_file(bfl_file, small_model):
    model = load_transformer(bfl_file)
    assert model.cfg == SMALL and same_weights(model, small_model)
    assert not any(p.requires_grad for p in model.parameters())


def test_load_bfl_file_with_comfy_prefix(tmp_path, small_model):
    path = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in small_model.state_dict().items()}, str(path))
    assert same_weights(load_transformer(path), small_model)


def test_load_with_dtype(bfl_file):
    model = load_transformer(bfl_file, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_load_diffusers_folder_saved_by_diffusers(tmp_path, small_model):
    """A folder written by diffusers itself (save_pretrained, sharded) loads and gives diffusers' output."""
    ref = diffusers_model(SMALL).eval()
    ref.load_state_dict(mapping.bfl_to_diffusers(small_model.state_dict()))
    ref.save_pretrained(tmp_path / "model" / "transformer", max_shard_size="100KB")
    assert (tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = load_transformer(tmp_path / "model")  # the model folder; transformer/ is found inside
    assert same_weights(model, small_model)
    x, ids, ctx, tids = inputs(SMALL, 1, [(3, 3)])
    with torch.no_grad():
        want = ref(
            hidden_states=x,
            encoder_hidden_states=ctx,
            timestep=torch.tensor([0.5]),
            img_ids=ids,
            txt_ids=tids,
            guidance=torch.tensor([4.0]),
        ).sample
        got = model(x, ids[None], torch.tensor([0.5]), ctx, tids[None], torch.tensor([4.0]))
    assert (got - want).abs().max() <= 1e-5


def test_convert_round_trip_is_bit_identical(tmp_path, bfl_file):
    folder = convert(bfl_file, tmp_path / "transformer", to="diffusers")
    config = json.loads((folder / "config.json").read_text())
    ref = diffusers_model(SMALL)
    assert {k: v for k, v in config.items() if not k.startswith("_") and k in ref.config} == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if k in ref.config
    }
    back = convert(folder, tmp_path / "back.safetensors", to="bfl")
    a, b = load_safetensors(bfl_file), load_safetensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert back.read_bytes() == bfl_file.read_bytes()  # same tensors, same writer: the very same bytes


def test_convert_refuses_bad_destinations(tmp_path, bfl_file):
    with pytest.raises(ValueError, match="folder"):
        convert(bfl_file, tmp_path / "x.safetensors", to="diffusers")
    with pytest.raises(ValueError, match="bfl"):
        convert(bfl_file, tmp_path / "x", to="comfy")


def test_other_preset_is_named_in_the_error(bfl_file):
    with pytest.raises(CheckpointError) as e:
        load_transformer(bfl_file, preset="flux2-klein-4b")
    msg = str(e.value)
    assert "wrong shapes" in msg and "missing keys" in msg and "hidden 64" in msg


def test_real_preset_names_are_recognised():
    with torch.device("meta"):
        model = Flux2(PRESETS["flux2-klein-4b"].transformer)
    cfg = infer_transformer_config({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert cfg == PRESETS["flux2-klein-4b"].transformer


def test_missing_and_unexpected_keys_are_listed(tmp_path, small_model):
    sd = dict(small_model.state_dict())
    del sd["double_blocks.1.img_mlp.0.weight"]
    sd["extra.weight"] = torch.zeros(2)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"missing keys: double_blocks\.1\.img_mlp\.0\.weight") as e:
        load_transformer(path, preset=SMALL)
    assert "unexpected keys: extra.weight" in str(e.value)


def test_wrong_shape_is_reported(tmp_path, small_model):
    sd = dict(small_model.state_dict())
    sd["final_layer.linear.weight"] = torch.zeros(128, 32)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(
        CheckpointError, match=r"final_layer\.linear\.weight: file \(128, 32\) vs model \(128, 64\)"
    ):
        load_transformer(path, preset=SMALL)


def test_truncated_file(tmp_path, bfl_file):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(bfl_file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_transformer(cut)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, this is text and not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_transformer(path)


def test_pickle_checkpoint_is_refused_with_instructions(tmp_path, small_model):
    path = tmp_path / "model.pt"
    torch.save(small_model.state_dict(), path)
    with pytest.raises(CheckpointError, match="safetensors.torch as st"):
        load_transformer(path)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_transformer(tmp_path / "nothing.safetensors")


def test_vae_file_given_as_transformer(tmp_path):
    path = tmp_path / "ae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match="autoencoder"):
        load_transformer(path)


def test_guidance_mismatch_names_the_klein_preset(tmp_path):
    cfg = dataclasses.replace(SMALL, use_guidance_embed=False)
    model = Flux2(cfg)
    path = tmp_path / "k.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="guidance embedder no"):
        load_transformer(path, preset=SMALL)


def test_autoencoder_from_diffusers_folder_and_convert_round_trip(tmp_path):
    from fluxion.weights.load import load_autoencoder
    from test_vae import _diffusers_vae

    ref = _diffusers_vae(seed=1)
    ref.save_pretrained(tmp_path / "model" / "vae")
    ae = load_autoencoder(tmp_path / "model", dtype=torch.float32)
    assert ae.cfg.ch == 32 and ae.cfg.ch_mult == (1, 2, 2, 2) and ae.cfg.num_res_blocks == 1
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        want = ref.decode(ref.encode(x).latent_dist.mode()).sample
        got = ae.decoder(ae.encoder(x)[:, :32])
    assert (got - want).abs().max() < 1e-4
    bfl = convert(tmp_path / "model" / "vae", tmp_path / "ae.safetensors", to="bfl")
    folder = convert(bfl, tmp_path / "vae2", to="diffusers")
    back = convert(folder, tmp_path / "ae2.safetensors", to="bfl")
    assert back.read_bytes() == bfl.read_bytes()
    assert json.loads((folder / "config.json").read_text())["block_out_channels"] == [32, 64, 64, 64]


def test_autoencoder_wrong_component(tmp_path, bfl_file):
    from fluxion.weights.load import load_autoencoder

    with pytest.raises(CheckpointError, match="no autoencoder"):
        load_autoencoder(bfl_file)


def test_configs_read_off_odd_shapes():
    """Widths per level (encoder and decoder apart), depths, heads, time width: whatever the shapes say."""
    import dataclasses

    from fluxion.config import DEBUG_TRANSFORMER, VAEConfig
    from fluxion.model.transformer import Flux2
    from fluxion.vae.autoencoder import AutoEncoder
    from fluxion.weights.load import infer_transformer_config, infer_vae_config

    cfg = dataclasses.replace(
        DEBUG_TRANSFORMER,
        num_double_blocks=3,
        num_single_blocks=5,
        time_channels=64,
        use_guidance_embed=False,
    )
    vae = VAEConfig(widths=(64, 96, 128, 128), decoder_widths=(32, 64, 96, 96), num_res_blocks=1)
    with torch.device("meta"):
        tr_shapes = {k: tuple(v.shape) for k, v in Flux2(cfg).state_dict().items()}
        vae_shapes = {k: tuple(v.shape) for k, v in AutoEncoder(vae).state_dict().items()}
    assert infer_transformer_config(tr_shapes) == cfg
    assert infer_vae_config(vae_shapes) == vae
    decoder_only = {k: s for k, s in vae_shapes.items() if k.startswith("decoder.")}
    assert infer_vae_config(decoder_only).decoder_widths == (32, 64, 96, 96)
