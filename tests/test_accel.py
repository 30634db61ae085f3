"""The performance layer against the plain path (SDPA, eager, float, resident) on a tiny model."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fluxion.accel import AccelOptions, apply
from fluxion.accel.apply import attention_backend
from fluxion.accel.offload import offload_blocks
from fluxion.config import DEBUG_TRANSFORMER
from fluxion.kernels.flash import fa3_available
from fluxion.model.attention import get_attention_backend, set_attention_backend
from fluxion.model.transformer import Flux2
from fluxion.quant.fp8 import Float8Linear
from fluxion.quant.weight_only import Int8WeightOnlyLinear
from fluxion.sampling.ids import image_ids, text_ids

# 2 double + 3 single blocks: an odd number of streamed blocks exercises the slot wrap-around of offload.
CFG = dataclasses.replace(DEBUG_TRANSFORMER, num_double_blocks=2, num_single_blocks=3)


@pytest.fixture(autouse=True)
def restore_attention():
    previous = get_attention_backend()
    yield
    set_attention_backend(previous)


def make_model(device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = Flux2(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if p.ndim == 1 else p.normal_(0, p.shape[1] ** -0.5)
    return model.to(device=device, dtype=dtype)


def inputs(device="cpu", dtype=torch.float32, seed=1, side=4, n_txt=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, side * side, CFG.in_channels, generator=g).to(device, dtype)
    ctx = torch.randn(1, n_txt, CFG.context_in_dim, generator=g).to(device, dtype)
    t = torch.tensor([0.7], device=device, dtype=dtype)
    guidance = torch.tensor([4.0], device=device, dtype=dtype)
    return x, image_ids(side, side, device=device), t, ctx, text_ids(n_txt, device=device), guidance


def cosine(a, b):
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@torch.no_grad()
def reference(device="cpu", dtype=torch.float32, **kw):
    return make_model(device, dtype)(*inputs(device, dtype, **kw))


# ---- options and order -------------------------------------------------------------------------------------


def test_options_validation():
    with pytest.raises(ValueError):
        AccelOptions(fp8=True, weight_only="int8")
    with pytest.raises(ValueError):
        AccelOptions(attention="xformers")
    with pytest.raises(ValueError):
        AccelOptions(offload="all")
    with pytest.raises(ValueError):
        AccelOptions(cuda_graphs=True, offload="blocks")
    with pytest.raises(dataclasses.FrozenInstanceError):
        AccelOptions().compile = True


@torch.no_grad()
def test_default_options_are_the_plain_path():
    model = make_model()
    acc = apply(model, AccelOptions())
    assert acc.module is model and not acc.quantized and acc.compiled == 0 and acc.offload is None
    assert torch.equal(acc(*inputs()), reference())


@torch.no_grad()
def test_math_backend_matches_sdpa():
    model = make_model()
    acc = apply(model, AccelOptions(attention="math"))
    # the backend belongs to the model: the process fallback stays plain SDPA
    assert model.attention_backend.__name__ == "sdpa_math" and get_attention_backend().__name__ == "_sdpa"
    assert all(
        b.attention_backend is model.attention_backend for b in [*model.double_blocks, *model.single_blocks]
    )
    assert torch.allclose(acc(*inputs()), reference(), atol=1e-5)
    assert acc.previous_attention is None


@pytest.mark.skipif(fa3_available(), reason="FA3 is installed here")
def test_fa3_unavailable_fails_before_touching_the_model():
    model = make_model()
    with pytest.raises(ValueError, match="FlashAttention-3"):
        apply(model, AccelOptions(attention="fa3", fp8=True))
    assert not any(isinstance(m, Float8Linear) for m in model.modules())


@torch.no_grad()
def test_compile_regional_traces_blocks_and_keeps_names():
    model = make_model()
    keys = list(model.state_dict())
    acc = apply(model, AccelOptions(compile=True, compile_backend="eager", attention="math"))
    assert acc.compiled == CFG.num_double_blocks + CFG.num_single_blocks
    assert list(model.state_dict()) == keys
    assert torch.allclose(acc(*inputs()), reference(), atol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_compile_inductor_matches_eager():
    acc = apply(make_model(), AccelOptions(compile=True))
    assert torch.allclose(acc(*inputs()), reference(), atol=1e-4)


@torch.no_grad()
def test_quantize_then_compile_order():
    model = make_model()
    acc = apply(model, AccelOptions(fp8=True, compile=True, compile_backend="eager"))
    assert isinstance(model.double_blocks[0].img_attn.qkv, Float8Linear)  # swapped before the compile
    assert len(acc.quantized) == 8 * CFG.num_double_blocks + 2 * CFG.num_single_blocks
    assert cosine(acc(*inputs()), reference()) > 0.995


@torch.no_grad()
def test_weight_only_via_apply():
    for kind, bound in (("int8", 0.999), ("int4", 0.97)):
        model = make_model()
        acc = apply(model, AccelOptions(weight_only=kind, int4_group_size=32))
        assert acc.quantized
        assert cosine(acc(*inputs()), reference()) > bound


# ---- offload (CPU "device": same bookkeeping, synchronous copies) --------------------------------------------


@pytest.mark.parametrize("num_slots", [2, 3])
@torch.no_grad()
def test_offload_cpu_bookkeeping(num_slots):
    model = make_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = offload_blocks(model, "cpu", num_slots=num_slots)
    n = CFG.num_double_blocks + CFG.num_single_blocks
    assert len(handle.streamed) == n and handle.resident_bytes == 0
    ref = reference()
    for _ in range(3):  # repeated forwards: the cyclic prefetch must never hand a block stale bytes
        assert torch.equal(model(*inputs()), ref)
    # Between forwards every streamed tensor points at its host copy, so the state dict is the real one.
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert handle.copies >= n
    handle.remove()
    assert type(model.double_blocks) is nn.ModuleList
    assert torch.equal(model(*inputs()), ref)


@torch.no_grad()
def test_offload_resident_budget_and_quantized_blocks():
    model = make_model()
    apply(model, AccelOptions(weight_only="int8"))
    plain = model(*inputs())
    one_block = sum(t.numel() * t.element_size() for t in model.double_blocks[0].state_dict().values())
    handle = offload_blocks(model, "cpu", resident_bytes=one_block + 1024)
    assert len(handle.streamed) == CFG.num_double_blocks + CFG.num_single_blocks - 1
    assert isinstance(model.double_blocks[1].img_attn.qkv, Int8WeightOnlyLinear)  # int8 buffers streamed too
    assert torch.equal(model(*inputs()), plain)


# ---- GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flash", "cudnn", "efficient"])
@torch.no_grad()
def test_sdpa_backends_match_sdpa_bf16(name):
    # head dim 32 in the tiny model; all three kernels support it.
    ref = reference("cuda", torch.bfloat16, side=16, n_txt=64)
    acc = apply(make_model("cuda", torch.bfloat16), AccelOptions(attention=name))
    out = acc(*inputs("cuda", torch.bfloat16, side=16, n_txt=64))
    assert cosine(out, ref) > 0.9999


@pytest.mark.gpu
@pytest.mark.skipif(not fa3_available(), reason="FlashAttention-3 not installed")
@torch.no_grad()
def test_fa3_matches_sdpa():
    from fluxion.kernels.flash import fa3_attention, reference_attention

    q, k, v = (torch.randn(1, 4, 256, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert cosine(fa3_attention(q, k, v), reference_attention(q, k, v)) > 0.9999


@pytest.mark.gpu
@torch.no_grad()
def test_offload_cuda_matches_resident():
    model = make_model("cuda", torch.bfloat16)
    ref = model(*inputs("cuda", torch.bfloat16))
    handle = offload_blocks(model, "cuda", num_slots=2)
    assert next(model.double_blocks[0].parameters()).device.type == "cpu"
    assert next(model.double_blocks[0].parameters()).is_pinned()
    for _ in range(2):
        assert torch.equal(model(*inputs("cuda", torch.bfloat16)), ref)
    handle.remove()


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graphs_replay_new_inputs():
    model = make_model("cuda", torch.bfloat16)
    acc = apply(model, AccelOptions(cuda_graphs=True, attention="cudnn"))
    for seed in (1, 2, 3):  # the first call captures, later ones replay with fresh inputs
        args = inputs("cuda", torch.bfloat16, seed=seed, side=16, n_txt=64)
        set_attention_backend(attention_backend("cudnn"))
        assert cosine(acc(*args), model(*args)) > 0.9999


# ---- autoencoder -------------------------------------------------------------------------------------------


def _vae(seed=0):
    from fluxion.config import DEBUG_VAE
    from fluxion.vae.autoencoder import AutoEncoder
    from pipeline_fixtures import randomize_vae

    torch.manual_seed(seed)
    return randomize_vae(AutoEncoder(DEBUG_VAE).eval(), seed)


@pytest.mark.parametrize(
    "opts",
    [
        dict(channels_last=True),
        dict(compile=True, compile_backend="aot_eager"),
        pytest.param(
            dict(compile=True, channels_last=True), marks=pytest.mark.slow, id="inductor+channels_last"
        ),
    ],
    ids=str,
)
@torch.no_grad()
def test_apply_vae_matches_the_plain_path(opts):
    from fluxion.accel import VAEAccelOptions, apply_vae

    plain, fast = _vae(), _vae()
    keys = list(plain.state_dict())
    assert apply_vae(fast, VAEAccelOptions(**opts)) is fast and list(fast.state_dict()) == keys
    img = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z_ref, z = plain.encode(img), fast.encode(img)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.decode(z_ref), plain.decode(z_ref), atol=1e-5, rtol=1e-5)
    if opts.get("channels_last"):
        assert fast.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def test_compiled_rope_real_form_equals_complex_form():
    """Under compile (inference) apply_rope takes a real-arithmetic form inductor can fuse; same rotation."""
    from fluxion.model.attention import apply_rope, rope

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 24, 4), generator=g)
    pe = rope(ids, (8, 8, 8, 8), 2000)
    x = torch.randn(2, 3, 24, 32, generator=g)
    graphs = []

    def record(gm, example_inputs):  # a backend that keeps the traced graph and runs it as traced
        graphs.append(gm)
        return gm.forward

    eager = apply_rope(x, pe)
    traced = torch.compile(apply_rope, backend=record, fullgraph=True)(x, pe)
    torch.testing.assert_close(traced, eager, atol=1e-6, rtol=1e-6)
    assert not torch.equal(eager, x)  # it does rotate
    assert "view_as_complex" not in graphs[0].code  # the traced graph took the real form
