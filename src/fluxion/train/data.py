"""Training data: image/caption pairs and edit pairs, batched by resolution bucket.

Three layouts are read:
- a tinyset folder (what `fluxion data build` writes): images.npy uint8 [N, H, W, 3] + captions.jsonl, and
  optionally edits.jsonl ({"refs": [i, ...], "target": j, "caption": ...}) for edit-pair training;
- an image folder with same-named .txt captions (the kohya / ai-toolkit convention), any sizes: each image is
  resized and centre-cropped to the nearest aspect bucket of about `pixels` pixels;
- WebDataset-style `.tar` shards of the same (image + .txt or .json caption per key), e.g. `fluxion curate`'s
  output; beside them, `precomputed-<pixels>/<shard>.safetensors` (curate's precompute stage) may hold each
  image's VAE latent at its aspect bucket and its caption's text embedding, which the trainer then uses instead
  of encoding (when they were made by the same VAE weights and text encoder: see `precomputed_digests`).
Every sample becomes pixels in [-1, 1] as a float tensor [3, H, W].
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Sample:
    image: Tensor  # [3, H, W] in [-1, 1]
    caption: str
    refs: list[Tensor] = field(default_factory=list)  # reference images for edit pairs, each [3, h, w]
    key: str = ""  # a stable name of the image (source folder + index), for the latent cache
    ref_keys: list[str] = field(default_factory=list)
    # Precomputed by `fluxion curate` (TarShards): the VAE latent [128, H/16, W/16] of `image` and the text
    # embedding [max_length, C] of `caption`, with the digests of the VAE weights and text encoder that made them.
    latent: Tensor | None = None
    context: Tensor | None = None
    made_by: tuple[str, str] = ("", "")  # (VAE weights digest, text encoder digest); "" = not precomputed


# --- precomputed latents and text embeddings (written by fluxion.curate.precompute) ---------------------------
PRECOMPUTED_FORMAT = "fluxion-precomputed-v1"


def precomputed_folder(folder: str | Path, pixels: int) -> Path:
    """Where precomputed tensors for aspect buckets of about `pixels` pixels live beside a folder of shards: one
    safetensors file per shard (same stem), tensors `latent.<key>` and `text.<key>`, fp32."""
    return Path(folder) / f"precomputed-{pixels}"


@functools.lru_cache(maxsize=8)
def weights_digest(path: str) -> str:
    """sha256 (16 hex digits) of a weights file's bytes (a folder: of its files' names and bytes, sorted): names
    the VAE that made precomputed latents, so the trainer uses them only with the same VAE."""
    p = Path(path)
    h = hashlib.sha256()
    for f in [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(p) if f != p else ''}\0".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def text_digest(encoder) -> str:
    """16 hex digits naming a loaded text encoder (fluxion.text.cache.encoder_identity: config, weights dtype,
    tokenizer and model files), for precomputed text embeddings."""
    from fluxion.text.cache import encoder_identity

    return hashlib.sha256(encoder_identity(encoder).encode()).hexdigest()[:16]


def nearest_bucket(bucket_list: list[tuple[int, int]], width: int, height: int) -> tuple[int, int]:
    """The (width, height) bucket closest in log aspect ratio to an image of this size."""
    aspect = width / height
    return min(bucket_list, key=lambda wh: abs(np.log(wh[0] / wh[1] / aspect)))


def to_tensor(image: np.ndarray | Image.Image) -> Tensor:
    """uint8 HWC (or a PIL image) -> float [3, H, W] in [-1, 1]."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def buckets(pixels: int, multiple: int = 16, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `multiple`, with about `pixels` pixels and aspect up to max_aspect."""
    out = set()
    for w in range(multiple, int((pixels * max_aspect) ** 0.5) + multiple, multiple):
        h = max(multiple, round(pixels / w / multiple) * multiple)
        if max(w / h, h / w) <= max_aspect:
            out.add((w, h))
    return sorted(out)


def fit_to_bucket(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so the image covers `size` (w, h), then centre-crop to it."""
    w, h = size
    scale = max(w / image.width, h / image.height)
    resized = image.resize(
        (max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.LANCZOS
    )
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    return resized.crop((left, top, left + w, top + h))


class TinySet:
    """A tinyset folder. Images are memory-mapped, so opening it costs nothing."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        for name in ("images.npy", "captions.jsonl"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not a tinyset folder: {name} is missing")
        self.folder = folder
        self.images = np.load(folder / "images.npy", mmap_mode="r")
        self.records = [
            json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines() if line
        ]
        if len(self.records) != len(self.images):
            raise ValueError(f"{folder}: {len(self.images)} images but {len(self.records)} captions")
        edits = folder / "edits.jsonl"
        self.edits = (
            [json.loads(line) for line in edits.read_text().splitlines() if line] if edits.is_file() else []
        )

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every image in this folder."""
        return int(self.images.shape[2]), int(self.images.shape[1])

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, index: int) -> Sample:
        return Sample(
            to_tensor(self.images[index]), self.records[index]["caption"], key=f"{self.folder}:{index}"
        )

    def edit_sample(self, index: int) -> Sample:
        edit = self.edits[index]
        return Sample(
            to_tensor(self.images[edit["target"]]),
            edit["caption"],
            [to_tensor(self.images[r]) for r in edit["refs"]],
        )


class ImageFolder:
    """Images with same-named .txt captions; each image goes to its nearest aspect bucket."""

    def __init__(self, folder: str | Path, pixels: int = 128 * 128):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {folder}")
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise ValueError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.buckets = buckets(pixels)
        self.captions = []
        for p in self.paths:
            txt = p.with_suffix(".txt")
            self.captions.append(txt.read_text().strip() if txt.is_file() else "")
        self.sizes = []
        for p in self.paths:
            with Image.open(p) as im:
                aspect = im.width / im.height
            self.sizes.append(min(self.buckets, key=lambda wh: abs(np.log(wh[0] / wh[1] / aspect))))

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, index: int) -> Sample:
        with Image.open(self.paths[index]) as im:
            image = fit_to_bucket(im.convert("RGB"), self.sizes[index])
        return Sample(to_tensor(image), self.captions[index], key=f"{self.paths[index]}:{self.sizes[index]}")


class TarShards:
    """WebDataset-style shards: `*.tar` files whose members are grouped by key (`key.png` + `key.txt`, or
    `key.json` with a "caption" field). The index (member offsets and image sizes) is read once; images are
    decoded on demand and fitted to their nearest aspect bucket, like ImageFolder."""

    def __init__(self, folder: str | Path, pixels: int = 128 * 128, shards: list[Path] | None = None):
        import tarfile

        self.shards = sorted(Path(folder).glob("*.tar")) if shards is None else [Path(p) for p in shards]
        if not self.shards:
            raise ValueError(f"{folder} holds no .tar shards")
        self.buckets = buckets(pixels)
        self.items: list[tuple[int, str, str]] = []  # (shard index, image member, caption or json member)
        self.captions: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        # Where each image's bytes lie in its (uncompressed) shard: (byte offset, length). None for a compressed
        # shard, read through tarfile instead. Opening a tar by member name scans every header before it, so a
        # per-sample open would cost O(shard) per image.
        self.spans: list[tuple[int, int] | None] = []
        for k, shard in enumerate(self.shards):
            try:
                tar, plain = tarfile.open(shard, "r:"), True
            except (
                tarfile.ReadError
            ):  # gzip / bz2 / xz inside a .tar name: tarfile still reads it, without seeking
                tar, plain = tarfile.open(shard), False
            with tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                for name, member in members.items():
                    stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
                    if "." + suffix.lower() not in IMAGE_SUFFIXES:
                        continue
                    caption = ""
                    if stem + ".txt" in members:
                        caption = tar.extractfile(members[stem + ".txt"]).read().decode().strip()
                    elif stem + ".json" in members:
                        caption = json.loads(tar.extractfile(members[stem + ".json"]).read()).get(
                            "caption", ""
                        )
                    with Image.open(tar.extractfile(member)) as im:  # reads the header only
                        size = nearest_bucket(self.buckets, im.width, im.height)
                    self.items.append((k, name, caption))
                    self.spans.append(
                        (member.offset_data, member.size) if plain and not member.issparse() else None
                    )
                    self.captions.append(caption)
                    self.sizes.append(size)
        # Precomputed latents / text embeddings for these buckets, per shard, with who made them.
        self.precomputed: dict[int, tuple[Path, tuple[str, str]]] = {}
        pre = precomputed_folder(folder, pixels)
        for k, shard in enumerate(self.shards):
            path = pre / (shard.stem + ".safetensors")
            if path.is_file():
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
                if meta.get("format") == PRECOMPUTED_FORMAT:
                    self.precomputed[k] = (path, (meta.get("vae", ""), meta.get("text", "")))

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, index: int) -> Sample:
        import io
        import tarfile

        k, name, caption = self.items[index]
        span = self.spans[index]
        if span is not None:
            with open(self.shards[k], "rb") as f:
                f.seek(span[0])
                data = f.read(span[1])
        else:
            with tarfile.open(self.shards[k]) as tar:
                data = tar.extractfile(name).read()
        with Image.open(io.BytesIO(data)) as im:
            image = fit_to_bucket(im.convert("RGB"), self.sizes[index])
        sample = Sample(to_tensor(image), caption, key=f"{self.shards[k]}:{name}:{self.sizes[index]}")
        if k in self.precomputed:
            from safetensors import safe_open

            path, sample.made_by = self.precomputed[k]
            stem = name.rsplit(".", 1)[0]
            with safe_open(str(path), "pt") as f:
                names = set(f.keys())
                if f"latent.{stem}" in names:
                    sample.latent = f.get_tensor(f"latent.{stem}")
                if f"text.{stem}" in names:
                    sample.context = f.get_tensor(f"text.{stem}")
        return sample


class BatchSampler:
    """Endless batches, each from one source and one size, so tensors stack without padding.

    Sources are picked in proportion to their size; `edit_fraction` of the batches are edit pairs where a source
    has them. The RNG is explicit so a run (and a resumed run) draws the same batches.
    """

    def __init__(
        self,
        sources: list,
        batch_size: int,
        edit_fraction: float = 0.0,
        seed: int = 0,
        caption_variety: float = 0.0,
    ):
        if not sources:
            raise ValueError("no training data: give at least one dataset folder")
        self.sources, self.batch_size, self.edit_fraction = sources, batch_size, edit_fraction
        self.rng = random.Random(seed)
        # Chance that a tinyset caption is rephrased when drawn (curate.tinyset.captions.vary_caption);
        # 0 draws nothing extra from the RNG, so runs without it are unchanged.
        self.caption_variety = caption_variety

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])

    def next_batch(self) -> list[Sample]:
        weights = [len(s) for s in self.sources]
        src = self.rng.choices(self.sources, weights=weights)[0]
        edits = getattr(src, "edits", [])
        if edits and self.rng.random() < self.edit_fraction:
            idx = [self.rng.randrange(len(edits)) for _ in range(self.batch_size)]
            # One edit kind per batch keeps the number and sizes of references equal inside the batch.
            n_refs = len(edits[idx[0]]["refs"])
            idx = [i if len(edits[i]["refs"]) == n_refs else idx[0] for i in idx]
            return [src.edit_sample(i) for i in idx]
        if isinstance(src, (ImageFolder, TarShards)):
            size = src.sizes[self.rng.randrange(len(src))]
            pool = [i for i, s in enumerate(src.sizes) if s == size]
            return [src.sample(self.rng.choice(pool)) for _ in range(self.batch_size)]
        idx = [self.rng.randrange(len(src)) for _ in range(self.batch_size)]
        samples = [src.sample(i) for i in idx]
        if self.caption_variety and isinstance(src, TinySet):
            from fluxion.curate.tinyset.captions import vary_caption

            for s, i in zip(samples, idx):
                s.caption = vary_caption(src.records[i], self.rng, self.caption_variety)
        return samples


def open_sources(paths, pixels: int = 128 * 128) -> list:
    out = []
    for p in paths:
        p = Path(p)
        if (p / "images.npy").is_file():
            out.append(TinySet(p))
        elif p.is_dir() and any(p.glob("*.tar")):
            out.append(TarShards(p, pixels))
        else:
            out.append(ImageFolder(p, pixels))
    return out


class Prefetcher:
    """Draws the next batches of a sampler in a background thread while the GPU runs the current step.

    The sampler's own draws are unchanged (one thread, in order), so a run sees exactly the batches it would
    see without this. `state_dict` is the sampler's state right after the last batch handed out (not after the
    ones drawn ahead), so a checkpoint resumes at the same batch as without prefetching.
    """

    def __init__(self, sampler, depth: int = 2):
        import queue

        self.sampler, self.depth = sampler, depth
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = None
        self._state = None  # state after the last batch handed out; None: none handed out yet

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("load the sampler state before the first batch is drawn")
        self.sampler.load_state_dict(state)

    def state_dict(self) -> dict:
        return self._state if self._state is not None else self.sampler.state_dict()

    def _run(self) -> None:
        while True:
            try:
                batch = self.sampler.next_batch()
                item = (batch, self.sampler.state_dict(), None)
            except BaseException as e:  # handed to the consumer, raised there
                item = (None, None, e)
            self._queue.put(item)
            if item[2] is not None:
                return

    def next_batch(self):
        if self._thread is None:
            import threading

            self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
            self._thread.start()
        batch, state, error = self._queue.get()
        if error is not None:
            raise error
        self._state = state
        return batch

    def __getattr__(self, name):  # everything else (sources, batch_size, ...) is the sampler's
        return getattr(self.sampler, name)
