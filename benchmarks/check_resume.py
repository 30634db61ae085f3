"""Exact resume of the FSDP2 trainer across processes on the devices of this machine (NCCL on GPUs).

    python benchmarks/check_resume.py --nproc 2            # 2 GPUs: full run vs stop-after-3 + resume
    python benchmarks/check_resume.py --nproc 2 --smoke    # CPU, gloo (the same as tests/test_distributed.py)

The recipe and the tiny model / data of tests/test_distributed.py (8 steps, batch 2, EMA, caption dropout): one
uninterrupted run, then a run stopped after 3 steps (a DCP checkpoint is written) and resumed to the end. Writes
check_resume_<N>proc.json under $OUT with both loss traces, whether they are identical, and whether the exported
weights are bit-identical. Exit code 0 when both are, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import environment, out_dir
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from test_distributed import RECIPE, losses  # noqa: E402  (the recipe the CPU test checks)
from train_fixtures import build_components  # noqa: E402


def torchrun(recipe: Path, nproc: int, smoke: bool) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "fluxion.train.train", str(recipe)]
    log = recipe.with_suffix(".log")
    with open(log, "w") as f:
        done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{recipe.name} failed:\n{log.read_text()[-4000:]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="CPU processes (gloo)")
    args = ap.parse_args()
    if not args.smoke and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"needs {args.nproc} GPUs, found {torch.cuda.device_count()} (or pass --smoke)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parts = build_components(tmp)

        def recipe(name: str, out: Path, stop: int) -> Path:
            path = tmp / f"{name}.py"
            path.write_text(RECIPE.format(tests=str(TESTS), out=str(out), stop=stop, **parts))
            return path

        torchrun(recipe("full", tmp / "full", 0), args.nproc, args.smoke)
        torchrun(recipe("first", tmp / "split", 3), args.nproc, args.smoke)
        torchrun(recipe("rest", tmp / "split", 0), args.nproc, args.smoke)
        full, split = losses(tmp / "full"), losses(tmp / "split")
        a = load_file(str(tmp / "full" / "transformer.safetensors"))
        b = load_file(str(tmp / "split" / "transformer.safetensors"))
    same_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = dict(
        env=environment(),
        nproc=args.nproc,
        backend="gloo" if args.smoke else "nccl",
        losses_full=full,
        losses_resumed=split,
        losses_identical=full == split,
        weights_identical=same_weights,
    )
    path = out_dir() / f"check_resume_{args.nproc}proc{'_smoke' if args.smoke else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "env"}))
    return 0 if full == split and same_weights else 1


if __name__ == "__main__":
    sys.exit(main())
