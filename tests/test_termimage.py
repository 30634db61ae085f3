"""Terminal images: protocol choice from the environment, and each encoding decodes back to the picture."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from fluxion.termimage import TerminalPreview, blocks, detect_protocol, iterm, kitty, sixel


@pytest.fixture
def picture():
    a = np.zeros((20, 30, 3), np.uint8)
    a[:10, :, 0] = 255  # red top half
    a[10:, :, 2] = 255  # blue bottom half
    return Image.fromarray(a)


def test_protocol_detection():
    assert detect_protocol({"KITTY_WINDOW_ID": "1"}) == "kitty"
    assert detect_protocol({"TERM_PROGRAM": "iTerm.app"}) == "iterm"
    assert detect_protocol({"TERM": "xterm-256color"}) == "blocks"
    assert detect_protocol({"FLUXION_TERM_IMAGES": "sixel", "KITTY_WINDOW_ID": "1"}) == "sixel"
    with pytest.raises(ValueError, match="must be one of"):
        detect_protocol({"FLUXION_TERM_IMAGES": "jpeg"})


def test_kitty_and_iterm_carry_the_png(picture):
    payload = "".join(re.findall(r"\x1b_G[^;]*;([^\x1b]*)\x1b\\", kitty(picture)))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(payload)))), np.asarray(picture))
    b64 = re.search(r":([A-Za-z0-9+/=]+)\x07", iterm(picture)).group(1)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))), np.asarray(picture))


def test_sixel_bands_and_palette(picture):
    s = sixel(picture, colors=4)
    assert s.startswith("\x1bPq") and s.rstrip().endswith("\x1b\\")
    assert s.count("-") == -(-20 // 6)  # one band per 6 rows
    colours = dict(re.findall(r"#(\d+);2;(\d+;\d+;\d+)", s))
    assert "100;0;0" in colours.values() and "0;0;100" in colours.values()


def test_blocks_colours_and_redraw(picture):
    text = blocks(picture, width=6)
    assert "38;2;255;0;0" in text.splitlines()[0] and "48;2;0;0;255" in text.splitlines()[-1]
    out = io.StringIO()
    p = TerminalPreview(out, "blocks", width=6)
    p.show(picture, "step 1/2")
    p.show(picture, "step 2/2")
    assert f"\x1b[{text.count(chr(10)) + 1}A" in out.getvalue()  # second frame drawn over the first
