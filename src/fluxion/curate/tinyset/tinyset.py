"""fluxion-tiny training set: plan -> render -> write.

Two commands (``main``)::

    python -m fluxion.curate.tinyset.tinyset fetch .tinydata/sources            # needs npm + Debian registries
    python -m fluxion.curate.tinyset.tinyset build .tinydata/sources OUT        # offline: PIL + numpy only

Output directory (what ``train/`` reads)::

    images.npy      uint8 [N, H, W, 3], a plain .npy (np.load(..., mmap_mode="r"))
    captions.jsonl  one JSON object per image, in image order: caption, alt_captions, source, license,
                    kind ("emoji" | "typography" | "shape") and metadata (hex colours, text, vendor, ...)
    edits.jsonl     {"refs": [i, ...], "target": j, "caption", "alt_captions", "kind"}; indices into images
    meta.json       counts, resolution, licenses, source versions, build parameters and seed

The plan (which images, captions and edits) depends only on the sources, the seed and the plan options,
never on the resolution or on the number of workers, so ``--sizes`` gives the same dataset at several
aspect ratios and the output is byte-identical for a fixed seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fluxion.curate.tinyset import emoji as emoji_mod
from fluxion.curate.tinyset import typography
from fluxion.curate.tinyset.colors import WHITE, sample_color
from fluxion.curate.tinyset.edits import Plan, compose_edits, scene_edits, skin_tone_edits, vendor_edits
from fluxion.curate.tinyset.sources import VENDORS, Sources, fetch_sources, load_emoji_pack, load_sources

FORMAT = "fluxion-tinyset"
FORMAT_VERSION = 1
OUTPUT_FILES = ("images.npy", "captions.jsonl", "edits.jsonl", "meta.json")


@dataclass(frozen=True)
class PlanConfig:
    """What goes into the dataset (not how big the images are)."""

    num_scenes: int = 4000  # typography/shape scenes before edits
    scene_edit_fraction: float = 0.5  # share of scenes that get one edited copy (+ the reverse edit)
    num_compose_emoji: int = 800  # two-reference targets with an emoji subject
    num_compose_text: int = 400  # ... with a text subject
    colored_background_fraction: float = 0.3  # emoji families drawn on a colour instead of white
    limit: int | None = None  # cap on emoji families, scenes and compose targets each (quick builds)


def plan_tinyset(src: Sources, seed: int, cfg: PlanConfig) -> Plan:
    def cap(n: int) -> int:
        return n if cfg.limit is None else min(n, cfg.limit)

    plan = Plan()
    fonts = {f.path.name: f for f in src.fonts}

    # Emoji: every image of a family (both vendors, all skin tones) shares one background.
    rng = np.random.default_rng([seed, 1])
    families = emoji_mod.emoji_families(src)
    if cfg.limit is not None and cfg.limit < len(families):
        families = [families[i] for i in sorted(rng.choice(len(families), cfg.limit, replace=False))]
    index: dict[tuple[str, str], int] = {}
    packs = {v: load_emoji_pack(src.root, v) for v in src.vendors} if cfg.colored_background_fraction else {}
    for fam in families:
        bg = WHITE
        if rng.random() < cfg.colored_background_fraction:
            for _ in range(10):  # a colour on which every vendor's base image stands out
                bg = sample_color(rng, exclude=("white", "cream", "beige"))
                if all(emoji_mod.visible_on(packs[v][fam["image"]], bg) for v in fam["vendors"]):
                    break
        for vendor in fam["vendors"]:
            for variant in [None, *[v for v in fam["variants"] if vendor in v["vendors"]]]:
                spec, record = emoji_mod.emoji_record(fam, variant, vendor, bg, rng)
                i = plan.add_image(spec, record)
                index[(vendor, spec["image"])] = i
                plan.emoji_of[i] = (fam, variant, vendor)
    emoji_images = list(range(len(plan.specs)))

    # Typography and shape scenes.
    rng = np.random.default_rng([seed, 2])
    scenes = []
    for _ in range(cap(cfg.num_scenes)):
        spec = typography.sample_scene(rng, src.fonts)
        scenes.append(plan.add_image(spec, typography.scene_record(spec, fonts, rng)))

    # Edits, each family of them on its own stream so that changing one option leaves the others alone.
    skin_tone_edits(plan, families, index, np.random.default_rng([seed, 3]))
    vendor_edits(plan, families, index, np.random.default_rng([seed, 4]))
    scene_edits(plan, scenes, fonts, np.random.default_rng([seed, 5]), cfg.scene_edit_fraction)
    text_scenes = [i for i in scenes if plan.specs[i]["layout"] == "text"]
    backgrounds = scenes + [i for i in emoji_images if plan.specs[i]["bg"] != WHITE]
    compose_edits(
        plan,
        emoji_images,
        text_scenes,
        backgrounds,
        fonts,
        np.random.default_rng([seed, 6]),
        num_emoji=cap(cfg.num_compose_emoji),
        num_text=cap(cfg.num_compose_text),
    )
    return plan


# ---------------------------------------------------------------------------------------------------------
# Rendering (optionally in worker processes; each loads the sources once)

_WORKER: dict = {}


def _init_worker(root: str) -> None:
    src = load_sources(Path(root))
    _WORKER["packs"] = {v: load_emoji_pack(src.root, v) for v in src.vendors}
    _WORKER["font_dir"] = src.root / "fonts"


def _render_chunk(job: tuple[list[dict], tuple[int, int]]) -> np.ndarray:
    specs, size = job
    out = np.empty((len(specs), size[1], size[0], 3), dtype=np.uint8)
    for k, spec in enumerate(specs):
        if spec["type"] == "emoji":
            out[k] = emoji_mod.render_emoji(_WORKER["packs"][spec["vendor"]][spec["image"]], spec["bg"], size)
        else:
            out[k] = typography.render_scene(spec, size, _WORKER["font_dir"])
    return out


def render_images(
    src: Sources, specs: list[dict], size: tuple[int, int], dest: Path, *, workers: int = 1, log=print
) -> None:
    """Render ``specs`` at ``size`` = (W, H) into a new ``dest`` .npy of uint8 [N, H, W, 3]."""
    images = np.lib.format.open_memmap(
        dest, mode="w+", dtype=np.uint8, shape=(len(specs), size[1], size[0], 3)
    )
    chunk = 128
    jobs = [(specs[i : i + chunk], size) for i in range(0, len(specs), chunk)]
    t0, done, next_report = time.time(), 0, 0.1
    if workers <= 1:
        _init_worker(str(src.root))
        results = map(_render_chunk, jobs)
        pool = None
    else:
        pool = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
            workers, initializer=_init_worker, initargs=(str(src.root),)
        )
        results = pool.imap(_render_chunk, jobs)  # ordered, so the output does not depend on workers
    try:
        for block in results:
            images[done : done + len(block)] = block
            done += len(block)
            if done / len(specs) >= next_report:
                log(f"  {size[0]}x{size[1]}: {done}/{len(specs)} images, {time.time() - t0:.0f} s")
                next_report += 0.1
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    images.flush()
    del images


# ---------------------------------------------------------------------------------------------------------
# Writing


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        ours = [out / f for f in OUTPUT_FILES if (out / f).exists()]
        if not overwrite:
            raise FileExistsError(f"output folder {out} is not empty (pass overwrite=True / --overwrite)")
        for p in ours:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _meta(src: Sources, plan: Plan, size: tuple[int, int], seed: int, cfg: PlanConfig) -> dict:
    used_vendors = sorted({s["vendor"] for s in plan.specs if s["type"] == "emoji"})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "width": size[0],
        "height": size[1],
        "num_images": len(plan.specs),
        "num_edits": len(plan.edits),
        "counts": dict(Counter(r["kind"] for r in plan.records)),
        "edit_counts": dict(Counter(e["kind"] for e in plan.edits)),
        "licenses": dict(Counter(r["license"] for r in plan.records)),
        "attribution": [VENDORS[v]["attribution"] for v in used_vendors],
        "sources": {k: v["version"] for k, v in src.manifest.get("packages", {}).items()},
        "fonts": [{"file": f.path.name, "family": f.family, "license": f.license} for f in src.fonts],
        "build": {
            "seed": seed,
            **dataclasses.asdict(cfg),
            "supersample": typography.SUPERSAMPLE,
            "emoji_fill": emoji_mod.EMOJI_FILL,
        },
        "files": {
            "images.npy": {"dtype": "uint8", "shape": [len(plan.specs), size[1], size[0], 3]},
            "captions.jsonl": "one JSON object per image",
            "edits.jsonl": "one JSON object per edit",
        },
    }


def build_tinyset(
    sources: Path,
    out: Path,
    *,
    resolution: int | tuple[int, int] = 128,
    seed: int = 0,
    limit: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    config: PlanConfig | None = None,
    log=print,
) -> dict:
    """Build the dataset from a sources folder into ``out`` and return its meta.json contents.

    ``resolution`` is a side (square) or (W, H). ``limit`` overrides ``config.limit``.
    """
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"resolution must be a side or (W, H) of at least 16 px, got {resolution!r}")
    cfg = config or PlanConfig()
    if limit is not None:
        cfg = dataclasses.replace(cfg, limit=limit)
    src = load_sources(Path(sources))
    out = Path(out)
    _prepare_out(out, overwrite)
    t0 = time.time()
    plan = plan_tinyset(src, seed, cfg)
    log(f"plan: {len(plan.specs)} images, {len(plan.edits)} edits ({time.time() - t0:.1f} s)")
    render_images(src, plan.specs, size, out / "images.npy", workers=workers, log=log)
    with open(out / "captions.jsonl", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in plan.records)
    with open(out / "edits.jsonl", "w") as f:
        f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in plan.edits)
    meta = _meta(src, plan, size, seed, cfg)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    log(
        f"wrote {out}: {meta['num_images']} images {size[0]}x{size[1]} {meta['counts']}, "
        f"{meta['num_edits']} edits, {time.time() - t0:.0f} s"
    )
    return meta


# ---------------------------------------------------------------------------------------------------------
# Command line


def _parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    try:
        return (int(w), int(h or w))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fluxion.curate.tinyset.tinyset", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download the raw sources (npm + Debian registries)")
    f.add_argument("dest", type=Path)
    f.add_argument("--cache", type=Path, help="keep the npm tarballs here between runs")
    f.add_argument("--force", action="store_true", help="redo every part even when up to date")
    b = sub.add_parser("build", help="build the training set from a sources folder (offline)")
    b.add_argument("sources", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--resolution", type=_parse_size, default=(128, 128), help="N or WxH (default 128)")
    b.add_argument(
        "--sizes",
        type=lambda s: [_parse_size(x) for x in s.split(",")],
        help="comma-separated WxH list, e.g. 128x128,160x96,96x160: one OUT/WxH folder each",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--limit", type=int, help="at most N emoji families, N scenes, N compose targets")
    b.add_argument("--workers", type=int, default=0, help="render processes (0: one per CPU)")
    b.add_argument("--overwrite", action="store_true")
    for fld in dataclasses.fields(PlanConfig):
        if fld.name != "limit":
            b.add_argument("--" + fld.name.replace("_", "-"), type=type(fld.default), default=fld.default)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fetch":
            fetch_sources(args.dest, cache=args.cache, force=args.force)
            return 0
        cfg = PlanConfig(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(PlanConfig) if f.name != "limit"}
        )
        workers = args.workers or os.cpu_count() or 1
        for size in args.sizes or [args.resolution]:
            out = args.out / f"{size[0]}x{size[1]}" if args.sizes else args.out
            build_tinyset(
                args.sources,
                out,
                resolution=size,
                seed=args.seed,
                limit=args.limit,
                workers=workers,
                overwrite=args.overwrite,
                config=cfg,
            )
        return 0
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
