"""`fluxion curate RECIPE.toml [--output DIR] [--executor local|ray] [--workers N] [--limit N] [--num-cpus N]`: the flags
override the recipe's fields of the same name (fluxion.curate.pipeline.CurateConfig); RAY_ADDRESS, when set,
fills `ray_address`. The `fluxion` command builds its flags from `CurateArgs` (fluxion/cli.py)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class CurateArgs:
    recipe: str  # a .toml recipe (see README: Curating data)
    output: str | None = None  # output folder (overrides the recipe)
    executor: Literal["local", "ray"] | None = None  # where stages run (overrides the recipe)
    workers: int | None = None  # local executor: processes mapping shards in parallel (1: in this process)
    limit: int | None = None  # only the first N input items
    num_cpus: int | None = None  # CPUs for Ray's local instance


def run_curate(args: CurateArgs) -> int:
    from fluxion.curate.pipeline import load_recipe, run

    try:
        cfg = load_recipe(
            args.recipe,
            output=args.output,
            executor=args.executor,
            workers=args.workers,
            limit=args.limit,
            num_cpus=args.num_cpus,
            ray_address=os.environ.get("RAY_ADDRESS"),  # the same recipe runs on a cluster when this is set
        )
        run(cfg)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:  # RuntimeError: a worker process died
        print(f"fluxion curate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def curate_main(argv: list[str] | None = None) -> int:
    """`python -m fluxion.curate.cli ...`: the same as `fluxion curate ...`."""
    from fluxion.cli import main

    return main(["curate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(curate_main())
