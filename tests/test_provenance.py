"""Watermark and C2PA: the mark survives what images go through (JPEG 80, a 0.5x resize), an unmarked image is not
flagged, and a signed manifest reads back with the model and the action."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from fluxion.provenance import C2PASigner, add_watermark, detect_watermark, sign_c2pa, verify


def scene(seed: int, size: int = 256) -> Image.Image:
    """A generated-looking picture: smooth colour field plus a few flat shapes."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    im = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    from PIL import ImageDraw

    d = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(size // 10, size // 3))
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return im


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=quality)
    return Image.open(io.BytesIO(b.getvalue())).convert("RGB")


@pytest.mark.parametrize("size", [128, 512])
def test_watermark_survives_jpeg_and_resize_and_costs_little(size):
    found = {"plain": 0, "jpeg80": 0, "half": 0, "unmarked": 0}
    psnrs = []
    n = 6
    for seed in range(n):
        im = scene(seed, size)
        marked = add_watermark(im)
        a, b = np.asarray(im, dtype=float), np.asarray(marked, dtype=float)
        psnrs.append(10 * np.log10(255**2 / np.mean((a - b) ** 2)))
        found["plain"] += detect_watermark(marked).found
        found["jpeg80"] += detect_watermark(jpeg(marked, 80)).found
        found["half"] += detect_watermark(marked.resize((size // 2, size // 2), Image.BICUBIC)).found
        found["unmarked"] += detect_watermark(im).found
    assert found["plain"] == n and found["half"] == n
    assert found["jpeg80"] >= n - 1
    assert found["unmarked"] == 0
    assert min(psnrs) > 29  # measured 30.6-36.3 dB on these scenes (the bench reports the mean over 100)


def test_tiny_images_are_refused_with_a_message():
    with pytest.raises(ValueError, match="sides must be >= 64"):
        add_watermark(Image.new("RGB", (48, 200)))


def test_c2pa_manifest_round_trip(tmp_path):
    pytest.importorskip("c2pa")
    from c2pa_certs import make_signing_identity

    chain, key = make_signing_identity()
    marked = add_watermark(scene(0))
    b = io.BytesIO()
    marked.save(b, "PNG")
    signed = sign_c2pa(
        b.getvalue(), "image/png", C2PASigner(chain, key), {"model": "m1", "references": 2}, True
    )
    path = tmp_path / "signed.png"
    path.write_bytes(signed)
    report = verify(path)
    assert report["watermark"]["found"]
    assert report["c2pa"]["actions"] == ["c2pa.created", "c2pa.edited"] and report["c2pa"]["model"] == "m1"
    assert report["c2pa"]["claim_generator"] == ["fluxion"]
    # Any change to the signed bytes breaks the hard binding: add a text chunk before IEND (the PNG still decodes).
    payload = b"Comment\x00changed after signing"
    chunk = (
        len(payload).to_bytes(4, "big") + b"tEXt" + payload + zlib.crc32(b"tEXt" + payload).to_bytes(4, "big")
    )
    iend = signed.rindex(b"IEND") - 4
    path.write_bytes(signed[:iend] + chunk + signed[iend:])
    state = verify(path)["c2pa"]
    assert state is not None and state["validation_state"] != "Valid"
    plain = tmp_path / "plain.png"
    Image.new("RGB", (96, 96)).save(plain)
    assert verify(plain)["c2pa"] is None and not verify(plain)["watermark"]["found"]
