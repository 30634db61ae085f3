"""The moderation stage: a pluggable check of the prompt (before a job is queued) and of the output image
(before it is stored). A flagged prompt ends the job `Request Moderated`, a flagged image `Content Moderated`;
neither is charged. `safety_tolerance` (0 strictest .. 5 least strict, BFL's scale) is passed to every check.

The built-in `Blocklist` flags prompts containing operator-listed terms; each term carries the highest
tolerance at which it still blocks. `NSFWClassifier` maps an object detector's labelled boxes (nudenet's
`NudeDetector`, extra `[nsfw]`, off by default: its weights are AGPL-3.0) to reasons by tolerance; `Stages`
chains several moderators.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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


# nudenet 3.x labels. EXPLICIT ones block at every tolerance below 5 from a score that rises with the tolerance;
# SUGGESTIVE ones block only at the strictest tolerances.
EXPLICIT = frozenset(
    {
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "ANUS_EXPOSED",
        "BUTTOCKS_EXPOSED",
    }
)
SUGGESTIVE = frozenset(
    {
        "FEMALE_GENITALIA_COVERED",
        "FEMALE_BREAST_COVERED",
        "BUTTOCKS_COVERED",
        "ANUS_COVERED",
        "MALE_BREAST_EXPOSED",
        "BELLY_EXPOSED",
    }
)


class Detector(Protocol):
    """nudenet's interface: `detect(path)` -> [{"class": label, "score": 0..1, "box": [x, y, w, h]}, ...]."""

    def detect(self, image_path: str) -> list[dict[str, Any]]: ...


def explicit_threshold(tolerance: int) -> float | None:
    """Lowest detector score of an EXPLICIT label that blocks at this tolerance (None: never blocks)."""
    return None if tolerance >= 5 else 0.3 + 0.1 * tolerance  # 0 -> 0.3 .. 4 -> 0.7


def suggestive_threshold(tolerance: int) -> float | None:
    return 0.5 if tolerance <= 1 else None


@dataclass(frozen=True)
class NSFWClassifier:
    """Checks output images with an object detector (nudenet's `NudeDetector` by default, `[nsfw]` extra)."""

    detector: Any

    @staticmethod
    def nudenet() -> NSFWClassifier:
        try:
            from nudenet import NudeDetector
        except ImportError:
            raise ValueError(
                "--nsfw needs nudenet: pip install 'fluxion[nsfw]' (its weights are AGPL-3.0 licensed)"
            ) from None
        return NSFWClassifier(NudeDetector())

    def check_prompt(self, prompt: str, tolerance: int) -> list[str]:
        return []

    def check_image(self, image: Image.Image, tolerance: int) -> list[str]:
        import os
        import tempfile

        fd, path = tempfile.mkstemp(suffix=".png")  # nudenet reads from a path
        try:
            with os.fdopen(fd, "wb") as f:
                image.convert("RGB").save(f, format="PNG")
            found = self.detector.detect(path)
        finally:
            os.unlink(path)
        return reasons_for(found, tolerance)


def reasons_for(detections: list[dict[str, Any]], tolerance: int) -> list[str]:
    """Detector boxes -> moderation reasons at this tolerance (one per label, the highest score)."""
    best: dict[str, float] = {}
    for d in detections:
        best[d["class"]] = max(best.get(d["class"], 0.0), float(d["score"]))
    out = []
    for label, score in sorted(best.items()):
        limit = (
            explicit_threshold(tolerance)
            if label in EXPLICIT
            else suggestive_threshold(tolerance)
            if label in SUGGESTIVE
            else None
        )
        if limit is not None and score >= limit:
            out.append(f"image classifier: {label.lower()} ({score:.2f})")
    return out


@dataclass(frozen=True)
class Stages:
    """Several moderators in a row; a request is flagged with the reasons of all of them."""

    stages: tuple[Any, ...]

    def check_prompt(self, prompt: str, tolerance: int) -> list[str]:
        return [r for s in self.stages for r in s.check_prompt(prompt, tolerance)]

    def check_image(self, image: Image.Image, tolerance: int) -> list[str]:
        return [r for s in self.stages for r in s.check_image(image, tolerance)]


def build_moderator(blocklist: str | None, nsfw: bool) -> Stages:
    stages: list[Any] = [Blocklist.load(blocklist)]
    if nsfw:
        stages.append(NSFWClassifier.nudenet())
    return Stages(tuple(stages))
