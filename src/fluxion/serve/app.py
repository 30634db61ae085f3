"""The HTTP service: BFL's API and OpenAI's Images API over one job store.

`create_app(cfg)` builds the FastAPI app. With role "all" (the default) it also loads the models and runs a
worker thread and the webhook sender in this process; with role "api" it only accepts, validates, stores and
answers (workers run elsewhere: `fluxion serve --role worker`).

Every check of a request happens before anything is written: a request either becomes complete job rows in one
transaction or an error that says what to change (BFL routes: FastAPI's `{"detail": ...}`; OpenAI routes:
`{"error": {message, type, param, code}}`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import random
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import ValidationError

from fluxion.serve import store as st
from fluxion.serve.auth import PriceTable, megapixels, verify_key
from fluxion.serve.config import ServeConfig, Served, served_models
from fluxion.serve.engine import LIVE_PREVIEW, list_loras, lora_path
from fluxion.serve.inputs import (
    InputError,
    check_public_url,
    check_size,
    decode_image_field,
    open_image,
    parse_size,
    size_from_input,
)
from fluxion.serve.moderation import build_moderator
from fluxion.serve.schemas import (
    MAX_INPUTS,
    MAX_SEED,
    AsyncResponse,
    AsyncWebhookResponse,
    BFLRequest,
    Credits,
    OpenAIGeneration,
    OpenAIImagesResponse,
    ResultResponse,
)

log = logging.getLogger("fluxion.serve")
PUBLIC_STATUS = {st.QUEUED: "Pending", st.RUNNING: "Pending", st.CANCELLED: st.ERROR}
STATIC = Path(__file__).parent / "static"  # the studio page: plain HTML, CSS and JS, no build step


def _eta(job: st.Job) -> float | None:
    """Seconds left, from the time the job has run and the fraction of its steps done."""
    if job.status != st.RUNNING or not job.started_at or job.progress <= 0:
        return None
    elapsed = time.time() - job.started_at
    return round(elapsed * (1 - job.progress) / job.progress, 2)


class ApiError(Exception):
    """An HTTP error with a message that says what to change; rendered in the shape of the route's API."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/images/")


def _error_response(request: Request, e: ApiError) -> JSONResponse:
    if _is_openai(request):
        kind = {
            401: "authentication_error",
            429: "rate_limit_error",
            503: "server_error",
            500: "server_error",
        }
        status = 400 if e.status == 422 else e.status  # OpenAI answers invalid requests with 400
        body = {
            "error": {
                "message": e.message,
                "type": kind.get(e.status, "invalid_request_error"),
                "param": e.param,
                "code": e.code,
            }
        }
    else:
        status, body = e.status, {"detail": e.message}
    return JSONResponse(body, status_code=status, headers=e.headers)


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    """One line from pydantic's errors: `field: what is wrong` (the offending input is never echoed)."""
    parts, first = [], None
    for e in err.errors(include_url=False, include_input=False):
        loc = ".".join(str(x) for x in e["loc"]) or "body"
        first = first or loc
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = (
                f"unknown field; images go in input_image .. input_image_{MAX_INPUTS} (at most {MAX_INPUTS})"
                if loc.startswith("input_image_")
                else "unknown field; see /docs for the accepted fields"
            )
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts), first


class Changes:
    """Wakes the async waiters of this process (SSE streams, OpenAI requests) when an in-process worker wrote
    something about the jobs they watch; waiters also time out and re-read the store, which is how changes made
    by workers in other processes arrive. Per job: with 32 open event streams, a step of one batch must not make
    every stream re-read the store (those reads hold the GIL the denoise loop launches its kernels under)."""

    KEEP = 100_000  # job versions remembered; a forgotten one reads as "changed" (one extra store read)

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiters: dict[asyncio.Future, frozenset[str] | None] = {}  # None: wake on any change
        self.version = 0  # bumped on the loop at each wake
        self.everyone = 0  # the version of the last change not tied to given jobs
        self.jobs: dict[str, int] = {}  # job id -> version of its last change

    def notify(self, job_ids=None) -> None:  # from any thread; job_ids None: a change that may touch any job
        if self.loop is not None and not self.loop.is_closed():
            ids = None if job_ids is None else frozenset(job_ids)
            self.loop.call_soon_threadsafe(self._wake, ids)

    def _wake(self, ids: frozenset[str] | None) -> None:
        self.version += 1
        if ids is None:
            self.everyone = self.version
        else:
            for i in ids:
                self.jobs.pop(i, None)
                self.jobs[i] = self.version  # insertion order = age: the oldest are dropped first
            while len(self.jobs) > self.KEEP:
                self.jobs.pop(next(iter(self.jobs)))
        for f, watch in list(self.waiters.items()):
            if ids is None or watch is None or watch & ids:
                del self.waiters[f]
                if not f.done():
                    f.set_result(None)

    def seen(self, ids=None) -> tuple[int, int]:
        """A token for the current state of these jobs (all: None); read it before the store, pass it to wait()."""
        if ids is None:
            return (self.version, self.version)
        return (self.everyone, max((self.jobs.get(i, 0) for i in ids), default=0))

    async def wait(self, timeout: float, seen: tuple[int, int], ids=None) -> None:
        if self.seen(ids) != seen:  # something changed since the caller read the store
            return
        f = asyncio.get_running_loop().create_future()
        self.waiters[f] = None if ids is None else frozenset(ids)
        try:
            await asyncio.wait_for(f, timeout)
        except asyncio.TimeoutError:
            self.waiters.pop(f, None)


class Service:
    """State shared by the routes: config, store, served models, signing secret, prices, moderation."""

    def __init__(self, cfg: ServeConfig, store: st.Store | None = None):
        self.cfg = cfg
        self.served: list[Served] = served_models(cfg)  # first: a bad --model must not create a database
        self.store = store or st.Store(cfg.db)
        self.by_name = {n: s for s in self.served for n in s.names}
        self.prices = PriceTable.load(cfg.prices)
        self.moderator = build_moderator(cfg.blocklist, cfg.nsfw)
        self.url_secret = self.store.setting("url_secret", st.new_secret).encode()
        self.worker = None
        self.models_loaded = cfg.role == "api"
        self.changes = Changes()
        # Waiters re-read the store this often: rarely when the worker is in this process (it wakes them).
        self.poll_s = 1.0 if cfg.role == "all" else 0.1

    # ---- signed sample URLs -----------------------------------------------------------------------------
    def base(self, request: Request | None) -> str:
        """Where clients reach us: --public-url, else the address this request came to."""
        if self.cfg.public_url or request is None:
            return self.cfg.base_url
        return str(request.base_url).rstrip("/")

    def sample_url(self, job_id: str, request: Request | None = None) -> str:
        exp = int(time.time() + self.cfg.result_ttl_s)
        sig = hmac.new(self.url_secret, f"{job_id}:{exp}".encode(), hashlib.sha256).hexdigest()
        return f"{self.base(request)}/v1/results/{job_id}?exp={exp}&sig={sig}"

    def check_sample(self, job_id: str, exp: int, sig: str) -> bool:
        good = hmac.new(self.url_secret, f"{job_id}:{exp}".encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(good, sig) and time.time() <= exp

    # ---- auth ---------------------------------------------------------------------------------------------
    def auth_required(self) -> bool:
        return self.cfg.auth == "on" or (self.cfg.auth == "auto" and self.store.has_keys())

    def authenticate(self, request: Request):
        """The caller's key row (None when auth is off). BFL: `x-key`; OpenAI: `Authorization: Bearer`."""
        raw = request.headers.get("x-key")
        bearer = request.headers.get("authorization", "")
        if not raw and bearer.lower().startswith("bearer "):
            raw = bearer[7:].strip()
        if not self.auth_required():
            return verify_key(self.store, raw) if raw else None
        if not raw:
            header = "Authorization: Bearer <key>" if _is_openai(request) else "x-key: <key>"
            raise ApiError(401, f"missing API key: send the header {header}", code="invalid_api_key")
        row = verify_key(self.store, raw)
        if row is None:
            raise ApiError(
                401,
                "invalid or revoked API key; create one with `fluxion keys create`",
                code="invalid_api_key",
            )
        return row

    # ---- submission ---------------------------------------------------------------------------------------
    def model(self, name: str | None) -> Served:
        if name is None:
            return self.served[0]
        if name not in self.by_name:
            names = ", ".join(sorted(self.by_name))
            raise ApiError(
                404, f"unknown model {name!r}; this server serves: {names}", "model", "model_not_found"
            )
        return self.by_name[name]

    def job_spec(
        self,
        *,
        api: str,
        served: Served,
        prompt: str,
        images: list[tuple[str, bytes]],
        opened: list[Image.Image],
        width: int | None,
        height: int | None,
        steps: int | None,
        guidance: float | None,
        seed: int,
        output_format: str,
        safety_tolerance: int = 2,
        mask: Image.Image | None = None,
        extra: dict | None = None,
    ) -> dict:
        """Validate everything model-dependent and return the store's job dict (nothing written)."""
        from fluxion.sampling.pipeline import resolve_guidance

        spec = served.spec
        refs = len(opened) - (1 if mask is not None else 0)
        limit = spec.max_references if mask is None else 1
        if refs > limit:
            raise ApiError(
                422,
                f"{len(opened)} input images given; {served.name} takes at most {limit}"
                + (" besides the inpainted image" if mask is not None else ""),
                "input_image",
            )
        if mask is not None:
            width, height = opened[0].size
            if mask.size != opened[0].size:
                raise ApiError(
                    422, f"mask is {mask.size[0]}x{mask.size[1]} but the image is {width}x{height}", "mask"
                )
            if width * height > self.cfg.max_mp * 2**20:
                raise ApiError(
                    422,
                    f"image is {width}x{height}; this server edits at most {self.cfg.max_mp:g} MP",
                    "image",
                )
        else:
            if not width or not height:
                w0, h0 = (
                    size_from_input(opened[0], min(self.cfg.max_mp, 4.0)) if opened else spec.default_size
                )
                width, height = width or w0, height or h0
            try:
                check_size(width, height, min(self.cfg.max_mp, 4.0))
            except InputError as e:
                raise ApiError(422, str(e), e.field) from None
        steps = spec.default_steps if steps is None else steps
        try:
            g = resolve_guidance(spec, guidance, allow_override=False)
        except ValueError as e:
            raise ApiError(422, str(e), "guidance") from None
        in_mp = sum(megapixels(*im.size) for im in opened)
        out_mp = megapixels(width, height)
        reasons = self.moderator.check_prompt(prompt, safety_tolerance)
        params = {
            "prompt": prompt,
            "seed": seed,
            "width": width,
            "height": height,
            "steps": steps,
            "guidance": g.scale,
            "output_format": output_format,
            "safety_tolerance": safety_tolerance,
            "inputs": len(opened),
            **(extra or {}),
        }
        solo = bool(images) or bool(params.get("partial_images"))
        return {
            "api": api,
            "model": served.name,
            "batch_key": f"solo:{uuid.uuid4()}"
            if solo
            else f"{served.name}|{width}x{height}|{steps}|{g.scale:g}"
            + "".join(f"|{x['name']}@{x['scale']:g}" for x in params.get("loras") or []),
            "params": params,
            "images": images,
            "status": st.REQUEST_MODERATED if reasons else st.QUEUED,
            "details": {"Moderation Reasons": reasons} if reasons else None,
            "input_mp": round(in_mp, 6),
            "output_mp": round(out_mp, 6),
            "cost": 0.0 if reasons else self.prices.cost(served.names, in_mp, out_mp),
        }

    def submit(self, key, specs: list[dict]) -> list[str]:
        key_id = key.id if key is not None else None
        if key is not None and key.credits is not None:
            need = sum(s["cost"] for s in specs)
            left = key.credits - self.store.usage(key_id)["cost"]
            if need > left:
                raise ApiError(
                    402, f"insufficient credits: this request costs {need:g}, {left:g} left on the key"
                )
        try:
            ids = self.store.submit(
                specs,
                key_id=key_id,
                key_limit=self.cfg.key_limit if key_id else None,
                queue_cap=self.cfg.queue_cap,
            )
            if self.worker is not None:  # the in-process worker claims now, not at its next poll
                self.worker.poke()
            return ids
        except st.LimitExceeded as e:
            if e.which == "key":
                raise ApiError(
                    429,
                    f"this key has {e.current} active tasks (limit {e.limit}); wait for some to finish",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": "5"},
                ) from None
            raise ApiError(
                503,
                f"the server's queue is full ({e.limit} jobs); retry later",
                headers={"Retry-After": "10"},
            ) from None

    def owned(self, job_id: str, key) -> st.Job | None:
        job = self.store.get(job_id)
        if (
            job is None
            or (key is not None and job.key_id != key.id)
            or (key is None and self.auth_required())
        ):
            return None
        return job

    def result_body(self, job: st.Job, request: Request | None = None) -> dict:
        status = PUBLIC_STATUS.get(job.status, job.status)
        body = {"id": job.id, "status": status, "result": None, "progress": None, "details": job.details}
        if status == "Pending":
            body["progress"] = round(job.progress, 4)
        elif job.status == st.READY:
            body["progress"] = 1.0
            body["result"] = {
                "sample": self.sample_url(job.id, request),
                "seed": job.params["seed"],
                "prompt": job.params["prompt"],
                **(
                    {"prompt_original": job.params["prompt_original"]}
                    if "prompt_original" in job.params
                    else {}
                ),
                "start_time": job.started_at,
                "end_time": job.finished_at,
                "duration": (job.finished_at - job.started_at)
                if job.started_at and job.finished_at
                else None,
            }
        elif job.status == st.CANCELLED:
            body["details"] = {"error": "cancelled by the client"}
        elif job.status == st.ERROR:
            body["details"] = {**(job.details or {}), "error": job.error}
        return body


async def _json_body(request: Request, max_bytes: int) -> object:
    body = await request.body()
    if len(body) > max_bytes:
        raise ApiError(413, f"request body is {len(body) >> 20} MiB; at most {max_bytes >> 20} MiB")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(
            422, f"the body is not valid UTF-8 (byte {e.start}): send JSON encoded as UTF-8"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(422, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _validate(model, data):
    if not isinstance(data, dict):
        raise ApiError(422, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        msg, param = _validation_message(e)
        raise ApiError(422, msg, param) from None


def _draw_seed(seed: int | None) -> int:
    return seed if seed is not None else random.randrange(MAX_SEED + 1)


def _body_schema(model) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def create_app(cfg: ServeConfig, store: st.Store | None = None, models: dict | None = None) -> FastAPI:
    """`models`: already loaded `Models` by served name (embedding, benchmarks); None: load per `cfg.models`."""
    svc = Service(cfg, store)
    from fluxion.serve.engine import Metrics

    metrics = Metrics()
    stop = threading.Event()
    threads: list[threading.Thread] = []

    @asynccontextmanager
    async def lifespan(app):
        svc.changes.loop = asyncio.get_running_loop()
        from fluxion.serve.webhooks import WebhookSender

        sender = WebhookSender(cfg, svc.store, svc.sample_url)
        threads.append(threading.Thread(target=sender.run, args=(stop,), daemon=True, name="webhooks"))
        if cfg.role == "all":
            threads.append(
                threading.Thread(
                    target=_start_worker, args=(svc, metrics, stop, models), daemon=True, name="worker"
                )
            )
        for t in threads:
            t.start()
        log.info(
            "serving", extra={"event": "start", "role": cfg.role, "models": [s.name for s in svc.served]}
        )
        yield
        stop.set()
        if svc.worker is not None:
            svc.worker.poke()  # out of an idle wait at once

    app = FastAPI(
        title="fluxion serve",
        summary="FLUX.2 over BFL's API and OpenAI's Images API",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = svc
    max_body = int(cfg.max_body_mb * 2**20)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error_response(request, e)

    @app.exception_handler(st.StoreBusy)
    async def _busy(request: Request, e):
        return _error_response(
            request, ApiError(503, "the job store is busy; retry", headers={"Retry-After": "1"})
        )

    # ---- operations -------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["operations"])
    def healthz():
        return {"ok": True}

    @app.get("/readyz", tags=["operations"])
    def readyz():
        try:
            svc.store.ping()
        except Exception as e:
            return JSONResponse({"ready": False, "why": f"job store unreachable ({type(e).__name__})"}, 503)
        if cfg.role == "all" and not svc.models_loaded:
            return JSONResponse({"ready": False, "why": "loading models"}, 503)
        if cfg.role == "all" and (svc.worker is None or not svc.worker.alive):
            return JSONResponse({"ready": False, "why": "worker not running"}, 503)
        return {"ready": True}

    @app.get("/metrics", tags=["operations"])
    def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        counts = svc.store.counts()
        lines = [
            "# HELP fluxion_queue_depth jobs waiting for a worker",
            "# TYPE fluxion_queue_depth gauge",
            f"fluxion_queue_depth {counts.get(st.QUEUED, 0)}",
            "# HELP fluxion_jobs jobs in the store by status",
            "# TYPE fluxion_jobs gauge",
        ]
        for s in (st.QUEUED, st.RUNNING, *st.TERMINAL):
            lines.append(f'fluxion_jobs{{status="{s}"}} {counts.get(s, 0)}')
        text = "\n".join(lines) + "\n" + generate_latest(metrics.registry).decode()
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["operations"])
    def list_models():
        return {
            "data": [
                {"id": s.name, "aliases": list(s.aliases), "preset": s.spec.name, "object": "model"}
                for s in svc.served
            ]
        }

    # ---- BFL ----------------------------------------------------------------------------------------------
    @app.get("/v1/get_result", response_model=ResultResponse, tags=["BFL"])
    def get_result(request: Request, id: str):
        key = svc.authenticate(request)
        job = svc.owned(id, key)
        if job is None:
            return JSONResponse({"id": id, "status": "Task not found", "result": None, "progress": None}, 404)
        return svc.result_body(job, request)

    @app.get("/v1/credits", response_model=Credits, tags=["BFL"])
    def credits(request: Request):
        key = svc.authenticate(request)
        use = svc.store.usage(key.id if key is not None else None)
        left = None if key is None or key.credits is None else round(key.credits - use["cost"], 4)
        return {
            "credits": left,
            "used": round(use["cost"], 4),
            **{k: use[k] for k in ("input_mp", "output_mp", "jobs")},
        }

    @app.delete("/v1/jobs/{job_id}", response_model=ResultResponse, tags=["beyond BFL"])
    def cancel(request: Request, job_id: str):
        """Cancel: a queued job ends at once, a running one at its next denoising step."""
        key = svc.authenticate(request)
        if svc.owned(job_id, key) is None:
            return JSONResponse({"id": job_id, "status": "Task not found"}, 404)
        return svc.result_body(svc.store.request_cancel(job_id), request)

    @app.get("/v1/jobs/{job_id}/events", tags=["beyond BFL"])
    async def events(request: Request, job_id: str):
        """Server-sent events: `progress` while the job runs, then one `result` (the get_result body)."""
        key = svc.authenticate(request)
        if svc.owned(job_id, key) is None:
            return JSONResponse({"id": job_id, "status": "Task not found"}, 404)

        async def stream():
            last, last_preview = None, None
            while not await request.is_disconnected():
                seen = svc.changes.seen([job_id])
                job = await asyncio.to_thread(svc.store.get, job_id)
                body = svc.result_body(job, request)
                if body["status"] != "Pending":
                    yield f"event: result\ndata: {json.dumps(body)}\n\n"
                    return
                thumb = None
                if job.status == st.RUNNING:
                    thumb = await asyncio.to_thread(svc.store.preview, job_id, LIVE_PREVIEW)
                if thumb is not None and thumb != last_preview:
                    # The latest per-step thumbnail (PreviewMap on the x0 estimate), a few hundred bytes.
                    last_preview = thumb
                    body["preview"] = {"image": "data:image/png;base64," + base64.b64encode(thumb).decode()}
                body["eta_s"] = _eta(job)
                if (body["status"], body["progress"]) != last or body.get("preview"):
                    last = (body["status"], body["progress"])
                    yield f"event: progress\ndata: {json.dumps(body)}\n\n"
                await svc.changes.wait(svc.poll_s, seen, [job_id])

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/v1/jobs", tags=["beyond BFL"])
    def list_jobs(request: Request, limit: int = 50, before: int | None = None):
        """The caller's jobs, newest first, with their parameters and (when ready) a fresh sample URL.
        `next` pages further back (pass it as `before`)."""
        key = svc.authenticate(request)
        if not 1 <= limit <= 200:
            raise ApiError(422, f"limit must be in 1..200, got {limit}", "limit")
        rows = svc.store.list_jobs(key.id if key is not None else None, limit, before)
        out = []
        for _, job in rows:
            body = svc.result_body(job, request)
            out.append(
                {
                    **body,
                    "model": job.model,
                    "params": job.params,
                    "created_at": job.created_at,
                    "finished_at": job.finished_at,
                }
            )
        return {"jobs": out, "next": rows[-1][0] if len(rows) == limit else None}

    @app.get("/v1/jobs/{job_id}/preview", tags=["beyond BFL"], response_class=Response)
    def live_preview(request: Request, job_id: str):
        """The latest per-step thumbnail of a running job (PNG; 404 before the first step)."""
        key = svc.authenticate(request)
        if svc.owned(job_id, key) is None:
            return JSONResponse({"id": job_id, "status": "Task not found"}, 404)
        data = svc.store.preview(job_id, LIVE_PREVIEW)
        if data is None:
            raise ApiError(404, "no preview yet: the job has not finished a denoising step")
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/v1/loras", tags=["beyond BFL"])
    def loras():
        """LoRAs callers may name in `loras` (the operator's --lora-dir)."""
        return {"data": [{"name": n} for n in list_loras(cfg.lora_dir)]}

    @app.get("/v1/studio", tags=["beyond BFL"])
    def studio_config():
        """What the studio page needs to build its form."""
        return {
            "models": [
                {
                    "id": s.name,
                    "aliases": list(s.aliases),
                    "default_size": list(s.spec.default_size),
                    "default_steps": s.spec.default_steps,
                    "default_guidance": s.spec.default_guidance,
                    "guidance_mode": s.spec.guidance_mode,
                    "max_references": s.spec.max_references,
                }
                for s in svc.served
            ],
            "loras": list_loras(cfg.lora_dir),
            "upsampling": bool(cfg.upsampler),
            "auth": svc.auth_required(),
            "max_mp": cfg.max_mp,
        }

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/results/{job_id}", tags=["BFL"], response_class=Response)
    def sample(job_id: str, exp: int, sig: str):
        """The image behind a signed `sample` URL (valid until `exp`)."""
        if not svc.check_sample(job_id, exp, sig):
            raise ApiError(403, "this sample URL is invalid or expired; poll get_result for a fresh one")
        row = svc.store.result(job_id)
        if row is None:
            raise ApiError(404, "no image for this id")
        return Response(
            row.data, media_type=row.media_type, headers={"Cache-Control": "private, max-age=600"}
        )

    @app.post(
        "/v1/{model}",
        tags=["BFL"],
        response_model=AsyncResponse | AsyncWebhookResponse,
        openapi_extra=_body_schema(BFLRequest),
    )
    async def bfl_submit(request: Request, model: str):
        """Submit a generation or edit (BFL endpoint names, or this server's local model names)."""
        key = svc.authenticate(request)
        served = svc.model(model)
        body = _validate(BFLRequest, await _json_body(request, max_body))
        images, opened = [], []
        for i, value in enumerate(body.images()):
            field = "input_image" if i == 0 else f"input_image_{i + 1}"
            try:
                data = await asyncio.to_thread(decode_image_field, value, field, cfg.allow_url_prefixes)
                opened.append(await asyncio.to_thread(open_image, data, field))
            except InputError as e:
                raise ApiError(422, str(e), e.field) from None
            images.append(("image", data))
        mask = None
        if body.mask_image:
            if not opened:
                raise ApiError(422, "mask_image needs input_image (the image to inpaint)", "mask_image")
            try:
                data = await asyncio.to_thread(
                    decode_image_field, body.mask_image, "mask_image", cfg.allow_url_prefixes
                )
                mask = await asyncio.to_thread(_open_mask, data)
            except InputError as e:
                raise ApiError(422, str(e), "mask_image") from None
            images.append(("mask", _png(mask)))
        if body.prompt_upsampling and not cfg.upsampler:
            raise ApiError(
                422,
                "prompt_upsampling is not configured on this server (the operator starts it with "
                "--upsampler FOLDER); send prompt_upsampling: false",
                "prompt_upsampling",
            )
        loras = []
        for i, choice in enumerate(body.loras):
            try:
                lora_path(cfg.lora_dir, choice.name)
            except ValueError as e:
                raise ApiError(422, str(e), f"loras.{i}.name") from None
            loras.append({"name": choice.name, "scale": choice.scale})
        if body.webhook_url:
            try:
                await asyncio.to_thread(
                    check_public_url, body.webhook_url, "webhook_url", cfg.allow_private_webhooks
                )
            except InputError as e:
                raise ApiError(422, str(e), e.field) from None
        spec = svc.job_spec(
            api="bfl",
            served=served,
            prompt=body.prompt,
            images=images,
            opened=opened,
            width=body.width or None,
            height=body.height or None,
            steps=body.steps,
            guidance=body.guidance,
            seed=_draw_seed(body.seed),
            output_format=body.output_format,
            safety_tolerance=body.safety_tolerance,
            mask=mask,
            extra={
                "endpoint": model,
                "prompt_upsampling": body.prompt_upsampling,
                **({"loras": loras} if loras else {}),
                **({"mask": True} if mask is not None else {}),
            },
        )
        if body.webhook_url:
            spec.update(webhook_url=body.webhook_url, webhook_secret=body.webhook_secret)
        [job_id] = await asyncio.to_thread(svc.submit, key, [spec])
        out = {
            "id": job_id,
            "polling_url": f"{svc.base(request)}/v1/get_result?id={job_id}",
            "cost": spec["cost"],
            "input_mp": spec["input_mp"],
            "output_mp": spec["output_mp"],
        }
        log.info("submitted", extra={"event": "submit", "job": job_id, "model": served.name, "api": "bfl"})
        if body.webhook_url:
            return {**out, "status": "Pending", "webhook_url": body.webhook_url}
        return out

    # ---- OpenAI -------------------------------------------------------------------------------------------
    async def openai_run(request: Request, key, body: OpenAIGeneration, served: Served, images, opened, mask):
        wh = parse_size_or_error(body.size)
        seed = _draw_seed(body.seed)
        fmt = body.output_format
        specs = [
            svc.job_spec(
                api="openai",
                served=served,
                prompt=body.prompt,
                images=images,
                opened=opened,
                width=wh[0] if wh else None,
                height=wh[1] if wh else None,
                steps=body.steps or body.num_inference_steps,
                guidance=body.guidance if body.guidance is not None else body.guidance_scale,
                seed=(seed + i) % (MAX_SEED + 1),
                output_format=fmt,
                mask=mask,
                extra={
                    "partial_images": body.partial_images if body.stream else 0,
                    "quality": body.output_compression,
                },
            )
            for i in range(body.n)
        ]
        moderated = [s for s in specs if s["status"] == st.REQUEST_MODERATED]
        if moderated:
            raise ApiError(
                400,
                "the prompt was rejected by moderation: "
                + "; ".join(moderated[0]["details"]["Moderation Reasons"]),
                "prompt",
                "moderation_blocked",
            )
        ids = await asyncio.to_thread(svc.submit, key, specs)
        log.info("submitted", extra={"event": "submit", "jobs": ids, "model": served.name, "api": "openai"})
        size = f"{specs[0]['params']['width']}x{specs[0]['params']['height']}"
        if body.stream:
            return StreamingResponse(openai_stream(request, ids, body, size), media_type="text/event-stream")
        jobs = await wait_all(request, ids)
        data = []
        for job_id in ids:
            job = jobs[job_id]
            if job.status != st.READY:
                raise job_failure(job)
            if body.response_format == "url":
                data.append({"url": svc.sample_url(job_id, request), "revised_prompt": None})
            else:
                row = await asyncio.to_thread(svc.store.result, job_id)
                data.append({"b64_json": base64.b64encode(row.data).decode(), "revised_prompt": None})
        return {"created": int(time.time()), "data": data, "output_format": fmt, "size": size}

    def parse_size_or_error(size: str):
        try:
            return parse_size(size)
        except InputError as e:
            raise ApiError(400, str(e), "size") from None

    def job_failure(job: st.Job) -> ApiError:
        if job.status == st.CONTENT_MODERATED:
            return ApiError(400, "the generated image was rejected by moderation", None, "moderation_blocked")
        if job.status == st.CANCELLED:
            return ApiError(499, "the request was cancelled", None, "cancelled")
        return ApiError(500, f"generation failed: {job.error}", None, "generation_failed")

    async def wait_all(request: Request, ids: list[str]) -> dict[str, st.Job]:
        deadline = time.time() + cfg.sync_timeout_s
        while True:
            seen = svc.changes.seen(ids)
            jobs = await asyncio.to_thread(svc.store.get_many, ids)
            if all(j.status in st.TERMINAL for j in jobs.values()):
                return jobs
            if await request.is_disconnected():  # nobody will read the answer: free the GPU
                for job_id in ids:
                    await asyncio.to_thread(svc.store.request_cancel, job_id)
                raise ApiError(499, "client went away")
            if time.time() > deadline:
                raise ApiError(
                    504,
                    f"not finished within {cfg.sync_timeout_s:g} s; the jobs keep running",
                    code="timeout",
                )
            await svc.changes.wait(svc.poll_s, seen, ids)

    async def openai_stream(request: Request, ids: list[str], body: OpenAIGeneration, size: str):
        sent: dict[str, int] = {i: 0 for i in ids}
        pending = set(ids)
        fmt = body.output_format
        while pending:
            if await request.is_disconnected():
                for job_id in pending:
                    await asyncio.to_thread(svc.store.request_cancel, job_id)
                return
            watched = list(pending)
            seen = svc.changes.seen(watched)
            jobs = await asyncio.to_thread(svc.store.get_many, watched)
            for image_index, job_id in enumerate(ids):
                if job_id not in pending:
                    continue
                while sent[job_id] < body.partial_images:
                    data = await asyncio.to_thread(svc.store.preview, job_id, sent[job_id])
                    if data is None:
                        break
                    event = {
                        "type": "image_generation.partial_image",
                        "b64_json": base64.b64encode(data).decode(),
                        "created_at": int(time.time()),
                        "size": size,
                        "output_format": "png",
                        "partial_image_index": sent[job_id],
                        "image_index": image_index,
                    }
                    yield f"event: image_generation.partial_image\ndata: {json.dumps(event)}\n\n"
                    sent[job_id] += 1
                job = jobs[job_id]
                if job.status in st.TERMINAL:
                    pending.discard(job_id)
                    if job.status == st.READY:
                        row = await asyncio.to_thread(svc.store.result, job_id)
                        event = {
                            "type": "image_generation.completed",
                            "b64_json": base64.b64encode(row.data).decode(),
                            "created_at": int(time.time()),
                            "size": size,
                            "output_format": fmt,
                            "image_index": image_index,
                        }
                        yield f"event: image_generation.completed\ndata: {json.dumps(event)}\n\n"
                    else:
                        e = job_failure(job)
                        err = {"type": "error", "error": {"message": e.message, "code": e.code}}
                        yield f"event: error\ndata: {json.dumps(err)}\n\n"
            await svc.changes.wait(svc.poll_s, seen, watched)

    @app.post(
        "/v1/images/generations",
        tags=["OpenAI"],
        response_model=OpenAIImagesResponse,
        openapi_extra=_body_schema(OpenAIGeneration),
    )
    async def openai_generations(request: Request):
        key = svc.authenticate(request)
        body = _validate(OpenAIGeneration, await _json_body(request, max_body))
        return await openai_run(request, key, body, svc.model(body.model), [], [], None)

    @app.post("/v1/images/edits", tags=["OpenAI"], response_model=OpenAIImagesResponse)
    async def openai_edits(request: Request):
        """Multipart: `image[]` (or `image`, repeatable), optional `mask` (transparent = repaint, as OpenAI;
        or a grey mask, white = repaint), plus the fields of /v1/images/generations."""
        key = svc.authenticate(request)
        try:
            form = await request.form(max_files=MAX_INPUTS + 2, max_part_size=int(cfg.max_body_mb * 2**20))
        except Exception as e:
            raise ApiError(400, f"the body must be multipart/form-data ({e})") from None
        files = [f for name in ("image[]", "image") for f in form.getlist(name)]
        if not files:
            raise ApiError(400, "no image: send one or more files in image[] (multipart/form-data)", "image")
        if len(files) > MAX_INPUTS:
            raise ApiError(400, f"{len(files)} images sent; at most {MAX_INPUTS}", "image")
        images, opened = [], []
        for i, f in enumerate(files):
            if isinstance(f, str):
                raise ApiError(400, f"image[{i}] must be a file upload, not a text field", "image")
            data = await f.read()
            try:
                opened.append(await asyncio.to_thread(open_image, data, f"image[{i}]"))
            except InputError as e:
                raise ApiError(400, str(e), "image") from None
            images.append(("image", data))
        mask = None
        if "mask" in form:
            m = form["mask"]
            if isinstance(m, str):
                raise ApiError(400, "mask must be a file upload", "mask")
            try:
                mask = await asyncio.to_thread(_open_mask, await m.read())
            except InputError as e:
                raise ApiError(400, str(e), "mask") from None
            images.append(("mask", _png(mask)))
        fields = {
            k: v for k, v in form.items() if k not in ("image", "image[]", "mask") and isinstance(v, str)
        }
        body = _validate(OpenAIGeneration, fields)
        return await openai_run(request, key, body, svc.model(body.model), images, opened, mask)

    return app


def _open_mask(data: bytes) -> Image.Image:
    """OpenAI masks mark the area to edit as transparent; grey masks as white. Returns L, 255 = repaint."""
    from fluxion.serve.inputs import MAX_INPUT_PIXELS

    try:
        im = Image.open(io.BytesIO(data))
        if im.size[0] * im.size[1] > MAX_INPUT_PIXELS:
            raise InputError(f"mask is {im.size[0]}x{im.size[1]}: larger than any accepted image", "mask")
        im.load()
    except InputError:
        raise
    except Exception:
        raise InputError("mask is not an image Pillow can read (send a PNG)", "mask") from None
    if im.mode in ("RGBA", "LA") or "transparency" in im.info:
        alpha = im.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0)
    return im.convert("L")


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _start_worker(svc: Service, metrics, stop: threading.Event, models: dict | None) -> None:
    from fluxion.serve.engine import Worker, load_served

    try:
        models = models or load_served(svc.cfg, svc.served)
    except Exception:
        log.exception("loading the models failed")
        return
    svc.worker = Worker(svc.cfg, svc.store, models, svc.moderator, metrics, on_change=svc.changes.notify)
    svc.models_loaded = True
    svc.worker.run(stop)
