"""Turning untrusted request fields into validated images and sizes. Every failure is an `InputError` whose
message says what to change; nothing here touches the job store.

Images: base64 or a data URL (strict alphabet), or an http(s) URL only when it starts with an operator-listed
prefix (fetched without redirects, size-capped). The header is read first: images over `max_pixels` are refused
before any pixel is decoded (decompression bombs), then the image is decoded fully (truncated files fail here).
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import math
import socket
import warnings
from urllib.parse import urlsplit

from PIL import Image, UnidentifiedImageError

from fluxion.editing.references import MAX_ASPECT, MAX_OUTPUT_PIXELS

MAX_INPUT_BYTES = 20 * 1024 * 1024  # per image, after base64 decoding
MAX_INPUT_PIXELS = 4 * MAX_OUTPUT_PIXELS  # 16 MP: references are downscaled anyway
MIN_SIDE = 64


class InputError(ValueError):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def decode_image_field(value: str, field: str, allow_url_prefixes: tuple[str, ...] = ()) -> bytes:
    """The raw bytes of an image field (base64, data URL or allow-listed URL)."""
    v = value.strip()
    if v.startswith(("http://", "https://")):
        return _fetch(v, field, allow_url_prefixes)
    if v.startswith("data:"):
        head, sep, v = v.partition(",")
        if not sep or ";base64" not in head:
            raise InputError(f"{field}: a data URL must look like data:image/png;base64,<data>", field)
    try:
        data = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            f"{field} is not valid base64: send the image file's bytes base64-encoded "
            "(or a data URL, or an allow-listed http(s) URL)",
            field,
        ) from None
    if len(data) > MAX_INPUT_BYTES:
        raise InputError(
            f"{field} is {len(data) / 2**20:.1f} MiB; at most {MAX_INPUT_BYTES >> 20} MiB", field
        )
    return data


def _fetch(url: str, field: str, prefixes: tuple[str, ...]) -> bytes:
    if not any(url.startswith(p) for p in prefixes):
        raise InputError(
            f"{field}: URL inputs are accepted only from the operator's allow-list; send the image as base64 instead",
            field,
        )
    import httpx

    try:
        with httpx.stream("GET", url, timeout=10.0, follow_redirects=False) as r:
            if r.status_code != 200:
                raise InputError(f"{field}: fetching {url} answered HTTP {r.status_code}", field)
            chunks, size = [], 0
            for chunk in r.iter_bytes():
                size += len(chunk)
                if size > MAX_INPUT_BYTES:
                    raise InputError(f"{field}: {url} is larger than {MAX_INPUT_BYTES >> 20} MiB", field)
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as e:
        raise InputError(f"{field}: could not fetch {url} ({type(e).__name__})", field) from None


def open_image(data: bytes, field: str) -> Image.Image:
    """Decode and check one input image (size limits, aspect, completeness); returns it in RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > MAX_INPUT_PIXELS:
                raise InputError(
                    f"{field} is {w}x{h} ({w * h / 1e6:.0f} MP); inputs may have at most "
                    f"{MAX_INPUT_PIXELS / 2**20:.0f} MP: downscale it",
                    field,
                )
            im.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"{field} has far too many pixels; inputs may have at most {MAX_INPUT_PIXELS / 2**20:.0f} MP: downscale it",
            field,
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"{field} is not an image Pillow can read (send PNG, JPEG or WebP)", field) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{field} is damaged or truncated ({e}); send the complete file", field) from None
    if min(w, h) < MIN_SIDE:
        raise InputError(f"{field} is {w}x{h}: both sides must be at least {MIN_SIDE} px", field)
    if max(w / h, h / w) > MAX_ASPECT:
        raise InputError(f"{field} is {w}x{h}: the aspect ratio must be at most {MAX_ASPECT:g}:1", field)
    return im.convert("RGB")


def check_size(width: int, height: int, max_mp: float, field: str = "width/height") -> None:
    """Output size rules: multiples of 16, each side >= 64, at most 8:1, at most `max_mp` megapixels."""
    for name, v in (("width", width), ("height", height)):
        if v < MIN_SIDE:
            raise InputError(f"{name} {v} is below {MIN_SIDE}: use at least {MIN_SIDE}", name)
        if v % 16:
            raise InputError(
                f"{name} {v} is not a multiple of 16: use {v // 16 * 16} or {v // 16 * 16 + 16}", name
            )
    if width * height > max_mp * 2**20:
        raise InputError(
            f"size {width}x{height} is {width * height / 2**20:.2f} MP; this server allows at most {max_mp:g} MP "
            f"(e.g. {int(math.sqrt(max_mp) * 1024) // 16 * 16}x{int(math.sqrt(max_mp) * 1024) // 16 * 16})",
            field,
        )
    if max(width / height, height / width) > MAX_ASPECT:
        raise InputError(f"size {width}x{height}: the aspect ratio must be at most {MAX_ASPECT:g}:1", field)


def size_from_input(image: Image.Image, max_mp: float) -> tuple[int, int]:
    """The first input's size, scaled down (aspect kept) to max_mp and rounded down to multiples of 16."""
    w, h = image.size
    s = min(1.0, math.sqrt(max_mp * 2**20 / (w * h)))
    return max(MIN_SIDE, int(w * s) // 16 * 16), max(MIN_SIDE, int(h * s) // 16 * 16)


def parse_size(size: str, field: str = "size") -> tuple[int, int] | None:
    """OpenAI's "1024x1024" (None for "auto")."""
    if size == "auto":
        return None
    w, sep, h = size.partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise InputError(f'size must be "WIDTHxHEIGHT" (e.g. "1024x1024") or "auto", got {size!r}', field)
    return int(w), int(h)


def check_public_url(url: str, field: str, allow_private: bool) -> None:
    """SSRF guard for webhook URLs: http(s) only, and the host must resolve to public addresses only (unless
    the operator allows private ones)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"{field} must be an http(s) URL with a host, got {url!r}", field)
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise InputError(f"{field}: the host {parts.hostname!r} does not resolve", field) from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if not addr.is_global or addr.is_multicast:
            raise InputError(
                f"{field}: {parts.hostname} resolves to the non-public address {addr}; "
                "webhooks go to public hosts only",
                field,
            )
