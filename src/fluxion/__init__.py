"""fluxion: a from-scratch FLUX.2 stack (generate, edit, train).

    import fluxion
    models = fluxion.load_models()                      # the embedded fluxion-tiny, on the CPU
    [result] = fluxion.generate(models, fluxion.Request(prompt="a red heart", seed=0))
    result.save("heart.png")                            # PNG with its parameters in the metadata

The public names below are imported on first use (PEP 562), so `import fluxion` itself loads neither torch nor
any model code.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_models": "fluxion.weights.models",
    "Models": "fluxion.weights.models",
    "generate": "fluxion.sampling.pipeline",
    "inpaint": "fluxion.sampling.pipeline",
    "Request": "fluxion.request",
    "Result": "fluxion.request",
    "Note": "fluxion.request",
    "request_from_params": "fluxion.request",
    "AccelOptions": "fluxion.accel",
    "load_lora": "fluxion.lora",
    "load_image": "fluxion.images",
    "OutputSize": "fluxion.images",
    "save_png": "fluxion.metadata",
    "read_params": "fluxion.metadata",
    "get_preset": "fluxion.config",
    "PRESETS": "fluxion.config",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'fluxion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
