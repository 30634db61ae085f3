"""Text encoders as ComfyUI ships them (issue 10): one safetensors file (`text_encoders/qwen_3_4b.safetensors`,
`mistral_3_small_flux2_{bf16,fp8}.safetensors`, or inside an all-in-one checkpoint) plus a tokenizer folder.
The reference is transformers loading the same weights from a transformers folder (the existing, parity-tested
path); fp8 files are compared with the folder holding the weights the file means (codes * scale, computed here)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fluxion.text.encoder import load_text_encoder
from text_fixtures import TINY_MISTRAL3, TINY_QWEN3, make_mistral_tokenizer, make_qwen3_tokenizer

PROMPTS = ["A fluffy orange cat sitting on a windowsill", "a red apple"]
E4M3 = torch.float8_e4m3fn


def comfy_fp8(sd: dict, prefix: str):
    """Per-tensor fp8 for every 2-D projection weight, in ComfyUI's layout; returns (file tensors, meaning)."""
    out, meaning = {}, {}
    for k, v in sd.items():
        if k.endswith("_proj.weight") and v.ndim == 2:
            layer = k[: -len(".weight")]
            scale = v.abs().amax().float() / 448.0
            codes = (v.float() / scale).to(E4M3)
            out[prefix + k], out[prefix + layer + ".weight_scale"] = codes, scale
            out[prefix + layer + ".comfy_quant"] = torch.tensor(
                list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8
            )
            meaning[k] = codes.float() * scale
        else:
            out[prefix + k] = v
            meaning[k] = v
    return out, meaning


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny Qwen3 with the real model's constants (rope theta 1e6, eps 1e-6), its folder and its tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("qwen3")
    tok = make_qwen3_tokenizer()
    tok.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
    )
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(root / "text_encoder")
    return root, {k: v.detach().clone() for k, v in model.state_dict().items()}


def encode(source, cfg, **kw):
    enc = load_text_encoder(source, cfg, dtype=torch.float32, **kw)
    return enc.encode(PROMPTS, dtype=torch.float32)


def test_qwen3_single_file_matches_the_folder(tmp_path, qwen3):
    root, sd = qwen3
    path = tmp_path / "qwen_3_4b.safetensors"
    save_file(sd, str(path))  # ComfyUI's names: model.embed_tokens / model.layers.N / model.norm (+ lm_head)
    want = encode(root, TINY_QWEN3)
    got = encode(path, TINY_QWEN3, tokenizer_folder=root / "tokenizer")
    assert torch.equal(got, want)


def test_qwen3_fp8_file_and_bundle(tmp_path, qwen3):
    from transformers import Qwen3ForCausalLM

    root, sd = qwen3
    body = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    out, meaning = comfy_fp8(body, "text_encoders.qwen3_4b.transformer.model.")
    out["model.diffusion_model.img_in.weight"] = torch.zeros(2, 2)  # an all-in-one bundle
    path = tmp_path / "flux2_klein_aio.safetensors"
    save_file(out, str(path))
    ref = Qwen3ForCausalLM.from_pretrained(root / "text_encoder")
    ref.model.load_state_dict(meaning)
    ref.save_pretrained(tmp_path / "meant" / "text_encoder")
    want = encode(tmp_path / "meant", TINY_QWEN3, tokenizer_folder=root / "tokenizer")
    got = encode(path, TINY_QWEN3, tokenizer_folder=root / "tokenizer")
    print("qwen3 fp8 bundle vs meant weights:", (got - want).abs().max().item())
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("pruned", [False, True])
def test_mistral_single_file_with_vision_tower_and_tekken(tmp_path, pruned):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok = make_mistral_tokenizer()
    tok.save_pretrained(tmp_path / "tokenizer")
    text = dict(
        model_type="mistral",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        sliding_window=None,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e9},
        max_position_embeddings=131072,
    )
    vision = dict(
        model_type="pixtral",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=8,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision))
    model.save_pretrained(tmp_path / "text_encoder")
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            name = "model." + k[len("model.language_model.") :]
            if pruned and (name.startswith(("model.layers.3.", "model.norm."))):
                continue  # ComfyUI's pruned file: layers after the last tap and the final norm left out
            out[name] = v
        elif k.startswith("model.vision_tower."):
            out[k[len("model.") :]] = v
        elif k.startswith("model.multi_modal_projector."):
            out[k[len("model.") :]] = v
    out["tekken_model"] = torch.tensor(list(json.dumps({"vocab": []}).encode()), dtype=torch.uint8)
    path = tmp_path / "mistral_3_small_flux2_bf16.safetensors"
    save_file(out, str(path))
    want = encode(tmp_path, TINY_MISTRAL3)
    got = encode(path, TINY_MISTRAL3)  # tokenizer/ beside the file
    assert torch.equal(got, want)


def test_single_file_without_tokenizer_says_what_is_needed(tmp_path, qwen3):
    _, sd = qwen3
    path = tmp_path / "alone" / "qwen_3_4b.safetensors"
    path.parent.mkdir()
    save_file(sd, str(path))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_text_encoder(path, TINY_QWEN3)


@pytest.mark.parametrize(
    "kind, real",
    [
        (
            "qwen3",
            dict(
                vocab_size=151936,
                hidden_size=2560,
                intermediate_size=9728,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
            ),
        ),  # Qwen3-4B (klein 4B)
        (
            "qwen3",
            dict(
                vocab_size=151936,
                hidden_size=4096,
                intermediate_size=12288,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
            ),
        ),  # Qwen3-8B (klein 9B)
        (
            "mistral3",
            dict(
                vocab_size=131072,
                hidden_size=5120,
                intermediate_size=32768,
                num_hidden_layers=40,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
            ),
        ),  # Mistral Small 3.x (dev)
    ],
    ids=["qwen3-4b", "qwen3-8b", "mistral-small"],
)
def test_real_size_single_file_key_sets(kind, real):
    """ComfyUI's key set at the real sizes (meta tensors): the model built from shapes + facts has the real config."""
    import transformers

    from fluxion.text.encoder import _backbone_from_state, backbone_names

    cls = transformers.Qwen3ForCausalLM if kind == "qwen3" else transformers.MistralForCausalLM
    config_cls = transformers.Qwen3Config if kind == "qwen3" else transformers.MistralConfig
    with torch.device("meta"):
        hf = cls(config_cls(**real))
    sd = dict(hf.state_dict())  # model.embed_tokens / model.layers.N / model.norm / lm_head, as ComfyUI saves
    if kind == "mistral3":
        sd["vision_tower.transformer.layers.0.attention.q_proj.weight"] = torch.empty(
            1024, 1024, device="meta"
        )
        sd["multi_modal_projector.linear_1.weight"] = torch.empty(5120, 1024, device="meta")
        sd["tekken_model"] = torch.empty(10, dtype=torch.uint8, device="meta")
    model = _backbone_from_state(backbone_names(sd, torch.bfloat16), kind, "real")
    got = {k: getattr(model.config, k) for k in real}
    assert got == real
    assert model.config.rope_parameters["rope_theta"] == (1e6 if kind == "qwen3" else 1e9)


def test_prompt_cache_identity_of_a_single_file_encoder(tmp_path, qwen3):
    from fluxion.text.cache import encoder_identity

    root, sd = qwen3
    path = tmp_path / "qwen_3_4b.safetensors"
    save_file(sd, str(path))
    enc = load_text_encoder(path, TINY_QWEN3, dtype=torch.float32, tokenizer_folder=root / "tokenizer")
    other = tmp_path / "other" / "qwen_3_4b.safetensors"
    other.parent.mkdir()
    save_file({k: v for k, v in sd.items() if k != "lm_head.weight"}, str(other))  # another file, other size
    enc2 = load_text_encoder(other, TINY_QWEN3, dtype=torch.float32, tokenizer_folder=root / "tokenizer")
    assert encoder_identity(enc) != encoder_identity(enc2)
