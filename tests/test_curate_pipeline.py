"""fluxion curate on generated data with planted truth: each filter's decisions vs what was planted (precision /
recall printed), dedup recall and false pairs, resume after SIGKILL, the formats module, URL lists over a local
HTTP server, and the trainer reading the curated shards. One Ray end-to-end test (slow); the rest use the
in-process executor, which runs the same stages."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate_fixtures import base_image, jpeg, make_planted, near_duplicate, precision_recall
from fluxion.curate.dedup import DedupConfig, band_values, candidate_pairs, dedup, pdq_words
from fluxion.curate.pipeline import load_recipe, run
from fluxion.datasets import (
    CuratedShards,
    Record,
    detect_format,
    iter_records,
    write_folder,
    write_parquet,
    write_webdataset,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
RECIPE = """
input = "{input}"
output = "{output}"
shard_size = {shard_size}
batch_size = 8
[decode]
min_side = 64
max_aspect = 3.0
[quality]
min_sharpness = 50.0
min_contrast = 8.0
max_dark = 0.5
[dedup]
{extra}
"""


def write_recipe(path: Path, input: Path, output: Path, shard_size: int = 16, extra: str = "") -> Path:
    path.write_text(RECIPE.format(input=input, output=output, shard_size=shard_size, extra=extra))
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    truth = make_planted(root / "raw", n_base=40, n_dups=12)
    recipe = write_recipe(root / "recipe.toml", root / "raw", root / "out")
    stats = run(load_recipe(recipe), log=lambda *a: None)
    manifest = {r["key"]: r for r in pq.read_table(root / "out" / "manifest.parquet").to_pylist()}
    return root, truth, stats, manifest


def dropped(manifest: dict, stage: str, kind: str | None = None) -> set[str]:
    return {
        k
        for k, r in manifest.items()
        if r["dropped_by"] == stage and (kind is None or r["reason"].startswith(kind + ":"))
    }


def test_decode_filters_match_planted_truth(planted):
    _, truth, _, m = planted
    for kind, expected in [("corrupt", set(truth.corrupt))] + [
        (reason, {k for k, r in truth.invalid.items() if r == reason})
        for reason in set(truth.invalid.values())
    ]:
        p, r = precision_recall(dropped(m, "decode", kind), expected)
        print(f"decode/{kind}: precision {p:.2f} recall {r:.2f} (n={len(expected)})")
        assert (p, r) == (1.0, 1.0)
    # Odd but valid images are normalised to 8-bit RGB and kept; EXIF orientation is applied.
    for key, mode in truth.normalised.items():
        assert m[key]["kept"] and m[key]["normalised"] and m[key]["mode"] == mode, key
    for key, (w, h) in truth.exif_rotated.items():
        assert (m[key]["width"], m[key]["height"]) == (w, h)


def test_quality_filters_match_planted_truth(planted):
    _, truth, _, m = planted
    for kind, expected in [("blurry", truth.blurry), ("flat", truth.flat), ("underexposed", truth.dark)]:
        p, r = precision_recall(dropped(m, "quality", kind), set(expected))
        print(f"quality/{kind}: precision {p:.2f} recall {r:.2f} (n={len(expected)})")
        assert (p, r) == (1.0, 1.0)


def test_dedup_finds_every_planted_duplicate_and_keeps_the_best(planted):
    _, truth, _, m = planted
    # Each planted pair must end in one cluster with exactly one member kept.
    for dup, orig in truth.duplicates.items():
        a, b = m[dup], m[orig]
        assert (a["dropped_by"] == "dedup") != (b["dropped_by"] == "dedup"), (dup, orig)
        loser, winner = (a, b) if a["dropped_by"] == "dedup" else (b, a)
        assert loser["duplicate_of"] == winner["key"]
        # Quality rule: the kept copy has at least as many pixels.
        assert winner["width"] * winner["height"] >= loser["width"] * loser["height"]
    removed = dropped(m, "dedup")
    planted_pairs = {frozenset(p) for p in truth.duplicates.items()}
    found_pairs = {frozenset((k, m[k]["duplicate_of"])) for k in removed}
    false_pairs = found_pairs - planted_pairs
    n = sum(1 for r in m.values() if r["dropped_by"] in ("", "dedup"))
    print(
        f"dedup: {len(found_pairs & planted_pairs)}/{len(planted_pairs)} planted pairs found; "
        f"{len(false_pairs)} false pairs among {n * (n - 1) // 2} pairs"
    )
    assert found_pairs == planted_pairs


def test_lsh_bands_are_exact_below_the_band_count():
    """Against brute force (all pairs, numpy): 4 bands x 16 bits with 1-bit probes find every pair within 7 bits."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.int64).view(np.uint64)
    flips = rng.integers(0, 8, 300)  # each copy differs from its base by 0..7 bits
    copies = base.copy()
    for i, f in enumerate(flips):
        for b in rng.choice(64, f, replace=False):
            copies[i] ^= np.uint64(1) << np.uint64(b)
    words = np.concatenate([base, copies])[:, None]
    cand = {
        tuple(p) for p in candidate_pairs(band_values(words, 4), max_bucket=1000, probe_width=16).tolist()
    }
    d = np.bitwise_count(words[:, None, 0] ^ words[None, :, 0])
    brute = {(i, j) for i, j in zip(*np.nonzero(np.triu(d <= 7, 1)))}
    assert len(brute) >= 300 and brute <= cand
    print(
        f"LSH: {len(brute)} close pairs, {len(cand)} candidates of {len(words) * (len(words) - 1) // 2} pairs"
    )


def test_dedup_false_pair_rate_on_distinct_images():
    """300 distinct generated images + 30 near-duplicates: all planted pairs found, and no false pair (rate 0 of
    ~54k distinct pairs at the default thresholds)."""
    import imagehash
    import pdqhash

    rng = np.random.default_rng(7)
    images = [base_image(rng, 128) for _ in range(300)]
    dups = [Image.open(io.BytesIO(near_duplicate(images[i], i % 4))).convert("RGB") for i in range(30)]
    ph, pq_ = [], []
    for im in images + dups:
        ph.append(int(np.packbits(imagehash.phash(im).hash.flatten()).view(">i8")[0]))
        vec, _ = pdqhash.compute(np.asarray(im))
        pq_.append(np.packbits(vec.astype(np.uint8)).tobytes().hex())
    n = len(ph)
    res = dedup(DedupConfig(), np.array(ph, np.int64), pdq_words(pq_), np.arange(n))
    found = {tuple(sorted(p)) for p in res.pairs.tolist()}
    planted_pairs = {(i, 300 + i) for i in range(30)}
    false = found - planted_pairs
    print(
        f"dedup on 330 images: recall {len(found & planted_pairs) / 30:.2f}, false pairs {len(false)} of "
        f"{n * (n - 1) // 2} ({len(false) / (n * (n - 1) / 2):.1e}); {res.candidates} candidates checked"
    )
    assert planted_pairs <= found and not false


def test_outputs_are_consistent_and_the_trainer_reads_them(planted):
    root, _, stats, m = planted
    out = root / "out"
    kept = {k for k, r in m.items() if r["kept"]}
    assert stats["kept"] == len(kept) and stats["total"] == len(m)
    data = CuratedShards(out)
    assert set(data.keys) == kept and len(data) == len(kept)
    for i in range(0, len(data), 7):
        assert data.load(i).size == data.sizes[i]
    exclusions = pq.read_table(out / "exclusions.parquet").to_pylist()
    assert {r["key"] for r in exclusions} == set(m) - kept and all(r["reason"] for r in exclusions)
    # train/data.py reads the shards as they are (image + .txt per key), with aspect buckets.
    from fluxion.train.data import TarShards, open_sources

    [source] = open_sources([out], pixels=64 * 64)
    assert isinstance(source, TarShards) and len(source) == len(kept)
    assert source.sample(0).image.shape[0] == 3
    html = (out / "report.html").read_text()
    assert (
        "<svg" in html and "data:image/jpeg;base64," in html and "http" not in html.split("<style>")[1][:4000]
    )


def test_formats_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    records = [Record(f"k{i:02d}", jpeg(base_image(rng, 64)), f"caption {i}", {"n": i}) for i in range(5)]
    write_webdataset(tmp_path / "wds" / "000.tar", records) if (tmp_path / "wds").mkdir() is None else None
    write_folder(tmp_path / "folder", records)
    (tmp_path / "pq").mkdir()
    write_parquet(tmp_path / "pq" / "a.parquet", records)
    # Parquet with paths relative to the file.
    import pyarrow as pa

    write_folder(tmp_path / "pp" / "img", records)
    pq.write_table(
        pa.table({"path": [f"img/{r.key}.jpg" for r in records], "text": [r.caption for r in records]}),
        tmp_path / "pp" / "list.parquet",
    )
    for name, fmt in [("wds", "webdataset"), ("folder", "folder"), ("pq", "parquet"), ("pp", "parquet")]:
        assert detect_format(tmp_path / name) == fmt
        got = list(iter_records(tmp_path / name))
        assert [r.data for r in got] == [r.data for r in records], name
        assert [r.caption for r in got] == [r.caption for r in records], name
    # The tinyset layout.
    ts = tmp_path / "tiny"
    ts.mkdir()
    arr = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.save(ts / "images.npy", arr)
    (ts / "captions.jsonl").write_text("".join(json.dumps({"caption": f"c{i}"}) + "\n" for i in range(3)))
    got = list(iter_records(ts))
    assert [r.caption for r in got] == ["c0", "c1", "c2"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(got[2].data))), arr[2])


def test_bad_recipes_are_named(tmp_path, capsys):
    from fluxion.cli import main

    bad = tmp_path / "r.toml"
    bad.write_text('input = "x"\noutput = "y"\n[quality]\nmin_sharpnes = 3\n')
    assert main(["curate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "min_sharpnes" in err and err.count("\n") == 1
    bad.write_text('output = "y"\n')
    assert main(["curate", str(bad)]) == 2
    assert "exactly one of" in capsys.readouterr().err


def _curate_killed_mid_run(tmp_path, *extra: str):
    """A real `fluxion curate` over 74 planted images (19 shards of 4), SIGKILLed once 3 shard parts exist:
    (the command, its env, the killed process, the work folder)."""
    make_planted(tmp_path / "raw", n_base=40, n_dups=12)
    recipe = write_recipe(tmp_path / "r.toml", tmp_path / "raw", tmp_path / "out", shard_size=4)
    env = {**os.environ, "PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "fluxion.cli", "curate", str(recipe), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tmp_path / "out" / "_work"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.glob("part-*.parquet"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return cmd, env, proc, work


def _assert_every_image_once(out: Path) -> None:
    """The manifest holds each of the 74 images once, the shards exactly the kept ones, and no temp file is left."""
    keys = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += [n.rsplit(".", 1)[0] for n in tar.getnames() if n.endswith(".txt")]
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) == 74 and len({r["key"] for r in manifest}) == 74
    assert sorted(keys) == sorted(r["key"] for r in manifest if r["kept"])
    assert not list(out.rglob("*.tmp"))


def test_resume_after_sigkill(tmp_path):
    """A real `fluxion curate` process is SIGKILLed mid-run; the re-run processes only the unfinished shards and
    the output holds every kept image exactly once."""
    cmd, env, proc, work = _curate_killed_mid_run(tmp_path)
    done_before = {int(p.stem.split("-")[1]) for p in work.glob("part-*.parquet")}
    num_shards = -(-74 // 4)
    assert 3 <= len(done_before) < num_shards, "the kill must land mid-run"
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    mapped = [e["shard"] for e in log if e["phase"] == "map"]
    assert sorted(mapped) == list(range(num_shards)), "every shard processed exactly once over both runs"
    second = {e["shard"] for e in log if e["phase"] == "map" and e["pid"] != log[0]["pid"]}
    assert not second & done_before
    _assert_every_image_once(tmp_path / "out")


def test_a_worker_pool_writes_the_same_manifest(planted, tmp_path):
    """The same recipe with `workers = 2` (a process pool) writes the manifest the in-process run wrote: every
    column (decisions, reasons, scores, hashes) equal, but the per-row stage times."""
    root, _, stats, local = planted
    recipe = write_recipe(tmp_path / "r.toml", root / "raw", tmp_path / "out")
    pooled_stats = run(load_recipe(recipe, workers=2), log=lambda *a: None)
    pooled = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert pooled.keys() == local.keys()
    untimed = [c for c in next(iter(local.values())) if not c.startswith("t_")]
    assert len(untimed) > 20 and "phash" in untimed and "sharpness" in untimed

    def values(row):  # NaN (a stage that did not run on the row) compares equal to NaN
        return {c: "nan" if row[c] != row[c] else row[c] for c in untimed}

    for key, row in local.items():
        assert values(row) == values(pooled[key]), key
    assert pooled_stats["funnel"] == stats["funnel"] and pooled_stats["workers"] == 2
    log = [json.loads(line) for line in (tmp_path / "out" / "_work" / "log.jsonl").read_text().splitlines()]
    writers = {e["pid"] for e in log if e["phase"] == "map"}
    assert len(writers) == 2 and os.getpid() not in writers, "two worker processes wrote the parts"
    shard_writers = {e["pid"] for e in log if e["phase"] == "write"}
    assert len(shard_writers) == 2 and os.getpid() not in shard_writers, "two processes wrote the shards"
    tars = sorted(p.name for p in (root / "out").glob("*.tar"))
    assert tars and tars == sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    for name in tars:  # the shards themselves: byte for byte the in-process run's
        assert (root / "out" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_resume_after_sigkill_with_a_worker_pool(tmp_path):
    """`fluxion curate --workers 2` is SIGKILLed mid-run (the main process only, as the OOM killer would): its
    workers die with it, the re-run maps only the shards without a part, and the output holds every image once."""
    cmd, env, proc, work = _curate_killed_mid_run(tmp_path, "--workers", "2")
    first = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    workers = {e["pid"] for e in first}
    assert proc.pid not in workers and all(e["run"] == proc.pid for e in first)
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers), "the workers die with the killed run"
    done_before = {int(p.stem.split("-")[1]) for p in work.glob("part-*.parquet")}
    num_shards = -(-74 // 4)
    assert 3 <= len(done_before) < num_shards, "the kill must land mid-run"
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    mapped = [e["shard"] for e in log if e["phase"] == "map"]
    assert len(mapped) == len(set(mapped)), "no shard was mapped twice"
    second = {e["shard"] for e in log if e["phase"] == "map" and e["run"] != proc.pid}
    assert not second & done_before and second | done_before == set(range(num_shards))
    _assert_every_image_once(tmp_path / "out")


@pytest.mark.slow
def test_a_dead_worker_ends_the_run_with_one_line_and_a_rerun_resumes(tmp_path):
    """SIGKILL one pool worker (as the OOM killer would): `fluxion curate` exits 2 with one line on stderr, and
    the re-run completes from the shards already written."""
    make_planted(tmp_path / "raw", n_base=40, n_dups=12)
    recipe = write_recipe(tmp_path / "r.toml", tmp_path / "raw", tmp_path / "out", shard_size=4)
    env = {**os.environ, "PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "fluxion.cli", "curate", str(recipe), "--workers", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log_file = tmp_path / "out" / "_work" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log_file.is_file() and log_file.read_text().strip()):
        time.sleep(0.02)
    os.kill(json.loads(log_file.read_text().splitlines()[0])["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.count("\n") == 1 and "worker process died" in err, err
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert len(manifest) == 74 and len({r["key"] for r in manifest}) == 74


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_url_list_downloads_from_a_local_server(tmp_path):
    rng = np.random.default_rng(3)
    served = tmp_path / "www"
    served.mkdir()
    for i in range(6):
        (served / f"{i}.jpg").write_bytes(jpeg(base_image(rng, 96)))
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        lines = [f"{base}/{i}.jpg\ta picture {i}" for i in range(6)] + [f"{base}/missing.jpg\tnothing"]
        (tmp_path / "urls.txt").write_text("\n".join(lines))
        (tmp_path / "r.toml").write_text(
            f'urls = "{tmp_path / "urls.txt"}"\noutput = "{tmp_path / "out"}"\nshard_size = 4\n'
            "[download]\nretries = 0\ntimeout_s = 5\n"
        )
        stats = run(load_recipe(tmp_path / "r.toml"), log=lambda *a: None)
    finally:
        server.shutdown()
    m = {
        r["url"].rsplit("/", 1)[1]: r
        for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    }
    assert stats["kept"] == 6 and m["missing.jpg"]["reason"] == "download: HTTP 404"
    assert m["3.jpg"]["caption"] == "a picture 3" and m["3.jpg"]["http_status"] == 200


@pytest.mark.slow
def test_ray_executor_matches_local(planted, tmp_path):
    """The same recipe on Ray Data (a local instance, 2 CPUs) makes the same decisions as the in-process run."""
    pytest.importorskip("ray")
    root, _, _, local = planted
    recipe = write_recipe(tmp_path / "r.toml", root / "raw", tmp_path / "out", shard_size=16)
    cfg = load_recipe(recipe, executor="ray", num_cpus=2)
    stats = run(cfg, log=lambda *a: None)
    import ray

    ray.shutdown()
    remote = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert {k: (r["dropped_by"], r["reason"]) for k, r in remote.items()} == {
        k: (r["dropped_by"], r["reason"]) for k, r in local.items()
    }
    assert stats["executor"] == "ray" and stats["throughput"]["decode"]["images"] == len(local)


@pytest.mark.slow
def test_fluxion_train_steps_on_curated_shards(planted, tmp_path, monkeypatch):
    """`fluxion train` (the library entry) takes the curated output folder as its data and trains on it."""
    from fluxion.config import PRESETS
    from fluxion.train.train import TrainConfig, main
    from train_fixtures import TRAIN_SPEC, build_components

    monkeypatch.setitem(PRESETS, TRAIN_SPEC.name, TRAIN_SPEC)
    root, *_ = planted
    (tmp_path / "parts").mkdir()
    parts = build_components(tmp_path / "parts")
    cfg = TrainConfig(
        model=TRAIN_SPEC.name,
        data=(str(root / "out"),),
        out=str(tmp_path / "run"),
        vae=parts["vae"],
        text=parts["text"],
        steps=3,
        batch_size=2,
        pixels=32 * 32,
        log_every=1,
        seed=0,
    )
    result = main(cfg)
    assert len(result["losses"]) == 3 and all(loss == loss for loss in result["losses"])


def test_semantic_dedup_joins_pairs_the_hashes_miss():
    """Two images with unrelated hashes but (nearly) the same embedding are one cluster when semantic dedup is on."""
    rng = np.random.default_rng(0)
    n = 50
    phash = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    emb[7] = emb[3] + 0.01 * rng.normal(size=16).astype(np.float32)
    off = dedup(DedupConfig(), phash, None, np.arange(n), emb)
    on = dedup(DedupConfig(semantic_threshold=0.99), phash, None, np.arange(n), emb)
    assert off.keep.all()
    assert on.pairs.tolist() == [[3, 7]] and not on.keep[7] and on.cluster[7] == 3
