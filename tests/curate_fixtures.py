"""Generated curation data with planted truth: distinct base images, near-duplicates of some of them, corrupt and
odd files, blurry / flat / dark images and watermarked ones. `make_planted` writes an image folder with sidecar
captions and returns what was planted where."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fluxion.curate.watermark import HELD_OUT_REGION, Synth, sklearn_photos

FONTS = (
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerifCondensed-Italic.ttf",
)  # not the watermark model's training fonts


def base_image(rng: np.random.Generator, side: int = 192) -> Image.Image:
    """A busy, distinct image: a textured background and several random shapes (no two alike)."""
    noise = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(noise).resize((side, side), Image.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(4, 9))):
        x0, y0 = (int(v) for v in rng.integers(-20, side, 2))
        x1, y1 = x0 + int(rng.integers(20, side // 2)), y0 + int(rng.integers(20, side // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        [d.ellipse, d.rectangle][int(rng.integers(2))]((x0, y0, x1, y1), fill=fill)
    for _ in range(int(rng.integers(2, 5))):
        d.line(
            tuple(int(v) for v in rng.integers(0, side, 4)),
            fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
            width=3,
        )
    return im


def jpeg(im: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def near_duplicate(im: Image.Image, kind: int) -> bytes:
    w, h = im.size
    if kind == 0:  # downscaled, recompressed
        return jpeg(im.resize((w * 3 // 4, h * 3 // 4), Image.BILINEAR), 70)
    if kind == 1:  # slightly brighter
        return jpeg(Image.fromarray(np.clip(np.asarray(im, np.int16) + 12, 0, 255).astype(np.uint8)), 85)
    if kind == 2:  # 2% cropped off each border (pHash moves ~2-3 bits per 1% cropped: 4% can reach 16 bits)
        return png(im.crop((w // 50, h // 50, w - w // 50, h - h // 50)))
    return jpeg(im, 40)  # heavy recompression


def bomb_png(side: int = 30000) -> bytes:
    """A valid PNG header declaring side x side pixels (900 MP) with a tiny body: decoders must refuse it."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@dataclass
class Planted:
    base: list[str] = field(default_factory=list)
    duplicates: dict[str, str] = field(default_factory=dict)  # duplicate key -> its original's key
    corrupt: list[str] = field(default_factory=list)
    normalised: dict[str, str] = field(default_factory=dict)  # key -> what was odd (kept after normalising)
    invalid: dict[str, str] = field(default_factory=dict)  # key -> expected drop reason prefix (decode)
    blurry: list[str] = field(default_factory=list)
    flat: list[str] = field(default_factory=list)
    dark: list[str] = field(default_factory=list)
    watermarked: list[str] = field(default_factory=list)
    clean_for_watermark: list[str] = field(
        default_factory=list
    )  # unmarked photo crops, the watermark negatives
    exif_rotated: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> expected (w, h)


def make_planted(
    folder: Path, n_base: int = 40, n_dups: int = 12, n_marked: int = 0, seed: int = 0
) -> Planted:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = Planted()

    def put(key: str, data: bytes, ext: str, caption: str = "") -> None:
        (folder / f"{key}{ext}").write_bytes(data)
        (folder / f"{key}.txt").write_text(caption or f"image {key}")

    bases = {}
    for i in range(n_base):
        key = f"base{i:03d}"
        bases[key] = base_image(rng)
        put(key, jpeg(bases[key], 92), ".jpg")
        truth.base.append(key)
    for i in range(n_dups):
        orig = truth.base[i]
        key = f"dup{i:03d}"
        data = near_duplicate(bases[orig], i % 4)
        put(key, data, ".png" if data[:4] == b"\x89PNG" else ".jpg")
        truth.duplicates[key] = orig
    # Corrupt: truncated JPEG, random bytes, a PNG with a broken body.
    good = jpeg(base_image(rng))
    put("corrupt_trunc", good[: len(good) // 2], ".jpg")
    put("corrupt_noise", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), ".jpg")
    broken = bytearray(png(base_image(rng)))
    broken[60:200] = bytes(140)
    put("corrupt_png", bytes(broken), ".png")
    truth.corrupt += ["corrupt_trunc", "corrupt_noise", "corrupt_png"]
    put("bomb", bomb_png(), ".png")
    truth.invalid["bomb"] = "decompression bomb"
    put("tiny", png(base_image(rng).resize((40, 40))), ".png")
    truth.invalid["tiny"] = "too small"
    put("banner", png(base_image(rng, 192).resize((600, 100))), ".png")
    truth.invalid["banner"] = "aspect"
    # Odd but valid: CMYK JPEG, 16-bit greyscale PNG, RGBA PNG, EXIF-rotated JPEG.
    put("cmyk", jpeg(base_image(rng).convert("CMYK")), ".jpg")
    grad = (np.linspace(0, 65535, 160 * 160).reshape(160, 160)).astype(np.uint16)
    noise16 = (rng.random((160, 160)) * 20000).astype(np.uint16)
    put(
        "gray16",
        png(Image.fromarray(np.clip(grad.astype(np.int64) // 2 + noise16, 0, 65535).astype(np.uint16))),
        ".png",
    )
    rgba = base_image(rng).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (192, 192), dtype=np.uint8)))
    put("rgba", png(rgba), ".png")
    truth.normalised.update({"cmyk": "CMYK", "gray16": "I;16", "rgba": "RGBA"})
    tall = base_image(rng, 192).resize((120, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display: stored 120x200 shows as 200x120
    put("exif_rot", jpeg(tall, exif=exif.tobytes()), ".jpg")
    truth.exif_rotated["exif_rot"] = (200, 120)
    # Technical quality.
    for i in range(4):
        put(f"blur{i}", jpeg(base_image(rng).filter(ImageFilter.GaussianBlur(6)), 92), ".jpg")
        truth.blurry.append(f"blur{i}")
        c = tuple(int(v) for v in rng.integers(30, 220, 3))
        put(f"flat{i}", png(Image.new("RGB", (160, 160), c)), ".png")
        truth.flat.append(f"flat{i}")
        dark = Image.fromarray((np.asarray(base_image(rng), np.float32) * 0.02).astype(np.uint8))
        put(f"dark{i}", png(dark), ".png")
        truth.dark.append(f"dark{i}")
    # Watermarks (fonts and photo regions the classifier never saw); the same number of clean images as negatives.
    if n_marked:
        synth = Synth(sklearn_photos(), FONTS, np.random.default_rng(seed + 100), HELD_OUT_REGION)
        for i in range(2 * n_marked):
            im = synth.background()
            key = f"{'wm' if i % 2 == 0 else 'clean'}{i:03d}"
            if i % 2 == 0:
                im = synth.watermark(im)
                truth.watermarked.append(key)
            else:
                truth.clean_for_watermark.append(key)
            put(key, jpeg(im, 92), ".jpg")
    return truth


def precision_recall(predicted: set[str], truth: set[str]) -> tuple[float, float]:
    tp = len(predicted & truth)
    return tp / max(1, len(predicted)), tp / max(1, len(truth))
