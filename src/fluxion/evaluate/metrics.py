"""Plain numpy measures used by the evaluation: colour difference, PSNR over a region, string similarity.

Colour difference is CIEDE2000 (ΔE00) on CIELAB under D65, from sRGB. Rough reading: < 1 invisible, 2-3 just
noticeable side by side, ~5 clearly a different shade, > 20 a different colour (red vs orange is ~25-30).
"""

from __future__ import annotations

import numpy as np

from fluxion.curate.tinyset.colors import hex_to_rgb

# sRGB (D65) -> XYZ, IEC 61966-2-1; the reference white is D65 with Y = 1.
_SRGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_D65 = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb) -> np.ndarray:
    """sRGB in 0..255 ([..., 3], any numeric type) -> CIELAB [..., 3] (L in 0..100)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = (c @ _SRGB_TO_XYZ.T) / _D65
    eps = (6 / 29) ** 3
    f = np.where(t > eps, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def ciede2000(lab1, lab2) -> np.ndarray:
    """CIEDE2000 colour difference between CIELAB arrays [..., 3] (Sharma, Wu & Dalal 2005; kL = kC = kH = 1)."""
    L1, a1, b1 = np.moveaxis(np.asarray(lab1, dtype=np.float64), -1, 0)
    L2, a2, b2 = np.moveaxis(np.asarray(lab2, dtype=np.float64), -1, 0)
    C_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    G = 0.5 * (1 - np.sqrt(C_mean**7 / (C_mean**7 + 25.0**7)))
    a1p, a2p = (1 + G) * a1, (1 + G) * a2
    C1p, C2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    dL, dC = L2 - L1, C2p - C1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(C1p * C2p == 0, 0.0, dh)
    dH = 2 * np.sqrt(C1p * C2p) * np.sin(np.radians(dh / 2))
    L_mean, Cp_mean = (L1 + L2) / 2, (C1p + C2p) / 2
    h_sum = h1p + h2p
    h_mean = np.where(
        C1p * C2p == 0,
        h_sum,
        np.where(
            np.abs(h1p - h2p) <= 180, h_sum / 2, np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2)
        ),
    )
    T = (
        1
        - 0.17 * np.cos(np.radians(h_mean - 30))
        + 0.24 * np.cos(np.radians(2 * h_mean))
        + 0.32 * np.cos(np.radians(3 * h_mean + 6))
        - 0.20 * np.cos(np.radians(4 * h_mean - 63))
    )
    d_theta = 30 * np.exp(-(((h_mean - 275) / 25) ** 2))
    R_C = 2 * np.sqrt(Cp_mean**7 / (Cp_mean**7 + 25.0**7))
    S_L = 1 + 0.015 * (L_mean - 50) ** 2 / np.sqrt(20 + (L_mean - 50) ** 2)
    S_C = 1 + 0.045 * Cp_mean
    S_H = 1 + 0.015 * Cp_mean * T
    R_T = -np.sin(np.radians(2 * d_theta)) * R_C
    return np.sqrt((dL / S_L) ** 2 + (dC / S_C) ** 2 + (dH / S_H) ** 2 + R_T * (dC / S_C) * (dH / S_H))


def delta_e(rgb1, rgb2) -> float | np.ndarray:
    """CIEDE2000 between sRGB colours given as 0..255 triples ([..., 3]) or '#RRGGBB' strings."""
    a = np.array(hex_to_rgb(rgb1)) if isinstance(rgb1, str) else np.asarray(rgb1)
    b = np.array(hex_to_rgb(rgb2)) if isinstance(rgb2, str) else np.asarray(rgb2)
    d = ciede2000(rgb_to_lab(a), rgb_to_lab(b))
    return float(d) if d.ndim == 0 else d


def region_color(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """Per-channel median of the pixels of uint8 [H, W, 3] `image` where `mask` [H, W] is true (None if empty).

    The median, not the mean: a shape drawn a few pixels off leaves some background inside the mask, and the
    median ignores such a minority where a mean would blend it in."""
    if not mask.any():
        return None
    return np.median(image[mask].astype(np.float64), axis=0)


def border_color(image: np.ndarray, width: int = 4) -> np.ndarray:
    """Per-channel median of the `width`-px frame of uint8 [H, W, 3] `image`: its background, for flat scenes."""
    frame = np.ones(image.shape[:2], bool)
    frame[width:-width, width:-width] = False
    return region_color(image, frame)


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Binary erosion with a 3x3 square, `steps` times (pixels outside the image count as false)."""
    m = mask.astype(bool)
    for _ in range(steps):
        p = np.pad(m, 1, constant_values=False)
        h, w = m.shape
        m = np.logical_and.reduce([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
    return m


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB between uint8 images [H, W, 3], over the pixels where `mask` [H, W] is true (all if None).
    Identical pixels give 100 dB rather than infinity, so that means stay finite."""
    d = a.astype(np.float64) - b.astype(np.float64)
    if mask is not None:
        d = d[mask]
    mse = float(np.mean(d**2)) if d.size else 0.0
    return 100.0 if mse < 1e-10 else 10 * np.log10(255.0**2 / mse)


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalize_text(text: str) -> str:
    """Case-folded, whitespace collapsed: what OCR exact match compares (font case is a style, not an error)."""
    return " ".join(text.casefold().split())


def char_similarity(expected: str, read: str) -> float:
    """1 - Levenshtein distance / length of the longer string, on normalised text; 1 = identical, 0 = nothing
    in common (an empty reading of a non-empty word scores 0)."""
    a, b = normalize_text(expected), normalize_text(read)
    if not a and not b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))
