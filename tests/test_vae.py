"""Autoencoder: parity with diffusers' AutoencoderKLFlux2 through our key mapping, mapping round trips, the real
preset's size and key set on meta, tiling, input checks. All CPU, tiny widths, fp32."""

from __future__ import annotations

import pytest
import torch

from fluxion.config import DEBUG_VAE, FLUX2_AE
from fluxion.vae.autoencoder import AutoEncoder, patchify, unpatchify
from fluxion.vae.tiling import tile_starts, tiled_decode, tiled_encode
from fluxion.weights.vae_mapping import vae_bfl_to_diffusers, vae_diffusers_to_bfl
from pipeline_fixtures import randomize_vae

diffusers = pytest.importorskip("diffusers")

# DEBUG_VAE = ch 32, ch_mult (1, 2, 2, 2), 1 ResNet per level, 8 groups: the diffusers twin below.
DIF_SMALL = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8)
TOL = 1e-4


def _diffusers_vae(seed: int = 0):
    torch.manual_seed(seed)
    dif = diffusers.AutoencoderKLFlux2(**DIF_SMALL).eval()
    randomize_vae(dif, seed)
    return dif


def _ours(seed: int = 0) -> AutoEncoder:
    torch.manual_seed(seed)
    ae = AutoEncoder(DEBUG_VAE).eval()
    randomize_vae(ae, seed)
    return ae


# --- the diffusers pipelines' latent handling, written out here from their formula (they do it outside the VAE)
def _ref_patchify(z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def _ref_unpatchify(z: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = z.shape
    return z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


def _ref_bn(dif) -> tuple[torch.Tensor, torch.Tensor]:
    mean = dif.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(dif.bn.running_var.view(1, -1, 1, 1) + dif.config.batch_norm_eps)
    return mean, std


def _ref_encode(dif, x: torch.Tensor) -> torch.Tensor:
    mean, std = _ref_bn(dif)
    return (_ref_patchify(dif.encode(x).latent_dist.mode()) - mean) / std


def _ref_decode(dif, z: torch.Tensor) -> torch.Tensor:
    mean, std = _ref_bn(dif)
    return dif.decode(_ref_unpatchify(z * std + mean)).sample


def _check_parity(ours: AutoEncoder, dif, label: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 48, 64, generator=g) * 2 - 1  # non-square, so an H/W mix-up shows
    z = torch.randn(2, 128, 3, 4, generator=g)
    with torch.no_grad():
        enc, enc_ref = ours.encode(x), _ref_encode(dif, x)
        dec, dec_ref = ours.decode(z), _ref_decode(dif, z)
    assert enc.shape == (2, 128, 3, 4) and dec.shape == (2, 3, 48, 64)
    d_enc, d_dec = (enc - enc_ref).abs().max().item(), (dec - dec_ref).abs().max().item()
    print(f"\n[vae parity {label}] encode max|diff| = {d_enc:.3e}, decode max|diff| = {d_dec:.3e}")
    assert d_enc <= TOL and d_dec <= TOL
    assert enc.abs().max() > 0.1 and dec.abs().max() > 0.1  # not a vacuous comparison of near-zero tensors


def test_parity_diffusers_to_ours():
    dif = _diffusers_vae()
    with torch.device("meta"):
        ours = AutoEncoder(DEBUG_VAE)
    ours.load_state_dict(vae_diffusers_to_bfl(dif.state_dict()), strict=True, assign=True)
    _check_parity(ours.eval(), dif, "diffusers->ours")


def test_parity_ours_to_diffusers():
    ours = _ours(seed=3)
    dif = diffusers.AutoencoderKLFlux2(**DIF_SMALL).eval()
    dif.load_state_dict(vae_bfl_to_diffusers(ours.state_dict()), strict=True)
    _check_parity(ours, dif, "ours->diffusers")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_mapping_round_trips_are_bit_identical():
    ours = _ours(seed=5).state_dict()
    ours["bn.num_batches_tracked"].fill_(7)  # passed through unchanged, never reset
    _assert_same(vae_diffusers_to_bfl(vae_bfl_to_diffusers(ours)), ours)
    dif = _diffusers_vae(seed=6).state_dict()
    dif_no_counter = {k: v for k, v in dif.items() if k != "bn.num_batches_tracked"}  # as in converted files
    _assert_same(vae_bfl_to_diffusers(vae_diffusers_to_bfl(dif)), dif)
    _assert_same(vae_bfl_to_diffusers(vae_diffusers_to_bfl(dif_no_counter)), dif_no_counter)


def test_mapping_rejects_unknown_keys():
    sd = _ours().state_dict()
    sd["encoder.down.0.attn.0.q.weight"] = torch.zeros(1)
    sd["lpips.net.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"2 BFL .*encoder\.down\.0\.attn\.0\.q\.weight.*lpips"):
        vae_bfl_to_diffusers(sd)
    with pytest.raises(ValueError, match="diffusers"):
        vae_diffusers_to_bfl({"decoder.up_blocks.0.attentions.0.to_q.weight": torch.zeros(1)})


def test_real_preset_on_meta_matches_diffusers_layout():
    with torch.device("meta"):
        ours = AutoEncoder(FLUX2_AE)
        dif = diffusers.AutoencoderKLFlux2()  # its defaults are the FLUX.2 autoencoder
    assert sum(p.numel() for p in ours.parameters()) == 84_046_115
    ours_sd, dif_sd = ours.state_dict(), dif.state_dict()
    assert len(ours_sd) == 251  # 250 tensors + bn.num_batches_tracked (spec 4.6)
    mapped = vae_diffusers_to_bfl(dif_sd)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours_sd.items()}
    back = vae_bfl_to_diffusers(ours_sd)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in dif_sd.items()}
    # spot checks of the quirks in spec 4.6
    assert tuple(ours_sd["decoder.up.0.block.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)
    assert tuple(dif_sd["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"].shape) == (128, 256, 1, 1)
    assert tuple(ours_sd["encoder.quant_conv.weight"].shape) == (64, 64, 1, 1)
    assert all(t.is_meta for t in ours_sd.values())


def test_patchify_layout_and_inverse():
    z = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    p = patchify(z)
    assert p.shape == (2, 12, 2, 3)
    # channel c*4 + pi*2 + pj at (i, j) holds pixel (2i+pi, 2j+pj) of channel c
    assert p[1, 2 * 4 + 1 * 2 + 0, 1, 2] == z[1, 2, 2 * 1 + 1, 2 * 2 + 0]
    assert torch.equal(unpatchify(p), z)
    assert torch.equal(p, _ref_patchify(z))


def test_encode_rejects_bad_sizes():
    ae = _ours()
    with pytest.raises(ValueError, match=r"40x64 .*not a multiple of 16.*32x64"):
        ae.encode(torch.zeros(1, 3, 40, 64))
    with pytest.raises(ValueError, match="image batch"):
        ae.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="latents"):
        ae.decode(torch.zeros(1, 32, 2, 2))


def test_tile_starts():
    assert tile_starts(4, 4, 1) == [0]
    assert tile_starts(128, 64, 16) == [0, 32, 64]  # even spread; every overlap >= 16
    starts = tile_starts(21, 8, 2)
    assert starts[0] == 0 and starts[-1] == 13
    assert all(b - a <= 8 - 2 for a, b in zip(starts, starts[1:]))


def test_tiling_equals_plain_when_it_fits():
    ae = _ours()
    x = torch.rand(1, 3, 48, 64) * 2 - 1
    z = torch.randn(1, 128, 3, 4)
    with torch.no_grad():
        assert torch.equal(tiled_encode(ae, x, tile=64, overlap=16), ae.encode(x))
        assert torch.equal(tiled_decode(ae, z, tile=64, overlap=16), ae.decode(z))


def _seam_mask(size: int, tile: int, overlap: int, scale: int) -> torch.Tensor:
    """1-D bool mask (output pixels) of the cross-fade bands, where neighbouring tiles overlap."""
    starts = tile_starts(size, tile, overlap)
    mask = torch.zeros(size * scale, dtype=torch.bool)
    for a, b in zip(starts, starts[1:]):
        mask[b * scale : (a + tile) * scale] = True
    return mask


@pytest.mark.parametrize("direction", ["encode", "decode"])
def test_tiling_error_is_small_and_not_concentrated_at_seams(direction):
    ae = _ours()
    g = torch.Generator().manual_seed(2)
    h, w = 16, 24  # latents: a 256x384 px image
    tile, overlap = 192, 64  # px = 12 and 4 latents -> 2x3 tiles, starts (0, 4) x (0, 6, 12)
    with torch.no_grad():
        if direction == "encode":
            inp = torch.rand(1, 3, 16 * h, 16 * w, generator=g) * 2 - 1
            plain, tiled, scale = ae.encode(inp), tiled_encode(ae, inp, tile, overlap), 1
        else:
            inp = torch.randn(1, 128, h, w, generator=g)
            plain, tiled, scale = ae.decode(inp), tiled_decode(ae, inp, tile, overlap), 16
    err = (tiled - plain).abs()
    rel = (err.max() / plain.abs().max()).item()
    seams = _seam_mask(h, 12, 4, scale)[:, None] | _seam_mask(w, 12, 4, scale)[None, :]
    ratio = (err[..., seams].mean() / err[..., ~seams].mean()).item()
    print(
        f"\n[vae tiling {direction}] max err / max|plain| = {rel:.3f}, seam/elsewhere mean err = {ratio:.2f}"
    )
    # Tiling is not exact: a tile is not the plain call on a crop, because every conv zero-pads at tile borders
    # (not attention: zeroing both proj_out layers leaves the error unchanged). About ten 3x3 convs run at 1/8
    # scale, so border effects reach ~4 latents into a 12-latent tile: nearly all of these small tiles is "near a
    # border" (at the default 64-latent tiles most of each tile is not). Measured here: 0.056 (encode) and
    # 0.069 (decode) of the output's max; it shrinks as tiles grow (about halves from 12- to 16-latent tiles).
    assert rel < 0.2
    # The cross-fade bands must not carry much more error than elsewhere (no seam lines); measured 1.5 / 1.2.
    assert ratio < 2.0


# --- arbitrary widths: encoder and decoder each any list (diffusers block_out_channels /
# decoder_block_out_channels), e.g. BFL's small decoder 96/192/384/384 behind a 128/256/512/512 encoder.
ODD = dict(block_out_channels=(16, 24, 32, 32), layers_per_block=1, norm_num_groups=8)


def test_config_widths_canonical_form():
    from fluxion.config import FLUX2_SMALL_DECODER_AE, VAEConfig

    assert VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_groups=8) == VAEConfig(
        widths=(32, 64, 64, 64), num_groups=8
    )
    odd = VAEConfig(widths=(16, 24, 32, 32), num_groups=8)
    assert odd.ch == 16 and odd.ch_mult is None and odd.decoder_widths == odd.widths
    assert FLUX2_SMALL_DECODER_AE.widths == (128, 256, 512, 512)
    assert FLUX2_SMALL_DECODER_AE.decoder_widths == (96, 192, 384, 384)
    with pytest.raises(ValueError, match="same number of levels"):
        VAEConfig(widths=(32, 64), decoder_widths=(32, 64, 64), num_groups=8)
    with pytest.raises(ValueError, match="num_groups"):
        VAEConfig(widths=(16, 20), num_groups=8)


@pytest.mark.parametrize("decoder", [None, (16, 16, 24, 32)], ids=["same-decoder", "own-decoder"])
def test_parity_non_multiple_widths(tmp_path, decoder):
    """diffusers' AutoencoderKLFlux2 with widths 16/24/32/32 (and a decoder of its own), saved by diffusers,
    loaded through our reader with the config derived from its config.json."""
    from fluxion.weights.models import load_vae
    from fluxion.weights.spec import vae_config_from_diffusers

    torch.manual_seed(0)
    dif = diffusers.AutoencoderKLFlux2(**ODD, decoder_block_out_channels=decoder).eval()
    randomize_vae(dif, 4)
    dif.save_pretrained(tmp_path / "vae")
    cfg = vae_config_from_diffusers(dict(dif.config))
    assert cfg.widths == (16, 24, 32, 32) and cfg.decoder_widths == (decoder or cfg.widths)
    ours = load_vae(tmp_path / "vae", cfg)
    assert ours.cfg == cfg
    _check_parity(ours, dif, f"widths 16/24/32/32, decoder {decoder}")


def test_decoder_only_file_next_to_a_full_encoder(tmp_path):
    """A decoder-only file in BFL's small_decoder layout (bare keys, no `decoder.` prefix, no encoder, no latent
    statistics) replaces the decoder of a full autoencoder; the reference is diffusers' AutoencoderKLFlux2 with
    decoder_block_out_channels holding the full VAE's encoder and the small VAE's decoder."""
    from safetensors.torch import save_file

    from fluxion.config import VAEConfig
    from fluxion.weights.models import load_vae

    torch.manual_seed(0)
    full = randomize_vae(diffusers.AutoencoderKLFlux2(**DIF_SMALL).eval(), 7)
    small = randomize_vae(
        diffusers.AutoencoderKLFlux2(**{**DIF_SMALL, "block_out_channels": (16, 24, 32, 32)}), 8
    )
    full.save_pretrained(tmp_path / "vae")
    bfl_small = vae_diffusers_to_bfl(small.state_dict())
    bare = {
        k.removeprefix("decoder."): v.contiguous() for k, v in bfl_small.items() if k.startswith("decoder.")
    }
    assert "post_quant_conv.weight" in bare and "up.0.block.0.conv1.weight" in bare
    save_file(bare, str(tmp_path / "small_decoder.safetensors"))

    ref = diffusers.AutoencoderKLFlux2(**DIF_SMALL, decoder_block_out_channels=(16, 24, 32, 32)).eval()
    want = {k: v for k, v in full.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    want |= {k: v for k, v in small.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    ref.load_state_dict(want, strict=True)

    ours = load_vae(tmp_path / "vae", VAEConfig(num_groups=8), tmp_path / "small_decoder.safetensors")
    assert ours.cfg.widths == (32, 64, 64, 64) and ours.cfg.decoder_widths == (16, 24, 32, 32)
    _check_parity(ours, ref, "full encoder + decoder-only file")

    # a whole autoencoder is not a decoder file; a decoder carrying other latent statistics is refused
    with pytest.raises(ValueError, match="holds an encoder too"):
        load_vae(tmp_path / "vae", VAEConfig(num_groups=8), tmp_path / "vae")
    bare["bn.running_mean"] = torch.ones(128)
    save_file(bare, str(tmp_path / "other_stats.safetensors"))
    with pytest.raises(ValueError, match="latent statistics"):
        load_vae(tmp_path / "vae", VAEConfig(num_groups=8), tmp_path / "other_stats.safetensors")
