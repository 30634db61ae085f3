"""Opt-in speed and memory features applied from outside the model: `apply(model, AccelOptions(...))`."""

from fluxion.accel.apply import Accelerated, AccelOptions, apply

__all__ = ["AccelOptions", "Accelerated", "apply"]
