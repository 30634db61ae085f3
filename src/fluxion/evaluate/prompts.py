"""The fixed evaluation sets, drawn with fixed seeds from the tinyset's own generators and caption templates.

Each set is a list of plain dicts, reproducible from (size, seed) alone: no dataset and no font file is needed
to build them. Scenes are specs of `fluxion.curate.tinyset.typography`, so their exact masks (what is background, what
is shape) come from rendering the spec; shape-only scenes render without any font.

- typography: one short word (3-6 letters, the dataset's word lists and case mix) on a flat background;
- colour: one shape in the centre (the largest shape size the data has), colours named with their hex;
- edits: shape scenes with one `recolor_background` or `recolor_shape` edit made by the dataset's own edit
  code (`fluxion.curate.tinyset.edits.scene_edits`), so the instruction wording is in distribution;
- recognition: emoji families held out from the scorer (their names come from the shipped scorer.json).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fluxion.curate.tinyset.colors import WHITE, describe, hex_to_rgb, sample_color, sample_contrasting
from fluxion.curate.tinyset.edits import Plan, scene_edits
from fluxion.curate.tinyset.sources import FONTS, Font
from fluxion.curate.tinyset.typography import (
    ADJECTIVES,
    CENTER_SCALE,
    NOUNS,
    SHAPES,
    TEXT_CONTRAST,
    WORDS,
    render_scene,
    sample_scene,
    scene_captions,
    scene_record,
)

SYSTEM_FONTS = Path("/usr/share/fonts")
EDIT_KINDS = ("recolor_background", "recolor_shape")  # the scene edits with a single, measurable colour
_SEEDS = {"typography": 101, "colour": 102, "edits": 103, "emoji_edits": 104}


def fonts() -> dict[str, Font]:
    """The dataset's fonts by file name (caption metadata only; `path` is where Debian installs the file)."""
    return {
        f.file: Font(SYSTEM_FONTS / f.dir / f.file, f.family, f.style, f.weight, f.license) for f in FONTS
    }


def _word(rng: np.random.Generator) -> str:
    words = [w for w in (*NOUNS, *WORDS) if 3 <= len(w) <= 6 and w not in ADJECTIVES]
    text = words[int(rng.integers(len(words)))]
    case = rng.random()  # the dataset's mix: 30 % UPPER, 30 % Title, 40 % lower
    return text.upper() if case < 0.3 else text.title() if case < 0.6 else text


def typography_set(n: int, seed: int = 0) -> list[dict]:
    """`n` one-word text scenes: {"prompt", "text", "spec"}; no word repeats."""
    rng = np.random.default_rng([_SEEDS["typography"], seed])
    by_name = fonts()
    names = sorted(by_name)
    out, seen = [], set()
    while len(out) < n:
        text = _word(rng)
        if text.lower() in seen:
            continue
        seen.add(text.lower())
        bg = sample_color(rng)
        spec = {
            "type": "scene",
            "bg": bg,
            "layout": "text",
            "shapes": [],
            "text": {
                "text": text,
                "color": sample_contrasting(rng, [bg], TEXT_CONTRAST),
                "font": names[int(rng.integers(len(names)))],
                "fill": 1.0,
            },
        }
        out.append({"prompt": scene_captions(spec, by_name, rng, n=1)[0], "text": text, "spec": spec})
    return out


def colour_set(n: int, seed: int = 0) -> list[dict]:
    """`n` single centred shapes: {"prompt", "background", "color", "shape", "spec"}; shapes cycle through all
    ten kinds so each appears about equally often."""
    rng = np.random.default_rng([_SEEDS["colour"], seed])
    out = []
    for i in range(n):
        bg = sample_color(rng)
        color = sample_contrasting(rng, [bg], 2.0)  # SHAPE_CONTRAST; at least as distinct as in the data
        shape = SHAPES[i % len(SHAPES)]
        spec = {
            "type": "scene",
            "bg": bg,
            "layout": "shapes",
            "text": None,
            "shapes": [{"shape": shape, "color": color, "pos": "center", "scale": CENTER_SCALE}],
        }
        prompt = scene_captions(spec, {}, rng, n=1)[0]
        out.append({"prompt": prompt, "background": bg, "color": color, "shape": shape, "spec": spec})
    return out


def edit_set(n: int, seed: int = 0) -> list[dict]:
    """`n` shape-scene edits, alternating EDIT_KINDS: {"prompt", "kind", "source", "target", "new_color"}
    where source/target are scene specs and new_color the hex the edit asks for."""
    rng = np.random.default_rng([_SEEDS["edits"], seed])
    want = {k: n // len(EDIT_KINDS) + (i < n % len(EDIT_KINDS)) for i, k in enumerate(EDIT_KINDS)}
    got: dict[str, list[dict]] = {k: [] for k in EDIT_KINDS}
    font_list = list(fonts().values())
    while any(len(got[k]) < want[k] for k in EDIT_KINDS):
        plan = Plan()
        spec = sample_scene(rng, font_list)
        while spec["layout"] != "shapes":  # text layouts need a font file to render; shape scenes do not
            spec = sample_scene(rng, font_list)
        i = plan.add_image(spec, scene_record(spec, {}, rng))
        scene_edits(plan, [i], {}, rng, fraction=1.0)
        for e in plan.edits:
            if e["refs"] == [i] and e["kind"] in got and len(got[e["kind"]]) < want[e["kind"]]:
                src, tgt = plan.specs[i], plan.specs[e["target"]]
                new = tgt["bg"] if e["kind"] == "recolor_background" else _changed_shape_color(src, tgt)
                got[e["kind"]].append(
                    {
                        "prompt": e["caption"],
                        "kind": e["kind"],
                        "source": src,
                        "target": tgt,
                        "new_color": new,
                    }
                )
    # Interleave the kinds so that a prefix of the list (a --quick run) has both.
    return [got[k][j] for j in range(max(want.values())) for k in EDIT_KINDS if j < len(got[k])]


def _changed_shape_color(src: dict, tgt: dict) -> str:
    (new,) = [b["color"] for a, b in zip(src["shapes"], tgt["shapes"]) if a["color"] != b["color"]]
    return new


def background_edit_prompts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (instruction, hex) pairs that recolour a white background to a visibly different colour, worded as
    the dataset's recolor_background edits."""
    rng = np.random.default_rng([_SEEDS["emoji_edits"], seed])
    out = []
    while len(out) < n:
        c = sample_color(rng, exclude=("white", "cream", "beige", "lavender", "light gray"))
        if np.linalg.norm(np.array(hex_to_rgb(c)) - np.array(hex_to_rgb(WHITE))) >= 120:
            out.append((f"change the background to {describe(c, rng)}", c))
    return out


def render(spec: dict, size: int = 128) -> np.ndarray:
    """uint8 [size, size, 3] of a scene spec (text scenes need their font installed; shape scenes nothing)."""
    font_dir = None
    if spec["text"] is not None:
        font_dir = fonts()[spec["text"]["font"]].path.parent
    return render_scene(spec, (size, size), font_dir)


_HELDOUT_SEED = 105


def heldout_sets(n: int, seed: int = 0) -> dict[str, list[dict]]:
    """Prompts in phrasings and words training never sees (curate.tinyset.captions: HELDOUT_*):
    "words": a held-out 4-5 letter word to draw, {"prompt", "text"};
    "bare_hex": a plain background given only as a hex code, {"prompt", "background"};
    "name_hex": the same given as "name (#hex)", {"prompt", "background"};
    "layout": a shape placed with a held-out layout phrase, {"prompt", "position", "color", "background"}.
    Colours are drawn from all of sRGB (not only the palette); wrappers are HELDOUT_TEMPLATES."""
    from fluxion.curate.tinyset.captions import HELDOUT_LAYOUT, HELDOUT_TEMPLATES, HELDOUT_WORDS
    from fluxion.curate.tinyset.colors import color_name

    rng = np.random.default_rng([_HELDOUT_SEED, seed])

    def wrap(x: str) -> str:
        return HELDOUT_TEMPLATES[int(rng.integers(len(HELDOUT_TEMPLATES)))].format(x=x)

    words = [w for w in HELDOUT_WORDS if 4 <= len(w) <= 5]
    out: dict[str, list[dict]] = {"words": [], "bare_hex": [], "name_hex": [], "layout": []}
    for i in range(n):
        text = words[(i + seed) % len(words)]
        text = text.upper() if rng.random() < 0.5 else text
        bg = sample_color(rng, off_palette=1.0)
        fg = sample_contrasting(rng, [bg], 7.0)
        out["words"].append(
            {
                "prompt": wrap(f'the word "{text}" in {color_name(fg)} on a {color_name(bg)} background'),
                "text": text,
            }
        )
        bg = sample_color(rng, off_palette=1.0)
        hex_code = bg if rng.random() < 0.5 else bg.lower()
        out["bare_hex"].append({"prompt": wrap(f"a plain {hex_code} background"), "background": bg})
        bg = sample_color(rng, off_palette=1.0)
        out["name_hex"].append(
            {"prompt": wrap(f"a plain {color_name(bg)} ({bg}) background"), "background": bg}
        )
        pos = list(HELDOUT_LAYOUT)[i % len(HELDOUT_LAYOUT)]
        phrase = HELDOUT_LAYOUT[pos][int(rng.integers(len(HELDOUT_LAYOUT[pos])))]
        bg = sample_color(rng)
        color = sample_contrasting(rng, [bg], 3.0)
        shape = SHAPES[i % len(SHAPES)]
        out["layout"].append(
            {
                "prompt": wrap(f"a {color_name(color)} {shape} {phrase} on a {color_name(bg)} background"),
                "position": pos,
                "color": color,
                "background": bg,
            }
        )
    return out
