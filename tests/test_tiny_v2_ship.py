"""Shipping fluxion-tiny v2 as two embedded models (issue 14), as BFL ships klein and klein base: `fluxion-tiny`,
the 4-step guidance-distilled student, and `fluxion-tiny-base`, its 20-step true-CFG teacher.

Assets folders are written here by the real `package()` of runs/fluxion_tiny_v2.py from random tiny-shaped
weights (fp32, no metadata: what the trainer's stage exports look like after the GPU run) and pointed at with
$FLUXION_ASSETS. A v1 folder is written with v1's exact metadata. The expected sampling defaults are klein's
convention as the issue states them (distilled: 4 steps, guidance 1; base: true CFG, 20 steps, guidance 4),
not read from the code under test; transformer calls are counted with a global forward hook.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fluxion.config import TINY_TRANSFORMER, get_preset
from fluxion.metadata import read_params
from fluxion.model.transformer import Flux2
from fluxion.weights.models import load_models, resolve_spec

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "fluxion" / "assets" / "fluxion-tiny"
DISTILLED = ("fluxion-tiny", "distilled", 4, 1.0)
BASE = ("fluxion-tiny-base", "cfg", 20, 4.0)
V1 = ("fluxion-tiny", "cfg", 20, 4.0)  # fluxion-tiny as v1 ships it
V1_METADATA = {"model": "fluxion-tiny", "dtype": "bfloat16"}  # what the shipped v1 transformer carries


def runner():
    """runs/fluxion_tiny_v2.py as a module (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("fluxion_tiny_v2", ROOT / "runs" / "fluxion_tiny_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_weights(seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux2(TINY_TRANSFORMER).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}


def char_weights(seed: int) -> dict[str, torch.Tensor]:
    from fluxion.text.charenc import CharEncoder, CharEncoderConfig

    torch.manual_seed(seed)
    enc = CharEncoder(CharEncoderConfig(context_dim=TINY_TRANSFORMER.context_in_dim))
    return {k: v.detach().clone().contiguous() for k, v in enc.state_dict().items()}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Stage exports as the trainer leaves them: distill (the student) and dpo (the teacher), different weights."""
    work = tmp_path_factory.mktemp("work")
    for stage, seed in (("distill", 1), ("dpo", 2)):
        (work / stage).mkdir()
        save_file(tiny_weights(seed), str(work / stage / "transformer.safetensors"))
        save_file(char_weights(seed), str(work / stage / "charenc.safetensors"), metadata={"heads": "4"})
    return work


@pytest.fixture(scope="module")
def v2(work, tmp_path_factory) -> Path:
    assets = tmp_path_factory.mktemp("assets-v2")
    runner().package(work, assets, "dpo")
    return assets


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> Path:
    """Today's layout: assets/fluxion-tiny only, its transformer with v1's metadata (no guidance_mode)."""
    assets = tmp_path_factory.mktemp("assets-v1")
    folder = assets / "fluxion-tiny"
    folder.mkdir()
    sd = {k: v.to(torch.bfloat16) for k, v in tiny_weights(3).items()}
    save_file(sd, str(folder / "transformer.safetensors"), metadata=V1_METADATA)
    shutil.copy(SHIPPED / "vae.safetensors", folder / "vae.safetensors")
    return assets


@pytest.fixture(scope="module")
def loose(work, tmp_path_factory) -> dict[str, Path]:
    """Tiny-shaped files outside any assets folder, with each kind of metadata a file can carry."""
    root = tmp_path_factory.mktemp("loose")
    sd = load_file(str(work / "dpo" / "transformer.safetensors"))
    out = {"bare": work / "dpo" / "transformer.safetensors"}
    for name, meta in {
        "v1": V1_METADATA,
        "trainer": {"fluxion_model": "fluxion-tiny"},  # a flow-matching export
        "trainer-distill": {"fluxion_model": "fluxion-tiny", "guidance_mode": "distilled"},
    }.items():
        out[name] = root / f"{name}.safetensors"
        save_file(sd, str(out[name]), metadata=meta)
    return out


def summary(spec) -> tuple:
    return spec.name, spec.guidance_mode, spec.default_steps, spec.default_guidance


def metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


# --- packaging ----------------------------------------------------------------------------------------------------
def test_package_writes_two_models_sharing_one_autoencoder(v2, work):
    student, base = v2 / "fluxion-tiny", v2 / "fluxion-tiny-base"
    assert sorted(os.listdir(base)) == ["LICENSE", "charenc.safetensors", "transformer.safetensors"]  # no VAE
    assert (base / "LICENSE").read_bytes() == (SHIPPED / "LICENSE").read_bytes()
    assert sorted(os.listdir(student)) == sorted(
        [
            "transformer.safetensors",
            "charenc.safetensors",
            "vae.safetensors",
            "preview.json",
            "LICENSE",
            "README.md",
        ]
    )
    assert (student / "vae.safetensors").read_bytes() == (SHIPPED / "vae.safetensors").read_bytes()
    for folder, name, guidance, stage in ((student, "fluxion-tiny", "distilled", "distill"), (base, "fluxion-tiny-base", "cfg", "dpo")):  # fmt: skip
        expected = {"model": name, "dtype": "bfloat16", "guidance_mode": guidance}
        assert metadata(folder / "transformer.safetensors") == {**expected, "quantization": "int8_rows"}
        assert metadata(folder / "charenc.safetensors") == {**expected, "heads": "4"}
        # the character encoder in bf16
        packed, trained = load_file(str(folder / "charenc.safetensors")), load_file(str(work / stage / "charenc.safetensors"))  # fmt: skip
        assert packed.keys() == trained.keys()
        assert all(packed[k].dtype == torch.bfloat16 for k in packed)
        assert all(torch.equal(packed[k], trained[k].to(torch.bfloat16)) for k in packed)
        # the transformer: 2-D weights as int8 codes + one fp32 scale per row (from the fp32 weights), the rest bf16
        packed, trained = load_file(str(folder / "transformer.safetensors")), load_file(str(work / stage / "transformer.safetensors"))  # fmt: skip
        matrices = {k for k, v in trained.items() if v.ndim == 2}
        assert matrices and packed.keys() == trained.keys() | {k + "_scale" for k in matrices}
        for k, w in trained.items():
            if k in matrices:
                scale = packed[k + "_scale"].double()
                assert packed[k].dtype == torch.int8 and torch.allclose(scale, w.double().abs().amax(1) / 127)
                assert torch.all(
                    (packed[k].double() * scale[:, None] - w.double()).abs() <= scale[:, None] * 0.501
                )
            else:
                assert packed[k].dtype == torch.bfloat16 and torch.equal(packed[k], w.to(torch.bfloat16))


def test_package_ships_models_without_a_character_encoder(tmp_path):
    """A student distilled from v1 (`--no-char-encoder`: the teacher has none) packages without charenc files,
    and a stale charenc.safetensors from an earlier packaging is removed, so it cannot be loaded beside it."""
    work, assets = tmp_path / "work", tmp_path / "assets"
    for stage, seed in (("distill", 4), ("finetune", 5)):
        (work / stage).mkdir(parents=True)
        save_file(tiny_weights(seed), str(work / stage / "transformer.safetensors"))
    (assets / "fluxion-tiny-base").mkdir(parents=True)
    save_file(char_weights(6), str(assets / "fluxion-tiny-base" / "charenc.safetensors"))
    runner().package(work, assets, "finetune")
    assert sorted(os.listdir(assets / "fluxion-tiny-base")) == ["LICENSE", "transformer.safetensors"]
    assert "charenc.safetensors" not in os.listdir(assets / "fluxion-tiny")
    assert metadata(assets / "fluxion-tiny" / "transformer.safetensors")["guidance_mode"] == "distilled"


def test_package_into_the_folder_it_reads_the_autoencoder_from(work, tmp_path, monkeypatch):
    """Packaging into the package's own assets (as the lead will) must not copy the VAE onto itself, and drops
    a VAE an older package() put into fluxion-tiny-base."""
    run = runner()
    assets = tmp_path / "assets"
    shutil.copytree(SHIPPED, assets / "fluxion-tiny")
    (assets / "fluxion-tiny-base").mkdir()
    shutil.copy(SHIPPED / "vae.safetensors", assets / "fluxion-tiny-base" / "vae.safetensors")
    monkeypatch.setattr(run, "shipped_vae", lambda: str(assets / "fluxion-tiny" / "vae.safetensors"))
    run.package(work, assets, "dpo")
    assert sorted(os.listdir(assets / "fluxion-tiny-base")) == [
        "LICENSE",
        "charenc.safetensors",
        "transformer.safetensors",
    ]
    assert (assets / "fluxion-tiny" / "vae.safetensors").read_bytes() == (
        SHIPPED / "vae.safetensors"
    ).read_bytes()


# --- which preset a tiny-shaped file gets -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "file, expected",
    [
        ("student", DISTILLED),
        ("base", BASE),
        ("bare", BASE),  # no metadata: never distilled -> the safe sampler
        ("v1", BASE),  # v1's metadata names fluxion-tiny but says nothing of guidance
        ("trainer", BASE),
        ("trainer-distill", DISTILLED),
    ],
)
def test_a_tiny_shaped_file_gets_its_preset_from_its_metadata(v2, loose, file, expected, monkeypatch):
    monkeypatch.setenv("FLUXION_ASSETS", str(v2))
    paths = {
        "student": v2 / "fluxion-tiny" / "transformer.safetensors",
        "base": v2 / "fluxion-tiny-base" / "transformer.safetensors",
        **loose,
    }
    spec = resolve_spec(
        paths[file], vae=SHIPPED / "vae.safetensors"
    )  # no --text: MiniLM, as the tiny models use
    assert summary(spec) == expected
    assert spec.text.kind == "minilm"


def test_an_explicit_preset_wins(v2, loose, monkeypatch):
    monkeypatch.setenv("FLUXION_ASSETS", str(v2))
    student = v2 / "fluxion-tiny" / "transformer.safetensors"
    assert summary(resolve_spec(student, "fluxion-tiny-base")) == BASE
    assert summary(resolve_spec(loose["bare"], "fluxion-tiny")) == DISTILLED  # the name means the student now
    assert summary(get_preset("fluxion-tiny")) == DISTILLED
    assert summary(get_preset("fluxion-tiny-base")) == BASE


def test_v1_layout_keeps_todays_meanings(v1, v2, loose, monkeypatch):
    monkeypatch.setenv("FLUXION_ASSETS", str(v1))
    vae = SHIPPED / "vae.safetensors"
    assert summary(get_preset("fluxion-tiny")) == V1
    assert summary(load_models().spec) == V1
    for file in ("bare", "v1", "trainer"):
        assert summary(resolve_spec(loose[file], vae=vae)) == V1
    # a file that says it is distilled is still sampled as one
    assert summary(resolve_spec(v2 / "fluxion-tiny" / "transformer.safetensors", vae=vae)) == DISTILLED
    with pytest.raises(FileNotFoundError, match="this fluxion build ships no fluxion-tiny-base"):
        load_models("fluxion-tiny-base")


# --- the embedded models, loaded --------------------------------------------------------------------------------
def test_base_loads_its_own_weights_and_fluxion_tinys_autoencoder(v2, monkeypatch):
    monkeypatch.setenv("FLUXION_ASSETS", str(v2))
    models = load_models("fluxion-tiny-base")
    assert summary(models.spec) == BASE
    base = load_file(str(v2 / "fluxion-tiny-base" / "transformer.safetensors"))
    student = load_file(str(v2 / "fluxion-tiny" / "transformer.safetensors"))
    own = models.transformer.state_dict()

    def weight(sd, key):  # what an int8_rows file means: codes times row scales
        return sd[key].float() * sd[key + "_scale"][:, None]

    assert torch.allclose(own["img_in.weight"], weight(base, "img_in.weight"), rtol=1e-6, atol=0)
    assert not torch.allclose(own["img_in.weight"], weight(student, "img_in.weight"), atol=1e-3)
    chars = load_file(str(v2 / "fluxion-tiny-base" / "charenc.safetensors"))
    assert torch.equal(models.transformer.char_encoder.proj.weight, chars["proj.weight"].float())
    vae = load_file(str(v2 / "fluxion-tiny" / "vae.safetensors"))  # the one autoencoder file
    sd = models.vae.state_dict()
    assert all(torch.equal(sd[k], v.float()) for k, v in vae.items() if v.is_floating_point())
    assert summary(load_models().spec) == DISTILLED


class Forwards:
    """Batch size of every Flux2 forward while active (a global hook: it observes, it replaces nothing)."""

    def __enter__(self):
        self.batches: list[int] = []

        def hook(module, args):
            if isinstance(module, Flux2):
                self.batches.append(args[0].shape[0])

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def generate(capsys, out, *argv) -> tuple[int, list[int], str]:
    from fluxion.cli import main

    with Forwards() as f:
        code = main(["generate", "a red heart", "-o", str(out), "--device", "cpu", *map(str, argv)])
    return code, f.batches, capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_cli_generate_samples_the_student_by_default_and_the_base_with_cfg(v2, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLUXION_ASSETS", str(v2))
    code, batches, err = generate(capsys, tmp_path / "student.png")
    assert code == 0, err
    assert batches == [1] * 4  # one forward per step, no guidance pass
    params = read_params(tmp_path / "student.png")
    assert (params["model"], params["steps"], params["guidance"]) == ("fluxion-tiny", 4, 1.0)
    # True CFG batches the unconditional and conditional halves into one forward of 2 rows (sampling/denoise.py).
    code, batches, err = generate(capsys, tmp_path / "base.png", "--model", "fluxion-tiny-base")
    assert code == 0, err
    assert batches == [2] * 20
    params = read_params(tmp_path / "base.png")
    assert (params["model"], params["steps"], params["guidance"]) == ("fluxion-tiny-base", 20, 4.0)


def test_cli_v1_layout_samples_cfg_and_refuses_the_base(v1, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLUXION_ASSETS", str(v1))
    code, batches, err = generate(capsys, tmp_path / "v1.png")
    assert code == 0, err
    assert batches == [2] * 20
    assert read_params(tmp_path / "v1.png")["model"] == "fluxion-tiny"
    code, batches, err = generate(capsys, tmp_path / "no.png", "--model", "fluxion-tiny-base")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and batches == [] and not (tmp_path / "no.png").exists()
    assert len(lines) == 1 and "this fluxion build ships no fluxion-tiny-base" in lines[0], err


def test_an_assets_folder_without_fluxion_tiny_names_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLUXION_ASSETS", str(tmp_path / "missing"))
    code, batches, err = generate(capsys, tmp_path / "no.png")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and batches == [] and not (tmp_path / "no.png").exists()
    assert len(lines) == 1 and f"FLUXION_ASSETS={tmp_path / 'missing'} has no fluxion-tiny" in lines[0], err


def test_a_fresh_process_reads_the_switch_from_the_assets_it_is_given(v2, tmp_path):
    """Nothing is decided at import: the console command finds the student through $FLUXION_ASSETS."""
    env = {**os.environ, "FLUXION_ASSETS": str(v2), "PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "cold.png"
    cmd = [
        sys.executable,
        "-m",
        "fluxion.cli",
        "generate",
        "a blue circle",
        "-o",
        str(out),
        "--device",
        "cpu",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    params = read_params(out)
    assert (params["model"], params["steps"], params["guidance"]) == ("fluxion-tiny", 4, 1.0)


def test_serve_names_the_base_and_refuses_it_where_not_shipped(v1, v2, monkeypatch):
    from fluxion.serve.cli import config_from_args, serve_parser
    from fluxion.serve.config import served_models

    cfg = config_from_args(
        serve_parser().parse_args(["--model", "fluxion-tiny", "--model", "fluxion-tiny-base"])
    )
    monkeypatch.setenv("FLUXION_ASSETS", str(v2))
    assert [(s.name, summary(s.spec)) for s in served_models(cfg)] == [("fluxion-tiny", DISTILLED), ("fluxion-tiny-base", BASE)]  # fmt: skip
    monkeypatch.setenv("FLUXION_ASSETS", str(v1))
    with pytest.raises(FileNotFoundError, match="ships no fluxion-tiny-base"):
        served_models(cfg)


# --- the weights this checkout ships ------------------------------------------------------------------------------
def test_the_shipped_assets_are_one_layout_or_the_other(monkeypatch):
    """A guard for dropping in the v2 weights: with assets/fluxion-tiny-base present, fluxion-tiny must be the
    distilled student (packaged by the new package(): `guidance_mode` in its metadata), the base CFG and without
    a VAE of its own; without it, fluxion-tiny is v1 (no guidance_mode) and means true CFG at 20 steps."""
    monkeypatch.delenv("FLUXION_ASSETS", raising=False)
    tiny, base = SHIPPED, SHIPPED.parent / "fluxion-tiny-base"
    if not (tiny / "transformer.safetensors").is_file():
        pytest.skip("this checkout ships no fluxion-tiny")
    if base.exists():
        assert metadata(tiny / "transformer.safetensors").get("guidance_mode") == "distilled"
        assert metadata(base / "transformer.safetensors").get("guidance_mode") == "cfg"
        assert not (base / "vae.safetensors").exists()
        assert (tiny / "charenc.safetensors").is_file() and (base / "charenc.safetensors").is_file()
        assert summary(get_preset("fluxion-tiny")) == DISTILLED
    else:
        assert "guidance_mode" not in metadata(tiny / "transformer.safetensors")
        assert summary(get_preset("fluxion-tiny")) == V1


# --- the trainer's exports ----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distillation_exports_say_they_are_distilled(tmp_path, monkeypatch):
    from fluxion.config import PRESETS
    from fluxion.train.train import TrainConfig
    from fluxion.train.train import main as train
    from train_fixtures import TRAIN_SPEC, build_components

    monkeypatch.setitem(PRESETS, TRAIN_SPEC.name, TRAIN_SPEC)
    parts = build_components(tmp_path)
    common = dict(model=TRAIN_SPEC.name, data=(parts["data"],), vae=parts["vae"], text=parts["text"], steps=1,
                  batch_size=2, warmup=1, log_every=1)  # fmt: skip
    flow = train(TrainConfig(out=str(tmp_path / "flow"), **common))["exported"]
    distill = train(TrainConfig(out=str(tmp_path / "distill"), objective="distill", teacher=flow, init=flow,
                                teacher_steps=2, student_steps=1, **common))["exported"]  # fmt: skip
    assert metadata(flow) == {"fluxion_model": TRAIN_SPEC.name}  # unchanged for every other objective
    assert metadata(distill) == {"fluxion_model": TRAIN_SPEC.name, "guidance_mode": "distilled"}
