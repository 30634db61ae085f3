"""Webhook delivery, off the workers' path: a sender thread takes due deliveries from the store and posts them
from a small thread pool, so a slow receiver delays only its own delivery.

Signed as BFL documents it: header `X-BFL-Signature: sha256=<hex>`, HMAC-SHA256 of the raw body with the job's
`webhook_secret`. Retries after 1 s, 5 s and 30 s, then given up. Each delivery carries the job id (also in the
`X-BFL-Delivery` header); receivers de-duplicate by it, since a delivery can repeat (e.g. a 2xx lost in transit).
The target address is re-checked at each attempt (a host could re-resolve to a private address).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fluxion.serve import store as st
from fluxion.serve.config import ServeConfig
from fluxion.serve.inputs import InputError, check_public_url

log = logging.getLogger("fluxion.serve")
BACKOFF_S = (1.0, 5.0, 30.0)  # after the first failure, the second, the third; then given up
TIMEOUT_S = 30.0  # BFL: the receiver must answer within 30 s


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def payload(job: st.Job, sample_url: str | None) -> dict:
    public = {st.CANCELLED: st.ERROR}.get(job.status, job.status)
    body = {"id": job.id, "status": public, "timestamp": time.time()}
    if job.status == st.READY:
        body["result"] = {"sample": sample_url, "prompt": job.params["prompt"], "seed": job.params["seed"]}
    else:
        body["error"] = job.error or job.status
        body["message"] = job.error or job.status
        if job.details:
            body["details"] = job.details
    return body


class WebhookSender:
    def __init__(self, cfg: ServeConfig, store: st.Store, sample_url):
        self.cfg, self.store, self.sample_url = cfg, store, sample_url  # sample_url(job_id) -> signed URL
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook")

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                due = self.store.claim_webhooks(limit=16, hold_s=TIMEOUT_S + 10)
            except Exception:
                log.warning("webhook claim failed", exc_info=True)
                due = []
            for job in due:
                self.pool.submit(self.deliver, job)
            stop.wait(0.2 if not due else 0.0)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def deliver(self, job: st.Job) -> bool:
        import httpx

        body = json.dumps(payload(job, self.sample_url(job.id) if job.status == st.READY else None)).encode()
        headers = {"Content-Type": "application/json", "X-BFL-Delivery": job.id}
        if job.webhook_secret:
            headers["X-BFL-Signature"] = sign(job.webhook_secret, body)
        ok, why = False, ""
        try:
            check_public_url(job.webhook_url, "webhook_url", self.cfg.allow_private_webhooks)
            r = httpx.post(
                job.webhook_url, content=body, headers=headers, timeout=TIMEOUT_S, follow_redirects=False
            )
            ok, why = 200 <= r.status_code < 300, f"HTTP {r.status_code}"
        except InputError as e:
            why = str(e)
        except httpx.HTTPError as e:
            why = type(e).__name__
        attempt = job.webhook_attempts  # attempts made before this one
        next_at = None if ok or attempt >= len(BACKOFF_S) else time.time() + BACKOFF_S[attempt]
        self.store.webhook_done(job.id, ok, next_at)
        log.info(
            "webhook", extra={"event": "webhook", "job": job.id, "ok": ok, "why": why, "attempt": attempt + 1}
        )
        return ok
