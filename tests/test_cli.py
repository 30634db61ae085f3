"""The `fluxion` command line, run in-process through `main([...])` on a tiny random model written to disk in the
BFL layout (transformer.safetensors + ae.safetensors + a text-encoder folder), plus PNG metadata."""

from __future__ import annotations

import io
import json
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
