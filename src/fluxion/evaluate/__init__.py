"""Evaluation of a text-to-image/editing model on fixed prompt sets (`fluxion eval`).

`run.py` has the command and the sections (typography by OCR, colour, recognisability, editing, speed);
`prompts.py` the fixed sets; `metrics.py` the measures (CIEDE2000, PSNR, string similarity); `scorer.py` the
small self-trained image-text model (not CLIP) behind the recognisability figure.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """`fluxion eval [options]` (see fluxion.evaluate.run)."""
    from fluxion.evaluate.run import main as run_main

    return run_main(argv)
