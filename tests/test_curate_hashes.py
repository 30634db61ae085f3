"""Our numpy pHash and PDQ (fluxion.curate.hashes) against the reference implementations: imagehash (scipy's DCT)
and pdqhash (Meta's C++ code), on generated images of many sizes and aspects, their near-duplicates and greyscale
copies."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curate_fixtures import base_image, near_duplicate
from fluxion.curate.hashes import pdq, phash

imagehash = pytest.importorskip("imagehash")
pdqhash = pytest.importorskip("pdqhash")


def images() -> list[Image.Image]:
    rng = np.random.default_rng(11)
    out = [base_image(rng, int(s)) for s in rng.integers(48, 640, 40)]
    out += [Image.open(io.BytesIO(near_duplicate(out[i], i % 4))).convert("RGB") for i in range(12)]
    out += [im.resize((im.width, max(8, im.height // 3))) for im in out[:8]]  # wide
    out += [im.resize((max(8, im.width // 2), im.height)) for im in out[8:14]]  # tall
    out += [out[0].resize((64, 64)), out[1].resize((7, 9)), out[2].convert("L").convert("RGB")]
    return out


def bits(a: int | str, b: int | str) -> int:
    a, b = (int(v, 16) if isinstance(v, str) else v & (2**64 - 1) for v in (a, b))
    return bin(a ^ b).count("1")


def test_phash_equals_imagehash():
    diffs = []
    for im in images():
        ref = int(np.packbits(imagehash.phash(im).hash.flatten()).view(">i8")[0])
        diffs.append(bits(ref, phash(im)))
    print(
        f"pHash vs imagehash: {sum(d == 0 for d in diffs)}/{len(diffs)} identical, {sum(diffs)} bits differ"
    )
    assert sum(diffs) <= 1  # a coefficient within 1e-6 of the median may round either way


def test_pdq_equals_pdqhash():
    diffs, quality = [], []
    for im in images():
        vec, q = pdqhash.compute(np.asarray(im))
        h, ours = pdq(im)
        diffs.append(bits(np.packbits(vec.astype(np.uint8)).tobytes().hex(), h))
        quality.append(abs(q - ours))
    print(f"PDQ vs pdqhash: {sum(d == 0 for d in diffs)}/{len(diffs)} identical, {sum(diffs)} bits differ")
    assert sum(diffs) <= 2 and max(quality) <= 1
    assert pdq(Image.new("RGB", (4, 40))) == ("0" * 64, 0)  # under PDQ's 5-pixel minimum
