"""Watermark robustness and cost: detection rate after JPEG 80 and a 0.5x resize, false positives on unmarked
images, PSNR of the mark, time per image. Images: N synthetic scenes per size (smooth fields + flat shapes, the
look of generated images) and M fluxion-tiny generations (128x128). Prints a table and writes JSON.

    python benchmarks/bench_watermark.py --out bench_out/watermark [--n 100 --tiny 20]
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fluxion.provenance import add_watermark, detect_watermark


def scene(seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 5))):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(size // 12, size // 3))
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return im


def jpeg(im: Image.Image, q: int = 80) -> Image.Image:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=q)
    return Image.open(io.BytesIO(b.getvalue())).convert("RGB")


def measure(images: list[Image.Image]) -> dict:
    rows = {"plain": 0, "jpeg80": 0, "half": 0, "false_positive": 0}
    psnr, t_embed, t_detect = [], [], []
    for im in images:
        t = time.perf_counter()
        m = add_watermark(im)
        t_embed.append(time.perf_counter() - t)
        a, b = np.asarray(im.convert("RGB"), float), np.asarray(m, float)
        psnr.append(10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12)))
        t = time.perf_counter()
        rows["plain"] += detect_watermark(m).found
        t_detect.append(time.perf_counter() - t)
        rows["jpeg80"] += detect_watermark(jpeg(m)).found
        w, h = m.size
        rows["half"] += detect_watermark(m.resize((w // 2, h // 2), Image.BICUBIC)).found
        rows["false_positive"] += detect_watermark(im).found
    n = len(images)
    return {
        "images": n,
        **{f"{k}_rate": v / n for k, v in rows.items()},
        "psnr_db_mean": float(np.mean(psnr)),
        "psnr_db_min": float(np.min(psnr)),
        "embed_ms": 1000 * float(np.median(t_embed)),
        "detect_ms": 1000 * float(np.median(t_detect)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out/watermark")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--tiny", type=int, default=20)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for size in (256, 512, 1024):
        results[f"scenes_{size}"] = measure([scene(s, size) for s in range(args.n)])
    if args.tiny:
        from fluxion.request import Request
        from fluxion.sampling.pipeline import generate
        from fluxion.weights.models import load_models

        models = load_models()
        prompts = [
            "a red heart",
            "a yellow star on blue",
            "the word 'cat' in black",
            "a green tree",
            "an orange",
        ]
        req = Request(prompt=[prompts[i % len(prompts)] for i in range(args.tiny)], seed=0)
        results["fluxion_tiny_128"] = measure([r.image for r in generate(models, req)])
    print(
        f"{'set':<18} {'n':>4} {'plain':>6} {'jpeg80':>7} {'0.5x':>6} {'false+':>7} {'PSNR dB':>8} {'embed ms':>9}"
    )
    for k, r in results.items():
        print(
            f"{k:<18} {r['images']:>4} {r['plain_rate']:>6.2f} {r['jpeg80_rate']:>7.2f} {r['half_rate']:>6.2f} "
            f"{r['false_positive_rate']:>7.2f} {r['psnr_db_mean']:>8.1f} {r['embed_ms']:>9.1f}"
        )
    (out / "bench_watermark.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
