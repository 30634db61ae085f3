"""Provenance of generated images: an invisible watermark on every output, and an optional signed C2PA manifest.

Watermark: invisible-watermark's `dwtDctSvd` method (the one BFL's reference code names next to `dwtDct`) carries
a fixed 32-bit mark in the singular values of DCT blocks of the luma DWT band. Measured on our own test images
(benchmarks/bench_watermark.py): it survives JPEG quality 80 and a 0.5x resize, where `dwtDct` loses a quarter of
its bits on flat generated images. A mark counts as found when at least 28 of its 32 bits match: a random image
passes with probability P(Binomial(32, 1/2) >= 28) = 4.2e-6.

invisible-watermark refuses images under 256x256 pixels in its top-level encoder (a redundancy rule of thumb); the
embedding class itself works on any image whose luma DWT band holds one 4x4 block per bit, so we call it directly
and only refuse images under 64x64 (fluxion-tiny draws 128x128: 256 blocks, each bit 8 times).

C2PA: when the operator gives a signing certificate chain and key (PEM), c2pa-python writes a manifest naming the
generator (fluxion version, model) and whether input images were edited. `verify` reports both.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fluxion import __version__

MARK = b"FLX2"  # 32 bits
MARK_BITS = np.unpackbits(np.frombuffer(MARK, dtype=np.uint8)).astype(int).tolist()
MIN_MATCHING_BITS = 28
MIN_SIDE = 64
HEADROOM = 3  # grey levels kept free at both ends before embedding (see add_watermark)
# Scales tried by detection: an image may have been resized since it was marked; the mark lives on a block grid
# of the original size, so detection resamples back by the usual factors before decoding.
DETECT_SCALES = (1.0, 2.0, 0.5, 4 / 3, 1.5)


def _bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def add_watermark(image: Image.Image) -> Image.Image:
    """The image with the fluxion mark embedded (RGB out; alpha, if any, is dropped). PSNR 34-39 dB
    (benchmarks/bench_watermark.py)."""
    try:
        from imwatermark.dwtDctSvd import EmbedDwtDctSvd
    except ImportError:
        raise ValueError(
            "the invisible watermark needs the invisible-watermark package (pip install invisible-watermark), "
            "or pass --no-watermark"
        ) from None

    if min(image.size) < MIN_SIDE:
        raise ValueError(
            f"cannot watermark a {image.size[0]}x{image.size[1]} image: sides must be >= {MIN_SIDE}"
        )
    # Headroom: the mark moves luma/chroma by a few levels, and where a pixel sits at 0 or 255 (the flat white or
    # black backgrounds generated images are full of) clipping erased it: only 9 of 15 fluxion-tiny images kept a
    # detectable mark. Mapping [0, 255] onto [3, 252] first costs ~2 dB of PSNR and made it 15 of 15.
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    roomy = np.round(HEADROOM + px * (255 - 2 * HEADROOM) / 255).astype(np.uint8)
    marked = EmbedDwtDctSvd(watermarks=MARK_BITS, wmLen=len(MARK_BITS)).encode(
        np.ascontiguousarray(roomy[:, :, ::-1])
    )
    return Image.fromarray(np.clip(marked, 0, 255).astype(np.uint8)[:, :, ::-1].copy())


def watermark_if_possible(image: Image.Image) -> Image.Image:
    """`add_watermark`, or the image unchanged with a one-line warning when it is under MIN_SIDE px per side
    (the CLI and the server mark every output they can)."""
    import warnings

    if min(image.size) < MIN_SIDE:
        warnings.warn(
            f"not watermarked: the image is {image.size[0]}x{image.size[1]}, under {MIN_SIDE} px per side",
            stacklevel=2,
        )
        return image
    return add_watermark(image)


@dataclass(frozen=True)
class WatermarkResult:
    found: bool
    matching_bits: int  # the best over the scales tried, out of 32
    scale: float  # the resampling factor that gave it


def detect_watermark(image: Image.Image) -> WatermarkResult:
    from imwatermark.dwtDctSvd import EmbedDwtDctSvd

    decoder = EmbedDwtDctSvd(watermarks=[], wmLen=len(MARK_BITS))
    best = WatermarkResult(False, 0, 1.0)
    w, h = image.size
    for s in DETECT_SCALES:
        size = (round(w * s), round(h * s))
        if min(size) < MIN_SIDE or size[0] * size[1] > 4096 * 4096:
            continue
        im = image if s == 1.0 else image.convert("RGB").resize(size, Image.BICUBIC)
        bits = decoder.decode(_bgr(im))
        matching = int(sum(int(a) == b for a, b in zip(bits, MARK_BITS)))
        if matching > best.matching_bits:
            best = WatermarkResult(matching >= MIN_MATCHING_BITS, matching, s)
        if best.found:
            break
    return best


@dataclass(frozen=True)
class C2PASigner:
    """The operator's signing identity: a PEM certificate chain (leaf first) and its PEM private key, ES256 by
    default. `tsa_url` is an optional RFC 3161 time-stamp authority (None: no time stamp)."""

    cert_chain_pem: bytes
    private_key_pem: bytes
    alg: str = "es256"
    tsa_url: str | None = None

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path, alg: str = "es256") -> C2PASigner:
        return cls(Path(cert).read_bytes(), Path(key).read_bytes(), alg)


def c2pa_manifest(params: dict, edited: bool) -> dict:
    """The manifest definition: a c2pa.actions assertion saying the image was created (or edited) by a trained
    algorithm, and which model and fluxion version did it."""
    source = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
    agent = {"name": "fluxion", "version": __version__}
    model = {"model": str(params.get("model", "")), "references": int(params.get("references") or 0)}
    # C2PA requires the first action of a new asset to be c2pa.created (or c2pa.opened); an edit of input images
    # is a created asset followed by c2pa.edited.
    actions = [
        {"action": "c2pa.created", "digitalSourceType": source, "softwareAgent": agent, "parameters": model}
    ]
    if edited:
        actions.append({"action": "c2pa.edited", "digitalSourceType": source, "softwareAgent": agent})
    return {
        "claim_generator_info": [{"name": "fluxion", "version": __version__}],
        "title": "fluxion image",
        "assertions": [{"label": "c2pa.actions", "data": {"actions": actions}}],
    }


def sign_c2pa(data: bytes, mime: str, signer: C2PASigner, params: dict, edited: bool) -> bytes:
    """`data` (an encoded PNG / JPEG / WebP) with a signed C2PA manifest embedded."""
    import c2pa

    alg = getattr(c2pa.C2paSigningAlg, signer.alg.upper())
    info = c2pa.C2paSignerInfo(alg, signer.cert_chain_pem, signer.private_key_pem, signer.tsa_url)
    with c2pa.Signer.from_info(info) as s, c2pa.Builder(c2pa_manifest(params, edited)) as builder:
        out = io.BytesIO()
        builder.sign(s, mime, io.BytesIO(data), out)
        return out.getvalue()


def read_c2pa(data: bytes, mime: str) -> dict | None:
    """The active manifest as a dict (with the reader's validation state), or None when there is none."""
    import c2pa

    try:
        with c2pa.Reader(mime, io.BytesIO(data)) as reader:
            store = json.loads(reader.json())
    except c2pa.C2paError:
        return None
    active = store.get("manifests", {}).get(store.get("active_manifest", ""), {})
    return {"manifest": active, "validation_state": store.get("validation_state")}


_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def verify(path: str | Path) -> dict:
    """What `fluxion verify IMAGE` reports: the watermark check and the C2PA manifest, if any."""
    path = Path(path)
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
        im.load()
        mark = detect_watermark(im)
    try:
        import c2pa  # noqa: F401  (the [provenance] extra)

        checked = True
    except ImportError:
        checked = False
    manifest = read_c2pa(data, _MIME[fmt]) if checked and fmt in _MIME else None
    report = {
        "file": str(path),
        "watermark": {"found": mark.found, "matching_bits": mark.matching_bits, "of": len(MARK_BITS)},
        "c2pa": None,
        "c2pa_checked": checked,  # False: c2pa-python is not installed (pip install "fluxion[provenance]")
    }
    if manifest is not None:
        m = manifest["manifest"]
        actions = [
            a
            for assertion in m.get("assertions", [])
            if assertion.get("label", "").startswith("c2pa.actions")
            for a in assertion.get("data", {}).get("actions", [])
        ]
        report["c2pa"] = {
            "claim_generator": [g.get("name") for g in m.get("claim_generator_info", [])],
            "actions": [a.get("action") for a in actions],
            "model": next((a.get("parameters", {}).get("model") for a in actions), None),
            "validation_state": manifest["validation_state"],
            "signer": m.get("signature_info", {}).get("issuer"),
        }
    return report
