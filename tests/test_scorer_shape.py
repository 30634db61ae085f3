"""The scorer's shape check: colour_blob keeps an image's colours, area and place and removes its shape;
blob_test measures whether a scorer prefers the real image to its blob for the image's own caption."""

import numpy as np
import torch
from PIL import Image, ImageDraw

from fluxion.evaluate.scorer import colour_blob


def _star(size=64, bg=(255, 255, 255), fg=(250, 200, 20)) -> np.ndarray:
    im = Image.new("RGB", (size, size), bg)
    pts = []
    for k in range(10):
        r = 24 if k % 2 == 0 else 10
        a = np.pi / 2 + k * np.pi / 5
        pts.append((32 + r * np.cos(a), 30 - r * np.sin(a)))
    ImageDraw.Draw(im).polygon(pts, fill=fg)
    return np.asarray(im)


def test_colour_blob_keeps_colour_area_and_place_but_not_shape():
    star = _star()
    x = torch.from_numpy(star.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    blob = colour_blob(x)
    fg_star = (x - 1).abs().amax(1) > 0.24  # non-white
    fg_blob = (blob - 1).abs().amax(1) > 0.24
    assert abs(int(fg_blob.sum()) - int(fg_star.sum())) < 0.08 * int(fg_star.sum())  # same area
    ys, xs = torch.nonzero(fg_star[0], as_tuple=True)
    yb, xb = torch.nonzero(fg_blob[0], as_tuple=True)
    assert (
        abs(ys.float().mean() - yb.float().mean()) < 1.5 and abs(xs.float().mean() - xb.float().mean()) < 1.5
    )
    colour = blob[0, :, fg_blob[0]].mean(1)
    want = torch.tensor([250, 200, 20]) / 127.5 - 1
    assert (colour - want).abs().max() < 0.05  # the star's colour
    assert not torch.equal(fg_blob, fg_star)  # a disc, not a star
    assert torch.allclose(blob[0, :, 0, 0], torch.ones(3))  # the background stays


def test_recolour_changes_hue_but_keeps_background_brightness_and_unselected_images():
    from fluxion.evaluate.scorer import _recolour

    x = torch.from_numpy(_star(fg=(170, 100, 60)).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    x = x.repeat(8, 1, 1, 1)
    which = torch.tensor([True] * 7 + [False])
    y = _recolour(x, which, torch.Generator().manual_seed(0))
    assert torch.equal(y[7], x[7])  # not selected: untouched
    assert torch.allclose(y[:, :, :3, :3], torch.ones(8, 3, 3, 3))  # the white background stays
    inside = (slice(None), slice(None), 30, 32)  # a pixel inside the star (fully foreground)
    # A rotation about the grey axis, a channel permutation and grey all keep the mean of R, G and B
    # (hand computation: (170 + 100 + 60) / 3 = 110; no channel leaves [0, 255] for this colour).
    assert torch.allclose(y[inside].mean(1), torch.full((8,), 110 / 127.5 - 1), atol=1e-5)
    assert (y[inside][:7] - x[inside][:7]).abs().amax(1).gt(0.05).sum() >= 5  # most selected ones changed


def test_only_emoji_without_colour_words_are_recoloured_and_shapes_get_no_blob():
    from fluxion.evaluate.scorer import sample_flags

    records = [
        {"kind": "emoji", "label": "green apple"},
        {"kind": "emoji", "label": "Star"},
        {"kind": "emoji", "label": "black-cat"},
        {"kind": "typography", "text": "GIFT"},
        {"kind": "shape", "shapes": [{"shape": "circle"}]},
    ]
    recolour, blob = sample_flags(records)
    assert recolour.tolist() == [False, True, False, False, False]
    assert blob.tolist() == [True, True, True, True, False]
