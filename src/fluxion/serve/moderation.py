"""The moderation stage: a pluggable check of the prompt (before a job is queued) and of the output image
(before it is stored). A flagged prompt ends the job `Request Moderated`, a flagged image `Content Moderated`;
neither is charged. `safety_tolerance` (0 strictest .. 5 least strict, BFL's scale) is passed to every check.

The built-in `Blocklist` flags prompts containing operator-listed terms; each term carries the highest
tolerance at which it still blocks. Image classifiers plug in through the same interface.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image


class Moderator(Protocol):
    def check_prompt(self, prompt: str, tolerance: int) -> list[str]: ...  # reasons; empty = allowed

    def check_image(self, image: Image.Image, tolerance: int) -> list[str]: ...


@dataclass(frozen=True)
class Blocklist:
    terms: dict[str, int] = field(default_factory=dict)  # lower-case term -> blocks when tolerance <= this

    @staticmethod
    def load(path: str | None) -> Blocklist:
        """One term per line, optionally `term<TAB>max_tolerance` (default 5: blocks at every tolerance)."""
        if not path:
            return Blocklist()
        terms = {}
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            term, _, level = line.partition("\t")
            try:
                terms[term.strip().lower()] = int(level) if level else 5
            except ValueError:
                raise ValueError(f"{path}:{n}: the level after the tab must be an integer 0..5") from None
        return Blocklist(terms)

    def check_prompt(self, prompt: str, tolerance: int) -> list[str]:
        text = prompt.lower()
        return [
            f"blocked term: {t}"
            for t, level in self.terms.items()
            if tolerance <= level and re.search(rf"\b{re.escape(t)}\b", text)
        ]

    def check_image(self, image: Image.Image, tolerance: int) -> list[str]:
        return []  # no image classifier built in
