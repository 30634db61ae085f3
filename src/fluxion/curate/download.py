"""URL lists: reading them, and the download stage.

A URL list is a .txt file (one URL per line, optionally a tab and a caption) or a .csv / .parquet file with a
`url` column (and optionally `caption`, `key`). Downloads are resumable at shard granularity: a finished shard is
never fetched again (the pipeline skips it); failed downloads are dropped with the HTTP or network reason.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fluxion.curate.stages import Stage, drop


@dataclass(frozen=True)
class DownloadConfig:
    timeout_s: float = 10.0
    retries: int = 2
    max_bytes: int = 50_000_000
    user_agent: str = "fluxion-curate/0.1 (+https://github.com/fluxion)"


def read_url_list(path: str | Path) -> list[dict]:
    """[{"key", "url", "caption"}] in file order; keys are the first 16 hex digits of the URL's SHA-1 (stable)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"URL list not found: {path}")
    rows = []
    if path.suffix == ".txt":
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                url, _, caption = line.partition("\t")
                rows.append({"url": url.strip(), "caption": caption.strip()})
    elif path.suffix in (".csv", ".parquet"):
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        table = pcsv.read_csv(path) if path.suffix == ".csv" else pq.read_table(path)
        if "url" not in table.column_names:
            raise ValueError(
                f"{path}: a URL table needs a `url` column (has {', '.join(table.column_names)})"
            )
        for r in table.to_pylist():
            rows.append({"url": str(r["url"]), "caption": str(r.get("caption") or ""), "key": r.get("key")})
    else:
        raise ValueError(f"{path}: a URL list is a .txt, .csv or .parquet file")
    for r in rows:
        if not r["url"].startswith(("http://", "https://")):
            raise ValueError(f"{path}: not an http(s) URL: {r['url'][:100]}")
        r["key"] = str(r.get("key") or hashlib.sha1(r["url"].encode()).hexdigest()[:16])
    return rows


class Download(Stage):
    name = "download"
    schema = {"http_status": "int64"}

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg

    def fetch(self, url: str) -> tuple[bytes, int, str]:
        """(bytes, status, error). Retries network errors and 5xx; 4xx are final."""
        c = self.cfg
        err, status = "", -1
        for _ in range(c.retries + 1):
            try:
                req = urllib.request.Request(url, headers={"User-Agent": c.user_agent})
                with urllib.request.urlopen(req, timeout=c.timeout_s) as resp:
                    data = resp.read(c.max_bytes + 1)
                    if len(data) > c.max_bytes:
                        return b"", resp.status, f"larger than {c.max_bytes} bytes"
                    return data, resp.status, ""
            except urllib.error.HTTPError as e:
                status, err = e.code, f"HTTP {e.code}"
                if e.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                err = f"network: {getattr(e, 'reason', e)}"
        return b"", status, err

    def process(self, rows: list[dict]) -> None:
        for row in rows:
            if row["image"]:
                continue
            data, status, err = self.fetch(row["url"])
            row["http_status"] = status
            if err:
                drop(row, self.name, f"download: {err}")
            else:
                row["image"] = data
