"""fluxion eval's held-out section, checked on images whose answers are known: a "generator" that draws
exactly what each held-out prompt asks for (rendered with the tinyset's own scene renderer) scores dE00 ~0 and
layout 100 %, and one that ignores the prompt scores far worse. The prompts use phrasings and words that
training never sees."""

import numpy as np
import pytest

from fluxion.curate.tinyset.captions import HELDOUT_TEMPLATES, HELDOUT_WORDS, vary_caption
from fluxion.curate.tinyset.colors import hex_to_rgb
from fluxion.curate.tinyset.typography import CENTER_SCALE, SHAPE_SCALE, render_scene
from fluxion.evaluate import prompts
from fluxion.evaluate.run import EvalConfig, eval_heldout


class Drawer:
    """Draws the ground truth of each held-out item by prompt (no OCR section: `words` are skipped when
    rapidocr is absent, and otherwise read from a blank image)."""

    def __init__(self, sets: dict, faithful: bool):
        self.by_prompt = {}
        for name in ("bare_hex", "name_hex"):
            for it in sets[name]:
                self.by_prompt[it["prompt"]] = {"bg": it["background"], "shapes": []}
        for it in sets["layout"]:
            scale = CENTER_SCALE if it["position"] == "center" else SHAPE_SCALE[1]
            shape = {"shape": "circle", "color": it["color"], "pos": it["position"], "scale": scale}
            self.by_prompt[it["prompt"]] = {"bg": it["background"], "shapes": [shape]}
        self.faithful = faithful

    def __call__(self, name, prompt, seed, refs=()):
        scene = self.by_prompt.get(prompt)
        if scene is None or not self.faithful:
            return np.full((128, 128, 3), 255, np.uint8)
        spec = {"type": "scene", "layout": "shapes", "text": None, **scene}
        return render_scene(spec, (128, 128), None)


def test_heldout_prompts_use_held_out_words_and_wrappers():
    sets = prompts.heldout_sets(8, seed=0)
    assert all(it["text"].lower() in HELDOUT_WORDS and 4 <= len(it["text"]) <= 5 for it in sets["words"])
    heads = [t.split("{x}")[0] for t in HELDOUT_TEMPLATES]
    tails = [t.split("{x}")[1] for t in HELDOUT_TEMPLATES]
    for it in sets["bare_hex"] + sets["name_hex"] + sets["layout"] + sets["words"]:
        assert any(it["prompt"].startswith(h) and it["prompt"].endswith(t) for h, t in zip(heads, tails))
    assert all("(" not in it["prompt"] and "#" in it["prompt"] for it in sets["bare_hex"])
    assert all("(" in it["prompt"] for it in sets["name_hex"])
    # None of these prompts is a phrasing training can produce from the same scene.
    rec = {"caption": sets["layout"][0]["prompt"]}
    assert vary_caption(rec, __import__("random").Random(0), 0.0) == rec["caption"]


@pytest.mark.slow  # loads rapidocr when installed (tens of seconds on 2 shared cores)
def test_heldout_metrics_on_known_images():
    cfg = EvalConfig(num_heldout=6, out=None)
    sets = prompts.heldout_sets(6, cfg.seed)
    good = eval_heldout(Drawer(sets, True), cfg)
    bad = eval_heldout(Drawer(sets, False), cfg)
    assert good["bare_hex_delta_e"] < 0.5 and good["name_hex_delta_e"] < 0.5
    assert good["layout_ok"] == 1.0
    assert bad["bare_hex_delta_e"] > 10 and bad["layout_ok"] == 0.0
    assert {it["background"] for it in sets["bare_hex"]} and all(
        len(hex_to_rgb(it["background"])) == 3 for it in sets["bare_hex"]
    )
