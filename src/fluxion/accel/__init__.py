"""Opt-in speed and memory features applied from outside the model: `apply(model, AccelOptions(...))`."""

from fluxion.accel.apply import Accelerated, AccelOptions, VAEAccelOptions, apply, apply_vae

__all__ = ["AccelOptions", "Accelerated", "VAEAccelOptions", "apply", "apply_vae"]
