"""fluxion.curate: the fluxion-tiny dataset build, on a tiny synthetic sources folder made here."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxion.curate.tinyset.colors import color_name, contrast, hex_to_rgb
from fluxion.curate.tinyset.sources import load_emoji_pack, load_sources, write_emoji_pack
from fluxion.curate.tinyset.tinyset import PlanConfig, build_tinyset, main

FONT_CANDIDATES = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
]
SMALL = PlanConfig(num_scenes=16, num_compose_emoji=3, num_compose_text=3, colored_background_fraction=0.5)
HEX = re.compile(r"#[0-9A-F]{6}")


def _font() -> Path:
    for p in FONT_CANDIDATES:
        if Path(p).is_file():
            return Path(p)
    found = sorted(Path("/usr/share/fonts").rglob("*.ttf")) if Path("/usr/share/fonts").is_dir() else []
    if not found:
        pytest.skip("no TrueType font under /usr/share/fonts")
    return found[0]


def _emoji_png(path: Path, color: tuple[int, int, int], radius: int) -> None:
    yy, xx = np.mgrid[:64, :64]
    rgba = np.zeros((64, 64, 4), np.uint8)
    inside = (yy - 32) ** 2 + (xx - 32) ** 2 < radius**2
    rgba[inside] = (*color, 255)
    Image.fromarray(rgba, "RGBA").save(path)


def _make_sources(root: Path) -> Path:
    """Three emoji (one with two skin tones) in two vendors, labels for one of them, one font."""
    records = [
        {
            "name": "HEAVY BLACK HEART",
            "unified": "2764-FE0F",
            "image": "2764-fe0f.png",
            "short_names": ["heart"],
            "category": "Smileys & Emotion",
            "subcategory": "heart",
            "sort_order": 1,
        },
        {
            "name": "WAVING HAND SIGN",
            "unified": "1F44B",
            "image": "1f44b.png",
            "short_names": ["wave"],
            "category": "People & Body",
            "subcategory": "hand-fingers-open",
            "sort_order": 2,
            "skin_variations": {
                "1F3FB": {"unified": "1F44B-1F3FB", "image": "1f44b-1f3fb.png"},
                "1F3FF": {"unified": "1F44B-1F3FF", "image": "1f44b-1f3ff.png"},
            },
        },
        {
            "name": "ROCKET",
            "unified": "1F680",
            "image": "1f680.png",
            "short_names": ["rocket"],
            "category": "Travel & Places",
            "subcategory": "transport-air",
            "sort_order": 3,
        },
    ]
    (root / "emoji").mkdir(parents=True)
    (root / "emoji" / "emoji.json").write_text(json.dumps(records))
    (root / "emoji" / "labels.json").write_text(
        json.dumps({"2764": {"label": "red heart", "tags": ["love"]}})
    )
    names = ["2764-fe0f.png", "1f44b.png", "1f44b-1f3fb.png", "1f44b-1f3ff.png", "1f680.png"]
    png_dir = root.parent / "png"
    for v, vendor in enumerate(("google", "twitter")):
        (png_dir / vendor).mkdir(parents=True)
        for k, name in enumerate(names):
            _emoji_png(png_dir / vendor / name, (200, 40 * k, 60 * v), 20 + 2 * k + 4 * v)
        images = {p.name: np.asarray(Image.open(p).convert("RGBA")) for p in (png_dir / vendor).glob("*.png")}
        write_emoji_pack(root, vendor, images, source="test")
    (root / "fonts").mkdir()
    font = _font()
    shutil.copyfile(font, root / "fonts" / font.name)
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    return _make_sources(tmp_path_factory.mktemp("curate") / "sources")


@pytest.fixture(scope="module")
def built(sources: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("curate") / "set"
    build_tinyset(sources, out, seed=0, config=SMALL, log=lambda *a: None)
    return out


def _read(out: Path) -> tuple[np.ndarray, list[dict], list[dict], dict]:
    images = np.load(out / "images.npy", mmap_mode="r")
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    edits = [json.loads(line) for line in (out / "edits.jsonl").read_text().splitlines()]
    return images, captions, edits, json.loads((out / "meta.json").read_text())


def test_pack_roundtrip(tmp_path: Path):
    rgba = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 4), dtype=np.uint8)
    rgba[0, :8, :, 3] = 0
    write_emoji_pack(tmp_path, "google", {"b.png": rgba[1], "a.png": rgba[0]})
    back = load_emoji_pack(tmp_path, "google")
    visible = rgba[0, ..., 3] > 0
    assert back["a.png"].shape == (64, 64, 4) and np.array_equal(back["b.png"][..., 3], rgba[1, ..., 3])
    assert np.array_equal(back["a.png"][visible], rgba[0][visible])
    assert not back["a.png"][:8].any()  # invisible pixels are zeroed


def test_colors():
    assert color_name("#1E90FF") == "dodger blue" and color_name("#FE0103") == "red"
    assert contrast("#000000", "#FFFFFF") == pytest.approx(21.0)
    assert hex_to_rgb("#1E90FF") == (30, 144, 255)


def test_shapes_and_counts(built: Path, sources: Path):
    images, captions, edits, meta = _read(built)
    assert images.dtype == np.uint8 and images.shape == (len(captions), 128, 128, 3)
    assert meta["num_images"] == len(captions) and meta["num_edits"] == len(edits)
    assert meta["width"] == meta["height"] == 128 and meta["build"]["seed"] == 0
    # 3 families: (1 + 1 + 2 variants + 1) images per vendor, plus emoji compose targets.
    assert sum(c["kind"] == "emoji" for c in captions) >= 10
    assert {c["kind"] for c in captions} >= {"emoji", "typography"}
    assert set(meta["licenses"]) >= {"Apache-2.0", "CC-BY-4.0"}
    assert len(load_sources(sources).fonts) == 1


def test_captions_match_pixels(built: Path):
    images, captions, _, _ = _read(built)
    for i, rec in enumerate(captions):
        corner = tuple(int(v) for v in images[i, 0, 0])
        assert corner == hex_to_rgb(rec["background"]), (i, rec)
        for cap in [rec["caption"], *rec["alt_captions"]]:
            for h in HEX.findall(cap):  # every hex in a caption is a colour that is really drawn
                drawn = {
                    rec["background"],
                    rec.get("text_color"),
                    *(s["color"] for s in rec.get("shapes", [])),
                }
                assert h in drawn, (h, cap)
            if rec["kind"] in ("typography", "shape") or rec["background"] != "#FFFFFF":
                assert rec["background"] in cap, cap
            if rec["kind"] == "typography":
                assert f'"{rec["text"]}"' in cap and rec["text_color"] in cap, cap
                assert 2 <= len(rec["text"].replace(" ", "")) and len(rec["text"].split()) <= 2
                # the text colour is really on the canvas (anti-aliasing keeps the glyph cores exact)
                assert (images[i] == hex_to_rgb(rec["text_color"])).all(-1).any(), rec
            if rec["kind"] == "shape":
                assert all(s["shape"] in cap and s["color"] in cap for s in rec["shapes"]), cap
    labels = {c.get("label") for c in captions}
    assert "red heart" in labels and "waving hand sign" in labels  # CLDR label, else the Unicode name


def test_edits_valid(built: Path):
    _, captions, edits, _ = _read(built)
    kinds = {e["kind"] for e in edits}
    assert {"skin_tone", "vendor_style", "compose"} <= kinds
    for e in edits:
        assert (
            e["refs"] and all(0 <= i < len(captions) for i in e["refs"]) and 0 <= e["target"] < len(captions)
        )
        assert e["target"] not in e["refs"] and e["caption"]
        ref, tgt = captions[e["refs"][0]], captions[e["target"]]
        if e["kind"] == "skin_tone":
            assert ref["vendor"] == tgt["vendor"] and ref["background"] == tgt["background"]
            assert ref["skin_tone"] != tgt["skin_tone"]
        if e["kind"] == "vendor_style":
            assert ref["vendor"] != tgt["vendor"] and ref["unified"] == tgt["unified"]
            assert tgt["vendor"] in e["caption"]
        if e["kind"] == "compose":
            assert len(e["refs"]) == 2 and tgt["background"] == captions[e["refs"][1]]["background"]
            assert tgt["background"] != ref["background"]
        if e["kind"] == "retext":
            assert f'"{tgt["text"]}"' in e["caption"] and ref["text"] != tgt["text"]
        if e["kind"] == "recolor_background":
            assert tgt["background"] in e["caption"]


def test_deterministic(sources: Path, built: Path, tmp_path: Path):
    # Same seed, different worker count: identical bytes.
    build_tinyset(sources, tmp_path / "a", seed=0, config=SMALL, workers=2, log=lambda *a: None)
    for name in ("images.npy", "captions.jsonl", "edits.jsonl", "meta.json"):
        assert (built / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    build_tinyset(sources, tmp_path / "b", seed=1, config=SMALL, log=lambda *a: None)
    assert (built / "captions.jsonl").read_text() != (tmp_path / "b" / "captions.jsonl").read_text()


def test_cli_sizes_and_limit(sources: Path, tmp_path: Path, capsys):
    argv = [
        "build",
        str(sources),
        str(tmp_path / "out"),
        "--sizes",
        "160x96,96x160",
        "--limit",
        "2",
        "--workers",
        "1",
        "--seed",
        "3",
    ]
    assert main(argv) == 0
    wide, _, _, meta = _read(tmp_path / "out" / "160x96")
    tall, captions, _, _ = _read(tmp_path / "out" / "96x160")
    assert wide.shape[1:] == (96, 160, 3) and tall.shape[1:] == (160, 96, 3) and len(wide) == len(tall)
    assert meta["build"]["limit"] == 2 and sum(c["kind"] != "emoji" for c in captions) <= 2 + 2 * 2
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err  # refuses to overwrite by default
    assert main([*argv, "--overwrite"]) == 0


def test_missing_sources(tmp_path: Path, capsys):
    with pytest.raises(FileNotFoundError, match="fetch"):
        build_tinyset(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="emoji.json"):
        build_tinyset(tmp_path / "empty", tmp_path / "out")
    assert main(["build", str(tmp_path / "nope"), str(tmp_path / "out2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
