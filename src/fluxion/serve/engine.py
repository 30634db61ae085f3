"""The worker: one process (one per GPU) owns its loaded models, claims jobs from the store and runs them.

Scheduling: a claim takes the oldest queued job and up to `max_batch - 1` more queued jobs with the same batch
key (same model, size, steps and guidance, no input images); they run as one batch with a seed per image.
Jobs with input images run alone. Between denoising steps the worker records progress and honours cancels: a
cancelled job is finished `Cancelled` at once (its batch neighbours go on; a batch whose jobs are all cancelled
stops). A heartbeat thread renews the lease while the batch runs; if this process dies the lease runs out and
the jobs go back to the queue (store.reap).
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
import traceback
import uuid

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


def encode_image(image: Image.Image, fmt: str, quality: int | None = None) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)  # fast: the encode is on the worker's critical path
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=quality or 95)
    else:
        image.save(buf, format="WEBP", quality=quality or 95)
    return buf.getvalue()


def load_served(cfg: ServeConfig, served) -> dict[str, Models]:
    import torch

    from fluxion.weights.models import load_models

    for s in served:
        if s.path is None and s.spec.name != "fluxion-tiny":
            raise ValueError(
                f"--model {s.name}: give the checkpoint path (NAME=PATH); only fluxion-tiny is embedded"
            )
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[cfg.dtype]
    return {
        s.name: load_models(s.path, preset=cfg.preset if s.path else None, device=device, dtype=dtype)
        for s in served
    }


class Metrics:
    """Prometheus instruments of one process (a registry of its own, so several apps can live in one test)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.step_seconds = Histogram(
            "fluxion_step_seconds",
            "time of one denoising step of a batch",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "fluxion_batch_size", "jobs per batch", buckets=(1, 2, 4, 8, 16, 32), registry=self.registry
        )
        self.images = Counter(
            "fluxion_images", "images finished by this process", ["status"], registry=self.registry
        )
        self.gpu_memory = Gauge(
            "fluxion_gpu_memory_bytes", "CUDA memory allocated by this process", registry=self.registry
        )

        def gpu_bytes():
            import torch

            return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0

        self.gpu_memory.set_function(gpu_bytes)


class Worker:
    def __init__(
        self,
        cfg: ServeConfig,
        store: st.Store,
        models: dict[str, Models],
        moderator: Moderator,
        metrics: Metrics,
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
                try:
                    token, batch = self.store.claim(
                        self.id, list(self.models), self.cfg.max_batch, self.cfg.lease_s
                    )
                except Exception:  # the store is unreachable for a moment: wait, never die
                    log.warning("claim failed; retrying in 1 s", exc_info=True)
                    stop.wait(1.0)
                    continue
                if not batch:
                    stop.wait(self.cfg.poll_s)
                    continue
                self.run_batch(token, batch)
        finally:
            self.alive = False

    def run_batch(self, token: str, batch: list[st.Job]) -> None:
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(token, done), daemon=True)
        beat.start()
        try:
            self._run(token, batch)
        except Exception as e:  # a failed batch fails its jobs, never the worker
            log.error("batch failed: %s", traceback.format_exc(), extra={"event": "batch_error"})
            msg = (
                str(e)
                if isinstance(e, ValueError)
                else f"internal error ({type(e).__name__}); see the server log"
            )
            for job in batch:
                if self.store.finish(job.id, token, st.ERROR, error=msg):
                    self.metrics.images.labels(st.ERROR).inc()
        finally:
            done.set()

    def _heartbeat(self, token: str, done: threading.Event) -> None:
        while not done.wait(self.cfg.lease_s / 3):
            try:
                self.store.heartbeat(token, self.cfg.lease_s)
            except Exception:  # a store hiccup must not kill the thread; the next beat retries
                log.warning("heartbeat failed: %s", traceback.format_exc())

    def _run(self, token: str, batch: list[st.Job]) -> None:
        from fluxion.editing.references import pixels_to_pil
        from fluxion.sampling.pipeline import decode, generate, inpaint

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
        request = Request(
            prompt=[j.params["prompt"] for j in batch],
            seeds=tuple(j.params["seed"] for j in batch),
            width=p0["width"],
            height=p0["height"],
            steps=p0["steps"],
            guidance=p0["guidance"],
            references=refs[1:] if mask is not None else refs,
        )
        last = [0.0]

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
            if not active:
                raise Cancelled

        want = {i: j.params.get("partial_images", 0) for i, j in enumerate(batch)}

        def preview(step: int, total: int, tokens, h: int, w: int) -> None:
            for i, k in want.items():
                marks = [max(1, round(total * (n + 1) / (k + 1))) for n in range(k)]
                if k and step in marks and step < total and batch[i].id in active:
                    pixels = decode(models, tokens[i : i + 1], h, w)
                    im = pixels_to_pil(pixels)[0]
                    self.store.add_preview(batch[i].id, token, marks.index(step), encode_image(im, "png"))

        t0 = time.time()
        try:
            if mask is not None:
                results = inpaint(models, request, refs[0], mask, progress=progress)
            else:
                results = generate(
                    models, request, progress=progress, preview=preview if any(want.values()) else None
                )
        except Cancelled:
            return
        for job, res in zip(batch, results):
            if job.id not in active:
                continue
            tol = job.params.get("safety_tolerance", 2)
            reasons = self.moderator.check_image(res.image, tol)
            if reasons:
                ok = self.store.finish(
                    job.id,
                    token,
                    st.CONTENT_MODERATED,
                    details={"Moderation Reasons": reasons},
                    error="moderated",
                )
                status = st.CONTENT_MODERATED
            else:
                fmt = job.params.get("output_format", "jpeg")
                data = encode_image(res.image, fmt, job.params.get("quality"))
                ok = self.store.finish(
                    job.id,
                    token,
                    st.READY,
                    image=data,
                    media_type=MEDIA_TYPES[fmt],
                    seed=res.seed,
                    worker=self.id,
                )
                status = st.READY
            if ok:
                self.metrics.images.labels(status).inc()
            log.info(
                "job finished",
                extra={
                    "event": "finished",
                    "job": job.id,
                    "status": status,
                    "kept": ok,
                    "batch": len(batch),
                    "seconds": round(time.time() - t0, 3),
                },
            )
