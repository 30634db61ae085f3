"""Perceptual hashes in numpy alone: pHash (imagehash's DCT hash, 64 bits) and PDQ (Meta's, 256 bits + quality).

Our own implementations of the published algorithms, so curation needs neither scipy (imagehash's DCT) nor a
compiled extension (pdqhash has no wheel for every Python): the same code, and so the same hashes, on every
machine. tests/test_curate_hashes.py checks them against imagehash and pdqhash.

pHash: luminance resized to 32x32 with Lanczos (Pillow), the 2-D DCT-II, its 8x8 lowest frequencies (DC
included), one bit per coefficient: above their median.

PDQ (Meta's "pdqhash-2017-10-09" description and its reference code): luminance 0.299 R + 0.587 G + 0.114 B; a
tent filter made of two rounds of 1-D box filters along rows then columns, each window about 1/128 of the side
(`_box` says which pixels a window holds), clipped at the borders; point-sampled to 64x64 at pixel centres; the DCT rows 1..16 (DC skipped) on both
axes (16x16 coefficients); one bit per coefficient: above the 128th smallest. Quality: the sum of quantised
neighbour differences of the 64x64 image (0..100); low values mean a flat image whose hash says little.

Coefficients are rounded to 1e-6 before thresholding: on flat images every AC coefficient is float noise around
zero, and rounding makes those bits the same on every CPU and BLAS (all zero) instead of noise.
"""

from __future__ import annotations

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


def _box(x: np.ndarray, window: int, axis: int, at: np.ndarray | None = None) -> np.ndarray:
    """PDQ's 1-D box filter along `axis` (0 or 1) of a 2-D array: output i averages inputs
    i - (window - window // 2 - 1) .. i + window // 2, clipped to the array (fewer terms at the borders).
    `at`: compute only these outputs (the last round feeds only the 64 sampled rows and columns)."""
    n = x.shape[axis]
    if window <= 1:
        return x if at is None else np.take(x, at, axis=axis)
    left, right = window - (window + 2) // 2, (window + 2) // 2 - 1
    shape = list(x.shape)
    shape[axis] = n + 1
    c = np.zeros(shape, np.float64)  # c[k] = sum of x[:k] along the axis
    np.cumsum(x, axis=axis, out=c[(slice(None),) * axis + (slice(1, None),)])
    i = np.arange(n) if at is None else at
    lo, hi = np.maximum(i - left, 0), np.minimum(i + right, n - 1) + 1
    count = (hi - lo).astype(np.float64)
    if at is not None:
        count = count[:, None] if axis == 0 else count[None, :]
        return (np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)) / count
    # All outputs: the differences of the prefix sums at two offsets, as slices (no gather).
    take = lambda a, b: c[(slice(None),) * axis + (slice(a, b),)]  # noqa: E731
    out = np.concatenate(
        [
            take(right + 1, right + 1 + left),
            take(left + right + 1, n + 1),
            np.repeat(take(n, n + 1), right, axis),
        ],
        axis=axis,
    ) - np.concatenate([np.repeat(take(0, 1), left, axis), take(0, n - left)], axis=axis)
    out /= count[:, None] if axis == 0 else count[None, :]
    return out


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
        along_rows, along_cols = (
            (cols + 127) // 128,
            (rows + 127) // 128,
        )  # PDQ's window: a side / 128, rounded up
        ri = ((np.arange(64) + 0.5) * rows / 64).astype(np.int64)  # the 64 x 64 samples: pixel centres
        ci = ((np.arange(64) + 0.5) * cols / 64).astype(np.int64)
        # Two x-then-y rounds of box filters (a tent filter); the second only where the samples need it.
        x = _box(_box(luma, along_rows, axis=1), along_cols, axis=0)
        small = _box(_box(x, along_rows, axis=1, at=ci), along_cols, axis=0, at=ri)
    grad = np.abs(np.trunc(np.diff(small, axis=0) * 100 / 255)).sum()
    grad += np.abs(np.trunc(np.diff(small, axis=1) * 100 / 255)).sum()
    quality = min(100, int(grad) // 90)
    coeffs = _PDQ_DCT @ small @ _PDQ_DCT.T  # [16, 16]
    median = np.sort(coeffs.ravel())[127]  # the 128th smallest of 256, as PDQ's Torben median
    bits = _bits_above_median(coeffs, median).ravel()[::-1]
    return np.packbits(bits).tobytes().hex(), quality
