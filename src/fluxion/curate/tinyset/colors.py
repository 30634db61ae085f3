"""Named colours, hex codes and contrast checks for the synthetic tiny dataset.

Every colour in a caption is written both as a name and as an exact ``#RRGGBB`` code, and the code is
exactly the rendered pixel value (backgrounds are flat, so a model can learn the mapping hex -> pixel).
Names come from a small palette of common colour words; a sampled colour is the palette entry plus a
small random jitter, named after its nearest palette entry.
"""

from __future__ import annotations

import numpy as np

# (name, hex). Mostly CSS colour values so that "dodger blue (#1E90FF)" means what it says.
PALETTE: tuple[tuple[str, str], ...] = (
    ("red", "#FF0000"),
    ("dark red", "#8B0000"),
    ("crimson", "#DC143C"),
    ("tomato", "#FF6347"),
    ("coral", "#FF7F50"),
    ("salmon", "#FA8072"),
    ("orange", "#FFA500"),
    ("dark orange", "#FF8C00"),
    ("gold", "#FFD700"),
    ("yellow", "#FFFF00"),
    ("khaki", "#F0E68C"),
    ("olive", "#808000"),
    ("lime", "#00FF00"),
    ("light green", "#90EE90"),
    ("green", "#008000"),
    ("forest green", "#228B22"),
    ("dark green", "#006400"),
    ("sea green", "#2E8B57"),
    ("teal", "#008080"),
    ("turquoise", "#40E0D0"),
    ("cyan", "#00FFFF"),
    ("sky blue", "#87CEEB"),
    ("light blue", "#ADD8E6"),
    ("dodger blue", "#1E90FF"),
    ("royal blue", "#4169E1"),
    ("blue", "#0000FF"),
    ("navy", "#000080"),
    ("indigo", "#4B0082"),
    ("purple", "#800080"),
    ("violet", "#EE82EE"),
    ("lavender", "#E6E6FA"),
    ("magenta", "#FF00FF"),
    ("orchid", "#DA70D6"),
    ("pink", "#FFC0CB"),
    ("hot pink", "#FF69B4"),
    ("deep pink", "#FF1493"),
    ("maroon", "#800000"),
    ("brown", "#8B4513"),
    ("chocolate", "#D2691E"),
    ("tan", "#D2B48C"),
    ("beige", "#F5F5DC"),
    ("cream", "#FFFDD0"),
    ("white", "#FFFFFF"),
    ("light gray", "#D3D3D3"),
    ("gray", "#808080"),
    ("slate gray", "#708090"),
    ("dark gray", "#404040"),
    ("black", "#000000"),
)

WHITE = "#FFFFFF"
_NAMES = [n for n, _ in PALETTE]
_RGB = np.array([[int(h[i : i + 2], 16) for i in (1, 3, 5)] for _, h in PALETTE], dtype=np.float64)


def hex_to_rgb(hex_code: str) -> tuple[int, int, int]:
    h = hex_code.lstrip("#")
    if len(h) != 6:
        raise ValueError(f"not a #RRGGBB colour: {hex_code!r}")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def rgb_to_hex(rgb) -> str:
    r, g, b = (int(c) for c in rgb)
    return f"#{r:02X}{g:02X}{b:02X}"


def color_name(hex_code: str) -> str:
    """Nearest palette name (RGB distance weighted roughly like the eye: green counts most)."""
    d = (_RGB - np.array(hex_to_rgb(hex_code), dtype=np.float64)) ** 2 @ np.array([0.3, 0.59, 0.11])
    return _NAMES[int(np.argmin(d))]


def luminance(hex_code: str) -> float:
    """WCAG relative luminance in [0, 1]."""
    c = np.array(hex_to_rgb(hex_code), dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(c @ np.array([0.2126, 0.7152, 0.0722]))


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio, 1 (same) .. 21 (black on white)."""
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def sample_color(
    rng: np.random.Generator, *, jitter: int = 18, exclude: tuple[str, ...] = (), off_palette: float = 0.0
) -> str:
    """A palette colour, half the time exact and otherwise jittered by up to ``jitter`` per channel; with
    probability ``off_palette`` instead any sRGB colour (uniform), named after its nearest palette entry.

    The name of the result (``color_name``) is never one of ``exclude``.
    """
    if off_palette and rng.random() < off_palette:
        while True:
            hex_code = rgb_to_hex(rng.integers(0, 256, 3))
            if color_name(hex_code) not in exclude:
                return hex_code
    while True:
        name, hex_code = PALETTE[int(rng.integers(len(PALETTE)))]
        if name in exclude:
            continue
        if rng.random() < 0.5:
            rgb = np.clip(np.array(hex_to_rgb(hex_code)) + rng.integers(-jitter, jitter + 1, 3), 0, 255)
            hex_code = rgb_to_hex(rgb)
        if color_name(hex_code) not in exclude:
            return hex_code


def sample_contrasting(
    rng: np.random.Generator, others: list[str], min_ratio: float, *, exclude: tuple[str, ...] = ()
) -> str:
    """A colour whose contrast with every colour in ``others`` is at least ``min_ratio``."""
    for _ in range(200):
        c = sample_color(rng, exclude=exclude)
        if all(contrast(c, o) >= min_ratio for o in others):
            return c
    # Rare fallback (e.g. mid-grey backgrounds with a high ratio): the better of black and white.
    return max(("#000000", WHITE), key=lambda c: min(contrast(c, o) for o in others))


def describe(hex_code: str, rng: np.random.Generator | None = None) -> str:
    """Caption phrase naming a colour twice: 'dodger blue (#1E90FF)' (or 'dodger blue #1E90FF')."""
    if rng is not None and rng.random() < 0.2:
        return f"{color_name(hex_code)} {hex_code}"
    return f"{color_name(hex_code)} ({hex_code})"


def with_article(phrase: str) -> str:
    """'a red circle', 'an orange star' (by spelling only, which suits colour and shape names)."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase
