"""Reading and writing safetensors files: memory-mapped reads with clear errors, sharded writes.

Only safetensors are read. A pickle checkpoint (.pt, .pth, .ckpt, .bin) can execute code when loaded, so it is
refused with a message that says how to convert it.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl"}
_PICKLE_HELP = (
    "pickle checkpoints are not read (loading one can run arbitrary code). Convert it once with: "
    'python -c "import torch, safetensors.torch as st; '
    "st.save_file(torch.load('{src}', weights_only=True), '{dst}')\""
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with a message that says what to do."""


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(9)
    # A safetensors file is an 8-byte header length followed by a JSON object. Zip archives (torch.save) start
    # with PK, raw pickles with the protocol opcode 0x80.
    looks_safetensors = len(magic) == 9 and magic[8:9] == b"{"
    if path.suffix in PICKLE_SUFFIXES or (
        not looks_safetensors and magic[:2] in (b"PK", b"\x80\x02", b"\x80\x04")
    ):
        raise CheckpointError(
            f"{path}: " + _PICKLE_HELP.format(src=path, dst=path.with_suffix(".safetensors"))
        )


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, __metadata__, byte offset of the data section). Validates sizes against the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _refuse_pickle(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(
                f"{path}: not a safetensors file, or its header is cut off (header {n} bytes)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: file is truncated ({size} bytes, tensor {name!r} needs {data_start + end}); "
                "download or copy it again"
            )
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    return header, metadata, data_start


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the header alone (no data read)."""
    header, _, _ = read_header(path)
    return {k: tuple(v["shape"]) for k, v in header.items()}


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a file, memory-mapped (copy-on-write): pages are read only when a tensor is used."""
    header, _, data_start = read_header(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if Path(path).stat().st_size else None
    out = {}
    for name, entry in header.items():
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        out[name] = torch.frombuffer(mm, dtype=dtype, count=numel, offset=data_start + begin).view(shape)
    return out


def save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    # Write next to the target and rename: an interrupted write never leaves a half file under the real name.
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def save_sharded(
    tensors: dict[str, Tensor], folder: str | Path, stem: str, max_shard_bytes: int = 5 * 2**30
) -> list[Path]:
    """Write `<stem>.safetensors`, or shards `<stem>-0000k-of-0000n.safetensors` + `<stem>.safetensors.index.json`
    (the diffusers / transformers convention) when the total exceeds `max_shard_bytes`."""
    folder = Path(folder)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        path = folder / f"{stem}.safetensors"
        save_safetensors(shards[0], path)
        return [path]
    paths, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        path = folder / f"{stem}-{k:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, path)
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def load_folder_weights(folder: str | Path, stem: str) -> dict[str, Tensor]:
    """Load `<stem>.safetensors` or its sharded form (index json) from a folder."""
    folder = Path(folder)
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return load_safetensors(single)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        out: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(load_safetensors(folder / shard))
        missing = set(weight_map) - set(out)
        if missing:
            raise CheckpointError(f"{index}: {len(missing)} tensors listed in the index are in no shard")
        return out
    pickles = [p.name for p in folder.glob(f"{stem}.bin")] + [p.name for p in folder.glob("*.ckpt")]
    if pickles:
        _refuse_pickle(folder / pickles[0])
    raise FileNotFoundError(f"no {single.name} or {index.name} in {folder}")
