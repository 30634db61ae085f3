"""Where the single-process tail of `fluxion curate` goes (after the map phase): wall seconds in dedup, in writing
the shards + manifest parts, in the report, and in the rest of `finish`, over a `bench_curate.py` run.

    python benchmarks/profile_curate_tail.py --n 20000 --workers 2 [--out DIR]

The phases are timed by wrapping the pipeline's own functions, so the same script times older commits too.
Prints the seconds and writes OUT/curate_tail.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_curate

    import fluxion.curate.pipeline as pipeline
    import fluxion.curate.report as report

    seconds: dict[str, float] = {}

    def timed(module, name: str) -> None:
        fn = getattr(module, name)

        @functools.wraps(fn)
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t

        setattr(module, name, wrapper)

    for name in ("run_dedup", "write_outputs", "finish"):
        timed(pipeline, name)
    timed(report, "write_report")  # inside finish
    work = args.out / "curate_tail_run"
    sys.argv = ["bench_curate.py", "--n", str(args.n), "--workers", str(args.workers), "--ocr-n", "0"]
    sys.argv += ["--out", str(work)]
    bench_curate.main()
    result = {"n": args.n, "workers": args.workers, "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    print(json.dumps(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curate_tail.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":  # the curate worker pool spawns fresh interpreters that import this file
    main()
