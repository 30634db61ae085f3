"""Checkpoint layouts users have (issue 10): each file is built in the writing tool's exact layout (by the tool
itself where it is pip-installable: gguf's GGUFWriter + quantize, bitsandbytes), loaded by fluxion, and compared
with the tensors the tool means, computed independently here. Key-set tests run the real klein-4B / dev layouts
on the meta device."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from fluxion.config import DEV, KLEIN_4B
from fluxion.model.transformer import Flux2
from fluxion.quant.fp8 import Float8Linear
from fluxion.quant.weight_only import Int8WeightOnlyLinear
from fluxion.weights import mapping
from fluxion.weights.formats import bundle, comfy_quant
from fluxion.weights.load import (
    check_state_dict,
    component_shapes,
    load_autoencoder,
    load_transformer,
    read_transformer_state,
)
from fluxion.weights.safetensors_io import CheckpointError
from test_transformer import SMALL, inputs, randomize

E4M3 = torch.float8_e4m3fn
BLOCK = ("double_blocks.", "single_blocks.")


@pytest.fixture(scope="module")
def small_sd():
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in randomize(Flux2(SMALL).eval()).state_dict().items()}


def is_block_linear(k, v):
    return k.startswith(BLOCK) and k.endswith(".weight") and v.ndim == 2


def comfy_json(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def fp8_per_tensor(w):
    """ComfyUI's per-tensor fp8 recipe (QUANTIZATION.md): scale = amax / 448, codes = (w / scale) in e4m3."""
    scale = w.abs().amax().float() / 448.0
    return (w.float() / scale).clamp(-448, 448).to(E4M3), scale


def run(model_or_sd, cfg=SMALL):
    if isinstance(model_or_sd, dict):
        with torch.device("meta"):
            model = Flux2(cfg)
        model.load_state_dict(model_or_sd, assign=True)
        model_or_sd = model.eval()
    x, ids, ctx, tids = inputs(cfg, 1, [(3, 4)], n_txt=5)
    with torch.no_grad():
        return model_or_sd(x, ids[None], torch.tensor([0.5]), ctx, tids[None], torch.tensor([4.0]))


def shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def max_err(model, expected: dict) -> float:
    got = model.state_dict()
    return max((got[k].float() - expected[k].float()).abs().max().item() for k in expected)


# ---------------------------------------------------------------- ComfyUI fp8 (fp8mixed / BFL fp8 releases)


def write_fp8mixed(path, sd, prefix="model.diffusion_model."):
    out, expected, layers = {}, {}, {}
    for k, v in sd.items():
        if is_block_linear(k, v):
            layer = k[: -len(".weight")]
            codes, scale = fp8_per_tensor(v)
            out[prefix + k] = codes
            out[f"{prefix}{layer}.weight_scale"] = scale
            out[f"{prefix}{layer}.input_scale"] = torch.tensor(0.5)
            out[f"{prefix}{layer}.comfy_quant"] = comfy_json({"format": "float8_e4m3fn"})
            layers[prefix + layer] = {"format": "float8_e4m3fn"}
            expected[k] = codes.float() * scale
        else:
            out[prefix + k] = v.to(torch.bfloat16)
            expected[k] = v.to(torch.bfloat16).float()
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file(out, str(path), metadata=meta)
    return expected


def test_comfy_fp8mixed_dequantizes_exactly(tmp_path, small_sd):
    path = tmp_path / "flux2_fp8mixed.safetensors"
    expected = write_fp8mixed(path, small_sd)
    model = load_transformer(path, dtype=torch.float32, prequantized="dequantize")
    assert max_err(model, expected) == 0.0
    assert component_shapes(path, "transformer") == shapes(model)
    # Output: the same function as the model holding the intended weights (fp32 matmuls on differently aligned
    # buffers may round differently in the last bit).
    assert (run(model) - run(expected)).abs().max() < 1e-5


def test_comfy_fp8mixed_keeps_fp8_codes_and_scale(tmp_path, small_sd):
    path = tmp_path / "flux2_fp8mixed.safetensors"
    expected = write_fp8mixed(path, small_sd)
    model = load_transformer(path, dtype=torch.bfloat16, prequantized="keep")
    layer = model.double_blocks[0].img_attn.qkv
    assert isinstance(layer, Float8Linear) and layer.weight.dtype == E4M3
    codes, scale = fp8_per_tensor(small_sd["double_blocks.0.img_attn.qkv.weight"])
    assert torch.equal(
        layer.weight.view(torch.uint8), codes.view(torch.uint8)
    )  # bit-identical, no requantize
    assert torch.equal(layer.weight_scale, scale.expand(layer.out_features, 1))
    n_fp8 = sum(isinstance(m, Float8Linear) for m in model.modules())
    assert n_fp8 == sum(is_block_linear(k, v) for k, v in small_sd.items())
    for name, m in model.named_modules():
        if isinstance(m, Float8Linear):
            assert torch.equal(m.dequantized_weight(), expected[name + ".weight"])
    assert model.img_in.weight.dtype == torch.bfloat16  # embedders stay in the compute dtype


def test_old_scaled_fp8_layout_per_tensor_and_per_row(tmp_path, small_sd):
    out, expected = {"scaled_fp8": torch.zeros(0, dtype=E4M3)}, {}
    for i, (k, v) in enumerate(small_sd.items()):
        if is_block_linear(k, v):
            layer = k[: -len(".weight")]
            if i % 2:
                codes, scale = fp8_per_tensor(v)
            else:  # per-row scales [N, 1]
                scale = v.abs().amax(dim=1, keepdim=True) / 448.0
                codes = (v / scale).to(E4M3)
            out[k], out[f"{layer}.scale_weight"], out[f"{layer}.scale_input"] = (
                codes,
                scale,
                torch.tensor(1.0),
            )
            expected[k] = codes.float() * scale
        else:
            out[k] = expected[k] = v
    path = tmp_path / "flux2_scaled_fp8.safetensors"
    save_file(out, str(path))
    model = load_transformer(path, dtype=torch.float32, prequantized="dequantize")
    assert max_err(model, expected) == 0.0
    kept = load_transformer(path, dtype=torch.float32, prequantized="keep")
    for name, m in kept.named_modules():
        if isinstance(m, Float8Linear):
            assert torch.equal(m.dequantized_weight(), expected[name + ".weight"])


def test_unsupported_comfy_format_is_named(tmp_path, small_sd):
    out = dict(small_sd)
    out["double_blocks.0.img_attn.qkv.comfy_quant"] = comfy_json({"format": "mxfp8"})
    path = tmp_path / "mx.safetensors"
    save_file(out, str(path))
    with pytest.raises(CheckpointError, match="ComfyUI quantization format 'mxfp8'"):
        load_transformer(path)


# ---------------------------------------------------------------- NVFP4 (ComfyUI / comfy-kitchen layout)

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def nvfp4_quantize(w):
    """Independent NVFP4 quantizer (comfy-kitchen's recipe): per-tensor s2 = amax / (448 * 6); per 16-block scale
    amax / 6 / s2 rounded to e4m3; codes = nearest E2M1 of w / (s2 * block); packed first-element-high."""
    N, K = w.shape
    s2 = w.abs().amax() / (448.0 * 6.0)
    blocks = w.view(N, K // 16, 16)
    bs = (blocks.abs().amax(-1) / 6.0 / s2).clamp(max=448).to(E4M3)
    total = bs.float() * s2
    scaled = blocks / total[..., None]
    idx = (scaled.abs()[..., None] - E2M1).abs().argmin(-1)  # nearest magnitude
    sign = (scaled < 0).long() * 8
    code = (idx + sign).view(N, K)
    value = (E2M1[idx] * torch.where(scaled < 0, -1.0, 1.0) * total[..., None]).view(N, K)
    packed = ((code[:, 0::2] << 4) | code[:, 1::2]).to(torch.uint8)
    # cuBLAS block-scale layout, written element by element from the documented offset formula.
    rows, cols = -(-N // 128) * 128, -(-(K // 16) // 4) * 4
    flat = torch.zeros(rows * cols, dtype=torch.uint8)
    for r in range(N):
        for c in range(K // 16):
            tile = (r // 128) * (cols // 4) + c // 4
            flat[tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4] = bs[r, c].view(torch.uint8)
    return packed, flat.view(rows, cols).view(E4M3), s2.float(), value


def test_nvfp4_dequantizes_to_the_intended_weights(tmp_path, small_sd):
    out, expected = {}, {}
    for k, v in small_sd.items():
        if k.startswith("double_blocks.0.") and k.endswith(".weight") and v.ndim == 2:
            layer = k[: -len(".weight")]
            packed, bs, s2, value = nvfp4_quantize(v)
            out[k], out[f"{layer}.weight_scale"], out[f"{layer}.weight_scale_2"] = packed, bs, s2
            out[f"{layer}.comfy_quant"] = comfy_json({"format": "nvfp4"})
            expected[k] = value
        else:
            out[k] = expected[k] = v
    path = tmp_path / "flux2_nvfp4.safetensors"
    save_file(out, str(path))
    model = load_transformer(path, dtype=torch.float32)
    assert max_err(model, expected) == 0.0
    assert component_shapes(path, "transformer") == shapes(model)  # read on meta: nothing dequantized
    print("nvfp4 output:", (run(model) - run(expected)).abs().max().item())
    assert (run(model) - run(expected)).abs().max() < 1e-5


# ---------------------------------------------------------------- ComfyUI all-in-one bundle, `.weight` norm names


def test_comfy_bundle_loads_transformer_and_vae(tmp_path, small_sd):
    from fluxion.config import VAEConfig
    from fluxion.vae.autoencoder import AutoEncoder

    torch.manual_seed(2)
    vae = AutoEncoder(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, num_groups=8))
    vae_sd = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    out = {}
    for k, v in small_sd.items():  # newer ComfyUI / InvokeAI spell the q/k norm gains `.weight`
        out["model.diffusion_model." + k.replace("_norm.scale", "_norm.weight")] = v
    out.update({"vae." + k: v for k, v in vae_sd.items()})
    out["text_encoders.qwen3_4b.transformer.model.norm.weight"] = torch.ones(8)
    path = tmp_path / "flux2_klein_aio.safetensors"
    save_file(out, str(path))
    model = load_transformer(path)
    assert max_err(model, small_sd) == 0.0
    ae = load_autoencoder(path, vae.cfg)
    assert max_err(ae, vae_sd) == 0.0


# ---------------------------------------------------------------- GGUF (city96 layout, written by gguf itself)


def write_gguf(path, tensors: dict, qtypes: dict, orig_shapes=()):
    import gguf

    writer = gguf.GGUFWriter(str(path), "flux")
    for name, arr in tensors.items():
        qtype = qtypes.get(name, gguf.GGMLQuantizationType.F32)
        if name in orig_shapes:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(arr.shape))
            arr = arr.reshape(-1, 256)
        writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def q8_0_meaning(w: np.ndarray) -> np.ndarray:
    """Q8_0 by hand from ggml-quants.c: per 32 values d = amax / 127, q = roundf(x * (1 / d)) (half away from
    zero), d stored as fp16; the value is q * fp16(d)."""
    b = w.reshape(-1, 32).astype(np.float32)
    d = (np.abs(b).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    x = b * inv
    q = np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))
    return (q * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


def test_gguf_q8_0_and_f16_dequantize_exactly_and_keep_int8(tmp_path, small_sd):
    import gguf

    Q = gguf.GGMLQuantizationType
    tensors, qtypes, expected = {}, {}, {}
    for k, v in small_sd.items():
        arr = v.numpy().astype(np.float32)
        if v.ndim == 2 and v.shape[1] % 32 == 0:
            qtypes["model.diffusion_model." + k], expected[k] = Q.Q8_0, torch.from_numpy(q8_0_meaning(arr))
        elif v.ndim == 2:
            qtypes["model.diffusion_model." + k] = Q.F16
            expected[k] = v.half().float()
        else:
            expected[k] = v
        tensors["model.diffusion_model." + k] = arr
    path = tmp_path / "flux2-small-Q8_0.gguf"
    write_gguf(path, tensors, qtypes)
    model = load_transformer(path, dtype=torch.float32)
    assert max_err(model, expected) == 0.0
    assert component_shapes(path, "transformer") == shapes(model)
    kept = load_transformer(path, dtype=torch.float32, prequantized="keep")
    assert isinstance(kept.double_blocks[0].img_attn.qkv, Int8WeightOnlyLinear)
    assert not isinstance(kept.time_in.in_layer, Int8WeightOnlyLinear)
    # Same numbers as dequantizing on load, so the same output.
    assert (run(kept) - run(model)).abs().max() < 1e-5


@pytest.mark.parametrize("qname", ["Q6_K", "Q5_K", "Q4_K", "Q4_0", "BF16"])
def test_gguf_other_types_and_orig_shape(tmp_path, qname):
    import gguf

    from fluxion.weights.formats import gguf_io

    qtype = getattr(gguf.GGMLQuantizationType, qname)
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    rows = 6
    if qname in ("BF16",):
        data = gguf.quants.quantize(rng.standard_normal((rows, 512)).astype(np.float32), qtype)
    else:
        # gguf cannot quantize K-quants: random blocks with sane fp16 super-scales, as llama.cpp would write them.
        data = rng.integers(0, 256, size=(rows, 512 // block * nbytes), dtype=np.uint8)
        d = data.reshape(rows, -1, nbytes)
        scale_at = {"Q6_K": nbytes - 2, "Q5_K": 0, "Q4_K": 0, "Q4_0": 0}[qname]
        d[..., scale_at : scale_at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        if qname in ("Q5_K", "Q4_K"):
            d[..., 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    meaning = gguf.quants.dequantize(data, qtype).reshape(rows, 512)
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    writer.add_tensor("w.weight", data, raw_dtype=qtype)
    writer.add_array("comfy.gguf.orig_shape.r.weight", [3, 2, 256])  # a tensor city96 flattened to (-1, 256)
    writer.add_tensor("r.weight", data[:3], raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    sd, _ = gguf_io.read(path)
    assert sd["w.weight"].shape == (rows, 512)
    assert np.array_equal(sd["w.weight"].numpy(), meaning)
    assert sd["r.weight"].shape == (3, 2, 256)
    assert np.array_equal(sd["r.weight"].numpy().reshape(3, 512), meaning[:3])


def test_unsupported_files_name_their_format(tmp_path):
    onnx = tmp_path / "model.safetensors"
    onnx.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="HDF5"):
        load_transformer(onnx)
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(CheckpointError, match="GGUF"):
        load_transformer(bad)


# ---------------------------------------------------------------- bitsandbytes nf4 folder (diffusers layout)


@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_nf4_folder_without_bitsandbytes_at_load(tmp_path, small_sd, double_quant):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    dsd = mapping.bfl_to_diffusers(small_sd)
    out, meaning = {}, {}
    for k, v in dsd.items():
        if k.startswith(("transformer_blocks.", "single_transformer_blocks.")) and v.ndim == 2:
            q, state = bnbf.quantize_4bit(
                v.to(torch.bfloat16), blocksize=64, quant_type="nf4", compress_statistics=double_quant
            )
            out[k] = q
            out.update({f"{k}.{name}": t for name, t in state.as_dict(packed=True).items()})
            meaning[k] = bnbf.dequantize_4bit(q, state).float()  # what bitsandbytes itself computes
        else:
            out[k] = v.to(torch.bfloat16)
            meaning[k] = out[k].float()
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file(out, str(folder / "diffusion_pytorch_model.safetensors"))
    cfg = {
        "_class_name": "Flux2Transformer2DModel",
        "quantization_config": {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
        },
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    model = load_transformer(folder, SMALL, dtype=torch.float32)
    assert max_err(model, mapping.diffusers_to_bfl(meaning)) == 0.0
    assert component_shapes(folder, "transformer") == shapes(model)


# ---------------------------------------------------------------- key sets at real sizes (meta device)


def real_keys(cfg):
    with torch.device("meta"):
        return Flux2(cfg).state_dict()


@pytest.mark.parametrize("cfg", [KLEIN_4B, DEV], ids=["klein-4b", "dev"])
def test_real_size_comfy_layouts_key_sets(cfg):
    sd = real_keys(cfg)
    with torch.device("meta"):
        model = Flux2(cfg)
    # fp8mixed, kept as fp8 (codes + per-tensor scales), norm gains spelled `.weight`
    layered, meta_layers = {}, {}
    for k, v in sd.items():
        name = "model.diffusion_model." + k.replace("_norm.scale", "_norm.weight")
        if is_block_linear(k, v):
            layer = name[: -len(".weight")]
            layered[name] = torch.empty(v.shape, dtype=E4M3, device="meta")
            layered[layer + ".weight_scale"] = torch.empty((), device="meta")
            layered[layer + ".input_scale"] = torch.empty((), device="meta")
            meta_layers[layer] = {"format": "float8_e4m3fn"}
        else:
            layered[name] = v
    layered["vae.decoder.conv_in.weight"] = torch.empty(3, device="meta")  # a bundle
    sub, prefix = bundle.select(layered, "transformer")
    meta = {"_quantization_metadata": json.dumps({"layers": meta_layers})}
    plain, quant = comfy_quant.unpack(sub, meta, keep_fp8=lambda k: k.startswith(BLOCK), prefixes=(prefix,))
    plain = bundle.bfl_norm_names(plain)
    check_state_dict(model, plain, "fp8mixed")
    assert set(quant) == {k for k, v in sd.items() if is_block_linear(k, v)}
    # NVFP4 (dequantized on meta)
    nv = {}
    for k, v in sd.items():
        if is_block_linear(k, v):
            layer = k[: -len(".weight")]
            N, K = v.shape
            nv[k] = torch.empty(N, K // 2, dtype=torch.uint8, device="meta")
            nv[layer + ".weight_scale"] = torch.empty(
                -(-N // 128) * 128, -(-(K // 16) // 4) * 4, dtype=E4M3, device="meta"
            )
            nv[layer + ".weight_scale_2"] = torch.empty((), device="meta")
            nv[layer + ".comfy_quant"] = comfy_json({"format": "nvfp4"})
        else:
            nv[k] = v
    nv_plain, _ = comfy_quant.unpack(nv, {})
    check_state_dict(model, nv_plain, "nvfp4")


def test_read_transformer_state_reports_packed(tmp_path, small_sd):
    path = tmp_path / "f.safetensors"
    write_fp8mixed(path, small_sd)
    sd, quant = read_transformer_state(path, keep_fp8=True)
    assert quant and all(sd[k].dtype == E4M3 for k in quant)
    sd, quant = read_transformer_state(path)
    assert quant is None and all(v.dtype != E4M3 for v in sd.values())
    _ = F  # noqa


@pytest.mark.parametrize("cfg", [KLEIN_4B, DEV], ids=["klein-4b", "dev"])
def test_real_size_bnb_nf4_key_set(cfg):
    """diffusers' FLUX.2 bnb-4bit layout (double-quantized nf4, blocksize 64) at real size, on meta."""
    from fluxion.weights.formats import bnb_nf4

    dsd = mapping.bfl_to_diffusers(real_keys(cfg))
    out = {}
    for k, v in dsd.items():
        if k.startswith(("transformer_blocks.", "single_transformer_blocks.")) and v.ndim == 2:
            n = v.numel()
            meta = dict(device="meta")
            out[k] = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, **meta)
            out[k + ".absmax"] = torch.empty(n // 64, dtype=torch.uint8, **meta)
            out[k + ".quant_map"] = torch.empty(16, **meta)
            out[k + ".nested_absmax"] = torch.empty(-(-n // 64 // 256), **meta)
            out[k + ".nested_quant_map"] = torch.empty(256, **meta)
            state = {
                "quant_type": "nf4",
                "blocksize": 64,
                "dtype": "bfloat16",
                "shape": list(v.shape),
                "nested_blocksize": 256,
                "nested_dtype": "float32",
                "nested_offset": 0.01,
            }
            out[k + ".quant_state.bitsandbytes__nf4"] = comfy_json(state)
        else:
            out[k] = v
    plain = mapping.diffusers_to_bfl(bnb_nf4.dequantize_state_dict(out))
    with torch.device("meta"):
        model = Flux2(cfg)
    check_state_dict(model, plain, "bnb-nf4")


@pytest.mark.gpu
def test_fp8mixed_runs_the_fast_path_on_cuda(tmp_path, small_sd):
    """On sm_89+ in bf16, "auto" keeps the file's fp8 codes and runs them through torch._scaled_mm."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs an sm_89+ CUDA device")
    path = tmp_path / "flux2_fp8mixed.safetensors"
    write_fp8mixed(path, small_sd)
    fast = load_transformer(path, dtype=torch.bfloat16, device="cuda")  # prequantized="auto"
    plain = load_transformer(path, dtype=torch.bfloat16, device="cuda", prequantized="dequantize")
    assert isinstance(fast.double_blocks[0].img_attn.qkv, Float8Linear)
    x, ids, ctx, tids = inputs(SMALL, 1, [(8, 8)], n_txt=16)
    args = [a.cuda() for a in (x.bfloat16(), ids[None], torch.tensor([0.5]), ctx.bfloat16(), tids[None])]
    with torch.no_grad():
        a, b = fast(*args, torch.tensor([4.0]).cuda()), plain(*args, torch.tensor([4.0]).cuda())
    assert F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0) > 0.995


def test_convert_gguf_to_bfl_writes_the_meant_weights(tmp_path, small_sd):
    import gguf

    from fluxion.weights.load import convert

    Q = gguf.GGMLQuantizationType
    tensors = {k: v.numpy() for k, v in small_sd.items()}
    qtypes = {k: Q.Q8_0 for k, v in small_sd.items() if v.ndim == 2 and v.shape[1] % 32 == 0}
    write_gguf(tmp_path / "m.gguf", tensors, qtypes)
    convert(tmp_path / "m.gguf", tmp_path / "m.safetensors", to="bfl")
    a, b = load_transformer(tmp_path / "m.gguf"), load_transformer(tmp_path / "m.safetensors")
    assert max_err(a, b.state_dict()) == 0.0


def test_nvfp4_and_fp8_written_by_comfy_kitchen(tmp_path, small_sd):
    """The same layouts quantized by ComfyUI's own kernels library (eager backend, CPU)."""
    ck = pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.tensor import TensorCoreFP8Layout, TensorCoreNVFP4Layout

    out, expected = {}, {}
    with ck.registry.use_backend("eager"):
        for k, v in small_sd.items():
            if not is_block_linear(k, v):
                out[k] = expected[k] = v
                continue
            layer = k[: -len(".weight")]
            if k.startswith("double_blocks."):
                q, params = TensorCoreNVFP4Layout.quantize(v.to(torch.bfloat16))
                out[k], out[f"{layer}.weight_scale"] = q, params.block_scale
                out[f"{layer}.weight_scale_2"] = params.scale
                out[f"{layer}.comfy_quant"] = comfy_json({"format": "nvfp4"})
                expected[k] = ck.dequantize_nvfp4(q, params.scale, params.block_scale, torch.float32)
            else:
                q, params = TensorCoreFP8Layout.quantize(v.to(torch.bfloat16))
                out[k], out[f"{layer}.weight_scale"] = q, params.scale
                out[f"{layer}.comfy_quant"] = comfy_json({"format": "float8_e4m3fn"})
                expected[k] = q.float() * params.scale
    path = tmp_path / "ck.safetensors"
    save_file(out, str(path))
    model = load_transformer(path, dtype=torch.float32, prequantized="dequantize")
    err = max_err(model, expected)
    print("comfy-kitchen nvfp4 / fp8 weights:", err)
    assert err == 0.0
