"""Images in a terminal: `fluxion generate --preview` and the REPL's `show`.

Protocols, picked from the environment (override with FLUXION_TERM_IMAGES=kitty|iterm|sixel|blocks|none):
- kitty graphics protocol (kitty, WezTerm and Ghostty set KITTY_WINDOW_ID / TERM=xterm-kitty / TERM_PROGRAM):
  PNG bytes, base64, in <= 4096-byte chunks (`a=T,f=100`, `m=1` on every chunk but the last);
- iTerm2 inline images (TERM_PROGRAM=iTerm.app, and WezTerm): one OSC 1337 `File=` sequence with the PNG;
- sixel (xterm -ti vt340, mlterm, foot, Windows Terminal; not detectable from the environment, so opt in);
- otherwise 24-bit colour half blocks: one character cell shows two pixel rows (upper half block, foreground =
  top pixel, background = bottom pixel), which every modern terminal renders.
A preview is redrawn in place: the cursor moves back up over the previous frame before the next one.
"""

from __future__ import annotations

import base64
import io
import os
from typing import TextIO

import numpy as np
from PIL import Image

PROTOCOLS = ("kitty", "iterm", "sixel", "blocks", "none")


def detect_protocol(env: dict | None = None) -> str:
    env = os.environ if env is None else env
    forced = env.get("FLUXION_TERM_IMAGES", "").lower()
    if forced:
        if forced not in PROTOCOLS:
            raise ValueError(f"FLUXION_TERM_IMAGES must be one of {', '.join(PROTOCOLS)}, got {forced!r}")
        return forced
    term, program = env.get("TERM", ""), env.get("TERM_PROGRAM", "")
    if env.get("KITTY_WINDOW_ID") or term == "xterm-kitty" or program in ("ghostty",):
        return "kitty"
    if program in ("iTerm.app", "WezTerm"):
        return "iterm"
    return "blocks"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def kitty(image: Image.Image) -> str:
    data = base64.standard_b64encode(_png(image)).decode()
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    out = []
    for i, chunk in enumerate(chunks):
        more = 1 if i < len(chunks) - 1 else 0
        head = "a=T,f=100," if i == 0 else ""
        out.append(f"\x1b_G{head}m={more};{chunk}\x1b\\")
    return "".join(out) + "\n"


def iterm(image: Image.Image) -> str:
    data = _png(image)
    b64 = base64.standard_b64encode(data).decode()
    return f"\x1b]1337;File=inline=1;size={len(data)};preserveAspectRatio=1:{b64}\x07\n"


def sixel(image: Image.Image, colors: int = 64) -> str:
    """DEC sixel: a palette of up to `colors` entries, then bands of 6 pixel rows, one pass per colour."""
    pal_img = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    idx = np.asarray(pal_img)
    palette = np.asarray(pal_img.getpalette()[: 3 * colors]).reshape(-1, 3)
    h, w = idx.shape
    out = ["\x1bPq", f'"1;1;{w};{h}']
    for c, (r, g, b) in enumerate(palette):
        out.append(f"#{c};2;{r * 100 // 255};{g * 100 // 255};{b * 100 // 255}")
    for top in range(0, h, 6):
        band = idx[top : top + 6]
        for c in np.unique(band):
            bits = np.zeros(w, dtype=np.int64)
            for k in range(band.shape[0]):
                bits |= (band[k] == c).astype(np.int64) << k
            out.append(f"#{c}" + "".join(chr(63 + int(v)) for v in bits) + "$")
        out.append("-")
    out.append("\x1b\\")
    return "".join(out) + "\n"


def blocks(image: Image.Image, width: int = 48) -> str:
    """Half-block rendering `width` cells wide (2 pixel rows per text row)."""
    w, h = image.size
    height = max(2, round(h * width / w / 2) * 2)
    px = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR))
    lines = []
    for y in range(0, height, 2):
        cells = [
            f"\x1b[38;2;{t[0]};{t[1]};{t[2]}m\x1b[48;2;{b[0]};{b[1]};{b[2]}m\u2580"
            for t, b in zip(px[y], px[y + 1])
        ]
        lines.append("".join(cells) + "\x1b[0m")
    return "\n".join(lines) + "\n"


def render(image: Image.Image, protocol: str) -> str:
    return {"kitty": kitty, "iterm": iterm, "sixel": sixel, "blocks": blocks, "none": lambda _: ""}[protocol](
        image
    )


class TerminalPreview:
    """Draws successive frames in place (for per-step previews) on `stream` (stderr in the CLI)."""

    def __init__(self, stream: TextIO, protocol: str | None = None, width: int = 48):
        self.stream, self.protocol, self.width = stream, protocol or detect_protocol(), width
        self._lines = 0

    def show(self, image: Image.Image, caption: str = "") -> None:
        if self.protocol == "none":
            return
        text = blocks(image, self.width) if self.protocol == "blocks" else render(image, self.protocol)
        if caption:
            text += caption + "\n"
        if self._lines and self.protocol == "blocks":
            self.stream.write(f"\x1b[{self._lines}A")  # back over the previous frame
        self.stream.write(text)
        self.stream.flush()
        self._lines = text.count("\n")
