"""Reading samples from one WebDataset tar shard through `TarShards`: at the byte offsets indexed once (plain
tars) against through `tarfile` by member name (the path compressed shards take, and every shard before
2026-12-07), which scans the headers before the member on each read.

    python benchmarks/bench_tar_read.py [--members 2000] [--samples 500] [--out DIR]

Prints seconds per mode and writes OUT/bench_tar_read.json.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fluxion.train.data import TarShards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=2000, help="images in the shard (64 x 64 JPEGs)")
    ap.add_argument("--samples", type=int, default=500, help="samples read, evenly spread over the shard")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        with tarfile.open(Path(d) / "000000.tar", "w") as tar:
            for i in range(args.members):
                buf = io.BytesIO()
                Image.fromarray(np.full((64, 64, 3), i % 255, np.uint8)).save(buf, format="JPEG")
                for name, data in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.txt", b"a grey square")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards = TarShards(d, 64 * 64)
        picks = np.linspace(0, args.members - 1, args.samples).astype(int)
        result = {"members": args.members, "samples": args.samples, "seconds": {}}
        for mode in ("offset", "by name"):
            if mode == "by name":
                shards.spans = [None] * len(shards.spans)  # the tarfile path
            t = time.perf_counter()
            for i in picks:
                shards.sample(int(i))
            result["seconds"][mode] = round(time.perf_counter() - t, 3)
    print(json.dumps(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_tar_read.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
