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

    s = served[0]
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(cfg.dtype or "")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    return load_text_encoder(
        s.path if s.path not in (None, "fluxion-tiny") else None, s.spec.text, device=device, dtype=dtype
    )


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
                f"--model {s.name}: give the checkpoint path (NAME=PATH); only fluxion-tiny is embedded"
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
        on_change=None,
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
        self.on_change = on_change or (lambda: None)  # wakes in-process waiters (SSE, OpenAI) after a write
        self.paths = dict(cfg.models)
        self.preview_maps: dict = {}  # model name -> PreviewMap, made at the first job of that model
        self._upsampler = None
        self.signer = None
        if cfg.c2pa_cert and cfg.c2pa_key:
            from fluxion.provenance import C2PASigner

            self.signer = C2PASigner.from_files(cfg.c2pa_cert, cfg.c2pa_key)

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
            self.on_change()

    def _heartbeat(self, token: str, done: threading.Event) -> None:
        while not done.wait(self.cfg.lease_s / 3):
            try:
                self.store.heartbeat(token, self.cfg.lease_s)
            except Exception:  # a store hiccup must not kill the thread; the next beat retries
                log.warning("heartbeat failed: %s", traceback.format_exc())

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
            self.on_change()
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
                self.on_change()
            for i, k in want.items():  # OpenAI partial_images: full decodes at k evenly spaced steps
                marks = [max(1, round(total * (n + 1) / (k + 1))) for n in range(k)]
                if k and step in marks and step < total and batch[i].id in active:
                    pixels = decode(models, tokens[i : i + 1], h, w)
                    im = pixels_to_pil(pixels)[0]
                    self.store.add_preview(batch[i].id, token, marks.index(step), encode_image(im, "png"))
                    self.on_change()

        loras = p0.get("loras") or []
        names = []
        t0 = time.time()
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
            tol = job.params.get("safety_tolerance", 2)
            reasons = self.moderator.check_image(res.image, tol)
            result_params = None
            params = {**res.params, "seed": res.seed}
            if loras:
                params["loras"] = loras
            if job.id in upsampled:
                params["prompt_original"] = upsampled[job.id]
                # The job's params record both prompts (users should see when a prompt was rewritten).
                result_params = {
                    **job.params,
                    "prompt": res.params["prompt"],
                    "prompt_original": upsampled[job.id],
                }
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
                data = self.finish_image(res.image, params, fmt, job.params.get("quality"), edited)
                ok = self.store.finish(
                    job.id,
                    token,
                    st.READY,
                    image=data,
                    media_type=MEDIA_TYPES[fmt],
                    seed=res.seed,
                    worker=self.id,
                    result_params=result_params,
                )
                status = st.READY
            if ok:
                self.metrics.images.labels(status).inc()
                self.on_change()
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
