"""LoRA adapters as module swaps; file formats of every ecosystem are converted in weights/lora_mapping.py."""

from fluxion.lora.lora import (
    LORA_FILE_FORMATS,
    TARGET_PRESETS,
    LoadReport,
    LoRALinear,
    inject_lora,
    load_lora,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_lora,
    set_lora_scale,
    unmerge_lora,
    write_lora,
)

__all__ = [
    "LORA_FILE_FORMATS",
    "TARGET_PRESETS",
    "LoRALinear",
    "LoadReport",
    "inject_lora",
    "load_lora",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "remove_lora",
    "save_lora",
    "set_lora_scale",
    "unmerge_lora",
    "write_lora",
]
