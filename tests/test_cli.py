"""The `fluxion` command line, run in-process through `main([...])` on a tiny random model written to disk in the
BFL layout (transformer.safetensors + ae.safetensors + a text-encoder folder), plus PNG metadata."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxion import __version__
from fluxion.cli import COMMANDS, main, output_paths
from fluxion.metadata import read_params, save_png
from fluxion.request import Result
from fluxion.weights import models as M
from fluxion.weights.safetensors_io import load_folder_weights, load_safetensors
from pipeline_fixtures import KLEIN, build_bfl_files, register_specs

PROMPT = "A red apple on a wooden table"


@pytest.fixture(scope="module", autouse=True)
def _presets():
    with pytest.MonkeyPatch.context() as mp:
        register_specs(mp)
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_bfl_files(tmp_path_factory.mktemp("model"), KLEIN)


@pytest.fixture(scope="module")
def model_args(files):
    return [
        *("--model", files["model"], "--preset", KLEIN.name),
        *("--vae", files["vae"], "--text", files["text"], "--device", "cpu"),
    ]


def picture(path, width: int, height: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 16, 1), max(width // 16, 1), 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path)
    return str(path)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- help and entry point -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"] if command is None else [command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fluxion") and (command is None or command in out)


def test_console_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "fluxion.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in COMMANDS)


# --- generate, metadata, --from -----------------------------------------------------------------------------------
def test_generate_writes_png_with_metadata(tmp_path, model_args, capsys):
    out = tmp_path / "apple.png"
    code, stdout, stderr = run(
        capsys, "generate", PROMPT, "-o", out, "-W", 72, "-H", 88, "--seed", 3, *model_args
    )
    assert code == 0, stderr
    assert f"{out}  seed 3" in stdout
    assert "denoising" in stderr and "s/step" in stderr  # the progress bar
    assert Image.open(out).size == (72, 88)
    text = Image.open(out).text
    assert {k: text[k] for k in ("prompt", "seed", "steps", "width", "height", "model")} == {
        "prompt": PROMPT,
        "seed": "3",
        "steps": "4",
        "width": "72",
        "height": "88",
        "model": KLEIN.name,
    }
    assert text["fluxion_version"] == __version__ and float(text["guidance"]) == 1.0
    params = read_params(out)
    assert params["seed"] == 3 and params["prompt"] == PROMPT and params["references"] == 0


def test_several_outputs_are_numbered(tmp_path, model_args, capsys):
    out = tmp_path / "batch.png"
    code, stdout, _ = run(capsys, "generate", PROMPT, "a cat", "-n", 2, "--seed", 10, "-o", out, *model_args)
    assert code == 0
    paths = output_paths(out, 4)
    assert [p.name for p in paths] == ["batch.png", "batch-1.png", "batch-2.png", "batch-3.png"]
    stored = [(read_params(p)["prompt"], read_params(p)["seed"]) for p in paths]
    assert stored == [(PROMPT, 10), (PROMPT, 11), ("a cat", 10), ("a cat", 11)]
    assert all(f"{p}  seed" in stdout for p in paths)


def test_from_reruns_an_image(tmp_path, model_args, capsys):
    first = tmp_path / "first.png"
    assert run(capsys, "generate", PROMPT, "-o", first, *model_args)[0] == 0  # random seed, stored
    seed = read_params(first)["seed"]
    again = tmp_path / "again.png"
    code, stdout, _ = run(capsys, "generate", "--from", first, "-o", again, *model_args)
    assert code == 0 and f"seed {seed}" in stdout
    assert np.array_equal(pixels(first), pixels(again))
    changed = tmp_path / "changed.png"  # options given on the command line win over the stored ones
    code, _, _ = run(capsys, "generate", "a cat", "--from", first, "--steps", 2, "-o", changed, *model_args)
    params = read_params(changed)
    assert code == 0 and params["steps"] == 2 and params["prompt"] == "a cat" and params["seed"] == seed


def test_metadata_round_trip_and_errors(tmp_path):
    prompt = "ein Café am Meer, 夕焼け"  # not Latin-1: stored as iTXt
    result = Result(Image.new("RGB", (64, 64)), 42, {"prompt": prompt, "seed": 42, "steps": 4, "model": "m"})
    path = save_png(result, tmp_path / "sub" / "x.png")
    assert read_params(path) == {**result.params, "fluxion_version": __version__}
    assert Image.open(path).text["prompt"] == prompt
    assert json.loads(Image.open(path).text["fluxion_params"])["seed"] == 42
    with pytest.raises(ValueError, match=r"\.png"):
        save_png(result, tmp_path / "x.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no fluxion parameters"):
        read_params(tmp_path / "plain.png")


# --- edit, inpaint, convert ---------------------------------------------------------------------------------------
def test_edit_keeps_the_first_image_size(tmp_path, model_args, capsys):
    a, b = picture(tmp_path / "a.png", 80, 64, 1), picture(tmp_path / "b.png", 64, 64, 2)
    out = tmp_path / "edit.png"
    code, _, stderr = run(
        capsys, "edit", "-i", a, "-i", b, "put them together", "-o", out, "--seed", 1, *model_args
    )
    assert code == 0, stderr
    assert Image.open(out).size == (80, 64) and read_params(out)["references"] == 2
    sized = tmp_path / "sized.png"
    assert run(capsys, "edit", "-i", a, "x", "-o", sized, "-W", 96, "-H", 64, *model_args)[0] == 0
    assert Image.open(sized).size == (96, 64)


def test_inpaint(tmp_path, model_args, capsys):
    src = picture(tmp_path / "src.png", 72, 88, 3)
    mask = Image.new("L", (72, 88), 0)
    mask.paste(255, (8, 8, 40, 56))
    mask.save(tmp_path / "mask.png")
    out, raw = tmp_path / "inpainted.png", tmp_path / "raw.png"
    args = [
        "-i",
        src,
        "--mask",
        tmp_path / "mask.png",
        "a hole",
        "--seed",
        2,
        "--strength",
        0.75,
        "--no-watermark",  # the composite keeps the source's pixels exactly; the watermark would touch them
        *model_args,
    ]
    assert run(capsys, "inpaint", *args, "-o", out)[0] == 0
    assert run(capsys, "inpaint", *args, "--no-composite", "-o", raw)[0] == 0
    keep = np.asarray(mask) < 128
    assert Image.open(out).size == (72, 88)
    assert np.array_equal(pixels(out)[keep], pixels(src)[keep])
    assert not np.array_equal(pixels(raw)[keep], pixels(src)[keep])
    assert read_params(out)["strength"] == 0.75
    again = (
        tmp_path / "again.png"
    )  # --from restores prompt, seed and strength; the images come from -i/--mask
    assert (
        run(
            capsys,
            "inpaint",
            "-i",
            src,
            "--mask",
            tmp_path / "mask.png",
            "--from",
            out,
            "-o",
            again,
            "--no-watermark",
            *model_args,
        )[0]
        == 0
    )
    assert np.array_equal(pixels(again), pixels(out))


def test_convert_round_trip(tmp_path, files, capsys):
    folder, back = tmp_path / "transformer", tmp_path / "back.safetensors"
    assert run(capsys, "convert", files["model"], folder, "--to", "diffusers")[0] == 0
    assert (folder / "config.json").is_file()
    assert run(capsys, "convert", folder, back, "--to", "bfl")[0] == 0
    original, again = load_safetensors(files["model"]), load_safetensors(back)
    assert original.keys() == again.keys() and all(original[k].equal(again[k]) for k in original)
    assert "x_embedder.weight" in load_folder_weights(folder, "diffusion_pytorch_model")


# --- interactive --------------------------------------------------------------------------------------------------
def test_interactive_session(tmp_path, model_args, capsys, monkeypatch):
    outside = picture(tmp_path / "outside.png", 64, 64, 4)
    lines = [
        "!help",
        "!seed 7",
        "!size 64x80",
        "a red apple",  # $1
        "$1 make it blue",  # $2, references $1
        f"!load {outside}",  # $3
        "!edit $2 $3 combine them",  # $4
        "96x64 a wide one",  # $5, this size only
        "$ again, from the last",  # $6
        "!steps lots",
        "$9 there is no such image",
        "!bogus",
        "!show",
        "!quit",
        "never read",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out, _ = run(capsys, "interactive", "--outdir", tmp_path / "session", *model_args)
    assert code == 0
    made = sorted((tmp_path / "session").glob("image-*.png"))
    assert [p.name for p in made] == [f"image-000{i}.png" for i in (1, 2, 4, 5, 6)]
    sizes = [Image.open(p).size for p in made]
    assert sizes == [(64, 80), (64, 80), (64, 80), (96, 64), (64, 80)]
    assert [read_params(p)["references"] for p in made] == [0, 1, 2, 0, 1]
    assert all(read_params(p)["seed"] == 7 for p in made)
    for n in range(1, 7):
        assert f"${n} " in out
    assert "!load PATH" in out  # the help text
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "!steps" in errors[0] and "$9" in errors[1] and "!bogus" in errors[2]
    assert "seed=7" in out and "width=64" in out  # !show
    assert "never read" not in out


# --- bad input: one line on stderr, exit code 2, no traceback -----------------------------------------------------
@pytest.fixture
def bad_files(tmp_path):
    """Input files for the cases below; `{name}` in a case's arguments is replaced by the path."""
    ok = picture(tmp_path / "ok.png", 64, 80, 5)
    Image.new("L", (64, 64), 255).save(tmp_path / "small_mask.png")
    (tmp_path / "text.png").write_text("hello, I am text")
    whole = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    Image.new("RGB", (64, 64)).save(tmp_path / "plain.png")
    names = ("small_mask", "text", "truncated", "plain", "missing", "out")
    return {"ok": ok, "jpg": str(tmp_path / "out.jpg"), **{n: str(tmp_path / f"{n}.png") for n in names}}


BAD = {  # case: (arguments, what the message must say)
    "missing file": ("edit -i {missing} x -o {out}", "not found"),
    "not an image": ("edit -i {text} x -o {out}", "is not an image"),
    "truncated png": ("inpaint -i {truncated} --mask {ok} x -o {out}", "truncated"),
    "mask size mismatch": (
        "inpaint -i {ok} --mask {small_mask} x -o {out}",
        "mask is 64x64 but the image is 64x80",
    ),
    "too many references": ("edit" + " -i {ok}" * 5 + " x -o {out}", "at most 4"),
    "aspect beyond 8:1": ("generate x -W 64 -H 528 -o {out}", "aspect ratio"),
    "zero steps": ("generate x --steps 0 -o {out}", "at least 1"),
    "negative guidance": ("generate x --guidance -1 -o {out}", "guidance must be >= 0"),
    "size below 64": ("generate x -W 48 -o {out}", "at least 64"),
    "above 4 MP": ("generate x -W 2048 -H 2064 -o {out}", "4 MP"),
    "distilled guidance": ("generate x --guidance 3 -o {out}", "guidance-distilled"),
    "not a png output": ("generate x -o {jpg}", ".png"),
    "no prompt": ("generate -o {out}", "no prompt"),
    "from a foreign png": ("generate --from {plain} -o {out}", "no fluxion parameters"),
    "from a missing png": ("generate --from {missing} -o {out}", "no such file"),
    "bad strength": ("inpaint -i {ok} --mask {ok} x --strength 0 -o {out}", "strength"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_2(case, bad_files, model_args, capsys):
    template, message = BAD[case]
    argv = [a.format(**bad_files) for a in template.split()]
    preset = ["--preset", "test-klein-base"] if case == "negative guidance" else []  # a model with CFG
    code, _, err = run(capsys, *argv, *model_args, *preset)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"fluxion {argv[0]}: error: "), err
    assert message in lines[0]
    assert not Path(bad_files["out"]).exists()


def test_missing_model_messages(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(M, "embedded_model_dir", lambda name="fluxion-tiny": None)
    code, _, err = run(capsys, "generate", "x", "-o", tmp_path / "o.png")
    assert code == 2 and err.count("\n") == 1 and "no embedded model; pass --model" in err
    code, _, err = run(
        capsys, "generate", "x", "-o", tmp_path / "o.png", "--model", tmp_path / "nope.safetensors"
    )
    assert code == 2 and "no model at" in err


def test_guidance_override_with_permission_warns(tmp_path, model_args, capsys):
    out = tmp_path / "g.png"
    code, _, stderr = run(
        capsys, "generate", "x", "--guidance", 2, "--allow-override", "-o", out, *model_args
    )
    assert code == 0 and "warning: overriding" in stderr and read_params(out)["guidance"] == 2.0


# --- issue 9: what a new user hit --------------------------------------------------------------------------------
def bomb_png(path, width: int = 20000, height: int = 20000) -> str:
    """A PNG whose header declares width x height (a decompression bomb: tiny on disk, 1.2 GB decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * (width * 3)
    body = zlib.compress(row * 8, 9)  # a few rows are enough for the header check to matter
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )
    return str(path)


def one_error_line(code: int, err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"fluxion {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("command", ["data fetch", "data build"])
def test_help_of_nested_subcommands(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command.split(), "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: fluxion {command}")


def test_every_subcommand_documents_its_own_options(capsys):
    """Options generated from the dataclasses: each --help lists them, with the field's comment as help."""
    expect = {
        "generate": [
            "--fp8",
            "--compile",
            "--cuda-graphs",
            "--attention",
            "--quant",
            "--offload",
            "--noise",
            "--generator-device",
            "--negative-prompt",
            "--negative",
            "--lora",
            "1..1000",
        ],
        "edit": ["--image", "--lora", "--fp8"],
        "inpaint": ["--mask", "--strength", "--lora", "--quant"],
        "interactive": ["--outdir", "--lora", "--compile"],
        "eval": ["--out", "--num-typography", "--quick", "JSON report"],
        "train": ["--vae", "--lora-rank", "--steps"],
        "train-lora": ["--rank", "--alpha", "--batch-size"],
    }
    for command, flags in expect.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert all(flag in out for flag in flags), (command, [f for f in flags if f not in out])


def test_eval_out_as_the_model_card_writes_it(tmp_path, capsys):
    """`fluxion eval --out X` (no `--`): options are the subcommand's own. Zero items: only loading and the
    report are exercised here (test_evaluate.py covers the sections)."""
    out = tmp_path / "eval.json"
    zero = ["--num-typography", 0, "--num-colour", 0, "--num-recognition", 0, "--num-edits", 0]
    code, stdout, err = run(capsys, "eval", "--out", out, *zero)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["model"] == "fluxion-tiny" and report["config"]["out"] == str(out) and "wrote" in stdout


BOMB_CASES = {
    "edit -i": "edit -i {bomb} x -o {out}",
    "inpaint -i": "inpaint -i {bomb} --mask {ok} x -o {out}",
    "--from": "generate --from {bomb} -o {out}",
}


@pytest.mark.parametrize("case", BOMB_CASES)
def test_decompression_bomb_is_one_line(case, tmp_path, model_args, capsys):
    files = {
        "bomb": bomb_png(tmp_path / "bomb.png"),
        "ok": picture(tmp_path / "ok.png", 64, 64),
        "out": tmp_path / "o.png",
    }
    argv = [a.format(**files) for a in BOMB_CASES[case].split()]
    line = one_error_line(*run(capsys, *argv, *model_args)[::2], argv[0])
    assert "8192x8192" in line and ("400 MP" in line or "20000x20000" in line)
    assert not (tmp_path / "o.png").exists()


CHECKED_BEFORE_LOADING = {  # (arguments, message); the model does not exist, so loading would fail differently
    "guidance nan": ("generate x --guidance nan -o {out}", "finite"),
    "guidance inf": ("generate x --guidance inf -o {out}", "finite"),
    "guidance 1e30": ("generate x --guidance 1e30 -o {out}", "at most 100"),
    "width 0": ("generate x -W 0 -o {out}", "at least 64"),
    "seed 2**64": (f"generate x --seed {2**64} -o {{out}}", "seed must be in 0..2**64-1"),
    "steps 1001": ("generate x --steps 1001 -o {out}", "at most 1000"),
    "output in a file": ("generate x -o {file}/out.png", "is a file, not a folder"),
    "output is a folder": ("generate x -o {folder}", "is a folder"),
    "device foo": ("generate x --device foo -o {out}", "unknown device 'foo'"),
    "fp8 on cpu": ("generate x --fp8 --device cpu -o {out}", "fp8 needs a CUDA GPU"),
    "graphs with offload": (
        "generate x --cuda-graphs --offload blocks -o {out}",
        "CUDA graphs need resident weights",
    ),
    "fp8 and quant": ("generate x --fp8 --quant int8 -o {out}", "choose one"),
    "cudnn on cpu": ("generate x --attention cudnn --device cpu -o {out}", "needs a CUDA GPU"),
    "bad lora scale": ("generate x --lora {file}:inf -o {out}", "finite"),
    "missing lora": ("generate x --lora {folder}/none.safetensors -o {out}", "LoRA file not found"),
    "invalid utf-8": ("generate caf\udce9 -o {out}", "not valid UTF-8"),
}


@pytest.mark.parametrize("case", CHECKED_BEFORE_LOADING)
def test_checked_before_the_model_loads(case, tmp_path, capsys):
    (tmp_path / "file.png").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    paths = {"out": tmp_path / "o.png", "file": tmp_path / "file.png", "folder": tmp_path / "folder.png"}
    template, message = CHECKED_BEFORE_LOADING[case]
    argv = [a.format(**paths) for a in template.split()]
    code, _, err = run(capsys, *argv, "--model", tmp_path / "no-such-model")
    assert message in one_error_line(code, err, "generate")
    assert not (tmp_path / "o.png").exists()


def test_device_cuda_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, "generate", "x", "--device", "cuda", "-o", tmp_path / "o.png")
    assert "no CUDA device here" in one_error_line(code, err, "generate")


@pytest.mark.parametrize("flag", [["--vae", "ae.safetensors"], ["--preset", "flux2-klein-4b"]])
def test_vae_or_preset_with_the_embedded_model(flag, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "x", *flag, "-o", tmp_path / "o.png")
    assert "the embedded fluxion-tiny brings its own" in one_error_line(code, err, "generate")


def test_long_prompt_and_far_size_are_stated(tmp_path, model_args, capsys):
    code, _, err = run(
        capsys, "generate", " ".join(["cat"] * 80), "--seed", 1, "-o", tmp_path / "o.png", *model_args
    )
    lines = [line for line in err.splitlines() if "warning" in line]
    assert code == 0 and len(lines) == 1 and "tokens are dropped" in lines[0], err


def test_all_black_mask_is_a_note(tmp_path, model_args, capsys):
    src = picture(tmp_path / "src.png", 64, 64, 3)
    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")
    out = tmp_path / "o.png"
    code, _, err = run(
        capsys,
        "inpaint",
        "-i",
        src,
        "--mask",
        tmp_path / "black.png",
        "x",
        "-o",
        out,
        "--no-watermark",
        *model_args,
    )
    assert code == 0 and "fluxion inpaint: note: the mask is all black" in err
    assert np.array_equal(pixels(out), pixels(src))


def test_true_cfg_at_guidance_1_says_so(tmp_path, model_args, capsys):
    out = tmp_path / "o.png"
    argv = ["generate", "x", "--guidance", 1, "--negative-prompt", "blur", "-o", out, *model_args]
    code, _, err = run(capsys, *argv, "--preset", "test-klein-base")
    notes = [line for line in err.splitlines() if ": note: " in line]
    assert code == 0 and len(notes) == 1 and "classifier-free guidance off" in notes[0], err


def test_noise_modes_and_negative_alias(tmp_path, model_args, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    common = ["x", "-n", 2, "--seed", 4, "--generator-device", "cpu", *model_args]
    assert run(capsys, "generate", *common, "--noise", "diffusers", "-o", a)[0] == 0
    assert run(capsys, "generate", *common, "-o", b)[0] == 0
    first = output_paths(a, 2)
    assert read_params(first[1])["noise"] == "diffusers" and read_params(first[1])["seed"] == 4
    assert (
        "noise" not in read_params(output_paths(b, 2)[1]) and read_params(output_paths(b, 2)[1])["seed"] == 5
    )
    assert not np.array_equal(pixels(first[1]), pixels(output_paths(b, 2)[1]))
    # --from keeps the noise mode: the batch's first image alone draws the same noise (a CPU generator's draw
    # of [1, ...] is the start of its [2, ...] draw); a batch of 1 vs 2 rounds a few pixels one level apart.
    again = tmp_path / "again.png"
    assert run(capsys, "generate", "--from", first[0], "-o", again, *model_args)[0] == 0
    diff = np.abs(pixels(again).astype(int) - pixels(first[0]).astype(int))
    assert read_params(again)["noise"] == "diffusers" and diff.max() <= 2 and diff.mean() < 0.1
    code, _, err = run(capsys, "generate", "--from", first[1], "-o", again, *model_args)
    assert code == 0 and "image 2 of a --noise diffusers batch of 2" in err


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A LoRA for the test model written by fluxion.lora.save_lora (random, non-zero up weights)."""
    import torch

    from fluxion.lora import inject_lora, save_lora
    from fluxion.model.transformer import Flux2

    model = Flux2(KLEIN.transformer)
    inject_lora(model, rank=4, alpha=4, targets=["*img_attn.qkv", "*linear1"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_lora(model, path)
    return str(path)


def test_lora_is_applied_recorded_and_honoured_by_from(tmp_path, model_args, lora_file, capsys):
    plain, styled, again = tmp_path / "plain.png", tmp_path / "styled.png", tmp_path / "again.png"
    assert run(capsys, "generate", "x", "--seed", 2, "-o", plain, *model_args)[0] == 0
    code, _, err = run(
        capsys, "generate", "x", "--seed", 2, "--lora", f"{lora_file}:0.5", "-o", styled, *model_args
    )
    assert code == 0, err
    assert read_params(styled)["loras"] == [{"path": lora_file, "scale": 0.5}]
    assert not np.array_equal(pixels(plain), pixels(styled))
    assert run(capsys, "generate", "--from", styled, "-o", again, *model_args)[0] == 0
    assert (
        np.array_equal(pixels(again), pixels(styled))
        and read_params(again)["loras"] == read_params(styled)["loras"]
    )


def test_quant_int8_fast_path_runs_on_cpu(tmp_path, model_args, capsys):
    out = tmp_path / "q.png"
    code, _, err = run(
        capsys, "generate", "x", "--seed", 1, "--quant", "int8", "--offload", "model", "-o", out, *model_args
    )
    assert code == 0, err
    assert Image.open(out).size == (64, 64)


def test_result_save_keeps_metadata(tmp_path):
    result = Result(Image.new("RGB", (64, 64)), 5, {"prompt": "p", "seed": 5})
    path = result.save(tmp_path / "r.png")
    assert read_params(path)["seed"] == 5 and read_params(path)["prompt"] == "p"
    assert not list(tmp_path.glob(".*.part"))  # written to a temporary name, then renamed


def test_train_recipe_without_vae(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "fluxion-tiny"\ndata = ["d"]\nout = "o"\n')
    code, _, err = run(capsys, "train", recipe)
    line = one_error_line(code, err, "train")
    assert "sets no vae" in line and "--vae" in line


@pytest.fixture(scope="module")
def lora_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_data")
    for i in range(2):
        picture(folder / f"{i}.png", 64, 64, i)
        (folder / f"{i}.txt").write_text(f"picture {i}")
    return str(folder)


def test_train_lora_into_a_finished_or_other_rank_run(tmp_path, files, lora_data, capsys):
    """A real 1-step run leaves a rank-4 checkpoint; another --rank, or a finished folder, is one line."""
    from fluxion.train.train import TrainConfig
    from fluxion.train.train import main as train

    out = tmp_path / "run"
    base = dict(model=KLEIN.name, data=(lora_data,), out=str(out), vae=files["vae"], text=files["text"])
    train(
        TrainConfig(
            **base, init=files["model"], steps=3, batch_size=1, lora_rank=4, max_steps_this_run=1, warmup=1
        )
    )
    argv = [
        "train-lora",
        "--data",
        lora_data,
        "--out",
        out,
        "--model",
        files["model"],
        "--preset",
        KLEIN.name,
    ]
    argv += ["--vae", files["vae"], "--text", files["text"], "--steps", 3, "--batch-size", 1]
    code, _, err = run(capsys, *argv, "--rank", 8)
    assert "unfinished rank-4 LoRA run" in one_error_line(code, err, "train-lora")
    code, stdout, err = run(capsys, *argv, "--rank", 4)  # the same rank resumes and finishes
    assert code == 0 and (out / "lora.safetensors").is_file(), err
    code, _, err = run(capsys, *argv, "--rank", 4)
    assert "already holds a finished LoRA" in one_error_line(code, err, "train-lora")


def test_repl_survives_a_bomb_and_ctrl_c(tmp_path, model_args, capsys, monkeypatch):
    """!load of a decompression bomb is one error line; Ctrl-C during a generation (KeyboardInterrupt raised
    from inside the denoising loop, where a real SIGINT lands) stops it, and the session goes on."""
    import fluxion.cli as cli

    interrupted = []

    def progress():
        def update(step, total, seconds):
            if not interrupted:
                interrupted.append(step)
                raise KeyboardInterrupt

        return update

    monkeypatch.setattr(cli, "progress_bar", progress)
    bomb = bomb_png(tmp_path / "bomb.png")
    lines = [f"!load {bomb}", "a red apple", "a blue apple", "!quit"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out, _ = run(capsys, "interactive", "--outdir", tmp_path / "s", "--seed", 1, *model_args)
    assert code == 0
    assert "error:" in out and "400 MP" in out and "8192x8192" in out
    assert "interrupted; nothing saved" in out
    assert [p.name for p in sorted((tmp_path / "s").glob("*.png"))] == ["image-0001.png"]
    assert "$1 " in out and not list((tmp_path / "s").glob(".*.part"))


@pytest.mark.slow
def test_ctrl_c_in_generate_exits_130_without_files(tmp_path):
    """A real SIGINT to a real `fluxion generate` (the embedded model, 1000 steps: minutes if not stopped)."""
    import signal
    import time

    out = tmp_path / "o.png"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fluxion.cli", "generate", "x", "--steps", "1000", "-n", "2", "-o", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, seen = time.monotonic() + 240, ""
    while "denoising" not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += proc.stderr.readline()
    assert "denoising" in seen, seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_embedded_path_imports_no_transformers(tmp_path):
    """The [tiny] extra has no transformers: generating with the embedded model must not import it."""
    code = (
        "import sys; from fluxion.cli import main; "
        f"rc = main(['generate', 'a red heart', '-o', {str(tmp_path / 'h.png')!r}, '--steps', '1', '--seed', '1']); "
        "print(rc, sorted(m for m in ('transformers', 'diffusers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout + done.stderr


def test_import_fluxion_is_light_and_exports_the_api():
    code = (
        "import sys, fluxion; light = 'torch' not in sys.modules; "
        "names = [n for n in ('generate', 'load_models', 'Request', 'Result', 'AccelOptions', 'load_lora') "
        "if n not in dir(fluxion)]; r = fluxion.Request(prompt='x'); print(light, names, type(r).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "[]", "Request"], done.stdout + done.stderr


def test_threads_follow_the_free_cores(monkeypatch):
    import torch

    from fluxion.cli import configure_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1e6, 0.0, 0.0))  # a machine full of other work
    try:
        assert configure_threads(torch.device("cpu"), None) == 1 == torch.get_num_threads()
        assert configure_threads(torch.device("cpu"), 2) == 2
        with pytest.raises(ValueError, match="at least 1"):
            configure_threads(torch.device("cpu"), 0)
    finally:
        torch.set_num_threads(before)


def test_busy_elsewhere_leaves_out_this_process():
    """Hand computation: 1.8 CPU-seconds busy on our cores over 1 s, 0.9 of them ours -> 0.9 cores elsewhere."""
    from fluxion.cli import CpuUse, busy_elsewhere

    assert busy_elsewhere(CpuUse(0.0, 10.0, 1.0), CpuUse(1.0, 11.8, 1.9)) == pytest.approx(0.9)
    assert busy_elsewhere(CpuUse(0.0, 10.0, 1.0), CpuUse(0.1, 10.2, 1.0)) is None  # too short to tell


def test_threads_drop_when_other_processes_fill_the_cores(monkeypatch):
    """Real load: one busy process per core during the measured window -> 1 thread (not the load average,
    which would take a minute to notice them)."""
    import time

    import torch

    from fluxion.cli import configure_threads, cpu_use

    start = cpu_use()
    if start is None:
        pytest.skip("no /proc/stat here")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # the fallback would say: all free
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.3)  # started (interpreter up, spinning)
        since = cpu_use()
        time.sleep(0.6)
        assert configure_threads(torch.device("cpu"), None, since) == 1 == torch.get_num_threads()
    finally:
        for p in spinners:
            p.kill()
            p.wait()
        torch.set_num_threads(before)


def test_one_commands_parser_has_the_full_parsers_options(capsys):
    """`main` builds only the invoked command's options; each command's help is the full parser's."""
    from fluxion.cli import build_parser

    for command in COMMANDS:
        helps = []
        for parser in (build_parser(command), build_parser()):
            with pytest.raises(SystemExit):
                parser.parse_args([command, "--help"])
            helps.append(capsys.readouterr().out)
        assert helps[0] == helps[1], command


def test_cold_generate_imports_only_what_it_runs(tmp_path):
    """The embedded model's `fluxion generate` in a fresh process (as the console script runs it): no compiler
    stack (torch._dynamo / sympy: ~1.1 s of start-up), no trainer or curation modules; the GC is on again after
    start-up and the objects of the imports are frozen."""
    out = tmp_path / "h.png"
    code = (
        "import gc, sys; from fluxion.cli import main; "
        f"sys.argv = ['fluxion', 'generate', 'a red heart', '-o', {str(out)!r}, '--steps', '1', '--seed', '1']; "
        "rc = main(); "
        "heavy = [m for m in ('torch._dynamo', 'sympy', 'fluxion.train.train', 'fluxion.curate') if m in sys.modules]; "
        "print(rc, heavy, gc.isenabled(), gc.get_freeze_count() > 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split("\n")[-2] == "0 [] True True", done.stdout + done.stderr
    assert out.is_file()


def test_edit_of_a_large_photo_fits_the_model_with_a_note(tmp_path, capsys):
    """The embedded fluxion-tiny (made for 128²) editing a 1024x768 photo: the output is scaled to what the
    model handles (not a 0.8 MP generation on a CPU), and the reference is resized, each with a note."""
    photo = picture(tmp_path / "photo.png", 1024, 768, 7)
    out = tmp_path / "e.png"
    code, _, err = run(capsys, "edit", "-i", photo, "make it blue", "--steps", 1, "--seed", 1, "-o", out)
    assert code == 0, err
    w, h = Image.open(out).size
    assert w * h <= 256 * 256 and abs(w / h - 4 / 3) < 0.02
    assert f"note: the output is {w}x{h}" in err and "note: reference image 1 is 1024x768; resized" in err


def test_repl_with_a_lora_records_it(tmp_path, model_args, lora_file, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a red apple\n"))
    code, _, err = run(capsys, "interactive", "--outdir", tmp_path, "--lora", lora_file, *model_args)
    assert code == 0, err
    assert read_params(tmp_path / "image-0001.png")["loras"] == [{"path": lora_file, "scale": 1.0}]
