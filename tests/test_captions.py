"""Caption variety and the held-out sets: training phrasings never reach the held-out ones, quoted text is
kept letter for letter, colours appear in every written form, and random letter strings skip held-out words."""

import random
import re

import numpy as np

from fluxion.curate.tinyset.captions import (
    HELDOUT_LAYOUT,
    HELDOUT_TEMPLATES,
    HELDOUT_WORDS,
    TRAIN_TEMPLATES,
    vary_caption,
)
from fluxion.curate.tinyset.typography import NOUNS, WORDS, random_letters

RECORD = {
    "caption": 'the word "Hello" in dodger blue (#1E90FF) bold sans letters on a khaki (#F0E68C) background',
    "alt_captions": ["a red (#FF0000) circle in the center on a white #FFFFFF background"],
}


def test_variety_covers_the_colour_forms_and_keeps_quoted_text():
    rng = random.Random(0)
    caps = [vary_caption(RECORD, rng) for _ in range(400)]
    joined = "\n".join(caps)
    assert "#1e90ff" in joined and "#1E90FF" in joined and "rgb(30, 144, 255)" in joined
    assert re.search(r"dodger blue(?! \(#| #)", joined)  # the name alone
    assert any("circle" in c and "#" not in c and "red" not in c for c in caps)  # colour dropped
    word_caps = [c for c in caps if "word" in c or "letters" in c]
    assert all("Hello" in c for c in word_caps)  # the text to draw keeps its letters and case
    assert any('"Hello"' in c for c in caps) and any("'Hello'" in c for c in caps)
    assert any("Hello" in c and "'Hello'" not in c and '"Hello"' not in c for c in caps)  # unquoted
    assert any("centred" in c or "centered" in c or "centre" in c for c in caps)
    assert len(set(caps)) > 200


def test_held_out_phrasings_and_words_never_appear_in_training():
    rng = random.Random(1)
    caps = [vary_caption(RECORD, rng) for _ in range(2000)]
    held_layout = [p for ps in HELDOUT_LAYOUT.values() for p in ps]
    assert not any(p in c for c in caps for p in held_layout)
    assert not set(HELDOUT_TEMPLATES) & set(TRAIN_TEMPLATES)
    heads = [t.split("{x}")[0] for t in HELDOUT_TEMPLATES if t.split("{x}")[0]]
    assert not any(c.startswith(h) for c in caps for h in heads)
    assert not set(HELDOUT_WORDS) & (set(NOUNS) | set(WORDS))
    g = np.random.default_rng(0)
    strings = [random_letters(g) for _ in range(20000)]
    assert {len(s) for s in strings} == set(range(1, 9))
    assert not {s.lower() for s in strings} & set(HELDOUT_WORDS)


def test_zero_variety_is_the_stored_caption():
    assert vary_caption(RECORD, random.Random(0), 0.0) == RECORD["caption"]
