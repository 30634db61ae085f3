"""The trainer's entry point: `torchrun --nproc_per_node N -m fluxion.train.train RECIPE` (.toml or .py), and
the names the rest of fluxion imports. The loop is train/loop.py, the objectives train/objectives.py (flow
matching), train/dpo.py and train/distill.py, the settings train/config.py."""

from __future__ import annotations

from fluxion.train.config import TrainConfig, config_from_dict, lr_at
from fluxion.train.loop import EMA, main, run_stages, setup_distributed, shutdown_distributed
from fluxion.train.precision import compute_context

__all__ = [
    "EMA",
    "TrainConfig",
    "compute_context",
    "config_from_dict",
    "lr_at",
    "main",
    "run_stages",
    "setup_distributed",
    "shutdown_distributed",
]

if __name__ == "__main__":
    import sys

    from fluxion.train.recipes import load_recipe_file

    try:
        summary = run_stages(load_recipe_file(sys.argv[1]))
        if summary.get("exported"):
            print(f"exported {summary['exported']}")
    finally:
        shutdown_distributed()
