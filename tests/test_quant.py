"""Quantized Linear layers: round-trip and output error bounds against the float layer they replace."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fluxion.config import DEBUG_TRANSFORMER
from fluxion.model.transformer import Flux2
from fluxion.quant.fp8 import (
    E4M3_MAX,
    Float8Linear,
    convert_linears,
    dequantize_rowwise,
    quantize_rowwise,
)
from fluxion.quant.weight_only import Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_weight_only
from fluxion.sampling.ids import image_ids, text_ids


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cosine(a, b):
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def linear(k=256, n=96, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    nn.init.normal_(lin.weight, std=k**-0.5)
    return lin


def tiny_model(seed=0):
    cfg = dataclasses.replace(DEBUG_TRANSFORMER, num_double_blocks=2, num_single_blocks=2)
    torch.manual_seed(seed)
    model = Flux2(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if p.ndim == 1 else p.normal_(0, p.shape[1] ** -0.5)
    return model


def tiny_inputs(cfg, seed=1, n_img=16, n_txt=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n_img, cfg.in_channels, generator=g)
    ctx = torch.randn(1, n_txt, cfg.context_in_dim, generator=g)
    side = int(n_img**0.5)
    return x, image_ids(side, side), torch.tensor([0.7]), ctx, text_ids(n_txt), torch.tensor([4.0])


# ---- fp8 ---------------------------------------------------------------------------------------------------


def test_fp8_rowwise_round_trip_bound():
    x = torch.randn(64, 128) * torch.logspace(-3, 2, 64)[:, None]  # rows of very different magnitude
    xq, scale = quantize_rowwise(x)
    assert xq.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    # Each row's max maps to 448; e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal numbers,
    # and the subnormal spacing (2^-9 in e4m3 units) bounds it near zero.
    err = (dequantize_rowwise(xq, scale) - x).abs()
    assert torch.all(err <= x.abs() * 2**-4 + scale * 2**-9 + 1e-12)
    assert torch.allclose(xq.float().abs().amax(dim=1), torch.full((64,), E4M3_MAX))


def test_float8_linear_error_bound_and_reference():
    lin = linear()
    f8 = Float8Linear.from_float(lin)
    assert f8.weight.dtype == torch.float8_e4m3fn and f8.weight_scale.shape == (96, 1)
    x = torch.randn(3, 40, 256)
    y = f8(x)
    assert y.shape == (3, 40, 96)
    assert torch.equal(y, f8.reference_forward(x.reshape(-1, 256)).reshape(3, 40, 96))
    # Weights and activations each carry ~2-3 % rms rounding error; the product stays within 6 %.
    assert rel_err(y, lin(x)) < 0.06
    assert rel_err(f8.dequantized_weight(), lin.weight) < 0.04


def test_convert_linears_default_filter_keeps_embedders_bf16():
    model = tiny_model()
    cfg = model.cfg
    inputs = tiny_inputs(cfg)
    with torch.no_grad():
        ref = model(*inputs)
        names = convert_linears(model)
        out = model(*inputs)
    assert names and all(n.startswith(("double_blocks.", "single_blocks.")) for n in names)
    # 8 Linear layers per double block (img and txt: qkv, proj, mlp in, mlp out), 2 per single block.
    assert len(names) == 8 * cfg.num_double_blocks + 2 * cfg.num_single_blocks
    assert type(model.img_in) is nn.Linear and type(model.final_layer.linear) is nn.Linear
    assert isinstance(model.single_blocks[0].linear1, Float8Linear)
    assert cosine(out, ref) > 0.995


@pytest.mark.gpu
def test_float8_scaled_mm_matches_reference_path():
    lin = linear(512, 256).cuda().bfloat16()
    f8 = Float8Linear.from_float(lin)
    x = torch.randn(2, 128, 512, device="cuda", dtype=torch.bfloat16)
    y = f8(x)  # torch._scaled_mm
    ref = f8.reference_forward(x.reshape(-1, 512)).reshape(y.shape)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref) < 1e-2
    assert rel_err(y, lin(x)) < 0.06


# ---- weight-only -------------------------------------------------------------------------------------------


def test_int8_round_trip_and_forward():
    lin = linear()
    q = Int8WeightOnlyLinear.from_float(lin)
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (96,)
    err = (q.dequantized_weight() - lin.weight).abs()
    assert torch.all(err <= q.weight_scale[:, None] / 2 + 1e-7)  # round to nearest
    x = torch.randn(5, 256)
    assert torch.allclose(q(x), F.linear(x, q.dequantized_weight()), atol=1e-5)
    assert rel_err(q(x), lin(x)) < 0.01


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_round_trip_and_forward(group_size):
    lin = linear()
    q = Int4WeightOnlyLinear.from_float(lin, group_size=group_size)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (96, 128)
    assert q.weight_scale.shape == (96, 256 // group_size)
    codes = q.codes()
    assert codes.max() <= 15
    # Packing is lossless: re-packing the unpacked codes gives the same bytes.
    assert torch.equal(codes[:, 0::2] | (codes[:, 1::2] << 4), q.weight)
    scale = q.weight_scale.repeat_interleave(group_size, dim=1)
    assert torch.all((q.dequantized_weight() - lin.weight).abs() <= scale / 2 + 1e-6)
    x = torch.randn(5, 256)
    assert torch.allclose(q(x), F.linear(x, q.dequantized_weight()), atol=1e-5)
    # Gaussian weights: a group spans ~4.2 sigma (G=32) to ~5.2 sigma (G=128) in 15 steps, so the rms rounding
    # error is step / sqrt(12) ~ 8 % to 10 % of sigma.
    assert rel_err(q(x), lin(x)) < (0.10 if group_size == 32 else 0.13)


def test_quantize_weight_only_model():
    model = tiny_model()
    inputs = tiny_inputs(model.cfg)
    with torch.no_grad():
        ref = model(*inputs)
        names = quantize_weight_only(model, "int8")
        out8 = model(*inputs)
    assert len(names) == sum(1 for m in tiny_model().modules() if type(m) is nn.Linear) - 4  # time embedders
    assert cosine(out8, ref) > 0.999

    model = tiny_model()
    with torch.no_grad():
        names4 = quantize_weight_only(model, "int4", group_size=32)
        out4 = model(*inputs)
    assert type(model.img_in) is Int4WeightOnlyLinear  # in_features 128
    assert cosine(out4, ref) > 0.98
    with pytest.raises(ValueError):
        quantize_weight_only(model, "int2")
    assert names4


def test_quantized_state_dict_keys():
    f8 = Float8Linear.from_float(linear())
    assert set(f8.state_dict()) == {"weight", "weight_scale"}
    q8 = Int8WeightOnlyLinear.from_float(linear())
    fresh = Int8WeightOnlyLinear(256, 96)
    fresh.load_state_dict(q8.state_dict())
    assert torch.equal(fresh.weight, q8.weight)
