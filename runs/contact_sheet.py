"""A contact sheet of held-out prompts (phrasings and words training never saw) for a fluxion-tiny model.

    python runs/contact_sheet.py docs/contact-sheet-v1.jpg [--model M --vae V --preset P --steps S --guidance G]

Rows: held-out words, a bare hex background, "name (#hex)", held-out layout phrases, and emoji of the scorer's
held-out families (objects the model saw only from another vendor). Prompts come from fluxion.evaluate
(heldout_sets, the shipped scorer's held-out list), seed 0 for every image; each cell is labelled with its prompt.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

CELL, LABEL, COLS = 128, 46, 6


def prompts(n: int) -> list[tuple[str, list[str]]]:
    from fluxion.evaluate.prompts import heldout_sets
    from fluxion.evaluate.scorer import load_scorer

    sets = heldout_sets(n)
    _, meta = load_scorer(None)
    objects = [f"a {h['label']} emoji" for h in meta["heldout"][:n]]
    rows = [
        ("held-out words", [p["prompt"] for p in sets["words"]]),
        ("bare hex", [p["prompt"] for p in sets["bare_hex"]]),
        ("name (#hex)", [p["prompt"] for p in sets["name_hex"]]),
        ("held-out layout phrases", [p["prompt"] for p in sets["layout"]]),
        ("held-out emoji families", objects),
    ]
    return rows


def main() -> int:
    from PIL import Image, ImageDraw

    from fluxion.request import Request
    from fluxion.sampling.pipeline import generate
    from fluxion.weights.models import load_models

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--model", default=None)
    p.add_argument("--vae", default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    a = p.parse_args()
    models = load_models(a.model, preset=a.preset, vae=a.vae)
    rows = prompts(COLS)
    sheet = Image.new("RGB", (COLS * CELL, len(rows) * (CELL + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (_, texts) in enumerate(rows):
        req = Request(prompt=texts, seeds=tuple(0 for _ in texts), steps=a.steps, guidance=a.guidance)
        for c, (text, result) in enumerate(zip(texts, generate(models, req))):
            x, y = c * CELL, r * (CELL + LABEL)
            sheet.paste(result.image.convert("RGB").resize((CELL, CELL)), (x, y))
            label = "\n".join(textwrap.wrap(text, 26)[:3])
            draw.multiline_text((x + 2, y + CELL + 1), label, fill="black", spacing=1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp")
    fmt = "JPEG" if a.out.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    sheet.save(tmp, format=fmt, quality=82, optimize=True)  # JPEG: ~120 KB for the 5 x 6 sheet
    tmp.replace(a.out)
    print(f"wrote {a.out} ({a.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
