"""Edit pairs: reference image(s) + instruction -> target image.

Kinds (``edits.jsonl`` "kind"):
- ``skin_tone``: emoji base -> skin-tone variant, variant -> variant, variant -> default yellow.
- ``vendor_style``: the same emoji in the other vendor's style.
- ``recolor_text``, ``recolor_background``, ``recolor_shape``, ``retext``, ``move``, ``swap``,
  ``remove_shape``, ``add_shape``: one field of a rendered scene changed; each target is a new scene, and
  the reverse instruction (target -> source) is added too, at no extra image cost.
- ``compose`` (two references): the subject of reference 1 on the background colour of reference 2. Its
  target is also used for a one-reference ``recolor_background`` edit with the colour spelled out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from fluxion.curate.tinyset.colors import (
    WHITE,
    color_name,
    contrast,
    describe,
    hex_to_rgb,
    sample_color,
    with_article,
)
from fluxion.curate.tinyset.emoji import emoji_record, tone_phrase
from fluxion.curate.tinyset.sources import Font
from fluxion.curate.tinyset.typography import (
    POSITION_PHRASES,
    POSITIONS,
    SHAPE_CONTRAST,
    TEXT_CONTRAST,
    sample_text,
    scene_record,
    shape_phrase,
    short_shape,
)


@dataclass
class Plan:
    """Everything the build will write, before any pixel is rendered."""

    specs: list[dict] = field(default_factory=list)  # render specs, one per image
    records: list[dict] = field(default_factory=list)  # captions.jsonl rows
    edits: list[dict] = field(default_factory=list)  # edits.jsonl rows
    emoji_of: dict[int, tuple] = field(default_factory=dict)  # image index -> (family, variant, vendor)

    def add_image(self, spec: dict, record: dict) -> int:
        self.specs.append(spec)
        self.records.append(record)
        return len(self.specs) - 1

    def add_edit(self, refs: list[int], target: int, captions: list[str], kind: str) -> None:
        assert all(0 <= i < len(self.specs) for i in [*refs, target]) and target not in refs
        self.edits.append(
            {
                "refs": refs,
                "target": target,
                "caption": captions[0],
                "alt_captions": captions[1:],
                "kind": kind,
            }
        )


def _pick(rng: np.random.Generator, options: list[str], n: int = 3) -> list[str]:
    return [options[i] for i in rng.permutation(len(options))[:n]]


# ---------------------------------------------------------------------------------------------------------
# Emoji edits


def skin_tone_edits(plan: Plan, families: list[dict], index: dict, rng: np.random.Generator) -> None:
    for fam in families:
        for vendor in fam["vendors"]:
            base = index.get((vendor, fam["image"]))
            variants = [
                (v, index[(vendor, v["image"])]) for v in fam["variants"] if (vendor, v["image"]) in index
            ]
            if base is None or not variants:
                continue
            for v, target in variants:
                tone = tone_phrase(v["key"])
                short = tone.rsplit(" skin ", 1)[0]  # "medium-dark" / "light and dark"
                plan.add_edit(
                    [base],
                    target,
                    _pick(
                        rng,
                        [
                            f"make the skin tone {short}"
                            if tone.endswith("tone")
                            else f"make the skin tones {short}",
                            f"change the skin tone to {short}",
                            f"give the {fam['label']} {tone}",
                            f"use the {tone} variant",
                            f"{tone}, same emoji",
                        ],
                    ),
                    "skin_tone",
                )
            # One tone -> tone and one tone -> default pair per family, for variety in the references.
            (v1, i1), (v2, i2) = (
                variants[j] for j in rng.choice(len(variants), 2, replace=len(variants) < 2)
            )
            if i1 != i2:
                plan.add_edit(
                    [i1],
                    i2,
                    _pick(
                        rng,
                        [
                            f"change the skin tone from {tone_phrase(v1['key'])} to {tone_phrase(v2['key'])}",
                            f"make it {tone_phrase(v2['key'])} instead",
                            f"change the skin tone to {tone_phrase(v2['key'])}",
                        ],
                    ),
                    "skin_tone",
                )
            plan.add_edit(
                [i1],
                base,
                _pick(
                    rng,
                    [
                        "remove the skin tone, use the default yellow",
                        "make the skin the default emoji yellow",
                        f"change the {tone_phrase(v1['key'])} to the default yellow",
                    ],
                ),
                "skin_tone",
            )


def vendor_edits(plan: Plan, families: list[dict], index: dict, rng: np.random.Generator) -> None:
    for fam in families:
        present = [v for v in fam["vendors"] if (v, fam["image"]) in index]
        for a in present:
            for b in present:
                if a != b:
                    plan.add_edit(
                        [index[(a, fam["image"])]],
                        index[(b, fam["image"])],
                        _pick(
                            rng,
                            [
                                f"in {b} style",
                                f"redraw this emoji in {b} style",
                                f"make it {b} style",
                                f"convert the {fam['label']} to the {b} emoji style",
                                f"{b} style version",
                            ],
                        ),
                        "vendor_style",
                    )


# ---------------------------------------------------------------------------------------------------------
# Scene edits


MIN_RECOLOR_DISTANCE = 120  # RGB distance between old and new colour, so that a recolour is visible


def _new_color(
    rng: np.random.Generator, old: str, avoid_names: set[str], needs: list[tuple[str, float]]
) -> str | None:
    """A colour visibly unlike ``old``, not named like ``avoid_names``, and with contrast >= ratio
    against each (colour, ratio) of ``needs``."""
    old_rgb = np.array(hex_to_rgb(old))
    for _ in range(200):
        c = sample_color(rng, exclude=tuple(avoid_names | {color_name(old)}))
        far = np.linalg.norm(np.array(hex_to_rgb(c)) - old_rgb) >= MIN_RECOLOR_DISTANCE
        if far and all(contrast(c, o) >= r for o, r in needs):
            return c
    return None


def _match_case(new: str, old: str) -> str:
    return new.upper() if old.isupper() else new.title() if old.istitle() else new.lower()


# Each scene edit: (spec, target spec to modify, rng) -> (forward captions, reverse captions), or None when
# no suitable new value was found. The target starts as a deep copy of the spec.


def _edit_background(spec: dict, tgt: dict, rng: np.random.Generator):
    needs = [(s["color"], SHAPE_CONTRAST) for s in spec["shapes"]]
    if spec["text"] is not None:
        needs.append((spec["text"]["color"], TEXT_CONTRAST))
    tgt["bg"] = _new_color(rng, spec["bg"], set(), needs)
    return None if tgt["bg"] is None else _bg_captions(spec["bg"], tgt["bg"], rng)


def _edit_text_color(spec: dict, tgt: dict, rng: np.random.Generator):
    old, t = spec["text"]["color"], spec["text"]["text"]
    new = tgt["text"]["color"] = _new_color(rng, old, set(), [(spec["bg"], TEXT_CONTRAST)])

    def caps(c: str) -> list[str]:
        return _pick(
            rng,
            [
                f"change the text colour to {describe(c, rng)}",
                f"make the letters {describe(c, rng)}",
                f'recolour "{t}" to {describe(c, rng)}',
                f"paint the text {describe(c, rng)}",
            ],
        )

    return None if new is None else (caps(new), caps(old))


def _edit_text(spec: dict, tgt: dict, rng: np.random.Generator):
    old = new = spec["text"]["text"]
    while new.lower() == old.lower():
        new = _match_case(sample_text(rng, len(old.split())), old)
    tgt["text"]["text"] = new

    def caps(a: str, b: str) -> list[str]:
        return _pick(
            rng,
            [
                f'change the text to "{b}"',
                f'replace "{a}" with "{b}"',
                f'write "{b}" instead of "{a}"',
                f'make it say "{b}"',
            ],
        )

    return caps(old, new), caps(new, old)


def _edit_shape_color(spec: dict, tgt: dict, rng: np.random.Generator):
    k = int(rng.integers(len(spec["shapes"])))
    s = spec["shapes"][k]
    # keep "the <colour> <shape>" unambiguous: no second shape of this kind may get the same colour name
    taken = {color_name(o["color"]) for o in spec["shapes"] if o["shape"] == s["shape"]}
    new = tgt["shapes"][k]["color"] = _new_color(rng, s["color"], taken, [(spec["bg"], SHAPE_CONTRAST)])

    def caps(a: dict, c: str) -> list[str]:
        return _pick(
            rng,
            [
                f"make the {short_shape(a)} {describe(c, rng)}",
                f"change the colour of the {short_shape(a)} to {describe(c, rng)}",
                f"turn the {short_shape(a)} {color_name(c)} ({c})",
            ],
        )

    return None if new is None else (caps(s, new), caps(tgt["shapes"][k], s["color"]))


def _edit_move(spec: dict, tgt: dict, rng: np.random.Generator):
    k = int(rng.integers(len(spec["shapes"])))
    s = spec["shapes"][k]
    free = [p for p in POSITIONS if p not in {o["pos"] for o in spec["shapes"]}]
    new = tgt["shapes"][k]["pos"] = free[int(rng.integers(len(free)))]

    def caps(p: str) -> list[str]:
        where = POSITION_PHRASES[p]
        return _pick(
            rng,
            [
                f"move the {short_shape(s)} to the {p}",
                f"put the {short_shape(s)} {where}",
                f"move the {s['shape']} {where}",
            ],
        )

    return caps(new), caps(s["pos"])


def _edit_swap(spec: dict, tgt: dict, rng: np.random.Generator):
    a, b = spec["shapes"]
    tgt["shapes"][0]["pos"], tgt["shapes"][1]["pos"] = b["pos"], a["pos"]
    caps = _pick(
        rng,
        [
            f"swap the {short_shape(a)} and the {short_shape(b)}",
            f"exchange the positions of the {short_shape(a)} and the {short_shape(b)}",
            "swap the two shapes",
        ],
    )
    return caps, caps  # a swap undoes itself


def _edit_remove(spec: dict, tgt: dict, rng: np.random.Generator):
    s = tgt["shapes"].pop(int(rng.integers(len(spec["shapes"]))))
    where = POSITION_PHRASES[s["pos"]]
    fwd = _pick(
        rng,
        [f"remove the {short_shape(s)}", f"delete the {short_shape(s)}", f"take away the {short_shape(s)}"],
    )
    rev = _pick(rng, [f"add {shape_phrase(s, rng)} {where}", f"draw {shape_phrase(s, rng)} {where}"])
    return fwd, rev


_SCENE_EDITS = {
    "recolor_background": _edit_background,
    "recolor_text": _edit_text_color,
    "retext": _edit_text,
    "recolor_shape": _edit_shape_color,
    "move": _edit_move,
    "swap": _edit_swap,
    "remove_shape": _edit_remove,
}
_REVERSE_KIND = {"remove_shape": "add_shape"}


def _scene_ops(spec: dict) -> list[str]:
    ops = ["recolor_background"]
    if spec["text"] is not None:
        ops += ["recolor_text", "retext"]
    if spec["shapes"]:
        ops.append("recolor_shape")
    if spec["layout"] == "shapes":
        n, pos = len(spec["shapes"]), spec["shapes"][0]["pos"]
        # A single big shape leaves the center only by shrinking, so it is not moved from there;
        # two shapes sit on opposite sides at a size that only allows swapping them.
        ops += {
            1: [] if pos == "center" else ["move"],
            2: ["swap", "remove_shape"],
            3: ["move", "remove_shape"],
        }[n]
    return ops


def _bg_captions(old: str, new: str, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    def caps(a: str, b: str) -> list[str]:
        return _pick(
            rng,
            [
                f"change the background to {describe(b, rng)}",
                f"make the background {describe(b, rng)}",
                f"replace the {color_name(a)} background with {describe(b, rng)}",
                f"use {with_article(describe(b, rng))} background",
            ],
        )

    return caps(old, new), caps(new, old)


def scene_edits(
    plan: Plan, scenes: list[int], fonts: dict[str, Font], rng: np.random.Generator, fraction: float
) -> None:
    """Edit a ``fraction`` of the given scenes once each; every edit also gets its reverse."""
    for i in scenes:
        if rng.random() >= fraction:
            continue
        ops = _scene_ops(plan.specs[i])
        kind = ops[int(rng.integers(len(ops)))]
        tgt = copy.deepcopy(plan.specs[i])
        caps = _SCENE_EDITS[kind](plan.specs[i], tgt, rng)
        if caps is None:
            continue
        j = plan.add_image(tgt, scene_record(tgt, fonts, rng))
        plan.add_edit([i], j, caps[0], kind)
        plan.add_edit([j], i, caps[1], _REVERSE_KIND.get(kind, kind))


# ---------------------------------------------------------------------------------------------------------
# Multi-reference edits


def compose_edits(
    plan: Plan,
    emoji_images: list[int],
    text_scenes: list[int],
    backgrounds: list[int],
    fonts: dict[str, Font],
    rng: np.random.Generator,
    *,
    num_emoji: int,
    num_text: int,
) -> None:
    """Subject of reference 1 on the background colour of reference 2 (a new target image each)."""
    if not backgrounds:
        return
    for n, subjects in ((num_emoji, emoji_images), (num_text, text_scenes)):
        if not subjects:
            continue
        for i in rng.choice(len(subjects), size=n, replace=n > len(subjects)):
            ref1 = subjects[int(i)]
            spec1 = plan.specs[ref1]
            for _ in range(50):
                ref2 = backgrounds[int(rng.integers(len(backgrounds)))]
                bg = plan.specs[ref2]["bg"]
                ok = color_name(bg) != color_name(spec1["bg"]) and bg != WHITE
                if spec1["type"] == "scene":
                    ok = ok and contrast(bg, spec1["text"]["color"]) >= TEXT_CONTRAST
                if ok:
                    break
            else:
                continue
            if spec1["type"] == "emoji":
                fam, variant, vendor = plan.emoji_of[ref1]
                spec, record = emoji_record(fam, variant, vendor, bg, rng)
                target = plan.add_image(spec, record)
                plan.emoji_of[target] = (fam, variant, vendor)
                subject = f"{record['label']} emoji"
            else:
                spec = dict(copy.deepcopy(spec1), bg=bg)
                target = plan.add_image(spec, scene_record(spec, fonts, rng))
                subject = f'text "{spec1["text"]["text"]}"'
            plan.add_edit(
                [ref1, ref2],
                target,
                _pick(
                    rng,
                    [
                        f"put the {subject} from image 1 on the background colour of image 2",
                        f"the {subject} from the first image on the {describe(bg, rng)} background of the second image",
                        f"combine: the {subject} of image 1 with the background colour of image 2",
                        "place the subject of the first image on the background of the second",
                    ],
                ),
                "compose",
            )
            plan.add_edit([ref1], target, _bg_captions(spec1["bg"], bg, rng)[0], "recolor_background")
