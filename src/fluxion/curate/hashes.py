"""Perceptual hashes in numpy alone: pHash (imagehash's DCT hash, 64 bits) and PDQ (Meta's, 256 bits + quality).

Our own implementations of the published algorithms, so curation needs neither scipy (imagehash's DCT) nor a
compiled extension (pdqhash has no wheel for every Python): the same code, and so the same hashes, on every
machine. tests/test_curate_hashes.py checks them against imagehash and pdqhash.

pHash: luminance resized to 32x32 with Lanczos (Pillow), the 2-D DCT-II, its 8x8 lowest frequencies (DC
included), one bit per coefficient: above their median.

PDQ (Meta's "pdqhash-2017-10-09" description and its reference code): luminance 0.299 R + 0.587 G + 0.114 B; a
tent filter made of two rounds of 1-D box filters along rows then columns, each window about 1/128 of the side
(`_box_span` says which pixels a window holds), clipped at the borders; point-sampled to 64x64 at pixel centres; the DCT rows 1..16 (DC skipped) on both
axes (16x16 coefficients); one bit per coefficient: above the 128th smallest. Quality: the sum of quantised
neighbour differences of the 64x64 image (0..100); low values mean a flat image whose hash says little.

Coefficients are rounded to 1e-6 before thresholding: on flat images every AC coefficient is float noise around
zero, and rounding makes those bits the same on every CPU and BLAS (all zero) instead of noise.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image


def _dct_matrix(rows: range, n: int) -> np.ndarray:
    """cos(pi / (2n) * k * (2j + 1)) for k in rows, j < n: the unnormalised DCT-II basis, float64 [len(rows), n]."""
    k = np.asarray(rows, np.float64)[:, None]
    j = np.arange(n, dtype=np.float64)[None, :]
    return np.cos(np.pi / (2 * n) * k * (2 * j + 1))


_PHASH_DCT = 2.0 * _dct_matrix(range(8), 32)  # scipy's dct type 2 carries the factor 2
_PDQ_DCT = np.sqrt(2.0 / 64) * _dct_matrix(range(1, 17), 64)


def _bits_above_median(coeffs: np.ndarray, median: float) -> np.ndarray:
    return np.round(coeffs, 6) > np.round(median, 6)


def phash(image: Image.Image) -> int:
    """64-bit pHash as a signed int64 (row-major bits, the first the most significant), as
    `imagehash.phash(image)` packs it."""
    small = np.asarray(image.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    low = _PHASH_DCT @ small @ _PHASH_DCT.T  # [8, 8]
    bits = _bits_above_median(low, float(np.median(low))).ravel()
    return int(np.packbits(bits).view(">i8")[0])


def _box_span(i: np.ndarray, n: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """PDQ's 1-D box filter: output i averages inputs lo .. hi - 1, i.e. i - (window - window // 2 - 1) ..
    i + window // 2 clipped to the array (fewer terms at the borders)."""
    left, right = window - (window + 2) // 2, (window + 2) // 2 - 1
    return np.maximum(i - left, 0), np.minimum(i + right, n - 1) + 1


@functools.lru_cache(maxsize=256)
def _tent_sampler(n: int) -> np.ndarray:
    """[64, n]: two passes of the box filter of window ceil(n / 128) along a side of n pixels, then the 64 samples
    at pixel centres. Box filters along rows and along columns commute, so PDQ's x, y, x, y passes are this matrix
    on each side: small = sampler(rows) @ luma @ sampler(cols).T. Row c is the mean, over the inputs k of
    output c's window, of the rows of the box filter at k (built as difference arrays, never n x n)."""
    window = (n + 127) // 128  # PDQ's window: a side / 128, rounded up
    centres = ((np.arange(64) + 0.5) * n / 64).astype(np.int64)
    lo, hi = _box_span(centres, n, window)
    out = np.zeros((64, n + 1))
    for c in range(64):
        k = np.arange(lo[c], hi[c])
        klo, khi = _box_span(k, n, window)
        w = 1.0 / ((hi[c] - lo[c]) * (khi - klo))
        np.add.at(out[c], klo, w)
        np.add.at(out[c], khi, -w)
    return np.cumsum(out, axis=1)[:, :n]


def pdq(image: Image.Image | np.ndarray) -> tuple[str, int]:
    """(256-bit PDQ hash as 64 hex digits, quality 0..100), bit-ordered as `pdqhash.compute` returns its vector
    (packed most significant bit first). Images under 5 pixels a side hash to zero with quality 0."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    rows, cols = rgb.shape[:2]
    if min(rows, cols) < 5:
        return "0" * 64, 0
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114  # float64, as pdqhash's binding
    if (rows, cols) == (64, 64):
        small = luma
    else:
        small = _tent_sampler(rows) @ luma @ _tent_sampler(cols).T
    grad = np.abs(np.trunc(np.diff(small, axis=0) * 100 / 255)).sum()
    grad += np.abs(np.trunc(np.diff(small, axis=1) * 100 / 255)).sum()
    quality = min(100, int(grad) // 90)
    coeffs = _PDQ_DCT @ small @ _PDQ_DCT.T  # [16, 16]
    median = np.sort(coeffs.ravel())[127]  # the 128th smallest of 256, as PDQ's Torben median
    bits = _bits_above_median(coeffs, median).ravel()[::-1]
    return np.packbits(bits).tobytes().hex(), quality
