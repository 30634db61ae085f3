"""`fluxion eval`: figures for a model on fixed prompt sets with fixed seeds, printed and written as JSON.

    fluxion eval                                  (the embedded fluxion-tiny; about 2 minutes on 2 CPU cores)
    fluxion eval --quick --out quick.json         (a few images at 4 steps: a smoke test, not a measurement)
    fluxion eval --model klein/ --device cuda --num-typography 100 --images eval-images/

Sections (each image is one `pipeline.generate` call with seed = --seed + its index in the set; text-to-image runs
at the model's default size, and everything but OCR is measured at 128x128, the size the scenes are rendered at):
- typography: OCR (rapidocr-onnxruntime, PP-OCRv4) of one-word prompts; exact match (case-insensitive) and
  character similarity (1 - normalised Levenshtein distance). The same scenes rendered by the dataset code and
  read by the same OCR give the reference (where the fonts are installed).
- colour: CIEDE2000 between the requested hex colours and the median colour of the rendered regions (background
  and centred shape, masks from rendering the requested scene); "chance" pairs the measurements with the
  colours of the wrong prompts.
- recognition: top-1 / top-5 retrieval among 100 emoji family names by the self-trained scorer (not CLIP; see
  scorer.py); the scorer's rate on real held-out images of the same families is the reference. ref_top1 /
  ref_top5: the same images ranked by image similarity to each family's reference drawing (same image tower).
- editing: recolour edits of rendered shape scenes and of the generated emoji; PSNR against the reference image
  on the part the edit must keep (the VAE round trip of the reference is the ceiling) and CIEDE2000 of the
  edited part to the requested colour, after and before (the reference's own colour there).
- speed: seconds per image at the model's default steps, timed over the text-to-image calls after the first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fluxion.evaluate import metrics, prompts

# Thresholds behind the success rates (CIEDE2000; metrics.py gives a feel for the scale).
COLOR_OK = 15.0  # a region counts as "the requested colour" below this
EDIT_KEEP_ERODE = 2  # px eroded off every mask: anti-aliased edges and a pixel of drift are not judged


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    out: str | None = "fluxion-eval.json"  # JSON report; None: print only
    model: str | None = None  # None: the embedded fluxion-tiny; fluxion-tiny-base: its CFG teacher (v2 on)
    preset: str | None = None
    vae: str | None = None
    text: str | None = None
    device: str = "cpu"
    scorer: str | None = None  # scorer folder; None: the shipped one
    steps: int | None = None  # None: the model's default
    guidance: float | None = None
    seed: int = 0
    num_typography: int = 12
    num_colour: int = 12
    num_recognition: int = 32  # of the scorer's 100 held-out families
    num_edits: int = 12  # two thirds shape scenes (recolour background / shape), one third generated emoji
    num_heldout: int = 12  # per held-out set (words, bare hex, name (#hex), layout): phrasings never trained
    images: str | None = None  # save every generated image here
    quick: bool = False  # 2 items per section and 4 steps: checks that everything runs

    def __post_init__(self):
        for f in ("num_typography", "num_colour", "num_recognition", "num_edits"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must be >= 0")
        if self.num_recognition > 100:
            raise ValueError("num_recognition is at most 100 (the scorer's held-out families)")


QUICK = {
    "num_typography": 2,
    "num_colour": 2,
    "num_recognition": 2,
    "num_edits": 3,
    "num_heldout": 0,  # the held-out section has its own test (tests/test_eval_heldout.py)
    "steps": 4,
}


class Generator:
    """Calls pipeline.generate one image at a time with a fixed seed; keeps the timings and saves images."""

    def __init__(self, models, cfg: EvalConfig):
        self.models, self.cfg, self.times = models, cfg, []
        self.folder = Path(cfg.images) if cfg.images else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, prompt: str, seed: int, refs: tuple = ()) -> np.ndarray:
        """uint8 [H, W, 3] at the model's default size, or for edits at the first reference's size (as the CLI)."""
        from fluxion.request import Request
        from fluxion.sampling.pipeline import generate

        size = refs[0].size if refs else (None, None)
        request = Request(
            prompt=prompt,
            seed=seed,
            steps=self.cfg.steps,
            guidance=self.cfg.guidance,
            references=refs,
            width=size[0],
            height=size[1],
        )
        t0 = time.perf_counter()
        image = generate(self.models, request)[0].image
        if not refs:
            self.times.append(time.perf_counter() - t0)
        if self.folder:
            image.save(self.folder / f"{name}.png")
        return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------------------
# Sections


def at_128(image: np.ndarray) -> np.ndarray:
    """The image at 128x128 (box filter), where rendered masks and the scorer apply; unchanged if already so."""
    if image.shape[:2] == (128, 128):
        return image
    return np.asarray(Image.fromarray(image).resize((128, 128), Image.Resampling.BOX))


def read_text(ocr, image: np.ndarray) -> str:
    """All text rapidocr finds, in reading order (top to bottom, then left to right), space-joined."""
    result, _ = ocr(Image.fromarray(image))  # PIL in: rapidocr converts RGB to its BGR itself
    if not result:
        return ""
    boxes = sorted(result, key=lambda r: (round(min(p[1] for p in r[0]) / 16), min(p[0] for p in r[0])))
    return " ".join(r[1] for r in boxes)


def eval_typography(gen: Generator, cfg: EvalConfig) -> dict:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as e:
        raise ImportError("the typography figures need rapidocr-onnxruntime (the [eval] extra)") from e

    ocr = RapidOCR()
    items, refs = [], []
    for i, item in enumerate(prompts.typography_set(cfg.num_typography, cfg.seed)):
        read = read_text(ocr, gen(f"typography-{i:03d}", item["prompt"], cfg.seed + i))
        items.append(
            {
                "prompt": item["prompt"],
                "text": item["text"],
                "read": read,
                "exact": metrics.normalize_text(read) == metrics.normalize_text(item["text"]),
                "similarity": round(metrics.char_similarity(item["text"], read), 4),
            }
        )
        if prompts.fonts()[item["spec"]["text"]["font"]].path.is_file():
            ref = read_text(ocr, prompts.render(item["spec"]))
            refs.append(metrics.normalize_text(ref) == metrics.normalize_text(item["text"]))
    return {
        "ocr": "rapidocr-onnxruntime (PP-OCRv4), case-insensitive",
        "n": len(items),
        "exact_match": _mean(i["exact"] for i in items),
        "char_similarity": _mean(i["similarity"] for i in items),
        "reference_exact_match": _mean(refs) if refs else None,  # the rendered scenes, same OCR
        "reference_n": len(refs),
        "items": items,
    }


def _flat_mask(image: np.ndarray, hex_code: str, erode: int) -> np.ndarray:
    from fluxion.curate.tinyset.colors import hex_to_rgb

    return metrics.erode(np.all(image == np.array(hex_to_rgb(hex_code)), axis=-1), erode)


def eval_colour(gen: Generator, cfg: EvalConfig) -> dict:
    items = []
    for i, item in enumerate(prompts.colour_set(cfg.num_colour, cfg.seed)):
        image = at_128(gen(f"colour-{i:03d}", item["prompt"], cfg.seed + i))
        ref = prompts.render(item["spec"])
        bg = metrics.region_color(image, _flat_mask(ref, item["background"], 3))
        shape = metrics.region_color(image, _flat_mask(ref, item["color"], EDIT_KEEP_ERODE))
        items.append(
            {
                "prompt": item["prompt"],
                "shape": item["shape"],
                "background": item["background"],
                "color": item["color"],
                "measured_background": _hex(bg),
                "measured_color": _hex(shape),
                "delta_e_background": round(metrics.delta_e(bg, item["background"]), 2),
                "delta_e_shape": round(metrics.delta_e(shape, item["color"]), 2),
            }
        )
    n = len(items)
    chance = [  # each measurement against the next prompt's request: what ignoring the prompt would score
        metrics.delta_e(_rgb(items[(k + 1) % n][f"measured_{a}"]), items[k][b])
        for k in range(n)
        for a, b in (("background", "background"), ("color", "color"))
    ]
    return {
        "metric": "CIEDE2000",
        "n": n,
        "delta_e_background": _mean(i["delta_e_background"] for i in items),
        "delta_e_shape": _mean(i["delta_e_shape"] for i in items),
        "within_15_background": _mean(i["delta_e_background"] < COLOR_OK for i in items),
        "within_15_shape": _mean(i["delta_e_shape"] < COLOR_OK for i in items),
        "chance_delta_e": _mean(chance) if n > 1 else None,
        "items": items,
    }


def eval_recognition(gen: Generator, cfg: EvalConfig) -> tuple[dict, list[np.ndarray]]:
    from fluxion.evaluate.scorer import (
        REFERENCES_FILE,
        candidate_text,
        load_references,
        load_scorer,
        reference_ranks,
        retrieval_ranks,
        sentence_embeddings,
        topk_rates,
    )

    scorer, meta = load_scorer(cfg.scorer)
    held = meta["heldout"]
    minilm = getattr(getattr(gen.models.text, "cfg", None), "kind", None) == "minilm"
    encoder = gen.models.text if minilm else None  # other models: the scorer loads its own MiniLM
    text_emb = sentence_embeddings([candidate_text(h["label"]) for h in held], encoder)
    chosen = held[: cfg.num_recognition]
    images = [
        at_128(gen(f"recognition-{i:03d}", candidate_text(h["label"]), cfg.seed + i))
        for i, h in enumerate(chosen)
    ]
    ranks = retrieval_ranks(scorer, np.stack(images), text_emb, list(range(len(chosen)))) if images else []
    report = {
        "scorer": "self-trained on the tinyset, not CLIP (fluxion.evaluate.scorer)",
        "candidates": len(held),
        "n": len(chosen),
        **topk_rates(ranks),
        "reference": topk_rates([h["rank"] for h in chosen]),  # real held-out images of the same families
        "reference_all": meta["ceiling"],
        "items": [
            {"prompt": candidate_text(h["label"]), "rank": r, "reference_rank": h["rank"]}
            for h, r in zip(chosen, ranks)
        ],
    }
    # Shape, by image-to-image similarity: each image against the 100 families' reference drawings (the
    # other vendor's drawing, which the scorer trained on), embedded by the same image tower.
    refs = load_references(cfg.scorer)
    labels = [h["label"] for h in held]
    if refs is None or not set(labels) <= set(refs[1]):
        why = "missing" if refs is None else "for other families than this scorer's"
        report["ref_note"] = f"no ref_top1/ref_top5: {REFERENCES_FILE} {why} in the scorer folder"
        return report, images
    ref_emb = refs[0][[refs[1].index(label) for label in labels]]  # rows in the order of `held`
    ref_ranks = reference_ranks(scorer, np.stack(images), ref_emb, list(range(len(chosen)))) if images else []
    report.update({f"ref_{k}": v for k, v in topk_rates(ref_ranks).items()})
    report["ref_mean_rank"] = _mean(ref_ranks)
    # Real held-out drawings of the same families against the references (scorer.json, when recorded).
    if all("ref_rank" in h for h in chosen):
        report["ref_reference"] = topk_rates([h["ref_rank"] for h in chosen])
    report["ref_reference_all"] = meta.get("references", {}).get("ceiling")
    for item, r in zip(report["items"], ref_ranks):
        item["ref_rank"] = r
    return report, images


HELDOUT_KEYS = ("ocr_exact_4_5", "bare_hex_delta_e", "name_hex_delta_e", "layout_ok")
# A shape is "where asked" when its colour's centroid is within this fraction of the side of the named spot.
LAYOUT_TOLERANCE = 0.15


def _centroid(image: np.ndarray, hex_code: str) -> tuple[float, float] | None:
    """Relative (x, y) centroid of the pixels within dE00 15 of `hex_code` (None when there are too few)."""
    lab = metrics.rgb_to_lab(image.reshape(-1, 3))
    near = (
        metrics.ciede2000(lab, metrics.rgb_to_lab(_rgb(hex_code))[None]).reshape(image.shape[:2]) < COLOR_OK
    )
    if near.sum() < 0.005 * near.size:
        return None
    ys, xs = np.nonzero(near)
    return float(xs.mean() / image.shape[1]), float(ys.mean() / image.shape[0])


def eval_heldout(gen: Generator, cfg: EvalConfig) -> dict:
    """The held-out phrasings and words (prompts.heldout_sets): OCR exact match on 4-5 letter words never
    rendered in training, background dE00 for a bare hex code and for "name (#hex)" with held-out prompt
    wrappers and off-palette colours, and shapes placed with held-out layout words."""
    from fluxion.curate.tinyset.typography import POSITIONS

    sets = prompts.heldout_sets(cfg.num_heldout, cfg.seed)
    out: dict = {"n": cfg.num_heldout}
    try:
        from rapidocr_onnxruntime import RapidOCR

        ocr = RapidOCR()
    except ImportError:
        ocr = None
    if ocr is not None:
        reads = []
        for i, item in enumerate(sets["words"]):
            read = read_text(ocr, gen(f"heldout-word-{i:03d}", item["prompt"], cfg.seed + i))
            exact = metrics.normalize_text(read) == metrics.normalize_text(item["text"])
            reads.append({"prompt": item["prompt"], "text": item["text"], "read": read, "exact": exact})
        out["ocr_exact_4_5"] = _mean(r["exact"] for r in reads)
        out["words"] = reads
    for name in ("bare_hex", "name_hex"):
        items = []
        for i, item in enumerate(sets[name]):
            image = at_128(gen(f"heldout-{name}-{i:03d}", item["prompt"], cfg.seed + i))
            de = float(metrics.delta_e(metrics.border_color(image), _rgb(item["background"])))
            items.append(
                {"prompt": item["prompt"], "background": item["background"], "delta_e": round(de, 2)}
            )
        out[f"{name}_delta_e"] = _mean(i["delta_e"] for i in items)
        out[name] = items
    layout = []
    for i, item in enumerate(sets["layout"]):
        image = at_128(gen(f"heldout-layout-{i:03d}", item["prompt"], cfg.seed + i))
        c, want = _centroid(image, item["color"]), POSITIONS[item["position"]]
        ok = c is not None and max(abs(c[0] - want[0]), abs(c[1] - want[1])) <= LAYOUT_TOLERANCE
        layout.append({"prompt": item["prompt"], "centroid": c, "ok": ok})
    out["layout_ok"] = _mean(r["ok"] for r in layout)
    out["layout"] = layout
    return out


def _vae_roundtrip(models, image: np.ndarray) -> np.ndarray:
    from fluxion.editing.references import pixels_to_pil
    from fluxion.sampling.pipeline import decode, encode_images

    tokens, [(h, w)] = encode_images(models, [Image.fromarray(image)])
    return np.asarray(pixels_to_pil(decode(models, tokens, h, w))[0])


def _edit_record(models, kind, prompt, ref, out, keep, changed, new) -> dict:
    return {
        "kind": kind,
        "prompt": prompt,
        "new_color": new,
        "psnr_keep": round(metrics.psnr(out, ref, keep), 2),
        "vae_psnr_keep": round(metrics.psnr(_vae_roundtrip(models, ref), ref, keep), 2),
        "delta_e_after": round(metrics.delta_e(metrics.region_color(out, changed), new), 2),
        "delta_e_before": round(metrics.delta_e(metrics.region_color(ref, changed), new), 2),
    }


def eval_editing(gen: Generator, cfg: EvalConfig, emoji: list[np.ndarray]) -> dict:
    num_emoji = min(cfg.num_edits // 3, len(emoji))
    items = []
    for i, e in enumerate(prompts.edit_set(cfg.num_edits - num_emoji, cfg.seed)):
        src, tgt = prompts.render(e["source"]), prompts.render(e["target"])
        diff = np.any(src != tgt, axis=-1)
        keep, changed = metrics.erode(~diff, EDIT_KEEP_ERODE), metrics.erode(diff, EDIT_KEEP_ERODE)
        out = at_128(gen(f"edit-{i:03d}", e["prompt"], cfg.seed + i, (Image.fromarray(src),)))
        items.append(
            _edit_record(gen.models, e["kind"], e["prompt"], src, out, keep, changed, e["new_color"])
        )
    # Generated emoji as references: their background (the border's median) is what the edit recolours.
    for k, (prompt, new) in enumerate(prompts.background_edit_prompts(num_emoji, cfg.seed)):
        ref = emoji[k]
        de = metrics.delta_e(ref, metrics.border_color(ref, 4))
        keep, changed = metrics.erode(de > 20, EDIT_KEEP_ERODE), metrics.erode(de < 5, 3)
        out = at_128(gen(f"edit-emoji-{k:03d}", prompt, cfg.seed + k, (Image.fromarray(ref),)))
        items.append(
            _edit_record(gen.models, "recolor_background_emoji", prompt, ref, out, keep, changed, new)
        )
    by_kind = {}
    for kind in dict.fromkeys(i["kind"] for i in items):
        sub = [i for i in items if i["kind"] == kind]
        by_kind[kind] = {"n": len(sub), **_edit_summary(sub)}
    return {"n": len(items), **_edit_summary(items), "by_kind": by_kind, "items": items}


def _edit_summary(items: list[dict]) -> dict:
    return {
        "psnr_keep": _mean(i["psnr_keep"] for i in items),
        "vae_psnr_keep": _mean(i["vae_psnr_keep"] for i in items),
        "delta_e_after": _mean(i["delta_e_after"] for i in items),
        "delta_e_before": _mean(i["delta_e_before"] for i in items),
        "success": _mean(i["delta_e_after"] < COLOR_OK for i in items),
    }


# ---------------------------------------------------------------------------------------------------------
# Orchestration


def evaluate(models, cfg: EvalConfig, log=print) -> dict:
    """Run every section on loaded `models` (fluxion.weights.models.Models); returns the report (JSON-able)."""
    if cfg.quick:
        cfg = dataclasses.replace(
            cfg, **{k: v for k, v in QUICK.items() if k != "steps" or cfg.steps is None}
        )
    t0 = time.perf_counter()
    gen = Generator(models, cfg)
    report = {"model": models.spec.name, "config": dataclasses.asdict(cfg), "environment": _environment()}
    log(f"fluxion eval: {models.spec.name}, steps {cfg.steps or models.spec.default_steps}, seed {cfg.seed}")
    report["recognition"], emoji = eval_recognition(gen, cfg)
    log(
        _line("recognition", report["recognition"], ("top1", "top5", "ref_top1", "ref_top5", "ref_mean_rank"))
    )
    if "ref_note" in report["recognition"]:
        log(f"  {'':12s} {report['recognition']['ref_note']}")
    report["typography"] = eval_typography(gen, cfg)
    log(
        _line("typography", report["typography"], ("exact_match", "char_similarity", "reference_exact_match"))
    )
    report["colour"] = eval_colour(gen, cfg)
    log(_line("colour", report["colour"], ("delta_e_background", "delta_e_shape", "chance_delta_e")))
    if cfg.num_heldout:
        report["heldout"] = eval_heldout(gen, cfg)
        log(_line("heldout", report["heldout"], HELDOUT_KEYS))
    report["editing"] = eval_editing(gen, cfg, emoji)
    log(
        _line("editing", report["editing"], ("psnr_keep", "vae_psnr_keep", "delta_e_after", "delta_e_before"))
    )
    steps = cfg.steps or models.spec.default_steps
    timed = gen.times[1:] or gen.times  # the first call pays for warm-up
    report["speed"] = {
        # The median: on a shared machine a few calls can take many times longer than the rest.
        "seconds_per_image": round(float(np.median(timed)), 3) if timed else None,
        "seconds_per_image_mean": _mean(timed),
        "steps": steps,
        "size": list(models.spec.default_size),
        "images_timed": len(timed),
        "device": str(models.device),
        "torch_threads": torch.get_num_threads(),
    }
    log(_line("speed", report["speed"], ("seconds_per_image", "steps", "torch_threads")))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("fluxion", "torch", "rapidocr-onnxruntime", "onnxruntime"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"python": platform.python_version(), "machine": platform.machine(), "versions": versions}


def _mean(values) -> float:
    values = [float(v) for v in values]
    return round(float(np.mean(values)), 4) if values else None


def _hex(rgb) -> str | None:
    return None if rgb is None else "#" + "".join(f"{int(round(c)):02X}" for c in rgb)


def _rgb(hex_code: str):
    from fluxion.curate.tinyset.colors import hex_to_rgb

    return np.array(hex_to_rgb(hex_code))


def _line(name: str, section: dict, keys) -> str:
    parts = [f"{k} {section[k]}" for k in keys if k in section]
    return f"  {name:12s} " + "  ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    """Flags map 1:1 onto EvalConfig fields (--num-typography -> num_typography)."""
    p = argparse.ArgumentParser(prog="fluxion eval", description=__doc__.split("\n")[0].split(": ", 1)[1])
    for f in dataclasses.fields(EvalConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true")
        else:
            kind = {"int": int, "int | None": int, "float | None": float}.get(f.type, str)
            p.add_argument(flag, type=kind, default=f.default)
    return p


def main(argv: list[str] | None = None) -> int:
    from fluxion.weights.models import load_models

    args = build_parser().parse_args(argv)
    try:
        cfg = EvalConfig(**vars(args))
        models = load_models(cfg.model, preset=cfg.preset, vae=cfg.vae, text=cfg.text, device=cfg.device)
        report = evaluate(models, cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"fluxion eval: error: {e}", file=sys.stderr)
        return 2
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {cfg.out} ({report['seconds']} s)")
    return 0
