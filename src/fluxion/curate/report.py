"""One static HTML page per run: funnel, score histograms, sample grids of kept and dropped images per stage and
of duplicate clusters, throughput. Everything is inline (CSS, SVG, thumbnails as data URIs): no external assets,
so the page can be mailed or archived as one file."""

from __future__ import annotations

import base64
import html
import random
from pathlib import Path

import numpy as np

HIST_COLUMNS = (
    ("sharpness", "sharpness (Laplacian variance, log10)", True),
    ("contrast", "contrast (luminance std)", False),
    ("blockiness", "JPEG blockiness", False),
    ("dark", "dark fraction", False),
    ("bright", "bright fraction", False),
    ("watermark", "P(watermark)", False),
    ("text_area", "text area fraction", False),
    ("pdq_quality", "PDQ quality", False),
)
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}.bar{background:#4a7;height:12px;display:inline-block}
.drop{background:#c55}.grid{display:flex;flex-wrap:wrap;gap:4px}.cell{width:100px;font-size:10px;overflow:hidden}
.cell img{width:96px;height:96px;object-fit:contain;background:#eee;display:block}.hists{display:flex;flex-wrap:wrap;gap:16px}
.cluster{display:flex;gap:4px;margin:6px 0;padding:4px;border:1px solid #ddd}.kept img{outline:3px solid #4a7}
small{color:#666}
"""


def _svg_hist(values: np.ndarray, title: str, log: bool) -> str:
    v = values[np.isfinite(values)]
    if log:
        v = np.log10(np.maximum(v, 1e-3))
    if not len(v):
        return ""
    counts, edges = np.histogram(v, bins=30)
    w, h = 280, 90
    top = max(1, counts.max())
    bars = "".join(
        f'<rect x="{i * w / 30:.1f}" y="{h - c / top * h:.1f}" width="{w / 30 - 1:.1f}" height="{c / top * h:.1f}" fill="#47a"/>'
        for i, c in enumerate(counts)
    )
    return (
        f'<div><div style="font-size:12px">{html.escape(title)}</div><svg width="{w}" height="{h + 14}">{bars}'
        f'<text x="0" y="{h + 12}" font-size="10">{edges[0]:.3g}</text>'
        f'<text x="{w}" y="{h + 12}" font-size="10" text-anchor="end">{edges[-1]:.3g}</text></svg></div>'
    )


def _thumbs(out: Path, keys_by_shard: dict[int, set[str]]) -> dict[str, bytes]:
    import pyarrow.parquet as pq

    found = {}
    for shard, keys in keys_by_shard.items():
        t = pq.read_table(out / "_work" / f"part-{shard:05d}.parquet", columns=["key", "thumb"])
        for k, th in zip(t.column("key").to_pylist(), t.column("thumb").to_pylist()):
            if k in keys:
                found[k] = th
    return found


def _cell(key: str, thumb: bytes | None, note: str, css: str = "") -> str:
    img = (
        f'<img src="data:image/jpeg;base64,{base64.b64encode(thumb).decode()}">'
        if thumb
        else '<img alt="no preview">'
    )
    return f'<div class="cell {css}" title="{html.escape(note)}">{img}{html.escape(key[-18:])}<br><small>{html.escape(note[:40])}</small></div>'


def write_report(out: Path, manifest, stats: dict, cfg) -> None:
    rng = random.Random(0)
    rows = manifest.select(
        [
            c
            for c in ("key", "shard", "kept", "dropped_by", "reason", "duplicate_of")
            if c in manifest.column_names
        ]
    ).to_pylist()
    n = cfg.samples_per_grid
    shard_of = {r["key"]: int(r["shard"].split(".")[0]) for r in rows}
    groups: dict[str, list[dict]] = {"kept": [r for r in rows if r["kept"]]}
    for r in rows:
        if not r["kept"]:
            groups.setdefault(r["dropped_by"], []).append(r)
    samples = {g: rng.sample(v, min(n, len(v))) for g, v in groups.items()}
    clusters: dict[str, list[str]] = {}
    for r in rows:
        if r.get("duplicate_of"):
            clusters.setdefault(r["duplicate_of"], []).append(r["key"])
    shown_clusters = sorted(clusters.items(), key=lambda kv: -len(kv[1]))[: max(4, n // 3)]
    wanted: dict[int, set[str]] = {}
    for g in samples.values():
        for r in g:
            wanted.setdefault(shard_of[r["key"]], set()).add(r["key"])
    for kept, dups in shown_clusters:
        for k in [kept, *dups]:
            wanted.setdefault(shard_of[k], set()).add(k)
    thumbs = _thumbs(out, wanted)

    parts = [
        f"<!doctype html><meta charset=utf-8><title>fluxion curate: {html.escape(str(out))}</title><style>{CSS}</style>"
    ]
    parts.append(
        f"<h1>fluxion curate</h1><p>{html.escape(cfg.input or cfg.urls)} &rarr; {html.escape(str(out))}: "
        f"<b>{stats['kept']}</b> of {stats['total']} kept in {stats['shards']} shards "
        f"({stats['executor']} executor).</p>"
    )
    parts.append(
        "<h2>Funnel</h2><table><tr><th>stage</th><th>in</th><th>dropped</th><th>out</th><th></th><th>reasons</th></tr>"
    )
    total = max(1, stats["total"])
    for f in stats["funnel"]:
        reasons = ", ".join(
            f"{html.escape(k)}: {v}" for k, v in sorted(f["reasons"].items(), key=lambda kv: -kv[1])
        )
        parts.append(
            f"<tr><td>{f['stage']}</td><td>{f['in']}</td><td>{f['dropped']}</td><td>{f['out']}</td>"
            f'<td><span class="bar" style="width:{200 * f["out"] / total:.0f}px"></span>'
            f'<span class="bar drop" style="width:{200 * f["dropped"] / total:.0f}px"></span></td><td>{reasons}</td></tr>'
        )
    parts.append("</table>")
    parts.append(
        "<h2>Throughput</h2><table><tr><th>stage</th><th>images</th><th>worker-seconds</th><th>images/s per worker</th></tr>"
    )
    for name, t in stats["throughput"].items():
        parts.append(
            f"<tr><td>{name}</td><td>{t['images']}</td><td>{t['seconds']}</td><td>{t['images_per_s_per_worker']}</td></tr>"
        )
    parts.append(
        f"</table><p><small>map phase wall time this run: {stats['map_seconds_this_run']} s over "
        f"{stats['processed_shards_this_run']} shard(s)</small></p>"
    )
    hists = []
    score_cols = [c for c in manifest.column_names if c.startswith("score_")]
    for col, title, log in [*HIST_COLUMNS, *[(c, c, False) for c in score_cols]]:
        if col in manifest.column_names:
            # Missing: NaN for float scores, -1 for integer ones (rows the stage never saw).
            missing = {None, -1} if col == "pdq_quality" else {None}
            vals = np.array(
                [np.nan if v in missing else v for v in manifest.column(col).to_pylist()], np.float64
            )
            hists.append(_svg_hist(vals, title, log))
    parts.append(f'<h2>Score histograms</h2><div class="hists">{"".join(hists)}</div>')
    for group, sample in samples.items():
        title = "Kept (random sample)" if group == "kept" else f"Dropped by {group} ({len(groups[group])})"
        cells = "".join(_cell(r["key"], thumbs.get(r["key"]), r["reason"] or "kept") for r in sample)
        parts.append(f'<h2>{html.escape(title)}</h2><div class="grid">{cells}</div>')
    if shown_clusters:
        parts.append(f"<h2>Duplicate clusters ({len(clusters)}; largest first; outlined = kept copy)</h2>")
        for kept, dups in shown_clusters:
            cells = _cell(kept, thumbs.get(kept), "kept", "kept") + "".join(
                _cell(k, thumbs.get(k), "duplicate") for k in dups
            )
            parts.append(f'<div class="cluster">{cells}</div>')
    tmp = out / "report.html.tmp"
    tmp.write_text("".join(parts))
    tmp.replace(out / "report.html")
