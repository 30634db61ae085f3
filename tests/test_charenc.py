"""The character encoder of quoted text: codes, training with the model (checkpoint, export beside the
transformer, strict reload), and inference through load_models/generate."""

import pytest
import torch

from fluxion.config import PRESETS
from fluxion.text.charenc import (
    PAD,
    SEP,
    CharEncoder,
    CharEncoderConfig,
    char_codes,
    load_char_encoder,
    quoted_spans,
)
from fluxion.train.train import TrainConfig, main
from train_fixtures import TRAIN_SPEC, build_components

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def test_codes_keep_case_and_separate_spans():
    assert quoted_spans("the word \"Hi\" and \u201cyo\u201d, it's 'QX'") == ["Hi", "yo", "QX"]
    codes = char_codes(['say "Ab" and "c"', "no quotes"], max_chars=6)
    a, b, c = ord("A") - 32 + 3, ord("b") - 32 + 3, ord("c") - 32 + 3
    assert codes.tolist() == [[a, b, SEP, c, PAD, PAD], [PAD] * 6]
    assert not torch.equal(char_codes(['"HELLO"'], 8), char_codes(['"hello"'], 8))  # MiniLM can't tell


def test_trained_with_the_model_exported_beside_it_and_used_at_inference(tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, TRAIN_SPEC.name, TRAIN_SPEC)
    parts = build_components(tmp_path)
    cfg = TrainConfig(
        model=TRAIN_SPEC.name,
        data=(parts["data"],),
        out=str(tmp_path / "run"),
        vae=parts["vae"],
        text=parts["text"],
        steps=4,
        batch_size=2,
        lr=1e-3,
        warmup=1,
        char_encoder=True,
        char_max=8,
    )
    before = CharEncoder(CharEncoderConfig(context_dim=TRAIN_SPEC.transformer.context_in_dim, max_chars=8))
    before.reset_parameters(torch.Generator().manual_seed(cfg.seed + 1))
    result = main(cfg)
    from safetensors.torch import load_file

    tr = load_file(result["exported"])
    assert not any(k.startswith("char_encoder") for k in tr)  # transformer keys stay BFL keys
    enc = load_char_encoder(tmp_path / "run" / "charenc.safetensors", TRAIN_SPEC.transformer.context_in_dim)
    assert enc.cfg.max_chars == 8
    assert not torch.equal(enc.proj.weight, before.proj.weight)  # it was trained
    # Inference: load_models finds it beside the transformer; quoted letters change the conditioning.
    from fluxion.sampling.pipeline import encode_prompts
    from fluxion.weights.models import load_models

    models = load_models(result["exported"], preset=TRAIN_SPEC.name, vae=parts["vae"], text=parts["text"])
    assert models.transformer.char_encoder is not None
    ctx = encode_prompts(models, ['the word "AB"', 'the word "XY"'])
    L = models.text.encode(["x"], dtype=torch.float32).shape[1]
    assert ctx.shape[1] == L + 8
    assert torch.equal(ctx[0, :L], ctx[1, :L]) is False or not torch.equal(ctx[0, L:], ctx[1, L:])
    assert not torch.equal(ctx[0, L:], ctx[1, L:])
