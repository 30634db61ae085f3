"""The studio's CLI side on the embedded fluxion-tiny: watermark on by default and `fluxion verify`, --preview in
the terminal, the REPL's !view, --text against a real `fluxion serve --role text-encoder` process, and
--upsample-prompt recorded in the PNG."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from fluxion.cli import main
from fluxion.metadata import read_params
from fluxion.provenance import MIN_SIDE, watermark_if_possible
from fluxion.repl import run_repl
from fluxion.weights.models import load_models

FAST = ["--steps", "2", "--seed", "4"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_watermark_default_verify_and_opt_out(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLUXION_TERM_IMAGES", "blocks")
    marked, plain = tmp_path / "marked.png", tmp_path / "plain.png"
    code, _, err = run(capsys, "generate", "a blue sky", "-o", marked, "--preview", *FAST)
    assert code == 0
    assert "step 1/2" in err and "\x1b[38;2;" in err  # a 24-bit colour block frame per step
    assert run(capsys, "generate", "a blue sky", "-o", plain, "--no-watermark", *FAST)[0] == 0
    code, out, _ = run(capsys, "verify", marked)
    assert code == 0 and "watermark: found (3" in out and "c2pa: no manifest" in out
    code, out, _ = run(capsys, "verify", plain)
    assert code == 1 and "watermark: not found" in out
    a, b = (np.asarray(Image.open(p), np.float64) for p in (marked, plain))
    psnr = 10 * np.log10(255**2 / np.mean((a - b) ** 2))
    assert 28 < psnr < 60  # invisible, but there
    assert read_params(marked)["seed"] == 4  # the metadata survives the marking


def test_small_images_are_left_unmarked_with_a_note():
    small = Image.new("RGB", (MIN_SIDE - 16, 96), (10, 20, 30))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = watermark_if_possible(small)
    assert out is small and "under 64 px" in str(caught[0].message)


def test_repl_view_draws_the_last_image(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXION_TERM_IMAGES", "blocks")
    out = io.StringIO()
    paths = run_repl(
        load_models(),
        io.StringIO("!view\na red disc\n!view\n!view $2\n"),
        out,
        tmp_path,
        {"width": 64, "height": 64, "steps": 1, "guidance": None, "seed": 1, "allow_override": False},
    )
    text = out.getvalue()
    assert len(paths) == 1 and "error: no image yet" in text and "error: no image $2" in text
    assert "\x1b[38;2;" in text and f"$1 {paths[0]}" in text


def test_text_flag_uses_a_remote_encoder_process(tmp_path, capsys):
    pytest.importorskip("fastapi")
    from serve_fixtures import Proc, free_port

    port = free_port()
    proc = Proc(["--role", "text-encoder", "--port", str(port)], tmp_path / "te.log", port)
    try:
        proc.wait_ready(timeout=120, need_worker=False)
        local, remote = tmp_path / "local.png", tmp_path / "remote.png"
        assert run(capsys, "generate", "a blue sky", "-o", local, *FAST)[0] == 0
        code, _, err = run(capsys, "generate", "a blue sky", "-o", remote, "--text", proc.url, *FAST)
        assert code == 0, err
        assert np.array_equal(np.asarray(Image.open(local)), np.asarray(Image.open(remote)))
    finally:
        proc.stop()
    code, _, err = run(capsys, "generate", "x", "-o", tmp_path / "z.png", "--text", proc.url, *FAST)
    assert code == 2 and "cannot reach the text encoder" in err and "\n" not in err.strip()


@pytest.mark.slow  # a random LLM writes max_new_tokens tokens; tests/test_studio.py covers the server's path
def test_upsample_prompt_is_recorded(tmp_path, capsys):
    from text_fixtures import build_tiny_qwen3

    llm = build_tiny_qwen3(tmp_path / "llm", num_layers=1)
    flat = llm / "text_encoder"
    for f in (llm / "tokenizer").iterdir():
        (flat / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "up.png"
    code, _, err = run(capsys, "generate", "a cat", "-o", out, "--upsample-prompt", flat, *FAST)
    assert code == 0, err
    params = read_params(out)
    assert params["prompt_original"] == "a cat" and "upsampled prompt:" in err
