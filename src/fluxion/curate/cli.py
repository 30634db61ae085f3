"""`fluxion curate RECIPE.toml [--output DIR] [--executor local|ray] [--limit N]`: the flags override the recipe's
fields of the same name (fluxion.curate.pipeline.CurateConfig); RAY_ADDRESS, when set, fills `ray_address`."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class CurateArgs:
    recipe: str
    output: str | None = None
    executor: str | None = None
    limit: int | None = None
    num_cpus: int | None = None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fluxion curate",
        description="turn raw images into training shards: filters, dedup, captions, WebDataset + manifest + report",
    )
    p.add_argument("recipe", help="a .toml recipe (see README: Curating data)")
    p.add_argument("--output", help="output folder (overrides the recipe)")
    p.add_argument("--executor", choices=["local", "ray"], help="overrides the recipe")
    p.add_argument("--limit", type=int, help="only the first N input items")
    p.add_argument("--num-cpus", type=int, dest="num_cpus", help="CPUs for Ray's local instance")
    return p


def curate_main(argv: list[str] | None = None) -> int:
    from fluxion.curate.pipeline import load_recipe, run

    args = CurateArgs(**vars(parser().parse_args(argv)))
    try:
        cfg = load_recipe(
            args.recipe,
            output=args.output,
            executor=args.executor,
            limit=args.limit,
            num_cpus=args.num_cpus,
            ray_address=os.environ.get("RAY_ADDRESS"),  # the same recipe runs on a cluster when this is set
        )
        run(cfg)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"fluxion curate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(curate_main())
