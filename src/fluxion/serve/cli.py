"""`fluxion serve` and `fluxion keys`: argv -> ServeConfig -> the app / the worker / the key table.

fluxion serve                                   fluxion-tiny on the CPU, SQLite, API + worker, 127.0.0.1:8000
fluxion serve --model klein=FLUX.2-klein-4B/ --db postgresql://u:p@db/fluxion --role api --host 0.0.0.0
fluxion serve --model klein=FLUX.2-klein-4B/ --db postgresql://u:p@db/fluxion --role worker
fluxion serve --model FLUX.2-dev/ --role text-encoder --port 8001     (then: --text http://host:8001)
fluxion keys create --name studio [--credits 1000]      (the key is printed once)
fluxion keys list | fluxion keys revoke ID
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time

from fluxion.serve.config import ServeConfig

_RESERVED = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and any `extra` fields (job id, event, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _RESERVED and k != "message"})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("fluxion.serve")
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def serve_parser() -> argparse.ArgumentParser:
    d = ServeConfig()
    p = argparse.ArgumentParser(
        prog="fluxion serve", description="serve FLUX.2 over the BFL and OpenAI image APIs"
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="NAME=PATH",
        help="a model to serve under NAME (repeat for several); default: the embedded fluxion-tiny "
        "(fluxion-tiny-base: its CFG teacher, where this build ships it)",
    )
    p.add_argument("--preset", help="preset name for checkpoints whose preset cannot be read off the file")
    p.add_argument("--db", default=d.db, help="sqlite:///file.db (default) or postgresql://user:pass@host/db")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument(
        "--role",
        choices=["all", "api", "worker", "text-encoder"],
        default=d.role,
        help="all: API + worker in this process; api / worker: one part (share one --db); "
        "text-encoder: only the --model's text encoder, for other processes' --text URL",
    )
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--public-url", help="base URL clients reach this server at (for polling and sample URLs)")
    p.add_argument(
        "--auth",
        choices=["auto", "on", "off"],
        default=d.auth,
        help="auto (default): keys are required as soon as one exists (`fluxion keys create`)",
    )
    p.add_argument("--key-limit", type=int, default=d.key_limit, help="active tasks per key (429 beyond)")
    p.add_argument("--queue-cap", type=int, default=d.queue_cap, help="queued jobs in total (503 beyond)")
    p.add_argument("--max-mp", type=float, default=d.max_mp, help="largest output in megapixels (422 beyond)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="jobs of one shape run together")
    p.add_argument(
        "--admit-wait",
        type=float,
        default=d.admit_wait,
        help="a free row waits for prompts being encoded at most this fraction of a step (0: never)",
    )
    p.add_argument(
        "--lease", type=float, default=d.lease_s, help="seconds before a silent worker's jobs requeue"
    )
    p.add_argument("--max-attempts", type=int, default=d.max_attempts)
    p.add_argument("--result-ttl", type=float, default=d.result_ttl_s, help="sample URLs expire after (s)")
    p.add_argument(
        "--allow-url",
        action="append",
        default=[],
        metavar="PREFIX",
        help="accept http(s) input_image URLs starting with PREFIX (repeatable)",
    )
    p.add_argument(
        "--allow-private-webhooks",
        action="store_true",
        help="allow webhooks to loopback / private / link-local addresses",
    )
    p.add_argument("--prices", help='JSON price table {"model": [first_mp, per_mp]} in credits')
    p.add_argument("--blocklist", help="moderation terms, one per line (term<TAB>max_tolerance)")
    p.add_argument("--metrics-port", type=int, help="--role worker: serve Prometheus metrics on this port")
    p.add_argument("--worker-id", help="this worker's name in the job store (default: host:pid:random)")
    p.add_argument(
        "--no-watermark", action="store_true", help="do not embed the invisible watermark in served images"
    )
    p.add_argument(
        "--no-live-previews",
        action="store_true",
        help="do not store a per-step thumbnail of running jobs (the page then shows progress only)",
    )
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="encode prompts and decode / encode / store finished images inline, not on threads beside the "
        "denoise loop",
    )
    p.add_argument("--c2pa-cert", help="PEM certificate chain: sign a C2PA manifest into every image")
    p.add_argument("--c2pa-key", help="the PEM private key of --c2pa-cert")
    p.add_argument(
        "--nsfw",
        action="store_true",
        help="check output images with nudenet (pip install 'fluxion[nsfw]'; its weights are AGPL-3.0)",
    )
    p.add_argument("--lora-dir", help="folder of *.safetensors LoRAs callers may name per request")
    p.add_argument("--upsampler", help="transformers folder of a chat LLM for prompt_upsampling")
    p.add_argument("--text", help="http(s) URL of a `fluxion serve --role text-encoder` to encode prompts")
    p.add_argument("--prompt-cache", help="folder of cached prompt embeddings in front of the text encoder")
    p.add_argument("--log-level", default="info")
    return p


def config_from_args(a: argparse.Namespace) -> ServeConfig:
    from fluxion.weights.models import EMBEDDED

    models = []
    for m in a.model or ["fluxion-tiny"]:
        name, sep, path = m.partition("=")
        if not sep:
            if m in EMBEDDED:  # served under its own name (path None: the default, fluxion-tiny)
                name, path = m, (None if m == "fluxion-tiny" else m)
            else:
                name, path = m.rstrip("/").split("/")[-1], m
        if not name:
            raise ValueError(f"--model {m!r}: give NAME=PATH")
        models.append((name, path or None))
    for flag, v in (
        ("--key-limit", a.key_limit),
        ("--queue-cap", a.queue_cap),
        ("--max-batch", a.max_batch),
        ("--max-attempts", a.max_attempts),
    ):
        if v < 1:
            raise ValueError(f"{flag} must be at least 1, got {v}")
    if not a.max_mp > 0 or not a.lease > 0:
        raise ValueError("--max-mp and --lease must be positive")
    if bool(a.c2pa_cert) != bool(a.c2pa_key):
        raise ValueError("give both --c2pa-cert and --c2pa-key (a certificate chain and its private key)")
    if a.text and not a.text.startswith(("http://", "https://")):
        raise ValueError(f"--text {a.text!r}: give the http(s) URL of a `fluxion serve --role text-encoder`")
    return ServeConfig(
        models=tuple(models),
        preset=a.preset,
        db=a.db,
        host=a.host,
        port=a.port,
        role=a.role,
        device=a.device,
        dtype=a.dtype,
        public_url=a.public_url,
        auth=a.auth,
        key_limit=a.key_limit,
        queue_cap=a.queue_cap,
        max_mp=a.max_mp,
        max_batch=a.max_batch,
        admit_wait=a.admit_wait,
        lease_s=a.lease,
        max_attempts=a.max_attempts,
        result_ttl_s=a.result_ttl,
        allow_url_prefixes=tuple(a.allow_url),
        allow_private_webhooks=a.allow_private_webhooks,
        prices=a.prices,
        blocklist=a.blocklist,
        metrics_port=a.metrics_port,
        worker_id=a.worker_id,
        watermark=not a.no_watermark,
        live_previews=not a.no_live_previews,
        overlap=not a.no_overlap,
        c2pa_cert=a.c2pa_cert,
        c2pa_key=a.c2pa_key,
        nsfw=a.nsfw,
        lora_dir=a.lora_dir,
        upsampler=a.upsampler,
        text=a.text,
        prompt_cache=a.prompt_cache,
    )


def _errors(prog: str, fn):
    try:
        return fn()
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"fluxion {prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception as e:  # e.g. an unreachable database: one line, not a traceback
        if type(e).__module__.startswith("sqlalchemy"):
            print(f"fluxion {prog}: error: database: {' '.join(str(e).split()[:30])}", file=sys.stderr)
            return 2
        raise


def serve_main(argv: list[str]) -> int:
    a = serve_parser().parse_args(argv)
    _setup_logging(a.log_level)
    return _errors("serve", lambda: _serve(config_from_args(a)))


def _serve(cfg: ServeConfig) -> int:
    if cfg.role == "worker":
        return run_worker(cfg)
    import uvicorn

    if cfg.role == "text-encoder":
        from fluxion.serve.config import served_models
        from fluxion.serve.engine import load_text_only
        from fluxion.serve.text_encoder import create_text_encoder_app

        app = create_text_encoder_app(load_text_only(cfg, served_models(cfg)))
    else:
        from fluxion.serve.app import create_app

        app = create_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def run_worker(cfg: ServeConfig) -> int:
    from fluxion.serve.config import served_models
    from fluxion.serve.engine import Metrics, Worker, load_served
    from fluxion.serve.moderation import build_moderator
    from fluxion.serve.store import Store

    store = Store(cfg.db)
    served = served_models(cfg)
    metrics = Metrics()
    if cfg.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(cfg.metrics_port, registry=metrics.registry)
    worker = Worker(cfg, store, load_served(cfg, served), build_moderator(cfg.blocklist, cfg.nsfw), metrics)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: (stop.set(), worker.poke()))  # finish the current batch, then exit
    logging.getLogger("fluxion.serve").info("worker ready", extra={"event": "start", "worker": worker.id})
    worker.run(stop)
    return 0


def keys_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fluxion keys", description="manage API keys (stored hashed)")
    p.add_argument("--db", default=ServeConfig().db)
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="create a key; it is printed once and never stored in the clear")
    c.add_argument("--name", default="default")
    c.add_argument("--credits", type=float, help="budget in credits (default: unlimited)")
    sub.add_parser("list", help="keys with their usage")
    r = sub.add_parser("revoke", help="revoke a key by id")
    r.add_argument("id")
    a = p.parse_args(argv)

    def run() -> int:
        from fluxion.serve.auth import KEY_PREFIX, create_key
        from fluxion.serve.store import Store

        store = Store(a.db)
        if a.action == "create":
            print(create_key(store, a.name, a.credits))
            return 0
        if a.action == "revoke":
            key_id = a.id.removeprefix(KEY_PREFIX).split("_")[0]
            if not store.revoke_key(key_id):
                raise ValueError(f"no active key with id {key_id!r}; see `fluxion keys list`")
            print(f"revoked {key_id}")
            return 0
        print(
            f"{'id':<18}{'name':<20}{'created':<22}{'state':<9}{'jobs':>6}{'in MP':>10}{'out MP':>10}{'credits used':>14}"
        )
        for k in store.list_keys():
            u = store.usage(k.id)
            state = "revoked" if k.revoked_at else "active"
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k.created_at))
            print(
                f"{k.id:<18}{k.name[:19]:<20}{created:<22}{state:<9}{u['jobs']:>6}{u['input_mp']:>10.2f}"
                f"{u['output_mp']:>10.2f}{u['cost']:>14.2f}"
            )
        return 0

    return _errors("keys", run)


__all__ = ["serve_main", "keys_main", "serve_parser", "config_from_args"]


def dispatch(argv: list[str]) -> int:
    """`fluxion serve ...` / `fluxion keys ...` (argv includes the subcommand)."""
    return {"serve": serve_main, "keys": keys_main}[argv[0]](argv[1:])
