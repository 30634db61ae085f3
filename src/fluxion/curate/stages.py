"""The stage protocol and the stages that need no model weights.

A batch is a list of rows (dicts). Every row has the base columns of ``BASE_SCHEMA``; each stage adds its own
columns (``Stage.schema``), filled for every row so batches always have one schema. A stage never removes a row:
it drops one by writing the reason (``drop(row, stage, reason)``), so the manifest keeps every decision and the
exclusion sink is simply the dropped rows. ``run_stage`` calls a stage on the live rows only and records its time
per row (``t_<stage>``), from which the report derives throughput; per-stage counts come from ``dropped_by``.

Keys starting with "_" are per-process caches (the decoded image) and never leave the process.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

BASE_SCHEMA = {  # column -> pyarrow type name (see pipeline.arrow_schema)
    "key": "string",
    "shard": "int64",
    "source": "string",
    "url": "string",
    "caption": "string",
    "meta": "string",  # JSON of the source's extra fields
    "image": "binary",  # the encoded image (normalised by decode); emptied for dropped rows
    "thumb": "binary",  # a small JPEG for the report's sample grids
    "dropped_by": "string",  # "" while kept
    "reason": "string",
}
THUMB_SIDE = 96


def drop(row: dict, stage: str, reason: str) -> None:
    row["dropped_by"], row["reason"] = stage, reason


def live(row: dict) -> bool:
    return not row["dropped_by"]


class Stage:
    """One step. Subclasses set `name` and `schema` ({column: arrow type}), and implement `process(rows)`, which
    fills those columns on the live rows it is given and may `drop` some. `setup()` runs once per worker before
    the first batch (load models there, never in __init__: stages are pickled to Ray workers)."""

    name = "stage"
    schema: dict[str, str] = {}
    num_gpus: float = 0.0  # > 0: Ray gives each worker this share of a GPU
    stateful = False  # True: holds a model; Ray runs it in an actor pool

    def setup(self) -> None:
        pass

    def process(self, rows: list[dict]) -> None:
        raise NotImplementedError


DEFAULTS = {"string": "", "binary": b"", "float64": float("nan"), "int64": -1, "bool": False}


def run_stage(stage: Stage, rows: list[dict]) -> list[dict]:
    """Apply `stage` to the live rows, fill its columns on all rows, record its time per processed row."""
    for row in rows:
        for col, typ in stage.schema.items():
            row.setdefault(col, DEFAULTS[typ])
    todo = [r for r in rows if live(r)]
    start = time.perf_counter()
    if todo:
        stage.process(todo)
    per_row = (time.perf_counter() - start) / max(1, len(todo))
    for row in rows:
        row[f"t_{stage.name}"] = per_row if row in todo else 0.0
    return rows


def rgb(row: dict) -> Image.Image:
    """The row's image as RGB, decoded once per process."""
    if "_rgb" not in row:
        row["_rgb"] = Image.open(io.BytesIO(row["image"])).convert("RGB")
    return row["_rgb"]


def gray_small(row: dict, side: int = 512) -> np.ndarray:
    """Luminance in [0, 255] as float32, downscaled so the longer side is at most `side` (metrics are per-pixel
    statistics, so this bounds their cost without changing what they measure at the scales we filter on)."""
    if "_gray" not in row:
        im = rgb(row)
        if max(im.size) > side:
            im = im.copy()
            im.thumbnail((side, side), Image.BILINEAR)
        row["_gray"] = np.asarray(im.convert("L"), dtype=np.float32)
    return row["_gray"]


# --- decode + validate --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeConfig:
    min_side: int = 64  # pixels; smaller images are dropped
    max_aspect: float = 4.0  # long side / short side
    max_pixels: int = 64_000_000  # larger headers are refused before decoding (decompression bombs)
    min_bytes: int = 100
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO")


class Decode(Stage):
    """Open, check and normalise each image. Corrupt, truncated, oversized (bomb), too small, too elongated or
    disallowed-format files are dropped with the reason. EXIF orientation is applied; CMYK, 16-bit, palette and
    alpha images become 8-bit RGB (alpha composited on white). Images that needed any of that are re-encoded as
    PNG (lossless); the others keep their original bytes."""

    name = "decode"
    schema = {"width": "int64", "height": "int64", "format": "string", "mode": "string", "normalised": "bool"}

    def __init__(self, cfg: DecodeConfig):
        self.cfg = cfg

    def process(self, rows: list[dict]) -> None:
        for row in rows:
            reason = self._one(row)
            if reason:
                drop(row, self.name, reason)
                row["image"] = b""
            if "_rgb" in row:  # decoded (kept, or dropped for size / aspect): a thumbnail for the report
                im = row["_rgb"].copy()
                im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=80)
                row["thumb"] = buf.getvalue()

    def _one(self, row: dict) -> str:
        cfg, data = self.cfg, row["image"]
        try:
            with warnings.catch_warnings():
                # Pillow warns (and raises above 2x) on big images; we apply our own limit on the header.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))
                w, h = im.size
                row["format"], row["mode"] = im.format or "", im.mode
                if w * h > cfg.max_pixels:
                    return f"decompression bomb: {w}x{h} > {cfg.max_pixels} pixels"
                if im.format not in cfg.formats:
                    return f"format: {im.format} not allowed"
                if len(data) < cfg.min_bytes:
                    return f"corrupt: only {len(data)} bytes"
                im.load()
        except Image.DecompressionBombError as e:
            return f"decompression bomb: {e}"
        except (OSError, SyntaxError, ValueError) as e:  # Pillow's ways of saying corrupt / truncated
            msg = " ".join(str(e).split()).replace(" <_io.BytesIO object", "").split(" at 0x")[0]
            return f"corrupt: {msg[:120]}"
        changed = False
        oriented = ImageOps.exif_transpose(im)
        if oriented is not im:
            changed = im.getexif().get(0x0112, 1) != 1
            im = oriented
        if im.mode != "RGB":
            im, changed = _to_rgb8(im), True
        w, h = im.size
        row["width"], row["height"], row["normalised"], row["_rgb"] = w, h, changed, im
        if min(w, h) < cfg.min_side:
            return f"too small: {w}x{h} < {cfg.min_side}"
        if max(w, h) / min(w, h) > cfg.max_aspect:
            return f"aspect: {max(w, h) / min(w, h):.2f} > {cfg.max_aspect}"
        if changed:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            row["image"] = buf.getvalue()
        return ""


def _to_rgb8(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale the full range to 8 bits (Pillow's convert("L") would clip at 255).
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / hi * 255 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")  # CMYK, YCbCr, L, P, 1, F


# --- technical quality --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QualityConfig:
    min_sharpness: float = 0.0  # variance of the Laplacian on the <=512 px luminance; blur gives ~< 20
    max_dark: float = 1.0  # fraction of pixels <= 5 (0..255)
    max_bright: float = 1.0  # fraction of pixels >= 250
    max_blockiness: float = 10.0  # mean 8x8-boundary step / mean interior step; clean ~1, heavy JPEG > 1.5
    min_contrast: float = 0.0  # std of luminance; flat images ~< 5


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian (the classic focus measure)."""
    lap = gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1] - 4 * gray[1:-1, 1:-1]
    return float(lap.var())


def blockiness(gray: np.ndarray) -> float:
    """Mean absolute step across 8-pixel block boundaries divided by the mean step elsewhere (both directions).
    JPEG quantisation makes boundary steps larger than interior ones; ~1 means no visible blocking."""
    dx = np.abs(np.diff(gray, axis=1))
    dy = np.abs(np.diff(gray, axis=0))
    bx = np.zeros(dx.shape[1], bool)
    bx[7::8] = True
    by = np.zeros(dy.shape[0], bool)
    by[7::8] = True
    boundary = dx[:, bx].mean() + dy[by, :].mean()
    inner = dx[:, ~bx].mean() + dy[~by, :].mean()
    return float(boundary / max(inner, 1e-3))


class Quality(Stage):
    name = "quality"
    schema = {
        "sharpness": "float64",
        "dark": "float64",
        "bright": "float64",
        "blockiness": "float64",
        "contrast": "float64",
    }

    def __init__(self, cfg: QualityConfig):
        self.cfg = cfg

    def process(self, rows: list[dict]) -> None:
        c = self.cfg
        for row in rows:
            g = gray_small(row)
            row["sharpness"] = laplacian_variance(g)
            row["dark"] = float((g <= 5).mean())
            row["bright"] = float((g >= 250).mean())
            row["blockiness"] = blockiness(g) if min(g.shape) >= 16 else 1.0
            row["contrast"] = float(g.std())
            checks = [  # exposure before flatness: a near-black image is also flat, but dark is the cause
                (row["dark"] > c.max_dark, f"underexposed: {row['dark']:.2f} dark > {c.max_dark}"),
                (row["bright"] > c.max_bright, f"overexposed: {row['bright']:.2f} bright > {c.max_bright}"),
                (
                    row["contrast"] < c.min_contrast,
                    f"flat: contrast {row['contrast']:.1f} < {c.min_contrast}",
                ),
                (
                    row["sharpness"] < c.min_sharpness,
                    f"blurry: sharpness {row['sharpness']:.1f} < {c.min_sharpness}",
                ),
                (
                    row["blockiness"] > c.max_blockiness,
                    f"blocky: {row['blockiness']:.2f} > {c.max_blockiness}",
                ),
            ]
            reason = next((why for bad, why in checks if bad), "")
            if reason:
                drop(row, self.name, reason)


# --- perceptual hashes (the dedup itself is global: curate/dedup.py) ----------------------------------------------
class Hashes(Stage):
    """pHash (64 bits, imagehash's DCT hash) and PDQ (256 bits, Meta's, with its quality score 0..100), both from
    curate/hashes.py (numpy only)."""

    name = "hash"
    schema = {"phash": "int64", "pdq": "string", "pdq_quality": "int64"}

    def process(self, rows: list[dict]) -> None:
        from fluxion.curate.hashes import pdq, phash

        for row in rows:
            im = rgb(row)
            row["phash"] = phash(im)  # signed int64 holding the 64 bits
            small = im if max(im.size) <= 512 else im.resize((512, 512), Image.BILINEAR)  # PDQ resizes anyway
            row["pdq"], row["pdq_quality"] = pdq(small)


# --- text in the image ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextConfig:
    recognise: bool = True  # False: detection only (faster), no `ocr_text`
    max_text_area: float = 1.0  # drop when text boxes cover more than this fraction of the image
    min_score: float = 0.5  # recognition confidence below which a box's text is ignored
    side: int = 640  # images are downscaled so the long side is at most this before detection


class Text(Stage):
    """Text detection (+ recognition) with rapidocr's bundled PP-OCR ONNX models: the area text covers (a filter)
    and the text read (for typography captions)."""

    name = "text"
    schema = {"text_area": "float64", "text_boxes": "int64", "ocr_text": "string"}
    stateful = True

    def __init__(self, cfg: TextConfig):
        self.cfg = cfg

    def setup(self) -> None:
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()

    def process(self, rows: list[dict]) -> None:
        c = self.cfg
        for row in rows:
            im = rgb(row)
            if max(im.size) > c.side:
                im = im.copy()
                im.thumbnail((c.side, c.side), Image.BILINEAR)
            result, _ = self.engine(np.asarray(im), use_cls=False, use_rec=c.recognise)
            boxes = [r[0] if c.recognise else r for r in (result or [])]
            mask = np.zeros((im.height, im.width), bool)
            for box in boxes:  # axis-aligned cover of each quadrilateral
                xs, ys = [p[0] for p in box], [p[1] for p in box]
                mask[int(max(0, min(ys))) : int(max(ys)) + 1, int(max(0, min(xs))) : int(max(xs)) + 1] = True
            row["text_area"] = float(mask.mean())
            row["text_boxes"] = len(boxes)
            if c.recognise:
                row["ocr_text"] = " ".join(r[1] for r in (result or []) if r[2] >= c.min_score)
            if row["text_area"] > c.max_text_area:
                drop(row, self.name, f"text: covers {row['text_area']:.2f} > {c.max_text_area}")
