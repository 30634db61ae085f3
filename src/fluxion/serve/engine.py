"""The worker: one process (one per GPU) owns its loaded models, claims jobs from the store and runs them.

Scheduling (continuous batching): a claim takes the oldest queued job and up to `max_batch - 1` more queued jobs
with the same batch key (same model, size, steps, guidance and LoRA set, no input images). They denoise as one
batch, one transformer forward per step, and at every step boundary the worker admits newly queued jobs of that
key into the running batch (`Store.claim_more`, under the same claim), up to `max_batch` rows. Each row stands at
its own step of the shared schedule (`sampling.denoise.euler_step_rows`: a per-row time vector and dt); a row
that reaches t = 0 leaves the batch and is decoded, encoded and stored while the others go on. Each job's
image equals the same job run alone with the same seed up to float rounding: its noise (its own generator),
schedule and decode (batch 1) are the solo run's bit for bit; the batched transformer forward, and the one
text-encoder call for the prompts of jobs claimed together, round differently from batch 1 (fluxion-tiny on
the CPU: at most 1 level in 1 of ~12,000 pixel values, tests/test_serve_engine.py). Jobs with input images (and
OpenAI `partial_images` jobs) run alone through `pipeline.generate` / `inpaint`.

Overlap: text encoding of admitted jobs (and of the jobs about to take a finishing row's place) runs on a
prefetch thread, and the VAE decode + image encode + store of finished rows on finisher threads; on CUDA each
such thread issues its kernels on a stream of its own, so neither blocks the denoise loop. The loop keeps the
CPU at most one step ahead of the GPU.

Between steps the worker records progress and honours cancels per row: a cancelled job is finished `Cancelled`
at once, its neighbours go on. A heartbeat thread renews the lease of the claim while any of its jobs is open;
if this process dies the lease runs out and the jobs go back to the queue (store.reap).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import socket
import threading
import time
import traceback
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial

import torch
from PIL import Image

from fluxion.request import Request
from fluxion.serve import store as st
from fluxion.serve.config import ServeConfig
from fluxion.serve.moderation import Moderator
from fluxion.weights.models import Models

log = logging.getLogger("fluxion.serve")

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class Cancelled(Exception):
    """Raised from the progress callback to stop a batch whose every job was cancelled."""


def encode_image(
    image: Image.Image, fmt: str, quality: int | None = None, params: dict | None = None
) -> bytes:
    """`params`: PNG only, written into its text chunks (fluxion.metadata) so a download keeps them."""
    buf = io.BytesIO()
    if fmt == "png":
        from fluxion.metadata import png_info

        info = png_info(params) if params else None
        image.save(buf, format="PNG", compress_level=1, pnginfo=info)  # fast: on the worker's critical path
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=quality or 95)
    else:
        image.save(buf, format="WEBP", quality=quality or 95)
    return buf.getvalue()


LIVE_PREVIEW = -1  # previews-table index of the latest per-step thumbnail (overwritten every step)


def load_text_only(cfg: ServeConfig, served):
    """`--role text-encoder`: only the first served model's text encoder (no DiT, no VAE)."""
    from fluxion.text.encoder import load_text_encoder
    from fluxion.weights.models import is_embedded

    s = served[0]
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(cfg.dtype or "")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    return load_text_encoder(None if is_embedded(s.path) else s.path, s.spec.text, device=device, dtype=dtype)


def lora_path(lora_dir: str | None, name: str) -> str:
    """`name` (a file stem in the operator's LoRA folder) -> its path; anything else is refused."""
    from pathlib import Path

    if not lora_dir:
        raise ValueError("this server has no LoRA folder (start it with --lora-dir DIR)")
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"LoRA name {name!r}: give a file stem from GET /v1/loras")
    path = Path(lora_dir) / f"{name}.safetensors"
    if not path.is_file():
        raise ValueError(f"no LoRA named {name!r} in this server's LoRA folder; see GET /v1/loras")
    return str(path)


def list_loras(lora_dir: str | None) -> list[str]:
    from pathlib import Path

    if not lora_dir or not Path(lora_dir).is_dir():
        return []
    return sorted(p.stem for p in Path(lora_dir).glob("*.safetensors"))


def load_served(cfg: ServeConfig, served) -> dict[str, Models]:
    from fluxion.weights.models import load_models

    for s in served:
        if s.path is None and s.spec.name != "fluxion-tiny":
            raise ValueError(
                f"--model {s.name}: give the checkpoint path (NAME=PATH); only fluxion-tiny (and its base, "
                "where shipped) is embedded"
            )
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[cfg.dtype]
    out = {
        s.name: load_models(
            s.path, preset=cfg.preset if s.path else None, device=device, dtype=dtype, text=cfg.text
        )
        for s in served
    }
    if cfg.prompt_cache:
        from fluxion.text.cache import PromptCache

        for m in out.values():
            m.prompt_cache = PromptCache(cfg.prompt_cache)
    return out


class Metrics:
    """Prometheus instruments of one process (a registry of its own, so several apps can live in one test)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        seconds = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)  # histogram buckets, s
        rows = (1, 2, 4, 8, 16, 32)  # histogram buckets, jobs
        hist = partial(Histogram, registry=self.registry)
        self.step_seconds = hist(
            "fluxion_step_seconds", "time of one denoising step of a batch", buckets=seconds
        )
        self.batch_size = hist("fluxion_batch_size", "jobs per claim", buckets=rows)
        self.step_rows = hist("fluxion_step_rows", "rows (jobs) in one denoising forward", buckets=rows)
        self.start_wait = hist(
            "fluxion_start_wait_seconds",
            "from a job's claim to its first denoising step: its prompt encoding and the wait for a free row",
            buckets=seconds[1:] + (30,),
        )
        self.finish_seconds = hist(
            "fluxion_finish_seconds",
            "a finished row's decode, moderation, image encode and store (off the denoise loop when overlapped)",
            buckets=seconds[:-1],
        )
        self.admitted = Counter(
            "fluxion_admitted",
            "jobs that joined a batch already denoising, at a step boundary (continuous batching)",
            registry=self.registry,
        )
        self.images = Counter(
            "fluxion_images", "images finished by this process", ["status"], registry=self.registry
        )
        self.gpu_memory = Gauge(
            "fluxion_gpu_memory_bytes", "CUDA memory allocated by this process", registry=self.registry
        )

        def gpu_bytes():
            return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0

        self.gpu_memory.set_function(gpu_bytes)


class Overlap:
    """Where the work around the denoise loop runs. enabled: a prefetch thread (text encoding of admitted jobs)
    and `finishers` threads (decode + image encode + store of finished rows); on CUDA every such thread issues
    its kernels on a stream of its own, made once per thread. Disabled: the same functions, inline on the
    worker thread (CPU offload, or to compare)."""

    def __init__(self, enabled: bool, device: torch.device | None, finishers: int = 2):
        self.enabled, self.device = enabled, device  # device: the models' CUDA device, None off CUDA
        self.prep_pool = ThreadPoolExecutor(1, "fluxion-prep") if enabled else None
        self.finish_pool = ThreadPoolExecutor(finishers, "fluxion-finish") if enabled else None
        # one thread, so a job's thumbnails reach the store in step order
        self.preview_pool = ThreadPoolExecutor(1, "fluxion-preview") if enabled else None
        self._local = threading.local()

    def prep(self, fn, *args) -> Future:
        return self._submit(self.prep_pool, fn, *args)

    def finish(self, fn, *args) -> Future:
        return self._submit(self.finish_pool, fn, *args)

    def preview(self, fn, *args) -> Future:
        return self._submit(self.preview_pool, fn, *args)

    @staticmethod
    def _submit(pool, fn, *args) -> Future:
        if pool is not None:
            return pool.submit(fn, *args)
        f: Future = Future()
        try:
            f.set_result(fn(*args))
        except Exception as e:
            f.set_exception(e)
        return f

    def stream(self):
        """This thread's side stream (CUDA, overlap on), else None."""
        if self.device is None or not self.enabled:
            return None
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = torch.cuda.Stream(device=self.device)
        return s

    def on_side_stream(self):
        s = self.stream()
        return torch.cuda.stream(s) if s is not None else contextlib.nullcontext()

    def close(self) -> None:
        for pool in (self.prep_pool, self.finish_pool, self.preview_pool):
            if pool is not None:
                pool.shutdown(wait=True)


@dataclass
class _Shape:
    """What the jobs of one batch key share."""

    models: Models
    model: str  # served name
    width: int
    height: int
    steps: int
    guidance: object  # sampling.denoise.Guidance
    size: object  # images.OutputSize
    h: int  # latent grid (tokens)
    w: int
    timesteps: list[float]  # steps + 1 times from 1 to 0
    loras: list
    neg: torch.Tensor | None = None  # the empty negative prompt (true CFG), encoded once on the prep thread


@dataclass
class _Row:
    """One job in the running batch: its state [1, N, 128] at `step` of the shape's schedule."""

    job: st.Job
    prompt: str  # as encoded (after upsampling)
    original: str | None  # the prompt before upsampling, when it was rewritten
    x: torch.Tensor
    ctx: torch.Tensor  # [1, L, C_txt]
    # the CUDA event the tensors above wait on (made on the prep stream); None on the CPU or inline
    ready: object = None
    step: int = 0
    prev: torch.Tensor | None = field(default=None, repr=False)  # the state before the last step (previews)


class Worker:
    def __init__(
        self,
        cfg: ServeConfig,
        store: st.Store,
        models: dict[str, Models],
        moderator: Moderator,
        metrics: Metrics,
        on_change=None,
        overlap: bool | None = None,
    ):
        self.cfg, self.store, self.models, self.moderator, self.metrics = (
            cfg,
            store,
            models,
            moderator,
            metrics,
        )
        self.id = cfg.worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.alive = False
        # set by an API in this process when it queued work (poke): an idle worker claims at once instead of at
        # its next poll; submissions from other processes still arrive by polling (poll_s)
        self.work = threading.Event()
        # wakes in-process waiters (SSE, OpenAI) after a write: on_change(job_ids), None for any job
        self.on_change = on_change or (lambda job_ids=None: None)
        self.paths = dict(cfg.models)
        self.preview_maps: dict = {}  # model name -> PreviewMap, made at the first job of that model
        self._upsampler = None
        self.signer = None
        if cfg.c2pa_cert and cfg.c2pa_key:
            from fluxion.provenance import C2PASigner

            self.signer = C2PASigner.from_files(cfg.c2pa_cert, cfg.c2pa_key)
        # CPU offload moves components between devices per call: their users must not run at the same time.
        offload = any(m.offload for m in models.values())
        cuda = next((m.device for m in models.values() if m.device.type == "cuda"), None)
        overlap = cfg.overlap if overlap is None else overlap
        self.overlap = Overlap(overlap and not offload, cuda)

    def upsampler(self):
        if self._upsampler is None:
            from fluxion.text.upsample import PromptUpsampler

            device = next(iter(self.models.values())).device
            self._upsampler = PromptUpsampler(self.cfg.upsampler, device=device)
        return self._upsampler

    def finish_image(self, image: Image.Image, params: dict, fmt: str, quality, edited: bool) -> bytes:
        """Watermark (unless the operator turned it off), encode (PNG keeps the params), sign (C2PA)."""
        from fluxion.provenance import MIN_SIDE, add_watermark, sign_c2pa

        if self.cfg.watermark and min(image.size) >= MIN_SIDE:
            image = add_watermark(image)
        data = encode_image(image, fmt, quality, params)
        if self.signer is not None:
            data = sign_c2pa(data, MEDIA_TYPES[fmt], self.signer, params, edited)
        return data

    def poke(self) -> None:
        """Work was queued (or the worker should stop): end an idle wait now."""
        self.work.set()

    def run(self, stop: threading.Event) -> None:
        self.alive = True
        last_reap = 0.0
        try:
            while not stop.is_set():
                now = time.time()
                if now - last_reap > min(self.cfg.lease_s / 3, 5.0):
                    try:
                        n = self.store.reap(self.cfg.max_attempts)
                    except Exception:
                        n = 0
                        log.warning("reap failed", exc_info=True)
                    if n:
                        log.info(
                            "requeued %d jobs of stopped workers", n, extra={"event": "reap", "count": n}
                        )
                    last_reap = now
                self.work.clear()  # before the claim: a submit after it sets the event, so no wake is lost
                try:
                    token, batch = self.store.claim(
                        self.id, list(self.models), self.cfg.max_batch, self.cfg.lease_s
                    )
                except Exception:  # the store is unreachable for a moment: wait, never die
                    log.warning("claim failed; retrying in 1 s", exc_info=True)
                    stop.wait(1.0)
                    continue
                if not batch:
                    self.work.wait(self.cfg.poll_s)
                    continue
                self.run_batch(token, batch, stop)
        finally:
            self.overlap.close()  # finished rows still being stored are stored
            self.alive = False

    @staticmethod
    def continuous(batch: list[st.Job]) -> bool:
        """Jobs that denoise in the shared, growing batch: no input images, no partial-image decodes."""
        return all(not j.params.get("inputs") and not j.params.get("partial_images") for j in batch)

    def run_batch(self, token: str, batch: list[st.Job], stop: threading.Event | None = None) -> None:
        """Run one claim to its end: its first jobs and, for a continuous batch, every job admitted into it.
        Returns when the denoising is over; the claim's heartbeat goes on until its last finished row is stored."""
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(token, done), daemon=True)
        beat.start()
        open_jobs = {j.id: j for j in batch}  # jobs of this claim not yet finished nor handed to a finisher
        handed: list[Future] = []
        try:
            if self.continuous(batch):
                self._run_continuous(token, batch, open_jobs, handed, stop or threading.Event())
            else:
                self._run(token, batch)
        except Exception as e:  # a failed batch fails its open jobs, never the worker
            log.error("batch failed: %s", traceback.format_exc(), extra={"event": "batch_error"})
            msg = (
                str(e)
                if isinstance(e, ValueError)
                else f"internal error ({type(e).__name__}); see the server log"
            )
            for job in open_jobs.values():
                if self.store.finish(job.id, token, st.ERROR, error=msg):
                    self.metrics.images.labels(st.ERROR).inc()
        finally:
            self._release(done, handed)
            self.on_change()

    def _release(self, done: threading.Event, handed: list[Future]) -> None:
        """Stop the claim's heartbeat once every handed-off row is stored."""
        left = [f for f in handed if not f.done()]
        if not left:
            done.set()
            return
        lock, count = threading.Lock(), [len(left)]

        def one_done(_):
            with lock:
                count[0] -= 1
                if count[0] == 0:
                    done.set()

        for f in left:
            f.add_done_callback(one_done)

    def _heartbeat(self, token: str, done: threading.Event) -> None:
        while not done.wait(self.cfg.lease_s / 3):
            try:
                self.store.heartbeat(token, self.cfg.lease_s)
            except Exception:  # a store hiccup must not kill the thread; the next beat retries
                log.warning("heartbeat failed: %s", traceback.format_exc())

    # ---- continuous batching ------------------------------------------------------------------------------------
    def _shape(self, job: st.Job) -> _Shape:
        from fluxion.images import OutputSize
        from fluxion.sampling.pipeline import resolve_guidance
        from fluxion.sampling.schedule import get_schedule

        models = self.models[job.model]
        spec, p = models.spec, job.params
        f = spec.vae.downsample_factor
        size = OutputSize(p["width"], p["height"], f)
        gw, gh = size.generated
        h, w = gh // f, gw // f
        return _Shape(
            models=models,
            model=job.model,
            width=p["width"],
            height=p["height"],
            steps=p["steps"],
            guidance=resolve_guidance(spec, p["guidance"], allow_override=False),
            size=size,
            h=h,
            w=w,
            timesteps=get_schedule(p["steps"], h * w),
            loras=p.get("loras") or [],
        )

    @torch.no_grad()
    def _prepare(self, sh: _Shape, jobs: list[st.Job]) -> list:
        """Prefetch thread: the prompts of jobs claimed together (upsampled if asked) -> embeddings in one encoder
        call, and each job's noise from its own generator seeded with its seed, as `generate` draws it. Returns
        one `_Row` or one exception (that job's failure) per job."""
        from fluxion.sampling.pipeline import draw_noise, encode_prompts

        out: list = [None] * len(jobs)
        todo, prompts, originals = [], [], []
        for i, job in enumerate(jobs):
            prompt, original = job.params["prompt"], None
            try:
                if job.params.get("prompt_upsampling"):
                    if not self.cfg.upsampler:
                        raise ValueError(
                            "prompt_upsampling: this server has no upsampler (--upsampler FOLDER)"
                        )
                    up = self.upsampler()(prompt, [])
                    original, prompt = up.original, up.prompt
            except Exception as e:
                out[i] = e
                continue
            todo.append(i)
            prompts.append(prompt)
            originals.append(original)
        if not todo:
            return out
        models = sh.models
        with self.overlap.on_side_stream():
            ctx = encode_prompts(models, prompts)  # [n, L, C_txt]
            if sh.guidance.mode == "cfg" and sh.neg is None:  # the server's requests have no negative prompt
                sh.neg = encode_prompts(models, [""])
            xs = [
                draw_noise(models.spec, [jobs[i].params["seed"]], sh.h, sh.w, models.device, models.dtype)
                for i in todo
            ]
            ready = None
            if self.overlap.stream() is not None:
                ready = torch.cuda.Event()
                ready.record(self.overlap.stream())
        for k, i in enumerate(todo):
            out[i] = _Row(jobs[i], prompts[k], originals[k], x=xs[k], ctx=ctx[k : k + 1], ready=ready)
        return out

    @torch.no_grad()
    def _run_continuous(
        self,
        token: str,
        first: list[st.Job],
        open_jobs: dict[str, st.Job],
        handed: list[Future],
        stop: threading.Event,
    ) -> None:
        from fluxion.lora import load_lora, remove_lora
        from fluxion.sampling.denoise import Conditioning, euler_step_rows
        from fluxion.sampling.ids import image_ids, text_ids
        from fluxion.sampling.preview import denoised_estimate, preview_map_for_models

        sh = self._shape(first[0])
        models, steps, max_batch = sh.models, sh.steps, self.cfg.max_batch
        cuda = models.device.type == "cuda"
        if sh.model not in self.preview_maps:
            self.preview_maps[sh.model] = preview_map_for_models(models, self.paths.get(sh.model))
        pmap = self.preview_maps[sh.model]
        self.metrics.batch_size.observe(len(first))
        pending: list[tuple[list[st.Job], Future]] = []  # claimed together, prompts being encoded
        ready: list[_Row] = []  # encoded, waiting for a free row
        rows: list[_Row] = []  # denoising

        admitted_at: dict[str, float] = {}  # job id -> perf_counter at its claim, until its first step

        def admit(jobs: list[st.Job]) -> None:
            for j in jobs:
                open_jobs[j.id] = j
                admitted_at[j.id] = time.perf_counter()
                if j.cancel:
                    self._cancel(token, j.id, open_jobs)
            jobs = [j for j in jobs if j.id in open_jobs]
            if jobs:
                pending.append((jobs, self.overlap.prep(self._prepare, sh, jobs)))

        def collect(jobs: list[st.Job], fut: Future) -> None:
            try:
                made = fut.result()
            except Exception as e:  # the whole encoder call failed
                made = [e] * len(jobs)
            for j, row in zip(jobs, made):
                if j.id not in open_jobs:  # cancelled while its prompt was encoded
                    continue
                if isinstance(row, Exception):
                    self._fail(token, j, row, open_jobs)
                    continue
                if row.ready is not None:  # made on the prep stream: order it before our use
                    main = torch.cuda.current_stream(models.device)
                    main.wait_event(row.ready)
                    for t in (row.x, row.ctx, sh.neg):
                        if t is not None:
                            t.record_stream(main)
                ready.append(row)

        names = []
        started, n_jobs = time.perf_counter(), 0
        try:
            for spec in sh.loras:  # per-request LoRAs, on the fly (unmerged), removed after this batch
                path = lora_path(self.cfg.lora_dir, spec["name"])
                names.append(load_lora(models.transformer, path, scale=spec["scale"]).name)
            admit(first)
            members: list[str] = []
            x = ctx = neg = ids = None
            prev_done = None  # event of the previous step: the CPU runs at most one step ahead
            previews_out: list[Future] = []  # live thumbnails queued on the preview thread
            last_beat = last_live = 0.0
            t_step, last_step_s = time.perf_counter(), 0.0
            queue_empty_at = -math.inf  # when a claim last left rows free (perf_counter seconds)
            while rows or ready or pending:
                # -- adopt prepared rows: with nothing to denoise, wait for the first; with a free row, wait a
                # little for the prompts being encoded (the last step still runs on CUDA) rather than run a step
                # with the row empty
                if not rows and not ready:
                    wait([f for _, f in pending], return_when=FIRST_COMPLETED)
                elif pending and len(rows) + len(ready) < max_batch and last_step_s > 0:
                    wait([f for _, f in pending], timeout=self.cfg.admit_wait * last_step_s)
                still, done_now = [], []
                for p in pending:
                    (done_now if p[1].done() else still).append(p)
                pending[:] = still
                for jobs, fut in done_now:
                    collect(jobs, fut)
                running = any(r.step > 0 for r in rows)
                while ready and len(rows) < max_batch:
                    row = ready.pop(0)
                    if row.job.id in open_jobs:
                        rows.append(row)
                        n_jobs += 1
                        if running:  # joins a batch already denoising: continuous batching at work
                            self.metrics.admitted.inc()
                if not rows:
                    continue
                # -- one step of every row, each at its own place in the schedule
                if [r.job.id for r in rows] != members:
                    members = [r.job.id for r in rows]
                    x = torch.cat([r.x for r in rows])
                    B = len(rows)
                    ctx = torch.cat([r.ctx for r in rows])
                    neg = sh.neg.expand(B, -1, -1) if sh.neg is not None else None
                    ids = image_ids(sh.h, sh.w, batch=B, device=models.device)
                    cond = Conditioning(
                        ctx=ctx, ctx_ids=text_ids(ctx.shape[1], B, models.device), neg_ctx=neg
                    )
                t_cur = [sh.timesteps[r.step] for r in rows]
                t_next = [sh.timesteps[r.step + 1] for r in rows]
                x = euler_step_rows(models.denoiser, x, ids, cond, t_cur, t_next, sh.guidance)
                for i, r in enumerate(rows):
                    r.prev, r.x = r.x, x[i : i + 1]
                    r.step += 1
                    if r.step == 1 and r.job.id in admitted_at:  # first step queued now: claim -> start
                        self.metrics.start_wait.observe(time.perf_counter() - admitted_at.pop(r.job.id))
                step_done = None
                if cuda:
                    step_done = torch.cuda.Event()
                    step_done.record(torch.cuda.current_stream(models.device))
                    if prev_done is not None:
                        prev_done.synchronize()
                    prev_done = step_done
                now = time.perf_counter()
                last_step_s = now - t_step
                self.metrics.step_seconds.observe(last_step_s)
                self.metrics.step_rows.observe(len(rows))
                t_step = now
                # -- finished rows leave: decode + encode + store off this loop
                for r in rows:
                    if r.step == steps:
                        open_jobs.pop(r.job.id, None)
                        handed.append(self.overlap.finish(self._finish_row, token, sh, r, step_done))
                rows = [r for r in rows if r.step < steps]
                # -- progress and cancels (at most 4 store writes a second)
                if now - last_beat >= 0.25 or not rows:
                    last_beat = now
                    progress = {r.job.id: r.step / steps for r in rows}
                    progress.update({r.job.id: 0.0 for r in ready})
                    progress.update({j.id: 0.0 for jobs, _ in pending for j in jobs})
                    for job_id in self.store.heartbeat(token, self.cfg.lease_s, progress) & set(open_jobs):
                        self._cancel(token, job_id, open_jobs)
                        log.info("cancelled", extra={"event": "cancelled", "job": job_id})
                    rows = [r for r in rows if r.job.id in open_jobs]
                    self.on_change(list(progress))
                # -- live thumbnails from the x0 estimate (first step of a job always, else <= 4/s). Only the
                # estimate is queued here (GPU, async); its copy to the CPU, the PNG and the store write run on
                # the preview thread: done inline they would wait for this step's kernels and leave the GPU
                # idle while the CPU encodes. A backlog (slow store) drops the non-first thumbnails.
                if self.cfg.live_previews and rows:
                    due = now - last_live >= 0.25
                    previews_out = [f for f in previews_out if not f.done()]  # steps not stored yet
                    shown = [r for r in rows if r.step == 1 or (due and len(previews_out) < 2)]
                    ests = [
                        denoised_estimate(r.prev, r.x, sh.timesteps[r.step - 1], sh.timesteps[r.step])
                        for r in shown
                    ]
                    est_done = None
                    if cuda and ests:  # after the estimates' kernels (queued after step_done)
                        est_done = torch.cuda.Event()
                        est_done.record(torch.cuda.current_stream(models.device))
                    if shown:  # one task (and one wake of the event streams) per step
                        shown_ids = [r.job.id for r in shown]
                        previews_out.append(
                            self.overlap.preview(
                                self._live_previews, token, shown_ids, pmap, sh, ests, est_done
                            )
                        )
                    if due:
                        last_live = now
                # -- admission at the step boundary: queued jobs of this key take free rows; rows finishing in
                # the next two steps count as free, so those jobs' prompts are encoded while the steps run (one
                # step can be shorter than a text encode that shares the GPU with it). The queue is asked only
                # when it may hold more: after a poke (a submit in this process), after a claim that filled every
                # free row, or poll_s after it was last found empty (submissions from other processes).
                if not stop.is_set():
                    room = max_batch - len(rows) - len(ready) - sum(len(jobs) for jobs, _ in pending)
                    room += sum(r.step >= steps - 2 for r in rows)
                    if room > 0 and (self.work.is_set() or now - queue_empty_at >= self.cfg.poll_s):
                        self.work.clear()  # before the claim: a submit during it pokes again
                        more = self.store.claim_more(token, self.id, [sh.model], room, self.cfg.lease_s)
                        queue_empty_at = now if len(more) < room else -math.inf
                        if more:
                            log.info(
                                "admitted",
                                extra={"event": "admitted", "jobs": [j.id for j in more], "rows": len(rows)},
                            )
                            admit(more)
        finally:
            for f in [f for _, f in pending]:  # a failure: let the prep thread finish before the LoRAs go
                with contextlib.suppress(Exception):
                    f.result()
            for n in names:
                remove_lora(models.transformer, n)
        log.info(
            "batch ran",
            extra={"event": "ran", "jobs": n_jobs, "seconds": round(time.perf_counter() - started, 3)},
        )

    @torch.no_grad()
    def _live_previews(self, token: str, job_ids: list[str], pmap, sh: _Shape, ests: list, made) -> None:
        """Preview thread: one live thumbnail per job (ests: their x0 estimates, tokens [1, h*w, C] made on the
        denoise stream; made: the event after their kernels) to PNGs in the store. A failure costs that
        thumbnail only."""
        with self.overlap.on_side_stream():
            side = self.overlap.stream()
            if side is not None and made is not None:
                side.wait_event(made)
                for est in ests:
                    est.record_stream(side)
            for job_id, est in zip(job_ids, ests):
                try:
                    thumb = pmap.image(est, sh.h, sh.w, scale=4)  # to the CPU: waits for this stream only
                    self.store.add_preview(job_id, token, LIVE_PREVIEW, encode_image(thumb, "png"))
                except Exception:
                    log.warning("a live preview failed", exc_info=True, extra={"event": "preview_error"})
        self.on_change(job_ids)

    @torch.no_grad()
    def _finish_row(self, token: str, sh: _Shape, row: _Row, step_done) -> None:
        """Finisher thread: decode the finished row (on its own stream after the step that made it), then
        moderate, encode and store it. A failure fails this job only."""
        from fluxion.images import pixels_to_pil
        from fluxion.sampling.pipeline import decode

        t0 = time.perf_counter()
        try:
            tokens = row.x
            with self.overlap.on_side_stream():
                side = self.overlap.stream()
                if side is not None and step_done is not None:
                    side.wait_event(step_done)
                    tokens.record_stream(side)
                pixels = sh.size.crop(decode(sh.models, tokens, sh.h, sh.w))
                image = pixels_to_pil(pixels)[0]  # to the CPU: waits for this stream only
            seed = row.job.params["seed"]
            params = {
                "model": sh.models.spec.name,
                "width": sh.width,
                "height": sh.height,
                "steps": sh.steps,
                "guidance": sh.guidance.scale,
                "negative_prompt": "" if sh.guidance.mode == "cfg" else None,
                "references": 0,
                "prompt": row.prompt,
                "seed": seed,
            }  # what `generate` records for this job alone
            self._deliver(token, row.job, image, params, sh.loras, row.original, rows=None)
        except Exception as e:
            log.error("finishing a row failed: %s", traceback.format_exc(), extra={"event": "finish_error"})
            self._fail(token, row.job, e, {})
        finally:
            self.metrics.finish_seconds.observe(time.perf_counter() - t0)
            self.on_change([row.job.id])

    def _cancel(self, token: str, job_id: str, open_jobs: dict) -> None:
        open_jobs.pop(job_id, None)
        if self.store.finish(job_id, token, st.CANCELLED, error="cancelled"):
            self.metrics.images.labels(st.CANCELLED).inc()
            self.on_change([job_id])

    def _fail(self, token: str, job: st.Job, e: Exception, open_jobs: dict) -> None:
        open_jobs.pop(job.id, None)
        msg = (
            str(e)
            if isinstance(e, ValueError)
            else f"internal error ({type(e).__name__}); see the server log"
        )
        if not isinstance(e, ValueError):
            log.error("job failed: %s", "".join(traceback.format_exception(e)), extra={"event": "job_error"})
        if self.store.finish(job.id, token, st.ERROR, error=msg):
            self.metrics.images.labels(st.ERROR).inc()
            self.on_change([job.id])

    def _deliver(
        self,
        token: str,
        job: st.Job,
        image: Image.Image,
        params: dict,
        loras: list,
        original: str | None,
        rows: int | None,
    ) -> None:
        """Moderate, encode and store one finished image (`params`: what the generator recorded, seed set)."""
        tol = job.params.get("safety_tolerance", 2)
        reasons = self.moderator.check_image(image, tol)
        result_params = None
        params = dict(params)
        if loras:
            params["loras"] = loras
        if original is not None:
            params["prompt_original"] = original
            # The job's params record both prompts (users should see when a prompt was rewritten).
            result_params = {**job.params, "prompt": params["prompt"], "prompt_original": original}
        if reasons:
            ok = self.store.finish(
                job.id,
                token,
                st.CONTENT_MODERATED,
                details={"Moderation Reasons": reasons},
                error="moderated",
                result_params=result_params,
            )
            status = st.CONTENT_MODERATED
        else:
            fmt = job.params.get("output_format", "jpeg")
            edited = job.params.get("inputs", 0) > 0
            data = self.finish_image(image, params, fmt, job.params.get("quality"), edited)
            ok = self.store.finish(
                job.id,
                token,
                st.READY,
                image=data,
                media_type=MEDIA_TYPES[fmt],
                seed=params["seed"],
                worker=self.id,
                result_params=result_params,
            )
            status = st.READY
        if ok:
            self.metrics.images.labels(status).inc()
            self.on_change([job.id])
        log.info(
            "job finished",
            extra={
                "event": "finished",
                "job": job.id,
                "status": status,
                "kept": ok,
                "batch": rows,
                "seconds": round(time.time() - (job.started_at or time.time()), 3),  # since its claim
            },
        )

    # ---- jobs with input images: one at a time through the library ----------------------------------------------
    def _run(self, token: str, batch: list[st.Job]) -> None:
        from fluxion.editing.references import pixels_to_pil
        from fluxion.sampling.pipeline import decode, generate, inpaint
        from fluxion.sampling.preview import preview_map_for_models

        models = self.models[batch[0].model]
        p0 = batch[0].params
        active = {j.id for j in batch if not j.cancel}
        for j in batch:
            if j.cancel:
                self.store.finish(j.id, token, st.CANCELLED, error="cancelled")
        if not active:
            return
        batch = [j for j in batch if j.id in active]
        self.metrics.batch_size.observe(len(batch))
        images = self.store.inputs(batch[0].id) if len(batch) == 1 else []
        refs = tuple(Image.open(io.BytesIO(d)).convert("RGB") for role, d in images if role == "image")
        mask = next((Image.open(io.BytesIO(d)) for role, d in images if role == "mask"), None)
        prompts = [j.params["prompt"] for j in batch]
        upsampled: dict[str, str] = {}  # job id -> the original prompt, for jobs whose prompt was rewritten
        for i, j in enumerate(batch):
            if j.params.get("prompt_upsampling"):
                if not self.cfg.upsampler:
                    raise ValueError("prompt_upsampling: this server has no upsampler (--upsampler FOLDER)")
                up = self.upsampler()(prompts[i], list(refs))
                upsampled[j.id], prompts[i] = up.original, up.prompt
        request = Request(
            prompt=prompts,
            seeds=tuple(j.params["seed"] for j in batch),
            width=p0["width"],
            height=p0["height"],
            steps=p0["steps"],
            guidance=p0["guidance"],
            references=refs[1:] if mask is not None else refs,
        )
        last = [0.0]
        started = time.perf_counter()

        def progress(step: int, total: int, seconds: float) -> None:
            self.metrics.step_seconds.observe(seconds)
            now = time.perf_counter()
            if step < total and now - last[0] < 0.25:  # store writes at most 4x a second per batch
                return
            last[0] = now
            cancelled = self.store.heartbeat(token, self.cfg.lease_s, {j.id: step / total for j in batch})
            for job_id in cancelled & active:
                self.store.finish(job_id, token, st.CANCELLED, error="cancelled")
                active.discard(job_id)
                log.info("cancelled", extra={"event": "cancelled", "job": job_id, "step": step})
            self.on_change([j.id for j in batch])
            if not active:
                raise Cancelled

        want = {i: j.params.get("partial_images", 0) for i, j in enumerate(batch)}
        live = [self.cfg.live_previews for _ in batch]
        if batch[0].model not in self.preview_maps:
            self.preview_maps[batch[0].model] = preview_map_for_models(models, self.paths.get(batch[0].model))
        pmap = self.preview_maps[batch[0].model]
        last_live = [0.0]

        def preview(step: int, total: int, tokens, h: int, w: int) -> None:
            # Live thumbnails (the studio page) from the fitted latent -> RGB map on the x0 estimate: a matmul
            # and a tiny PNG per job. At most 4 a second (the cadence of the progress writes); the first step
            # always (short jobs show one).
            now = time.perf_counter()
            if any(live) and step < total and (step == 1 or now - last_live[0] >= 0.25):
                last_live[0] = now
                for i, job in enumerate(batch):
                    if live[i] and job.id in active:
                        thumb = pmap.image(tokens, h, w, index=i, scale=4)
                        self.store.add_preview(job.id, token, LIVE_PREVIEW, encode_image(thumb, "png"))
                self.on_change([j.id for j in batch])
            for i, k in want.items():  # OpenAI partial_images: full decodes at k evenly spaced steps
                marks = [max(1, round(total * (n + 1) / (k + 1))) for n in range(k)]
                if k and step in marks and step < total and batch[i].id in active:
                    pixels = decode(models, tokens[i : i + 1], h, w)
                    im = pixels_to_pil(pixels)[0]
                    self.store.add_preview(batch[i].id, token, marks.index(step), encode_image(im, "png"))
                    self.on_change([batch[i].id])

        loras = p0.get("loras") or []
        names = []
        try:
            from fluxion.lora import load_lora, remove_lora

            for spec in loras:  # per-request LoRAs, on the fly (unmerged), removed after this batch
                names.append(
                    load_lora(
                        models.transformer, lora_path(self.cfg.lora_dir, spec["name"]), scale=spec["scale"]
                    ).name
                )
            if mask is not None:
                results = inpaint(models, request, refs[0], mask, progress=progress, preview=preview)
            else:
                results = generate(models, request, progress=progress, preview=preview)
        except Cancelled:
            return
        finally:
            for n in names:
                remove_lora(models.transformer, n)
        log.info(
            "batch ran",
            extra={"event": "ran", "jobs": len(batch), "seconds": round(time.perf_counter() - started, 3)},
        )
        for job, res in zip(batch, results):
            if job.id not in active:
                continue
            params = {**res.params, "seed": res.seed}
            self._deliver(token, job, res.image, params, loras, upsampled.get(job.id), rows=len(batch))
