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


def test_a_phash_match_that_pdq_calls_far_apart_is_not_a_pair():
    """With require="any", pHash alone (distance <= 10) used to make a pair; at 100k images that gave ~0.7 % false
    drops whose PDQ distance was 76-120 bits. A PDQ distance above pdq_veto now refuses the pHash match, while a
    crop (pHash close, PDQ 46-64 apart) and a copy (both close) still pair."""
    import numpy as np

    from fluxion.curate.dedup import DedupConfig, dedup

    def pdq_with_distance(base: np.ndarray, bits: int, first: int = 0) -> np.ndarray:
        out = base.copy()
        for b in range(first, first + bits):  # flip `bits` bits from bit `first` on, across the four words
            out[b // 64] ^= np.uint64(1) << np.uint64(b % 64)
        return out

    rng = np.random.default_rng(0)
    base_p = int(rng.integers(0, 2**62))
    base_q = rng.integers(0, 2**63, size=4, dtype=np.uint64)
    # image 0; 1: a copy (pHash 2 bits, PDQ 10); 2: a crop (pHash 6, PDQ 60); 3: unrelated (pHash 8, PDQ 100)
    phash = np.array([base_p, base_p ^ 0b11, base_p ^ 0b111111, base_p ^ 0b11111111], np.int64)
    # image 3 flips the last 100 PDQ bits: 100 from 0, 110 from 1, 160 from 2 (pHash 8, 6 and 2 bits)
    pdq = np.stack(
        [
            base_q,
            pdq_with_distance(base_q, 10),
            pdq_with_distance(base_q, 60),
            pdq_with_distance(base_q, 100, 156),
        ]
    )
    pairs = {tuple(p) for p in dedup(DedupConfig(), phash, pdq, np.arange(4)).pairs.tolist()}
    assert (0, 1) in pairs and (0, 2) in pairs
    assert not any(3 in p for p in pairs)
    no_veto = {tuple(p) for p in dedup(DedupConfig(pdq_veto=0), phash, pdq, np.arange(4)).pairs.tolist()}
    assert (0, 3) in no_veto  # the old rule: pHash alone makes the pair
