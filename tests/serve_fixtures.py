"""Real processes for the server tests: `fluxion serve` subprocesses (uvicorn), a throwaway PostgreSQL cluster
(initdb + pg_ctl from the Debian package), a concurrent submitting client and a loopback webhook receiver."""

from __future__ import annotations

import base64
import glob
import hashlib
import hmac
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from PIL import Image

SRC = str(Path(__file__).resolve().parents[1] / "src")
TERMINAL_PUBLIC = ("Ready", "Error", "Request Moderated", "Content Moderated")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_b64(size=(64, 64), color=(200, 30, 30), fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


class Proc:
    """A `fluxion serve` subprocess; its output goes to a log file (read on failure)."""

    def __init__(self, args: list[str], log: Path, port: int | None = None):
        env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.port = port
        self.p = subprocess.Popen(
            [sys.executable, "-m", "fluxion.cli", "serve", *args],
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180.0, need_worker: bool = True) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"server exited {self.p.returncode}:\n{self.tail()}")
            try:
                r = httpx.get(self.url + ("/readyz" if need_worker else "/healthz"), timeout=2)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.tail()}")

    def kill9(self) -> None:
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()

    def tail(self, n: int = 4000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace")


def submit_many(
    url: str, n: int, concurrency: int, body, headers=None, stop_after=None
) -> tuple[list[str], int]:
    """POST n BFL jobs from `concurrency` threads; returns (accepted ids, failed submissions). A connection
    error (server killed) counts as not accepted; 429/503 are retried with back-off, as BFL's clients do."""
    accepted, failed, lock = [], [0], threading.Lock()

    def one(i: int):
        b = body(i)
        for attempt in range(200):
            try:
                r = httpx.post(url + "/v1/fluxion-tiny", json=b, headers=headers, timeout=60)
            except httpx.HTTPError:
                with lock:
                    failed[0] += 1
                return
            if r.status_code in (429, 503):
                time.sleep(min(0.05 * 2**attempt, 1.0))
                continue
            assert r.status_code == 200, r.text
            with lock:
                accepted.append(r.json()["id"])
            return

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    return accepted, failed[0]


def wait_terminal(url: str, ids: list[str], timeout: float, headers=None, procs=()) -> dict[str, dict]:
    """Poll get_result until every id is in a terminal status; returns id -> body. Fails at once if one of
    `procs` (servers, workers) exits."""
    out, deadline = {}, time.time() + timeout
    todo = list(ids)
    with httpx.Client(timeout=30) as c:
        while todo and time.time() < deadline:
            for p in procs:
                assert p.p.poll() is None, f"a server process exited:\n{p.tail()}"
            rest = []
            for job_id in todo:
                try:
                    body = c.get(url + "/v1/get_result", params={"id": job_id}, headers=headers).json()
                except (httpx.HTTPError, ValueError):
                    rest.append(job_id)
                    continue
                if body["status"] in TERMINAL_PUBLIC or body["status"] == "Task not found":
                    out[job_id] = body
                else:
                    rest.append(job_id)
            todo = rest
            if todo:
                time.sleep(0.5)
    assert not todo, f"{len(todo)} jobs still not finished after {timeout} s, e.g. {todo[:3]}"
    return out


# ---- PostgreSQL --------------------------------------------------------------------------------------------------
def pg_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return (
        str(Path(found[-1]).parent)
        if found
        else (str(Path(shutil.which("initdb")).parent) if shutil.which("initdb") else None)
    )


class PostgresCluster:
    """initdb + pg_ctl in a temporary folder on a free port (trust auth on 127.0.0.1). As root, the cluster
    runs as the `postgres` user (postgres refuses to run as root)."""

    def __init__(self):
        self.bindir = pg_bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="fluxion-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "log"),
            "-w",
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            "start",
        )
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, f"{self.bindir}/{tool}", *args], check=True, capture_output=True, timeout=120
        )

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---- webhooks ----------------------------------------------------------------------------------------------------
class WebhookReceiver:
    """A loopback HTTP server that records deliveries and checks their signature independently."""

    def __init__(self, secret: str, fail_first: int = 0):
        self.secret, self.deliveries, self.fail_left = secret.encode(), [], fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                want = "sha256=" + hmac.new(outer.secret, raw, hashlib.sha256).hexdigest()
                ok = hmac.compare_digest(want, self.headers.get("X-BFL-Signature", ""))
                if outer.fail_left > 0:
                    outer.fail_left -= 1
                    self.send_response(500)
                else:
                    outer.deliveries.append((json.loads(raw), ok, time.time()))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
