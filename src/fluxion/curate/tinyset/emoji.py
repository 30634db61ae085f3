"""Emoji images and captions: emoji-datasource records + CLDR labels -> families, captions, pixels.

A *family* is one base emoji with its skin-tone variants. All images of a family (both vendors, all tones)
share one background colour so that skin-tone and vendor edit pairs differ only in what the instruction says.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from fluxion.curate.tinyset.colors import WHITE, color_name, describe, hex_to_rgb, with_article
from fluxion.curate.tinyset.sources import NPM_PACKAGES, VENDORS, Sources

# Fitzpatrick modifiers as keyed in emoji-datasource's skin_variations.
TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}

# Emoji side as a fraction of the shorter image side (the 64 px images are upscaled to it).
EMOJI_FILL = 0.8


def tone_phrase(key: str | None) -> str | None:
    """'1F3FB' -> 'light skin tone'; '1F3FB-1F3FF' -> 'light and dark skin tones'; None -> None."""
    if key is None:
        return None
    tones = [TONES[k] for k in key.split("-")]
    if len(set(tones)) == 1:
        return f"{tones[0]} skin tone"
    return f"{' and '.join(tones)} skin tones"


def _clean_label(label: str) -> str:
    # CLDR writes qualifiers after a colon: "flag: Japan", "keycap: 7", "woman: beard".
    if ":" not in label:
        return label
    head, tail = (s.strip() for s in label.split(":", 1))
    if head == "flag":
        return f"flag of {tail}"
    if head == "keycap" or tail.startswith("facing"):
        return f"{head} {tail}"
    if tail == "bald":
        return f"bald {head}"
    if "hair" in tail or "beard" in tail:
        return f"{head} with {tail}"
    return f"{head} ({tail})"  # "family (man, woman, boy)"


def _label(src: Sources, unified: str) -> dict | None:
    return src.labels.get(unified) or src.labels.get(unified.replace("-FE0F", ""))


def emoji_families(src: Sources) -> list[dict]:
    """One dict per base emoji that at least one fetched vendor has, in CLDR order."""
    packs = {v: set(info["names"]) for v, info in src.vendors.items()}
    families = []
    for r in sorted(src.emoji, key=lambda r: r.get("sort_order", 0)):
        vendors = [v for v in packs if r["image"] in packs[v] and r.get(f"has_img_{v}", True)]
        if not vendors:
            continue
        lab = _label(src, r["unified"])
        # The CLDR label is the everyday name ("red heart"); emoji.json's Unicode name ("HEAVY BLACK HEART")
        # and short names ("heart") are kept as alternatives.
        label = _clean_label(lab["label"]) if lab else r["name"].lower()
        alts = [r["name"].lower()] + [s.replace("_", " ").replace("-", " ") for s in r.get("short_names", [])]
        alts = [a for a in dict.fromkeys(alts) if a != label.lower() and a.replace(" ", "").isalpha()]
        variants = [
            {
                "key": key,
                "image": v["image"],
                "unified": v["unified"],
                "vendors": [x for x in vendors if v["image"] in packs[x] and v.get(f"has_img_{x}", True)],
            }
            for key, v in (r.get("skin_variations") or {}).items()
        ]
        families.append(
            {
                "image": r["image"],
                "unified": r["unified"],
                "label": label,
                "alts": alts,
                "tags": [t for t in (lab["tags"] if lab else []) if t.isalpha()][:6],
                "category": r.get("category", ""),
                "subcategory": r.get("subcategory", ""),
                "vendors": vendors,
                "variants": [v for v in variants if v["vendors"]],
            }
        )
    return families


_TEMPLATES = (
    "{name}",
    "{a_name} emoji",
    "{name} emoji, {vendor} style",
    "{a_name} emoji in {vendor} style{bg}",
    "{vendor} style emoji of {name}{bg}",
    "{a_name} icon, flat emoji art, {vendor} style{bg}",
    "{name} ({alt}) emoji{bg}",
    "emoji: {name}; category: {category}, {subcategory}; style: {vendor}",
    "{a_name} emoji{bg}, keywords: {tags}",
)


def emoji_captions(
    fam: dict, key: str | None, vendor: str, bg: str, rng: np.random.Generator, n: int = 3
) -> list[str]:
    """``n`` different captions for one emoji image; a coloured background is always named with its hex."""
    name = fam["label"] if key is None else f"{fam['label']} with {tone_phrase(key)}"
    fields = {
        "name": name,
        "a_name": with_article(name),
        "vendor": vendor,
        "alt": fam["alts"][0] if fam["alts"] else "",
        "category": fam["category"].lower(),
        "subcategory": fam["subcategory"].replace("-", " "),
        "tags": ", ".join(fam["tags"]),
    }
    usable = [
        t for t in _TEMPLATES if (fam["alts"] or "{alt}" not in t) and (fam["tags"] or "{tags}" not in t)
    ]
    order = rng.permutation(len(usable))[:n]
    out = []
    for i in order:
        t = usable[i]
        if bg == WHITE:
            bg_text = " on a white background" if rng.random() < 0.5 else ""
        else:
            bg_text = f" on {with_article(describe(bg, rng))} background"
        if "{bg}" not in t and bg != WHITE:
            t += "{bg}"
        out.append(t.format(bg=bg_text, **fields))
    return out


def emoji_record(fam: dict, variant: dict | None, vendor: str, bg: str, rng: np.random.Generator) -> tuple:
    """(render spec, captions.jsonl record) for one emoji image."""
    image = fam["image"] if variant is None else variant["image"]
    key = None if variant is None else variant["key"]
    caps = emoji_captions(fam, key, vendor, bg, rng)
    pkg = VENDORS[vendor]["package"]
    spec = {"type": "emoji", "vendor": vendor, "image": image, "bg": bg}
    record = {
        "caption": caps[0],
        "alt_captions": caps[1:],
        "source": f"{pkg}@{NPM_PACKAGES[pkg]}:img/{vendor}/64/{image}",
        "license": VENDORS[vendor]["license"],
        "kind": "emoji",
        "vendor": vendor,
        "image": image,
        "unified": fam["unified"] if variant is None else variant["unified"],
        "label": fam["label"],
        "skin_tone": tone_phrase(key),
        "category": fam["category"],
        "subcategory": fam["subcategory"],
        "background": bg,
        "background_name": color_name(bg),
    }
    return spec, record


def visible_on(rgba: np.ndarray, bg: str) -> bool:
    """False when much of the emoji has nearly the background colour (a black arrow on black)."""
    opaque = rgba[..., 3] > 128
    if not opaque.any():
        return True
    dist = np.linalg.norm(
        rgba[opaque][:, :3].astype(np.float32) - np.array(hex_to_rgb(bg), np.float32), axis=1
    )
    return float((dist < 60).mean()) < 0.3


def render_emoji(rgba: np.ndarray, bg: str, size: tuple[int, int]) -> np.ndarray:
    """64 px RGBA emoji -> uint8 [H, W, 3]: upscaled (Lanczos) and centred on a flat ``bg`` canvas."""
    w, h = size
    side = round(EMOJI_FILL * min(w, h))
    # Pillow premultiplies alpha while resampling RGBA, so no dark fringes appear at the edges.
    sprite = Image.fromarray(rgba, "RGBA").resize((side, side), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (w, h), bg)
    canvas.alpha_composite(sprite, ((w - side) // 2, (h - side) // 2))
    return np.asarray(canvas.convert("RGB"))
