"""`fluxion curate`: recipe -> plan -> map stages per shard -> global dedup -> shards + manifest + report.

Phases, each resumable (every output is written to a temporary name and renamed; a file that exists is done):

1. plan: the input's items in a fixed order, cut into shards of `shard_size` (`_work/plan.json`);
2. map: each pending shard's rows go through the per-image stages (download, decode, quality, hashes,
   watermark, text, scores, caption) on the executor; the result is `_work/part-NNNNN.parquet` (every row, its
   scores and decision; image bytes for the rows still kept). Finished shards are never processed again;
3. dedup: over the hashes of all kept rows (cheap, redone each run, deterministic);
4. write: `NNNNN.tar` (WebDataset: image, .txt caption, .json scores) for each shard, then its manifest part;
5. precompute (optional, curate/precompute.py): VAE latents and text embeddings of the kept images, per shard,
   in `precomputed-<pixels>/` for the trainer;
6. finish: `manifest.parquet` (every row of every shard, all columns but the image bytes), `exclusions.parquet`
   (the dropped rows and why), `stats.json` and `report.html`.

Executors run the same stages: `local` on this machine, in this process (`workers = 1`: tests, small runs) or in
a pool of `workers` processes (one machine without Ray: each process builds its stages once and writes each shard
it finishes itself, atomically), and `ray` on Ray Data (streaming `map_batches`; stages holding a model run in
actor pools, with `num_gpus` when set). Ray starts a local instance with `num_cpus` CPUs unless `ray_address`
names a cluster (the CLI takes it from RAY_ADDRESS). Whichever executor, a shard's part is written whole or not at
all, so a run killed at any moment resumes from the shards it finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import tomllib

from fluxion.curate.dedup import DedupConfig, dedup, pdq_words
from fluxion.curate.download import Download, DownloadConfig, read_url_list
from fluxion.curate.models import (
    Caption,
    CaptionConfig,
    HeadConfig,
    Scores,
    ScoresConfig,
    Watermark,
    WatermarkConfig,
)
from fluxion.curate.precompute import PrecomputeConfig
from fluxion.curate.stages import (
    BASE_SCHEMA,
    Decode,
    DecodeConfig,
    Hashes,
    Quality,
    QualityConfig,
    Stage,
    Text,
    TextConfig,
    run_stage,
)
from fluxion.datasets import ItemRef, Record, list_items, load_items, write_table_atomic, write_webdataset

WORK = "_work"


@dataclass(frozen=True)
class CurateConfig:
    """A recipe. Exactly one of `input` (a dataset in any fluxion.datasets format) or `urls` (a URL list). A stage
    runs when its table is present in the recipe (decode always runs)."""

    output: str
    input: str = ""
    urls: str = ""
    shard_size: int = 1000
    executor: str = "local"  # "local" | "ray"
    workers: int = (
        1  # local executor: 1 = in this process; N > 1 = a pool of N processes, a shard at a time each
    )
    num_cpus: int = 2  # Ray's local instance (ignored when ray_address is set)
    ray_address: str = (
        ""  # a Ray cluster ("auto", "ray://host:10001"); `fluxion curate` fills it from RAY_ADDRESS
    )
    batch_size: int = 32
    actors: int = 1  # actor-pool size per model stage on Ray
    limit: int = 0  # > 0: only the first `limit` items (trial runs)
    samples_per_grid: int = 24  # report: thumbnails per grid
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    quality: QualityConfig | None = None
    dedup: DedupConfig | None = None
    watermark: WatermarkConfig | None = None
    text: TextConfig | None = None
    scores: ScoresConfig | None = None
    caption: CaptionConfig | None = None
    precompute: PrecomputeConfig | None = (
        None  # after the shards: VAE latents (+ text embeddings) of kept images
    )

    def __post_init__(self):
        if bool(self.input) == bool(self.urls):
            raise ValueError("a recipe names exactly one of `input` (a dataset) or `urls` (a URL list)")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', not {self.executor!r}")
        if min(self.shard_size, self.batch_size, self.num_cpus, self.actors, self.workers) < 1:
            raise ValueError("shard_size, batch_size, num_cpus, actors and workers must be positive")


def _build(cls, data: dict, where: str):
    """A frozen dataclass from a TOML table, strictly: unknown keys are errors that name the key."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        sub = SECTIONS.get(name) if cls is CurateConfig else None
        if sub is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: [{name}] must be a table")
            value = _build(sub, value, f"{where} [{name}]")
        elif cls is ScoresConfig and name == "heads":
            value = tuple(_build(HeadConfig, h, f"{where} [[scores.heads]]") for h in value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


SECTIONS = {
    "decode": DecodeConfig,
    "download": DownloadConfig,
    "quality": QualityConfig,
    "dedup": DedupConfig,
    "watermark": WatermarkConfig,
    "text": TextConfig,
    "scores": ScoresConfig,
    "caption": CaptionConfig,
    "precompute": PrecomputeConfig,
}


def load_recipe(path: str | Path, **overrides) -> CurateConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _build(CurateConfig, data, str(path))


def build_stages(cfg: CurateConfig) -> list[Stage]:
    """The per-image stages in their fixed order: cheap checks first, models on what survives them."""
    stages: list[Stage] = [Download(cfg.download)] if cfg.urls else []
    stages.append(Decode(cfg.decode))
    if cfg.quality:
        stages.append(Quality(cfg.quality))
    if cfg.dedup:
        stages.append(Hashes())
    if cfg.watermark:
        stages.append(Watermark(cfg.watermark))
    if cfg.text:
        stages.append(Text(cfg.text))
    if cfg.scores:
        stages.append(Scores(cfg.scores))
    if cfg.caption:
        stages.append(Caption(cfg.caption))
    return stages


# --- plan ---------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    items: list[dict]  # {"key", "shard", "file", "member"} or {"key", "shard", "url", "caption"}
    num_shards: int


def make_plan(cfg: CurateConfig, work: Path) -> Plan:
    if cfg.urls:
        items = read_url_list(cfg.urls)
    else:
        items = [{"key": r.key, "file": r.file, "member": r.member} for r in list_items(cfg.input)]
    if cfg.limit:
        items = items[: cfg.limit]
    if not items:
        raise ValueError(f"{cfg.input or cfg.urls}: nothing to curate")
    keys = [it["key"] for it in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(
            f"duplicate key {dup!r} in the input: keys name shard members, so they must be unique"
        )
    for i, it in enumerate(items):
        it["shard"] = i // cfg.shard_size
    num_shards = (len(items) + cfg.shard_size - 1) // cfg.shard_size
    fingerprint = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    plan_file = work / "plan.json"
    record = {"items": len(items), "shard_size": cfg.shard_size, "fingerprint": fingerprint}
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old != record:
            raise ValueError(
                f"{cfg.output} holds a run over other input or another shard_size; "
                "resume with the same recipe or choose a new output folder"
            )
    else:
        _write_text_atomic(plan_file, json.dumps(record))
    return Plan(items, num_shards)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_rows(items: list[dict]) -> list[dict]:
    """Plan items -> base rows (image bytes loaded from the dataset; URL rows load in the download stage)."""
    refs = [ItemRef(it["file"], it["member"], it["key"]) for it in items if "file" in it]
    records: dict[str, Record] = {r.key: r for r in load_items(refs)} if refs else {}
    rows = []
    for it in items:
        rec = records.get(it["key"])
        meta = dict(rec.meta) if rec else {}
        rows.append(
            {
                "key": it["key"],
                "shard": it["shard"],
                "source": str(meta.pop("source", it.get("url", ""))),
                "url": it.get("url", ""),
                "caption": rec.caption if rec else it.get("caption", ""),
                "meta": json.dumps(meta, default=str),
                "image": rec.data if rec else b"",
                "thumb": b"",
                "dropped_by": "",
                "reason": "",
            }
        )
    return rows


# --- arrow conversion ---------------------------------------------------------------------------------------------
def column_types(stages: list[Stage]) -> dict[str, str]:
    types = dict(BASE_SCHEMA)
    for s in stages:
        types.update(s.schema)
        types[f"t_{s.name}"] = "float64"
    return types


def to_table(rows: list[dict], types: dict[str, str]):
    import pyarrow as pa

    names = [k for k in rows[0] if not k.startswith("_")] if rows else list(types)
    arrow = {
        "string": pa.string(),
        "binary": pa.binary(),
        "float64": pa.float64(),
        "int64": pa.int64(),
        "bool": pa.bool_(),
    }
    schema = pa.schema([(k, arrow[types[k]]) for k in names])
    return pa.Table.from_pylist([{k: r[k] for k in names} for r in rows], schema=schema)


# --- executors ----------------------------------------------------------------------------------------------------
# Every executor's `run(pending)` yields (shard, kept, total) once that shard's part file is written.
def map_shard(stages: list[Stage], items: list[dict], batch_size: int) -> list[dict]:
    """One shard's rows through the stages, batch by batch (stages must be set up)."""
    rows = []
    for s in range(0, len(items), batch_size):
        batch = load_rows(items[s : s + batch_size])
        for stage in stages:
            run_stage(stage, batch)
        for r in batch:  # drop per-process caches before the rows are kept for writing
            for k in [k for k in r if k.startswith("_")]:
                del r[k]
        rows += batch
    return rows


def write_part(
    work: Path, shard: int, rows: list[dict], types: dict[str, str], run_id: int
) -> tuple[int, int]:
    """The shard's part, atomically (a part that exists is complete), then its line in the log."""
    write_table_atomic(to_table(rows, types), _part(work, shard))
    kept = sum(not r["dropped_by"] for r in rows)
    _log(work, {"phase": "map", "shard": shard, "rows": len(rows), "kept": kept, "run": run_id})
    return kept, len(rows)


class LocalExecutor:
    """The stages on this machine without Ray: in this process (`workers` = 1), or in a pool of `workers`
    processes, each of which sets its stages up once and then maps whole shards, writing each part itself (no
    rows travel back). Worker processes die with this one (a SIGKILL of the run leaves no worker writing)."""

    def __init__(self, stages: list[Stage], cfg: CurateConfig, work: Path, types: dict[str, str]):
        self.stages, self.cfg, self.work, self.types = stages, cfg, work, types
        self.run_id = os.getpid()

    def run(self, items_by_shard: dict[int, list[dict]]) -> Iterator[tuple[int, int, int]]:
        if self.cfg.workers == 1 or len(items_by_shard) == 1:
            for s in self.stages:
                s.setup()
            for shard, items in items_by_shard.items():
                rows = map_shard(self.stages, items, self.cfg.batch_size)
                yield shard, *write_part(self.work, shard, rows, self.types, self.run_id)
            return
        yield from self._pool(items_by_shard)

    def _pool(self, items_by_shard: dict[int, list[dict]]) -> Iterator[tuple[int, int, int]]:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        workers = min(self.cfg.workers, len(items_by_shard))
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        # BLAS and torch threads per worker, so that N workers don't run N x cores threads. They are read when a
        # worker first imports numpy / torch, which happens before any initializer runs, so they travel in the
        # environment the workers are started with (values the user set are kept).
        saved = {v: os.environ.get(v) for v in _THREAD_VARS}
        for v in _THREAD_VARS:
            os.environ.setdefault(v, threads)
        pool = _spawn_pool(
            workers, _worker_init, (self.stages, self.cfg.batch_size, str(self.work), self.types, self.run_id)
        )
        try:
            try:  # workers start as tasks are submitted
                todo = {pool.submit(_worker_map, shard, items) for shard, items in items_by_shard.items()}
            finally:
                for v, value in saved.items():
                    if value is None:
                        del os.environ[v]
                    else:
                        os.environ[v] = value
            while todo:
                done, todo = wait(todo, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        yield future.result()  # a worker's exception (bad weights, ...) is raised here
                    except BrokenProcessPool:
                        raise RuntimeError(
                            "a curate worker process died (killed, or out of memory?); the shards it finished "
                            "are kept: run again to resume, with fewer workers or a smaller batch_size"
                        ) from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _spawn_pool(workers: int, initializer, initargs: tuple):
    """A process pool of fresh interpreters ("spawn": forking a process that holds Arrow's or torch's threads can
    hang); the initializer calls `_die_with_parent` first, so a killed run leaves no process writing."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer, initargs=initargs
    )


_WORKER: dict = {}  # in a pool worker: its stages and where to write


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when the process that started it dies (prctl PR_SET_PDEATHSIG), so a
    killed run leaves no worker behind to race its re-run. Elsewhere the workers exit when the pool's pipe closes."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _worker_init(stages, batch_size, work, types, parent) -> None:
    _die_with_parent(parent)
    _WORKER.update(
        stages=stages, batch_size=batch_size, work=Path(work), types=types, run=parent, ready=False
    )


def _worker_map(shard: int, items: list[dict]) -> tuple[int, int, int]:
    w = _WORKER
    if not w["ready"]:  # set up in the first task, not the initializer, so a failure is raised as itself
        for s in w["stages"]:
            s.setup()
        w["ready"] = True
    rows = map_shard(w["stages"], items, w["batch_size"])
    return shard, *write_part(w["work"], shard, rows, w["types"], w["run"])


class _RayStage:
    """A stage as a Ray Data callable: pyarrow batch -> rows -> stage -> pyarrow batch. Used as a function
    (stateless stages) or as an actor class (stages holding a model; constructed once per actor)."""

    def __init__(self, stage: Stage, types: dict[str, str]):
        self.stage, self.types, self.ready = stage, types, False

    def __call__(self, batch):
        if not self.ready:
            self.stage.setup()
            self.ready = True
        rows = run_stage(self.stage, batch.to_pylist())
        return to_table(rows, self.types)


def _ray_load(batch):
    from fluxion.curate.pipeline import load_rows, to_table

    rows = load_rows(batch.to_pylist())
    return to_table(rows, BASE_SCHEMA)


class RayExecutor:
    def __init__(self, stages: list[Stage], cfg: CurateConfig, work: Path, types: dict[str, str]):
        import ray

        self.stages, self.cfg, self.work, self.types = stages, cfg, work, types
        if not ray.is_initialized():
            kwargs = {"address": cfg.ray_address} if cfg.ray_address else {"num_cpus": cfg.num_cpus}
            ray.init(include_dashboard=False, log_to_driver=False, **kwargs)

    def run(self, items_by_shard: dict[int, list[dict]]) -> Iterator[tuple[int, int, int]]:
        import ray

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards complete in order: bounded buffering below
        ctx.enable_progress_bars = False
        items = [
            {
                "key": it["key"],
                "shard": it["shard"],
                "file": it.get("file", ""),
                "member": it.get("member", ""),
                "url": it.get("url", ""),
                "caption": it.get("caption", ""),
            }
            for its in items_by_shard.values()
            for it in its
        ]
        for it in items:  # load_rows tells dataset items from URL items by the "file" key
            if not it["file"]:
                del it["file"], it["member"]
        bs = self.cfg.batch_size
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // bs))
        ds = ds.map_batches(_ray_load, batch_format="pyarrow", batch_size=bs)
        types = dict(BASE_SCHEMA)
        for stage in self.stages:
            types = {**types, **stage.schema, f"t_{stage.name}": "float64"}
            if stage.stateful:
                ds = ds.map_batches(
                    _RayStage,
                    fn_constructor_args=(stage, types),
                    batch_format="pyarrow",
                    batch_size=bs,
                    concurrency=self.cfg.actors,
                    num_gpus=stage.num_gpus or None,
                )
            else:
                ds = ds.map_batches(_RayStage(stage, types), batch_format="pyarrow", batch_size=bs)
        expected = {s: len(its) for s, its in items_by_shard.items()}
        pending: dict[int, list[dict]] = {}
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                pending.setdefault(row["shard"], []).append(row)
                if len(pending[row["shard"]]) == expected[row["shard"]]:
                    rows = pending.pop(row["shard"])
                    yield row["shard"], *write_part(self.work, row["shard"], rows, self.types, os.getpid())


# --- the run ------------------------------------------------------------------------------------------------------
def _part(work: Path, shard: int) -> Path:
    return work / f"part-{shard:05d}.parquet"


def _log(work: Path, event: dict) -> None:
    with open(work / "log.jsonl", "a") as f:  # append-only: one line per finished shard, for audit and tests
        f.write(json.dumps({**event, "pid": os.getpid(), "time": time.time()}) + "\n")


def run(cfg: CurateConfig, log=print) -> dict:
    out = Path(cfg.output)
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    plan = make_plan(cfg, work)
    stages = build_stages(cfg)
    types = column_types(stages)
    by_shard: dict[int, list[dict]] = {}
    for it in plan.items:
        by_shard.setdefault(it["shard"], []).append(it)
    pending = {s: its for s, its in by_shard.items() if not _part(work, s).is_file()}
    where = f"{cfg.executor}, {cfg.workers} workers" if cfg.executor == "local" else cfg.executor
    log(f"{len(plan.items)} items in {plan.num_shards} shards; {len(pending)} to process ({where})")
    start = time.perf_counter()
    if pending:
        executor = (
            LocalExecutor(stages, cfg, work, types)
            if cfg.executor == "local"
            else RayExecutor(stages, cfg, work, types)
        )
        for shard, kept, total in executor.run(pending):
            log(f"shard {shard}: {kept}/{total} kept")
    map_seconds = time.perf_counter() - start
    decisions = run_dedup(cfg, work, plan.num_shards)
    write_outputs(cfg, out, plan, decisions, types)
    pre = None
    if cfg.precompute:
        from fluxion.curate.precompute import precompute

        pre = precompute(cfg.precompute, out, plan.num_shards, log)
    stats = finish(cfg, out, plan, map_seconds, len(pending), pre)
    log(f"kept {stats['kept']} of {stats['total']}; {out / 'report.html'}")
    return stats


def run_dedup(cfg: CurateConfig, work: Path, num_shards: int) -> dict[str, tuple[str, str]]:
    """key -> (kept key, reason) for every dropped duplicate."""
    if not cfg.dedup:
        return {}
    import pyarrow.parquet as pq

    cols = ["key", "dropped_by", "phash", "pdq", "width", "height", "sharpness", "blockiness"]
    parts = []
    for s in range(num_shards):
        names = pq.read_schema(_part(work, s)).names
        parts.append(pq.read_table(_part(work, s), columns=[c for c in cols + ["embedding"] if c in names]))
    rows = [r for t in parts for r in t.to_pylist() if not r["dropped_by"]]
    if not rows:
        return {}
    phash = np.array([r["phash"] for r in rows], np.int64)
    pdq = pdq_words([r["pdq"] for r in rows])
    # The quality rule as a rank: most pixels, then sharpest, then least blocky, then the key.
    order = sorted(
        range(len(rows)),
        key=lambda i: (
            -rows[i]["width"] * rows[i]["height"],
            -_num(rows[i].get("sharpness")),
            _num(rows[i].get("blockiness")),
            rows[i]["key"],
        ),
    )
    rank = np.empty(len(rows), np.int64)
    rank[order] = np.arange(len(rows))
    emb = None
    if cfg.dedup.semantic_threshold > 0 and rows[0].get("embedding"):
        emb = np.stack([np.frombuffer(r["embedding"], np.float32) for r in rows])
    result = dedup(cfg.dedup, phash, pdq, rank, emb)
    out = {}
    for i in np.flatnonzero(~result.keep):
        j = int(result.cluster[i])
        dp = int(np.bitwise_count(np.uint64(phash[i] ^ phash[j])))
        dq = int(np.bitwise_count(pdq[i] ^ pdq[j]).sum())
        out[rows[i]["key"]] = (
            rows[j]["key"],
            f"near-duplicate: of {rows[j]['key']} (phash {dp}, pdq {dq} bits)",
        )
    return out


def _num(v) -> float:
    return 0.0 if v is None or v != v else float(v)


def write_outputs(cfg: CurateConfig, out: Path, plan: Plan, decisions: dict, types: dict) -> None:
    """Phase 4 for every shard not written yet: in this process, or spread over `workers` processes (local
    executor; Ray: `num_cpus`), each shard whole and independent of the others, given the dedup decisions."""
    work = out / WORK
    todo = [s for s in range(plan.num_shards) if not (work / f"manifest-{s:05d}.parquet").is_file()]
    n = min(cfg.workers if cfg.executor == "local" else cfg.num_cpus, len(todo))
    if n <= 1:
        for s in todo:
            write_shard(out, s, decisions, types)
        return
    from concurrent.futures import as_completed
    from concurrent.futures.process import BrokenProcessPool

    shard_of = {it["key"]: it["shard"] for it in plan.items}
    by_shard: dict[int, dict] = {}
    for key, d in decisions.items():  # each task gets only its own shard's decisions
        by_shard.setdefault(shard_of[key], {})[key] = d
    pool = _spawn_pool(n, _die_with_parent, (os.getpid(),))
    try:
        futures = [pool.submit(write_shard, out, s, by_shard.get(s, {}), types) for s in todo]
        for f in as_completed(futures):
            try:
                f.result()
            except BrokenProcessPool:
                raise RuntimeError(
                    "a curate writer process died (killed, or out of memory?); the shards it wrote are kept: "
                    "run again to resume"
                ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_shard(out: Path, s: int, decisions: dict, types: dict) -> None:
    """One shard's `NNNNN.tar` (the kept rows) and then its manifest part (every row), each atomically: the part
    marks the shard done."""
    import pyarrow.parquet as pq

    work = out / WORK
    rows = pq.read_table(_part(work, s)).to_pylist()
    for r in rows:
        r["duplicate_of"] = ""
        if r["key"] in decisions and not r["dropped_by"]:
            r["duplicate_of"], r["reason"] = decisions[r["key"]]
            r["dropped_by"] = "dedup"
        r["kept"] = not r["dropped_by"]
        r["shard"] = f"{s:05d}.tar"
    write_webdataset(out / f"{s:05d}.tar", (_shard_record(r) for r in rows if r["kept"]))
    for r in rows:
        del r["image"], r["thumb"]
    names = {k: v for k, v in types.items() if k not in ("image", "thumb", "shard")}
    table = to_table(rows, {**names, "shard": "string", "duplicate_of": "string", "kept": "bool"})
    write_table_atomic(table, work / f"manifest-{s:05d}.parquet")
    _log(work, {"phase": "write", "shard": s})


def _shard_record(row: dict) -> Record:
    skip = {
        "image",
        "thumb",
        "key",
        "shard",
        "meta",
        "embedding",
        "dropped_by",
        "reason",
        "kept",
        "duplicate_of",
    }
    meta = {k: v for k, v in row.items() if k not in skip and not k.startswith("t_")}
    meta.update(json.loads(row["meta"] or "{}"))
    caption = row.get("caption_long") or row["caption"]
    return Record(row["key"], row["image"], caption, meta)


def finish(
    cfg: CurateConfig,
    out: Path,
    plan: Plan,
    map_seconds: float,
    processed_shards: int,
    pre: dict | None = None,
) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from fluxion.curate.report import write_report

    work = out / WORK
    tables = [pq.read_table(work / f"manifest-{s:05d}.parquet") for s in range(plan.num_shards)]
    manifest = pa.concat_tables(tables, promote_options="default")
    write_table_atomic(manifest, out / "manifest.parquet")
    dropped = manifest.filter(pc.invert(manifest.column("kept")))
    write_table_atomic(
        dropped.select(["key", "source", "dropped_by", "reason", "duplicate_of"]), out / "exclusions.parquet"
    )
    stages = [s.name for s in build_stages(cfg)] + (["dedup"] if cfg.dedup else [])
    stats = {
        "total": manifest.num_rows,
        "kept": int(pc.sum(manifest.column("kept")).as_py() or 0),
        "shards": plan.num_shards,
        "processed_shards_this_run": processed_shards,
        "map_seconds_this_run": round(map_seconds, 3),
        "executor": cfg.executor,
        "workers": cfg.workers if cfg.executor == "local" else None,
        "stages": stages,
        "funnel": funnel(manifest, stages),
        "throughput": throughput(manifest, stages),
    }
    if pre is not None:  # the precompute stage, this run: kept images encoded, seconds, images/s
        stats["precompute"] = {
            **pre,
            "images_per_s": round(pre["images"] / pre["seconds"], 1) if pre["seconds"] else None,
        }
    _write_text_atomic(out / "stats.json", json.dumps(stats, indent=2))
    write_report(out, manifest, stats, cfg)
    return stats


def funnel(manifest, stages: list[str]) -> list[dict]:
    """Per stage: images in, dropped (by reason kind) and out."""
    dropped_by = manifest.column("dropped_by").to_pylist()
    reasons = manifest.column("reason").to_pylist()
    left = len(dropped_by)
    out = []
    for name in stages:
        kinds: dict[str, int] = {}
        for d, r in zip(dropped_by, reasons):
            if d == name:
                kind = r.split(":")[0]  # every reason reads "<kind>: <detail>"
                kinds[kind] = kinds.get(kind, 0) + 1
        n = sum(kinds.values())
        out.append({"stage": name, "in": left, "dropped": n, "out": left - n, "reasons": kinds})
        left -= n
    return out


def throughput(manifest, stages: list[str]) -> dict[str, dict]:
    """Per stage: images processed and images/s per worker, from the per-row stage times."""
    out = {}
    for name in stages:
        col = f"t_{name}"
        if col not in manifest.column_names:
            continue
        t = np.array(manifest.column(col).to_pylist(), dtype=np.float64)
        n = int((t > 0).sum())
        total = float(t.sum())
        out[name] = {
            "images": n,
            "seconds": round(total, 3),
            "images_per_s_per_worker": round(n / total, 1) if total else None,
        }
    return out
