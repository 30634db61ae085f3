"""The README's first command on a CPU: fluxion-tiny, 128², default steps (goal: <= 5 s on 2 cores).

    python benchmarks/bench_cpu_generate.py [--runs 3]

Cold: the whole `fluxion generate "a red heart" -o ...` process (Python start, imports, model load, text
encoding, denoising, VAE decode, PNG write), wall clock, median of `--runs`. Warm: one `generate` call in a
process that has the models loaded already, median of 5 after one untimed call. Writes
`bench_cpu_generate.json` under $OUT (default bench_out/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import environment, out_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    # The console script the README runs (beside this interpreter), else the module.
    script = Path(sys.executable).with_name("fluxion")
    fluxion = [str(script)] if script.is_file() else [sys.executable, "-m", "fluxion.cli"]
    cold = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            t0 = time.perf_counter()
            done = subprocess.run(
                [*fluxion, "generate", "a red heart", "-o", str(Path(tmp) / f"{i}.png"), "--seed", str(i)],
                capture_output=True,
                text=True,
            )
            cold.append(time.perf_counter() - t0)
            if done.returncode:
                raise SystemExit(done.stderr)

    from fluxion.request import Request
    from fluxion.sampling.pipeline import generate
    from fluxion.weights.models import load_models

    t0 = time.perf_counter()
    models = load_models()
    load_s = time.perf_counter() - t0
    generate(models, Request(prompt="a red heart", seed=0))
    warm = []
    for i in range(5):
        t0 = time.perf_counter()
        generate(models, Request(prompt="a red heart", seed=i))
        warm.append(time.perf_counter() - t0)
    result = dict(
        env=environment(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        command=" ".join(fluxion),
        cold_command_s=[round(s, 2) for s in cold],
        cold_command_median_s=round(statistics.median(cold), 2),
        load_models_s=round(load_s, 2),
        warm_image_s=[round(s, 3) for s in warm],
        warm_image_median_s=round(statistics.median(warm), 3),
    )
    path = out_dir() / "bench_cpu_generate.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "env"}))


if __name__ == "__main__":
    sys.exit(main())
