"""Caption variety at training time, and the held-out phrasings and words that training never sees.

The tinyset's captions come from a few templates that always name a colour as "name (#HEX)", so a model
trained on them learns the template, not the words. `vary_caption` rewrites a caption each time it is drawn:
  - picks the caption or one of its alternative captions;
  - rewrites every colour mention: name only, hex only (upper or lower case, with or without '#'),
    rgb(r, g, b), name and hex in another format, or drops it;
  - replaces layout phrases by synonyms ("in the center" -> "centered", "at the centre", ...);
  - wraps the result the way people type prompts ("draw ...", lower case, no articles, "pls");
  - sometimes quotes the text with single quotes or not at all.
Quoted text keeps its letters and case: it is what must be drawn.

HELD-OUT (evaluation only; `vary_caption` never produces them, the tinyset never renders the words):
  HELDOUT_WORDS       4-5 letter words for OCR exact match;
  HELDOUT_LAYOUT      layout phrasings ("in the middle", ...);
  HELDOUT_TEMPLATES   prompt wrappers as people type them.
"""

from __future__ import annotations

import random
import re

from fluxion.curate.tinyset.colors import PALETTE, hex_to_rgb

# Words of 4-5 letters that the tinyset never renders (typography.sample_text skips them, random letter
# strings are re-drawn when they hit one); fluxion eval reads them back with OCR.
HELDOUT_WORDS = (
    "bloom", "crisp", "plume", "frost", "amber", "vivid", "quilt", "zebra", "jolly", "nexus",
    "orbit", "pluto", "relic", "spark", "tulip", "vapor", "waltz", "yacht", "blaze", "charm",
    "lynx", "glow", "husk", "jade", "kiwi", "mint", "nova", "opal", "plum", "quiz",
    "rust", "silk", "tide", "urn", "veil", "wisp", "yarn", "zinc", "fern", "gust",
)  # fmt: skip

# Layout phrasings kept for evaluation (training uses LAYOUT_SYNONYMS instead).
HELDOUT_LAYOUT = {
    "center": ("in the middle", "right in the middle of the image"),
    "left": ("over on the left side",),
    "right": ("over on the right side",),
    "top": ("up top",),
    "bottom": ("down at the bottom",),
}
LAYOUT_SYNONYMS = {
    "in the center": ("in the center", "in the centre", "centered", "at the center", "in the center of the image"),
    "on the left": ("on the left", "on the left side", "at the left", "to the left"),
    "on the right": ("on the right", "on the right side", "at the right", "to the right"),
    "at the top": ("at the top", "near the top", "at the top of the image"),
    "at the bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
    "in the top left corner": ("in the top left corner", "top left", "in the upper left"),
    "in the top right corner": ("in the top right corner", "top right", "in the upper right"),
    "in the bottom left corner": ("in the bottom left corner", "bottom left", "in the lower left"),
    "in the bottom right corner": ("in the bottom right corner", "bottom right", "in the lower right"),
}  # fmt: skip

# Prompt wrappers as people type them: training set and held-out set are disjoint.
TRAIN_TEMPLATES = (
    "{x}", "{x}", "draw {x}", "an image of {x}", "{x} please", "picture of {x}", "make {x}", "{x}, simple",
    "generate {x}", "i want {x}", "{x} pls", "show {x}",
)  # fmt: skip
HELDOUT_TEMPLATES = ("can you draw {x}", "{x}, thanks", "create a picture showing {x}", "render {x} for me")

_NAMES = sorted((n for n, _ in PALETTE), key=len, reverse=True)
# "dodger blue (#1E90FF)" or "dodger blue #1E90FF" (the two formats the tinyset writes).
_COLOUR = re.compile(r"\b(" + "|".join(map(re.escape, _NAMES)) + r") \(?(#[0-9A-Fa-f]{6})\)?", re.IGNORECASE)
_QUOTED = re.compile(r'("[^"]*")')


def colour_variant(name: str, hex_code: str, rng: random.Random) -> str:
    """One way of writing a colour, given its name and hex (all appear in training)."""
    h = hex_code.upper() if rng.random() < 0.5 else hex_code.lower()
    u = rng.random()
    if u < 0.25:
        return name
    if u < 0.45:
        return h if rng.random() < 0.85 else h.lstrip("#")
    if u < 0.55:
        r, g, b = hex_to_rgb(hex_code)
        return f"rgb({r}, {g}, {b})" if rng.random() < 0.7 else f"rgb({r},{g},{b})"
    if u < 0.9:
        return (f"{name} ({h})", f"{name} {h}", f"{h} {name}", f"{name}, {h}")[rng.randrange(4)]
    return ""  # dropped: the model must also draw without being told the colour


def _outside_quotes(text: str, fn) -> str:
    parts = _QUOTED.split(text)
    return "".join(p if i % 2 else fn(p) for i, p in enumerate(parts))


def vary_caption(record: dict, rng: random.Random, strength: float = 1.0) -> str:
    """A fresh phrasing of an image's caption (see the module docstring); `strength` is the chance that
    any rewriting happens at all (otherwise the stored caption is returned unchanged)."""
    caption = record["caption"]
    if rng.random() >= strength:
        return caption
    options = [caption, *record.get("alt_captions", [])]
    caption = options[rng.randrange(len(options))]

    def rewrite(part: str) -> str:
        part = _COLOUR.sub(lambda m: colour_variant(m.group(1).lower(), m.group(2), rng), part)
        for phrase, synonyms in LAYOUT_SYNONYMS.items():
            if phrase in part:
                part = part.replace(phrase, synonyms[rng.randrange(len(synonyms))])
        if rng.random() < 0.3:  # typed casually: lower case, fewer articles
            part = part.lower()
            if rng.random() < 0.5:
                part = re.sub(r"\b(a|an|the) ", "", part)
        return part

    caption = _outside_quotes(caption, rewrite)
    u = rng.random()
    if u < 0.15:  # other quote marks, or none, as people type them (the letters themselves are kept)
        caption = _QUOTED.sub(
            lambda m: ("'" + m.group(1)[1:-1] + "'") if u < 0.08 else m.group(1)[1:-1], caption
        )
    caption = re.sub(r"\s+", " ", re.sub(r"\(\s*\)|\s+([,.;:])", r"\1", caption)).strip(" ,")
    template = TRAIN_TEMPLATES[rng.randrange(len(TRAIN_TEMPLATES))]
    return template.format(x=caption)
