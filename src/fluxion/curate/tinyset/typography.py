"""Rendered scenes: short words and flat coloured shapes on a flat hex-coloured background.

A scene is a JSON-able spec (what to draw, in size-independent units) so the same plan renders at any
resolution and edits are specs with one field changed. Scenes are drawn at ``SUPERSAMPLE`` times the
output size and box-reduced, which anti-aliases the shape edges and keeps flat areas exactly at their hex.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fluxion.curate.tinyset.captions import HELDOUT_WORDS
from fluxion.curate.tinyset.colors import color_name, describe, sample_color, sample_contrasting, with_article
from fluxion.curate.tinyset.sources import Font

SUPERSAMPLE = 4
TEXT_CONTRAST = 4.5  # WCAG AA for text
SHAPE_CONTRAST = 2.0
MIN_EM = 0.22  # smallest font size (em) that ``fill`` may shrink text to, as a fraction of the short side

# Common, concrete English words of 2-8 letters. Colour words are left out so that a quoted word never
# competes with the colour names in the same caption.
NOUNS = (
    "cat dog sun moon star tree house home book cake coffee tea pizza apple lemon river ocean sea rain snow "
    "cloud storm wind fire light music dance dream smile love world city road garden flower rose bird fish "
    "horse tiger lion bear panda rabbit fox wolf owl bee duck frog bread milk juice candy cookie honey bakery "
    "market shop store cafe park beach forest mountain valley sky planet rocket robot train car bike "
    "boat ship plane bus taxi clock lamp chair table door window key phone radio movie game party team club "
    "school paper letter note story poem song piano guitar drum jazz art design studio photo camera video "
    "news sale deal gift prize winner summer winter spring autumn morning night today weekend holiday friday "
    "monday sunday birthday kitchen recipe pasta soup salad burger taco sushi donut waffle pancake cheese "
    "banana cherry melon mango peach berry corn carrot tomato pepper garlic onion butter sugar salt water "
    "island bridge tower castle palace temple museum library hotel office farm zoo circus magic wizard "
    "dragon knight pirate ninja queen king prince hero ghost monster alien comet galaxy energy power "
    "future past hope joy peace glory chaos echo pixel code data"
).split()
NOUNS = tuple(w for w in NOUNS if w not in HELDOUT_WORDS)
ADJECTIVES = (
    "big small happy sunny bright cool hot cold fresh sweet quiet loud fast slow wild calm brave kind lucky "
    "magic little tiny super new old good best dark soft warm free open royal cosmic urban fancy simple pure "
    "daily modern classic crazy funny gentle proud smart strong young secret hidden golden sleepy hungry"
).split()
WORDS = (
    "hello welcome thanks yes no stop go open closed exit enter push pull sale new free wow cool yay hi bye ok "
    "love peace hope joy relax enjoy smile believe create explore imagine learn play read write think listen "
    "dream shine grow laugh travel cook bake paint sing dance jump run swim fly build rest wake"
).split()
WORDS = tuple(w for w in WORDS if w not in HELDOUT_WORDS)
PHRASES = (
    "hello world",
    "thank you",
    "good luck",
    "open now",
    "big sale",
    "welcome home",
    "good night",
    "good morning",
    "happy day",
    "new year",
    "stay calm",
    "keep going",
    "well done",
    "see you",
    "go team",
    "game over",
    "coming soon",
    "sold out",
    "lets go",
    "be kind",
    "dream big",
    "hot tea",
    "fresh bread",
)
SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "hexagon", "pentagon", "ring", "cross")

# Relative centres (x, y) of the named positions, and how captions say them.
POSITIONS = {
    "center": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "top left": "in the top left corner",
    "top right": "in the top right corner",
    "bottom left": "in the bottom left corner",
    "bottom right": "in the bottom right corner",
}
# Pairs of positions half the image apart, where two shapes of size SHAPE_SCALE[2] cannot overlap.
OPPOSITE_PAIRS = (
    ("left", "right"),
    ("top", "bottom"),
    ("top left", "bottom right"),
    ("top right", "bottom left"),
    ("top left", "top right"),
    ("bottom left", "bottom right"),
    ("top left", "bottom left"),
    ("top right", "bottom right"),
)
# Shape side as a fraction of the shorter image side, by number of shapes in the scene.
SHAPE_SCALE = {1: 0.42, 2: 0.36, 3: 0.22}
CENTER_SCALE = 0.55

# Text boxes (x0, y0, x1, y1) and the shape slot (cx, cy, scale) of the text layouts.
TEXT_BOX = {
    "text": (0.05, 0.12, 0.95, 0.88),
    "text_above_shape": (0.06, 0.05, 0.94, 0.47),
    "shape_above_text": (0.06, 0.53, 0.94, 0.95),
}
SHAPE_SLOT = {"text_above_shape": (0.5, 0.73, 0.4), "shape_above_text": (0.5, 0.27, 0.4)}


# ---------------------------------------------------------------------------------------------------------
# Sampling


OFF_PALETTE = 0.2  # share of backgrounds drawn from all of sRGB, not the 48-colour palette
LETTER_STRINGS = 0.35  # share of single-"word" texts that are random letter strings (letters, not words)
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_STRING_LENGTHS = (1, 2, 3, 4, 5, 6, 7, 8)
_STRING_WEIGHTS = np.array([1, 2, 3, 4, 4, 3, 2, 1], dtype=np.float64) / 20


def random_letters(rng: np.random.Generator) -> str:
    """1-8 random letters (never one of the held-out evaluation words)."""
    while True:
        n = int(rng.choice(_STRING_LENGTHS, p=_STRING_WEIGHTS))
        text = "".join(_LETTERS[int(i)] for i in rng.integers(0, 26, n))
        if text.lower() not in HELDOUT_WORDS:
            return text


def sample_text(rng: np.random.Generator, num_words: int | None = None) -> str:
    num_words = num_words or (1 if rng.random() < 0.6 else 2)
    if num_words == 1 and rng.random() < LETTER_STRINGS:
        text = random_letters(rng)
    elif num_words == 1:
        pool = NOUNS if rng.random() < 0.7 else WORDS
        text = pool[int(rng.integers(len(pool)))]
    elif rng.random() < 0.3:
        text = PHRASES[int(rng.integers(len(PHRASES)))]
    else:
        text = f"{ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]} {NOUNS[int(rng.integers(len(NOUNS)))]}"
    case = rng.random()
    return text.upper() if case < 0.3 else text.title() if case < 0.6 else text


def _sample_shapes(rng: np.random.Generator, bg: str, positions: list[str], scale: float) -> list[dict]:
    shapes, seen = [], set()
    for pos in positions:
        while True:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = sample_contrasting(rng, [bg], SHAPE_CONTRAST)
            if (shape, color_name(color)) not in seen:  # "the red circle" must name one shape
                break
        seen.add((shape, color_name(color)))
        shapes.append({"shape": shape, "color": color, "pos": pos, "scale": scale})
    return shapes


def sample_scene(rng: np.random.Generator, fonts: list[Font]) -> dict:
    """A random scene spec: text only (45 %), text with a shape (20 %) or 1-3 shapes (35 %)."""
    bg = sample_color(rng, off_palette=OFF_PALETTE)
    u = rng.random()
    if u < 0.65:
        layout = "text" if u < 0.45 else ("text_above_shape", "shape_above_text")[int(rng.integers(2))]
        text = sample_text(rng, 1 if layout != "text" and rng.random() < 0.7 else None)
        font = fonts[int(rng.integers(len(fonts)))]
        spec = {
            "type": "scene",
            "bg": bg,
            "layout": layout,
            "shapes": [],
            "text": {
                "text": text,
                "color": sample_contrasting(rng, [bg], TEXT_CONTRAST),
                "font": font.path.name,
                "fill": round(float(rng.uniform(0.75, 1.0)), 3),
            },
        }
        if layout != "text":
            slot = "bottom" if layout == "text_above_shape" else "top"
            spec["shapes"] = _sample_shapes(rng, bg, [slot], SHAPE_SLOT[layout][2])
        return spec
    n = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    names = list(POSITIONS)
    if n == 1:
        positions = [names[int(rng.integers(len(names)))]]
    elif n == 2:
        positions = list(OPPOSITE_PAIRS[int(rng.integers(len(OPPOSITE_PAIRS)))])
        if rng.random() < 0.5:
            positions.reverse()
    else:
        positions = [names[i] for i in rng.choice(len(names), 3, replace=False)]
    scale = CENTER_SCALE if positions == ["center"] else SHAPE_SCALE[n]
    return {
        "type": "scene",
        "bg": bg,
        "layout": "shapes",
        "text": None,
        "shapes": _sample_shapes(rng, bg, positions, scale),
    }


# ---------------------------------------------------------------------------------------------------------
# Captions


def shape_phrase(shape: dict, rng: np.random.Generator, *, article: bool = True) -> str:
    """'a dodger blue (#1E90FF) circle' or 'a circle in dodger blue (#1E90FF)'."""
    c = describe(shape["color"], rng)
    p = f"{c} {shape['shape']}" if rng.random() < 0.6 else f"{shape['shape']} in {c}"
    return with_article(p) if article else p


def short_shape(shape: dict) -> str:
    """How an edit instruction refers to a shape already in the image: 'red circle'."""
    return f"{color_name(shape['color'])} {shape['shape']}"


def text_phrase(text: str, rng: np.random.Generator) -> str:
    noun = "word" if " " not in text else "words"
    # Stored captions always quote the text with '"'; other quotes and none come from training-time
    # variety (captions.vary_caption).
    return f'the {noun} "{text}"' if rng.random() < 0.7 else f'the text "{text}"'


_TEXT_TEMPLATES = (
    "{textp} in {fg} {style} letters on {a_bg} background",
    "{textp} written in {fg} on a plain {bg} background",
    "{a_bg} background with {textp} in {style} {fg} type",
    'typography poster: "{t}" in {family}, {fg} text on {bg}',
    '"{t}" in large {fg} letters, centered, {bg} background',
    'a sign that says "{t}", {fg} {style} text, {bg} background',
)
_TEXT_SHAPE_TEMPLATES = {
    "text_above_shape": (
        "{textp} in {fg} {style} letters above {shp}, on {a_bg} background",
        "{shp} below {textp} written in {fg}, {bg} background",
        '{a_bg} card: "{t}" in {fg} at the top and {shp} underneath',
    ),
    "shape_above_text": (
        "{shp} above {textp} in {fg} {style} letters, on {a_bg} background",
        "{textp} written in {fg} below {shp}, {bg} background",
        '{a_bg} card: {shp} at the top and "{t}" in {fg} underneath',
    ),
}
_SHAPE_TEMPLATES_1 = (
    "{shp} {pos} on {a_bg} background",
    "{a_bg} background with {shp} {pos}",
    "flat {shape} icon {pos}, colour {c}, on {a_bg} background",
)
_SHAPE_TEMPLATES_N = (
    "{list} on {a_bg} background",
    "{n} flat shapes on {a_bg} background: {list}",
    "{a_bg} background with {list}",
)
_NUMBERS = {2: "two", 3: "three"}


def _style(font: Font) -> str:
    weight = {"regular": "", "black": "heavy "}.get(font.weight, font.weight + " ")
    return f"{weight}{font.style}"


def scene_captions(spec: dict, fonts: dict[str, Font], rng: np.random.Generator, n: int = 3) -> list[str]:
    """``n`` different captions; each names the quoted text, every colour (name and hex), shapes and layout."""
    out = []
    layout = spec["layout"]
    if layout == "shapes":
        shapes = spec["shapes"]
        templates = _SHAPE_TEMPLATES_1 if len(shapes) == 1 else _SHAPE_TEMPLATES_N
    else:
        templates = _TEXT_TEMPLATES if layout == "text" else _TEXT_SHAPE_TEMPLATES[layout]
    for i in rng.permutation(len(templates))[:n]:
        f = {"bg": describe(spec["bg"], rng)}
        f["a_bg"] = with_article(f["bg"])
        if spec["text"] is not None:
            font = fonts[spec["text"]["font"]]
            f.update(
                t=spec["text"]["text"],
                textp=text_phrase(spec["text"]["text"], rng),
                fg=describe(spec["text"]["color"], rng),
                style=_style(font),
                family=font.family,
            )
        if layout in SHAPE_SLOT:
            f["shp"] = shape_phrase(spec["shapes"][0], rng)
        elif layout == "shapes" and len(spec["shapes"]) == 1:
            s = spec["shapes"][0]
            f.update(
                shp=shape_phrase(s, rng),
                pos=POSITION_PHRASES[s["pos"]],
                shape=s["shape"],
                c=describe(s["color"], rng),
            )
        elif layout == "shapes":
            parts = [f"{shape_phrase(s, rng)} {POSITION_PHRASES[s['pos']]}" for s in spec["shapes"]]
            f.update(list=", ".join(parts[:-1]) + " and " + parts[-1], n=_NUMBERS[len(parts)])
        cap = templates[i].format(**f)
        out.append(cap[0].upper() + cap[1:] if cap.startswith("a ") and rng.random() < 0.3 else cap)
    return out


def scene_record(spec: dict, fonts: dict[str, Font], rng: np.random.Generator) -> dict:
    caps = scene_captions(spec, fonts, rng)
    rec = {
        "caption": caps[0],
        "alt_captions": caps[1:],
        "source": "rendered:fluxion.curate.tinyset.typography",
        "license": "Apache-2.0",
        "kind": "shape" if spec["text"] is None else "typography",
        "layout": spec["layout"],
        "background": spec["bg"],
        "background_name": color_name(spec["bg"]),
        "shapes": [
            {
                "shape": s["shape"],
                "color": s["color"],
                "color_name": color_name(s["color"]),
                "position": s["pos"],
            }
            for s in spec["shapes"]
        ],
    }
    if spec["text"] is not None:
        font = fonts[spec["text"]["font"]]
        rec.update(
            text=spec["text"]["text"],
            text_color=spec["text"]["color"],
            text_color_name=color_name(spec["text"]["color"]),
            font=font.path.name,
            font_family=font.family,
            font_license=font.license,
        )
    return rec


# ---------------------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=512)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _fit_lines(text: str, path: str, box_w: float, box_h: float) -> tuple[list[str], int]:
    """Largest font size at which ``text`` fits the box, on one line or (two words) two lines."""
    options = [[text]] + ([text.split(" ", 1)] if " " in text else [])
    best = ([text], 1)
    ref = _font(path, 100)
    asc, desc = ref.getmetrics()
    for lines in options:
        width = max(ref.getlength(line) for line in lines)
        height = (asc + desc) * (len(lines) - 0.1)  # ascent-descent boxes, lines slightly overlapping
        size = int(100 * min(box_w / width, box_h / height))
        if size > best[1]:
            best = (lines, size)
    return best


def _draw_text(draw: ImageDraw.ImageDraw, text: dict, box: tuple, path: str, short_side: int) -> None:
    x0, y0, x1, y1 = box
    lines, size = _fit_lines(text["text"], path, x1 - x0, y1 - y0)
    # fill < 1 shrinks big text a little, for variety, but never below a legible em size.
    size = max(int(size * text.get("fill", 1.0)), min(size, round(MIN_EM * short_side)))
    font = _font(path, size)
    asc, desc = font.getmetrics()
    pitch = 0.9 * (asc + desc)
    top = (y0 + y1) / 2 - (pitch * (len(lines) - 1) + asc + desc) / 2
    for i, line in enumerate(lines):
        # Centre each line on its ink (getbbox), not its advance width, so lone capitals sit centred.
        left, _, right, _ = font.getbbox(line, anchor="ls")
        x = (x0 + x1) / 2 - (left + right) / 2
        draw.text((x, top + i * pitch + asc), line, fill=text["color"], font=font, anchor="ls")


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [
            (
                cx + radius * math.cos(phase + 2 * math.pi * k / n),
                cy + radius * math.sin(phase + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    up = -math.pi / 2
    if shape == "triangle":  # equilateral, centred on its bounding box
        return [(cx, cy - r), (cx + r, cy + 0.75 * r), (cx - r, cy + 0.75 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "hexagon":
        return ring(6, r, 0.0)
    if shape == "pentagon":
        return ring(5, r, up)
    if shape == "star":
        outer, inner = ring(5, r, up), ring(5, 0.42 * r, up + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "heart":  # the classic parametric heart, scaled to the box
        ts = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        x = 16 * np.sin(ts) ** 3
        y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        return list(zip(cx + x * r / 17, cy + (y + 2.5) * r / 17))
    raise ValueError(f"unknown polygon shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: dict, cx: float, cy: float, side: float) -> None:
    r = side / 2
    color = shape["color"]
    kind = shape["shape"]
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=color, width=max(1, round(0.32 * r)))
    elif kind == "square":
        draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=color)
    elif kind == "cross":
        a, b = 0.3 * r, r
        draw.rectangle((cx - a, cy - b, cx + a, cy + b), fill=color)
        draw.rectangle((cx - b, cy - a, cx + b, cy + a), fill=color)
    else:
        draw.polygon(_polygon(kind, cx, cy, r), fill=color)


def render_scene(spec: dict, size: tuple[int, int], font_dir) -> np.ndarray:
    """Scene spec -> uint8 [H, W, 3] at ``size`` = (W, H)."""
    w, h = size
    s = SUPERSAMPLE
    W, H = w * s, h * s
    im = Image.new("RGB", (W, H), spec["bg"])
    draw = ImageDraw.Draw(im)
    for shape in spec["shapes"]:
        if spec["layout"] in SHAPE_SLOT:
            cx, cy, _ = SHAPE_SLOT[spec["layout"]]
        else:
            cx, cy = POSITIONS[shape["pos"]]
        _draw_shape(draw, shape, cx * W, cy * H, shape["scale"] * min(W, H))
    if spec["text"] is not None:
        x0, y0, x1, y1 = TEXT_BOX[spec["layout"]]
        _draw_text(
            draw,
            spec["text"],
            (x0 * W, y0 * H, x1 * W, y1 * H),
            str(font_dir / spec["text"]["font"]),
            min(W, H),
        )
    return np.asarray(im.reduce(s))
