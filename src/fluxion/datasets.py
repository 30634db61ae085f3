"""Dataset formats shared by curate, train and evaluate: read and write image/caption records.

Formats (``detect_format`` tells them apart):

- ``folder``: images with same-named sidecar captions (``a.jpg`` + ``a.txt``, or ``a.json`` with "caption");
- ``webdataset``: ``*.tar`` shards whose members are grouped by key (``k.jpg`` + ``k.txt`` / ``k.json``);
- ``parquet``: ``*.parquet`` files with an image column (encoded bytes, or a path relative to the file) and an
  optional caption column;
- ``tinyset``: what ``fluxion data build`` writes (``images.npy`` + ``captions.jsonl``);
- ``curated``: what ``fluxion curate`` writes: WebDataset shards plus ``manifest.parquet`` (every score, caption
  and decision, with each kept image's size), read by ``CuratedShards`` without opening a single image.

Reading is two steps so a pipeline can plan before it loads: ``list_items(path)`` returns cheap references in a
fixed order, ``load_items(refs)`` turns a batch of them into ``Record``s (each tar or parquet file opened once
per batch). ``iter_records(path)`` does both. Records carry the encoded image bytes untouched; decoding is the
caller's business (``decode_rgb``).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
CAPTION_SUFFIXES = (".txt", ".json")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "bytes", "image_bytes")  # parquet: encoded bytes
PATH_COLUMNS = ("path", "image_path", "file")  # parquet: a path, relative to the parquet file
CAPTION_COLUMNS = ("caption", "text", "prompt")
MANIFEST = "manifest.parquet"


@dataclass
class Record:
    """One image and its caption. `data` is the encoded file (JPEG/PNG/...) exactly as stored."""

    key: str  # unique inside a dataset; shard writers use it as the member stem
    data: bytes
    caption: str = ""
    meta: dict = field(
        default_factory=dict
    )  # anything else the source had (json sidecar fields, source path)


@dataclass(frozen=True)
class ItemRef:
    """A pointer to one record: `file` (an image, a tar or a parquet file) and where inside it."""

    file: str
    member: str = ""  # tar: the key; parquet: the row index as text; folder/tinyset: ""
    key: str = ""


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.is_file():
        if path.suffix == ".tar":
            return "webdataset"
        if path.suffix == ".parquet":
            return "parquet"
        raise ValueError(f"{path}: a dataset file must be a .tar shard or a .parquet file (or give a folder)")
    if (path / "images.npy").is_file() and (path / "captions.jsonl").is_file():
        return "tinyset"
    if (path / MANIFEST).is_file():
        return "curated"
    if any(path.glob("*.tar")):
        return "webdataset"
    if any(path.glob("*.parquet")):
        return "parquet"
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        return "folder"
    raise ValueError(f"{path} holds no images, .tar shards, .parquet files or tinyset")


def list_items(path: str | Path) -> list[ItemRef]:
    """Every record of a dataset as a cheap reference, in a fixed order (sorted files, stored order inside)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "folder":
        return [
            ItemRef(str(p), key=str(p.relative_to(path).with_suffix("")).replace(os.sep, "/"))
            for p in sorted(path.rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        ]
    if fmt in ("webdataset", "curated"):
        shards = [path] if path.is_file() else sorted(path.glob("*.tar"))
        return [ItemRef(str(s), member=k, key=k) for s in shards for k in _tar_keys(s)]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
        out = []
        for f in files:
            names = pq.read_schema(f).names
            keys = pq.read_table(f, columns=["key"]).column("key").to_pylist() if "key" in names else None
            n = pq.read_metadata(f).num_rows
            out += [ItemRef(str(f), str(i), keys[i] if keys else f"{f.stem}/{i:08d}") for i in range(n)]
        return out
    n = len(np.load(path / "images.npy", mmap_mode="r"))
    return [ItemRef(str(path), str(i), f"{i:08d}") for i in range(n)]


def load_items(refs: Iterable[ItemRef]) -> list[Record]:
    """Records for `refs`, in their order. Each container file is opened once per call."""
    refs = list(refs)
    out: dict[int, Record] = {}
    by_file: dict[str, list[int]] = {}
    for i, r in enumerate(refs):
        by_file.setdefault(r.file, []).append(i)
    for file, idx in by_file.items():
        p = Path(file)
        if p.suffix == ".tar":
            wanted = {refs[i].member: i for i in idx}
            for key, members in _tar_groups(p, set(wanted)):
                out[wanted[key]] = _record_from_members(key, members, source=file)
        elif p.suffix == ".parquet":
            for i, rec in zip(idx, _parquet_rows(p, [int(refs[i].member) for i in idx])):
                out[i] = rec
        elif p.is_dir():  # tinyset
            images = np.load(p / "images.npy", mmap_mode="r")
            lines = (p / "captions.jsonl").read_text().splitlines()
            for i in idx:
                j = int(refs[i].member)
                meta = json.loads(lines[j])
                out[i] = Record(refs[i].key, encode_png(np.asarray(images[j])), meta.pop("caption", ""), meta)
        else:
            for i in idx:
                out[i] = Record(refs[i].key, p.read_bytes(), *_sidecar(p))
    return [out[i] for i in range(len(refs))]


def iter_records(path: str | Path, batch: int = 256) -> Iterator[Record]:
    """Every record of a dataset (any format above), in `list_items` order."""
    refs = list_items(path)
    for s in range(0, len(refs), batch):
        yield from load_items(refs[s : s + batch])


# --- reading helpers ----------------------------------------------------------------------------------------------
def _sidecar(image_path: Path) -> tuple[str, dict]:
    txt, js = image_path.with_suffix(".txt"), image_path.with_suffix(".json")
    meta: dict = {"source": str(image_path)}
    caption = ""
    if js.is_file():
        extra = json.loads(js.read_text())
        caption = str(extra.pop("caption", ""))
        meta.update(extra)
    if txt.is_file():
        caption = txt.read_text().strip()
    return caption, meta


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is everything before the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (dot + ext).lower()


def _tar_keys(shard: Path) -> list[str]:
    keys, seen = [], set()
    with tarfile.open(shard) as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = _split_member(m.name)
            if ext in IMAGE_SUFFIXES and key not in seen:
                seen.add(key)
                keys.append(key)
    return keys


def _tar_groups(shard: Path, wanted: set[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each key of a shard, members of one key being adjacent (WebDataset rule)."""
    current, members = None, {}
    with tarfile.open(shard) as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = _split_member(m.name)
            if key != current:
                if current is not None and members:
                    yield current, members
                current, members = key, {}
            if wanted is None or key in wanted:
                members[ext] = tar.extractfile(m).read()
        if current is not None and members:
            yield current, members


def _record_from_members(key: str, members: dict[str, bytes], source: str) -> Record:
    image = next((members[e] for e in members if e in IMAGE_SUFFIXES), None)
    if image is None:
        raise ValueError(f"{source}: key {key} has no image member ({', '.join(sorted(members))})")
    meta: dict = {"source": source}
    caption = ""
    if ".json" in members:
        extra = json.loads(members[".json"])
        caption = str(extra.pop("caption", ""))
        meta.update(extra)
    if ".txt" in members:
        caption = members[".txt"].decode().strip()
    return Record(key, image, caption, meta)


def _parquet_rows(file: Path, rows: list[int]) -> list[Record]:
    import pyarrow.parquet as pq

    table = pq.read_table(file)
    names = table.column_names
    image_col = next((c for c in IMAGE_COLUMNS if c in names), None)
    path_col = next((c for c in PATH_COLUMNS if c in names), None)
    if image_col is None and path_col is None:
        raise ValueError(
            f"{file}: no image column; name one of {', '.join(IMAGE_COLUMNS + PATH_COLUMNS)} "
            "(encoded image bytes, or a path relative to the parquet file)"
        )
    caption_col = next((c for c in CAPTION_COLUMNS if c in names), None)
    sub = table.take(rows).to_pylist()
    out = []
    for i, row in zip(rows, sub):
        if image_col is not None:
            data = row.pop(image_col)
            if isinstance(data, dict):  # HF datasets store images as {"bytes": ..., "path": ...}
                data = data.get("bytes")
        else:
            data = (file.parent / row.pop(path_col)).read_bytes()
        caption = str(row.pop(caption_col) or "") if caption_col else ""
        key = str(row.pop("key", None) or f"{file.stem}/{i:08d}")
        out.append(Record(key, bytes(data or b""), caption, {"source": str(file), **row}))
    return out


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded bytes -> an RGB PIL image (alpha composited on white). Raises what Pillow raises."""
    im = Image.open(io.BytesIO(data))
    im.load()
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# --- writing ------------------------------------------------------------------------------------------------------
def write_webdataset(path: str | Path, records: Iterable[Record]) -> int:
    """One shard: for each record `key.<ext>` (the image as stored), `key.txt` and `key.json` (meta). Written to a
    temporary name and renamed, so a shard either exists whole or not at all. Returns the number of records."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tarfile.open(tmp, "w") as tar:
        for r in records:
            ext = _image_ext(r.data)
            members = [(ext, r.data), (".txt", r.caption.encode()), (".json", json.dumps(r.meta).encode())]
            for suffix, payload in members:
                info = tarfile.TarInfo(r.key + suffix)
                info.size = len(payload)
                info.mtime = 0  # byte-identical shards for identical input
                tar.addfile(info, io.BytesIO(payload))
            n += 1
    os.replace(tmp, path)
    return n


def write_folder(path: str | Path, records: Iterable[Record]) -> int:
    """Images with sidecar .txt captions (keys may contain '/': subfolders)."""
    path = Path(path)
    n = 0
    for r in records:
        target = path / (r.key + _image_ext(r.data))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(r.data)
        target.with_suffix(".txt").write_text(r.caption)
        n += 1
    return n


def write_parquet(path: str | Path, records: Iterable[Record]) -> int:
    """Columns key, image (bytes), caption (+ a JSON `meta` column); atomic like the shard writer."""
    import pyarrow as pa

    rows = list(records)
    table = pa.table(
        {
            "key": [r.key for r in rows],
            "image": pa.array([r.data for r in rows], pa.binary()),
            "caption": [r.caption for r in rows],
            "meta": [json.dumps(r.meta) for r in rows],
        }
    )
    write_table_atomic(table, path)
    return len(rows)


def write_table_atomic(table, path: str | Path) -> None:
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _image_ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".png" if not data else ".bin"


# --- curated output, as the trainer reads it ----------------------------------------------------------------------
class CuratedShards:
    """The kept images of a `fluxion curate` output folder, indexed from its manifest (no image is opened to
    build the index). `sizes[i]` is (width, height) for the trainer's aspect buckets; `load(i)` decodes one
    image to RGB; `caption(i, "long" | "short")` picks a caption (falls back to the source caption)."""

    def __init__(self, folder: str | Path):
        import pyarrow.parquet as pq

        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise FileNotFoundError(f"{folder} is not a curated dataset: {MANIFEST} is missing")
        self.folder = folder
        cols = ["key", "shard", "kept", "width", "height", "caption", "caption_long", "caption_short"]
        table = pq.read_table(folder / MANIFEST)
        rows = table.select([c for c in cols if c in table.column_names]).to_pylist()
        rows = [r for r in rows if r["kept"]]
        self.keys = [r["key"] for r in rows]
        self.shards = [r["shard"] for r in rows]
        self.sizes = [(int(r["width"]), int(r["height"])) for r in rows]
        self._captions = {
            "source": [r.get("caption") or "" for r in rows],
            "long": [r.get("caption_long") or r.get("caption") or "" for r in rows],
            "short": [r.get("caption_short") or r.get("caption") or "" for r in rows],
        }
        self._offsets: dict[
            str, dict[str, tuple[int, int]]
        ] = {}  # shard -> key -> (offset, size) of the image

    def __len__(self) -> int:
        return len(self.keys)

    def caption(self, index: int, kind: str = "long") -> str:
        return self._captions[kind][index]

    def _index(self, shard: str) -> dict[str, tuple[int, int]]:
        if shard not in self._offsets:
            table = {}
            with tarfile.open(self.folder / shard) as tar:
                for m in tar:
                    key, ext = _split_member(m.name)
                    if ext in IMAGE_SUFFIXES:
                        table[key] = (m.offset_data, m.size)
            self._offsets[shard] = table
        return self._offsets[shard]

    def read_bytes(self, index: int) -> bytes:
        offset, size = self._index(self.shards[index])[self.keys[index]]
        with open(self.folder / self.shards[index], "rb") as f:  # one seek, no tar walk per sample
            f.seek(offset)
            return f.read(size)

    def load(self, index: int) -> Image.Image:
        return decode_rgb(self.read_bytes(index))
