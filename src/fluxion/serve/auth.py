"""API keys and accounting.

A key reads `flx_<id>_<secret>`: the id finds the row, the secret is stored only as its SHA-256 and compared in
constant time. Keys are shown once, at creation (`fluxion keys create`). Cost is in BFL credits (1 credit =
$0.01): first megapixel + each further output megapixel + each input megapixel, at per-model prices.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
from dataclasses import dataclass
from pathlib import Path

from fluxion.serve.store import Store

KEY_PREFIX = "flx_"
MP = 1024 * 1024  # one megapixel, as BFL bills it (1024x1024 = 1 MP)

# BFL's published prices in credits: (first output MP, each further output MP and each input MP).
BFL_PRICES: dict[str, tuple[float, float]] = {
    "flux-2-klein-4b": (1.4, 0.1),
    "flux-2-klein-9b": (1.5, 0.2),
    "flux-2-klein-9b-preview": (1.5, 0.2),
    "flux-2-pro": (3.0, 1.5),
    "flux-2-max": (7.0, 3.0),
    "flux-2-flex": (5.0, 5.0),
}


@dataclass(frozen=True)
class PriceTable:
    prices: dict[str, tuple[float, float]]

    @staticmethod
    def load(path: str | None) -> PriceTable:
        """BFL's prices, overridden/extended by a JSON file {"model": [first_mp, per_mp], ...}."""
        prices = dict(BFL_PRICES)
        if path:
            try:
                raw = json.loads(Path(path).read_text())
                prices.update({k: (float(v[0]), float(v[1])) for k, v in raw.items()})
            except (OSError, ValueError, TypeError, IndexError, AttributeError) as e:
                raise ValueError(
                    f"price table {path}: expected a JSON object {{model: [first_mp, per_mp]}} ({e})"
                ) from None
        return PriceTable(prices)

    def cost(self, names: tuple[str, ...], input_mp: float, output_mp: float) -> float:
        """Credits for one image; the first of `names` (local name, BFL name) found in the table prices it;
        a model in none of them is free."""
        for n in names:
            if n in self.prices:
                first, per = self.prices[n]
                return round(first + max(output_mp - 1.0, 0.0) * per + input_mp * per, 4)
        return 0.0


def megapixels(width: int, height: int) -> float:
    return width * height / MP


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(store: Store, name: str, credits: float | None = None) -> str:
    if credits is not None and (not math.isfinite(credits) or credits < 0):
        raise ValueError(f"--credits must be a non-negative number, got {credits}")
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(24)
    store.add_key(key_id, name, _hash(secret), credits)
    return f"{KEY_PREFIX}{key_id}_{secret}"


def verify_key(store: Store, raw: str | None):
    """The key's row if `raw` is a valid, unrevoked key, else None."""
    if not raw or not raw.startswith(KEY_PREFIX):
        return None
    key_id, _, secret = raw[len(KEY_PREFIX) :].partition("_")
    row = store.get_key(key_id) if key_id and secret else None
    # Compare a hash even when the id is unknown, so both paths take the same time.
    expected = row.secret_hash if row is not None else _hash("-" + secret)
    ok = hmac.compare_digest(_hash(secret), expected)
    return row if ok and row is not None and row.revoked_at is None else None
