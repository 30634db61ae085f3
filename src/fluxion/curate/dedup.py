"""Near-duplicate removal over the whole run, never all-pairs.

Candidates come from LSH by hash bands: each hash is cut into `bands` equal bit ranges and two images are a
candidate pair when one range is bit-identical. By the pigeonhole principle a pair whose Hamming distance is below
the number of bands always shares a band, so recall is guaranteed up to distance `bands - 1` and probabilistic
beyond. pHash bands are also probed with every one-bit flip (multi-probe), which guarantees distance
`2 * bands - 1` (7 bits with the default 4 x 16-bit bands). Band width sets the cost: with b-bit bands a random
pair collides with probability 2^-b per band, so candidates ~ n^2 / 2 * bands * probes / 2^b; at 1e9 images use
32-bit PDQ bands and treat pHash probes as the budget knob. Each candidate is verified on the full hashes (pHash distance <= phash_threshold and/or PDQ distance <=
pdq_threshold; with "any", a pHash match that PDQ puts above `pdq_veto` is refused), verified pairs are joined into clusters (union-find), and each cluster keeps its best copy by the
quality rule: most pixels, then sharpest, then least blocky, then the smallest key (deterministic).

Optionally, semantic dedup: k-means on stored embeddings, then pairs above a cosine threshold inside a cluster.

Cost: sorting n band values per band, plus the candidate pairs. A bucket larger than `max_bucket` (degenerate
hashes: flat or blank images) is cut to its first members (they still join one cluster through them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DedupConfig:
    phash_threshold: int = 10  # of 64 bits
    phash_bands: int = (
        4  # 16-bit bands, probed with every 1-bit flip: every pair at distance <= 7 is a candidate
    )
    phash_probe: bool = True
    pdq_threshold: int = (
        31  # of 256 bits (Meta's suggested match threshold); PDQ is not crop-robust (a 4% crop: 46-64)
    )
    pdq_bands: int = 8  # 32-bit bands, exact: every pair at distance <= 7 is a candidate
    # With require = "any", a pHash match whose PDQ distance is above this is not a pair (0: no veto). 100k
    # synthetic images (benchmarks/bench_curate.py) had 695 false pHash matches (distance 8-10) at PDQ 76-120
    # bits, while true copies sat at PDQ <= 20 and 4 % crops at 46-64.
    pdq_veto: int = 72
    require: str = (
        "any"  # "any": either hash's threshold makes a pair (pHash catches crops); "both": stricter
    )
    max_bucket: int = 256
    semantic_threshold: float = (
        0.0  # > 0: also drop pairs with embedding cosine >= this (needs keep_embedding)
    )
    semantic_clusters: int = 0  # 0: about sqrt(n)

    def __post_init__(self):
        if self.require not in ("both", "any"):
            raise ValueError(f"dedup.require must be 'both' or 'any', not {self.require!r}")
        if self.phash_bands not in (1, 2, 4, 8, 16, 32, 64) or self.pdq_bands not in (4, 8, 16, 32, 64):
            raise ValueError(
                "dedup.phash_bands must be a power of 2 up to 64, dedup.pdq_bands one from 4 to 64"
            )


@dataclass
class DedupResult:
    cluster: np.ndarray  # int64 [n]: cluster id (index of its kept member) or -1 for images with no duplicate
    keep: np.ndarray  # bool [n]
    pairs: np.ndarray  # int64 [p, 2] verified duplicate pairs (i < j)
    candidates: int  # candidate pairs checked


def pdq_words(hexes: list[str]) -> np.ndarray:
    """PDQ hex strings -> uint64 [n, 4]."""
    raw = b"".join(bytes.fromhex(h) if h else bytes(32) for h in hexes)
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(-1, 4)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of uint64 arrays, summed over the last axis if 2-D."""
    d = np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)
    return d.sum(-1) if d.ndim > 1 else d


def band_values(words: np.ndarray, bands: int) -> list[np.ndarray]:
    """words uint64 [n, w] -> `bands` uint64 arrays, each the bits of one band (a band never crosses a word)."""
    width = 64 * words.shape[1] // bands
    out = []
    for b in range(bands):
        lo = b * width
        word = words[:, lo // 64]
        if width == 64:
            out.append(word)
        else:
            shift = np.uint64(64 - width - lo % 64)
            out.append((word >> shift) & np.uint64((1 << width) - 1))
    return out


def unique_pairs(pairs: np.ndarray, n: int) -> np.ndarray:
    """The distinct rows of int64 [p, 2] pairs with values below n, sorted by (i, j). Encoded as one int64 key
    i * n + j and sorted in place (np.unique(axis=0) sorts rows as raw bytes, and numpy 2's 1-D np.unique hashes:
    both are ~10x slower at the millions of candidate pairs of a 100k-image run)."""
    if not len(pairs):
        return pairs.reshape(0, 2).astype(np.int64)
    key = pairs[:, 0].astype(np.int64) * n + pairs[:, 1]
    key.sort()
    key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    return np.stack([key // n, key % n], 1)


def candidate_pairs(bands: list[np.ndarray], max_bucket: int, probe_width: int = 0) -> np.ndarray:
    """All (i, j), i < j, whose values in some band are equal (or, with `probe_width` > 0, differ in one of the
    band's `probe_width` low bits: multi-probe LSH, which doubles the guaranteed distance for `width + 1` times
    the lookups). int64 [p, 2], unique. Lookups are sorted-array joins (searchsorted), never all pairs; a bucket
    larger than `max_bucket` is cut to its first `max_bucket` members."""
    found = []
    for values in bands:
        order = np.argsort(values, kind="stable")
        v = values[order]
        for flip in [0] + [1 << b for b in range(probe_width)]:
            q = values ^ np.uint64(flip)
            lo = np.searchsorted(v, q, "left")
            counts = np.minimum(np.searchsorted(v, q, "right") - lo, max_bucket)
            rows = np.repeat(np.arange(len(values)), counts)
            offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            cols = order[np.repeat(lo, counts) + offsets]
            keep = rows != cols
            found.append(np.stack([rows[keep], cols[keep]], 1))
    if not found:
        return np.zeros((0, 2), np.int64)
    pairs = np.sort(np.concatenate(found), axis=1)
    return unique_pairs(pairs, len(bands[0]))


def union_find(n: int, pairs: np.ndarray) -> np.ndarray:
    parent = np.arange(n)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) for i in range(n)])


def dedup(
    cfg: DedupConfig,
    phash: np.ndarray,
    pdq: np.ndarray | None,
    rank: np.ndarray,
    embeddings: np.ndarray | None = None,
) -> DedupResult:
    """phash int64 [n]; pdq uint64 [n, 4] or None; rank: lower is better (the quality rule, computed by the
    caller as a position in the preferred order); embeddings float32 [n, d] for semantic dedup."""
    n = len(phash)
    p64 = phash.astype(np.int64).view(np.uint64)[:, None]
    probe = 64 // cfg.phash_bands if cfg.phash_probe else 0
    found = [candidate_pairs(band_values(p64, cfg.phash_bands), cfg.max_bucket, probe)]
    if pdq is not None:
        found.append(candidate_pairs(band_values(pdq, cfg.pdq_bands), cfg.max_bucket))
    cand = unique_pairs(np.concatenate(found), n)
    ok_p = hamming(p64[cand[:, 0], 0], p64[cand[:, 1], 0]) <= cfg.phash_threshold
    if pdq is not None:
        d_q = hamming(pdq[cand[:, 0]], pdq[cand[:, 1]])
        ok_q = d_q <= cfg.pdq_threshold
        if cfg.require == "both":
            ok = ok_p & ok_q
        elif cfg.pdq_veto:
            ok = ok_q | (ok_p & (d_q <= cfg.pdq_veto))
        else:
            ok = ok_p | ok_q
    else:
        ok = ok_p
    pairs = cand[ok]
    if cfg.semantic_threshold > 0 and embeddings is not None:
        pairs = unique_pairs(np.concatenate([pairs, semantic_pairs(embeddings, cfg)]), n)
    roots = union_find(n, pairs)
    # The kept member of each cluster is its best-ranked one. Every member of a cluster is in a verified pair.
    members = np.unique(pairs.ravel())
    cluster = np.full(n, -1, np.int64)
    keep = np.ones(n, bool)
    if len(members):
        order = members[np.lexsort((rank[members], roots[members]))]  # by cluster, best rank first
        first = np.concatenate([[True], roots[order][1:] != roots[order][:-1]])
        best_of_root = dict(zip(roots[order][first].tolist(), order[first].tolist()))
        cluster[members] = [best_of_root[r] for r in roots[members].tolist()]
        keep[members] = cluster[members] == members
    return DedupResult(cluster, keep, pairs, len(cand))


def semantic_pairs(emb: np.ndarray, cfg: DedupConfig, iters: int = 10, seed: int = 0) -> np.ndarray:
    """Pairs with cosine >= threshold, searched inside k-means clusters only (SemDeDup's idea)."""
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-8)
    n = len(x)
    k = cfg.semantic_clusters or max(1, int(np.sqrt(n)))
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(n, min(k, n), replace=False)]
    for _ in range(iters):
        assign = np.argmax(x @ centroids.T, 1)
        for c in range(len(centroids)):
            m = assign == c
            if m.any():
                centroids[c] = x[m].mean(0)
    found = []
    for c in np.unique(assign):
        idx = np.flatnonzero(assign == c)
        sim = x[idx] @ x[idx].T
        i, j = np.nonzero(np.triu(sim >= cfg.semantic_threshold, 1))
        found.append(np.stack([idx[i], idx[j]], 1))
    return np.concatenate(found) if found else np.zeros((0, 2), np.int64)
