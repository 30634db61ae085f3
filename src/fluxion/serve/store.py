"""The job store: every job, its inputs, its result and its accounting live here, in SQLite (WAL, the embedded
default) or PostgreSQL (several workers on several machines). SQLAlchemy Core, no ORM.

Life of a job: `queued` -> (claimed by a worker under a lease) `running` -> one terminal status. A worker renews
its lease with heartbeats; a job whose lease ran out (dead worker) goes back to `queued` (at most
`max_attempts` times). Every write a worker makes is conditioned on its claim token, so a worker that lost its
lease can never overwrite the job's new owner: a job completes exactly once (and `results` has one row per job,
enforced by its primary key).

Claims: PostgreSQL locks the rows it takes with `FOR UPDATE SKIP LOCKED`; SQLite runs one atomic
`UPDATE ... WHERE id IN (SELECT ...)` (SQLite has a single writer, and WAL turns a lost race into a retryable
busy error, never a double claim). Times are Unix seconds (float).
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError, OperationalError

QUEUED, RUNNING = "queued", "running"
READY, ERROR = "Ready", "Error"
REQUEST_MODERATED, CONTENT_MODERATED = "Request Moderated", "Content Moderated"
CANCELLED = "Cancelled"
TERMINAL = (READY, ERROR, REQUEST_MODERATED, CONTENT_MODERATED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)

meta = sa.MetaData()

jobs = sa.Table(
    "jobs",
    meta,
    sa.Column("seq", sa.Integer, sa.Identity(), primary_key=True),  # submission order (FIFO)
    sa.Column("id", sa.String(36), nullable=False, unique=True),
    sa.Column("key_id", sa.String(32), nullable=True, index=True),
    sa.Column("api", sa.String(8), nullable=False),  # "bfl" | "openai"
    sa.Column("model", sa.String(64), nullable=False),
    sa.Column("batch_key", sa.String(200), nullable=False),  # jobs with equal keys may share one batch
    sa.Column("params", sa.Text, nullable=False),  # JSON: prompt, seed, width, height, steps, guidance, ...
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("progress", sa.Float, nullable=False, default=0.0),
    sa.Column("cancel", sa.Boolean, nullable=False, default=False),
    sa.Column("claim", sa.String(36), nullable=True),  # token of the worker's current claim
    sa.Column("worker", sa.String(64), nullable=True),
    sa.Column("lease_until", sa.Float, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("details", sa.Text, nullable=True),  # JSON, e.g. {"Moderation Reasons": [...]}
    sa.Column("input_mp", sa.Float, nullable=False, default=0.0),
    sa.Column("output_mp", sa.Float, nullable=False, default=0.0),
    sa.Column("cost", sa.Float, nullable=False, default=0.0),  # credits (1 credit = $0.01)
    sa.Column("webhook_url", sa.Text, nullable=True),
    sa.Column("webhook_secret", sa.Text, nullable=True),
    sa.Column("webhook_state", sa.String(12), nullable=True),  # pending | delivered | failed
    sa.Column("webhook_attempts", sa.Integer, nullable=False, default=0),
    sa.Column("webhook_next_at", sa.Float, nullable=True),
    sa.Index("ix_jobs_status_seq", "status", "seq"),
)

inputs = sa.Table(
    "inputs",  # validated input images (PNG/JPEG/WebP bytes as uploaded), in order; role "image" or "mask"
    meta,
    sa.Column("job_id", sa.String(36), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("role", sa.String(8), nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

results = sa.Table(
    "results",  # one row per finished image; the primary key makes a second completion impossible
    meta,
    sa.Column("job_id", sa.String(36), primary_key=True),
    sa.Column("media_type", sa.String(16), nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("worker", sa.String(64), nullable=False),
)

previews = sa.Table(
    "previews",  # partial images for OpenAI stream=true (index 0..partial_images-1)
    meta,
    sa.Column("job_id", sa.String(36), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

keys = sa.Table(
    "api_keys",
    meta,
    sa.Column("id", sa.String(32), primary_key=True),  # the public part of the key
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),  # sha256 hex of the secret part
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
    sa.Column("credits", sa.Float, nullable=True),  # budget; None = unlimited
)

settings = sa.Table(
    "settings",
    meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


@dataclass(frozen=True)
class Job:
    id: str
    key_id: str | None
    api: str
    model: str
    params: dict
    status: str
    progress: float
    cancel: bool
    claim: str | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    details: dict | None
    input_mp: float
    output_mp: float
    cost: float
    webhook_url: str | None
    webhook_secret: str | None
    webhook_state: str | None
    webhook_attempts: int  # deliveries tried so far (webhooks.py picks the back-off from it)

    @staticmethod
    def from_row(r) -> Job:
        m = r._mapping
        return Job(
            **{k: m[k] for k in Job.__dataclass_fields__ if k not in ("params", "details")},
            params=json.loads(m["params"]),
            details=json.loads(m["details"]) if m["details"] else None,
        )


def _running(token: str, worker: str, lease_s: float) -> dict:
    """Column values of a job taken by claim `token` (a first claim or an admission into a running batch)."""
    now = time.time()
    return dict(
        status=RUNNING,
        claim=token,
        worker=worker,
        lease_until=now + lease_s,
        started_at=now,
        progress=0.0,
        attempts=jobs.c.attempts + 1,
    )


class StoreBusy(RuntimeError):
    """The database stayed locked through all retries."""


def _retry(fn, tries: int = 50):
    """SQLite under several processes: a lost write race is a busy error; wait and try again."""
    delay = 0.005
    for i in range(tries):
        try:
            return fn()
        except OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or i == tries - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
    raise StoreBusy("the job store stayed locked")


class Store:
    def __init__(self, url: str):
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://") :]
        self.url = url
        self.sqlite = url.startswith("sqlite")
        if self.sqlite:
            self.engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _):
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                cur.execute("PRAGMA synchronous=NORMAL")  # durable at each WAL checkpoint; safe in WAL mode
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()
        else:
            self.engine = sa.create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
        self._create_tables()

    def _create_tables(self) -> None:
        """Create missing tables; several processes starting at once may race (one wins, the rest see its
        tables on the next try)."""
        from sqlalchemy.exc import DBAPIError

        for attempt in range(10):
            try:
                meta.create_all(self.engine)
                return
            except (OperationalError, IntegrityError, DBAPIError):
                if attempt == 9:
                    raise
                time.sleep(0.1 * (attempt + 1))

    # ---- settings -------------------------------------------------------------------------------------------
    def setting(self, name: str, make) -> str:
        """A value shared by every process on this store (created once, first writer wins)."""
        with self.engine.begin() as c:
            row = c.execute(sa.select(settings.c.value).where(settings.c.name == name)).first()
        if row:
            return row[0]
        try:
            _retry(lambda: self._insert_setting(name, make()))
        except IntegrityError:
            pass
        with self.engine.begin() as c:
            return c.execute(sa.select(settings.c.value).where(settings.c.name == name)).scalar_one()

    def _insert_setting(self, name, value):
        with self.engine.begin() as c:
            c.execute(settings.insert().values(name=name, value=value))

    # ---- submit ---------------------------------------------------------------------------------------------
    def submit(
        self,
        specs: list[dict],
        *,
        key_id: str | None,
        key_limit: int | None = None,
        queue_cap: int | None = None,
    ) -> list[str]:
        """Insert jobs (each a dict: api, model, batch_key, params, and optionally images [(role, bytes)],
        status, details, input_mp, output_mp, cost, webhook_url, webhook_secret) with their inputs in one
        transaction. Raises `LimitExceeded` (nothing written) when the key's active jobs or the queue would
        pass `key_limit` / `queue_cap`."""
        now = time.time()
        ids = [str(uuid.uuid4()) for _ in specs]
        queued = sum(s.get("status", QUEUED) == QUEUED for s in specs)

        def tx():
            with self.engine.begin() as c:
                if queued and key_limit is not None and key_id is not None:
                    n = c.execute(
                        sa.select(sa.func.count())
                        .select_from(jobs)
                        .where(jobs.c.key_id == key_id, jobs.c.status.in_(ACTIVE))
                    ).scalar_one()
                    if n + queued > key_limit:
                        raise LimitExceeded("key", n, key_limit)
                if queued and queue_cap is not None:
                    n = c.execute(
                        sa.select(sa.func.count()).select_from(jobs).where(jobs.c.status == QUEUED)
                    ).scalar_one()
                    if n + queued > queue_cap:
                        raise LimitExceeded("queue", n, queue_cap)
                for job_id, s in zip(ids, specs):
                    status = s.get("status", QUEUED)
                    hook = s.get("webhook_url")
                    c.execute(
                        jobs.insert().values(
                            id=job_id,
                            key_id=key_id,
                            api=s["api"],
                            model=s["model"],
                            batch_key=s["batch_key"],
                            params=json.dumps(s["params"]),
                            status=status,
                            progress=0.0,
                            cancel=False,
                            attempts=0,
                            created_at=now,
                            finished_at=None if status == QUEUED else now,
                            details=json.dumps(s["details"]) if s.get("details") else None,
                            input_mp=s.get("input_mp", 0.0),
                            output_mp=s.get("output_mp", 0.0),
                            cost=s.get("cost", 0.0),
                            webhook_url=hook,
                            webhook_secret=s.get("webhook_secret"),
                            webhook_state="pending" if hook else None,
                            webhook_attempts=0,
                            webhook_next_at=now if hook and status != QUEUED else None,
                        )
                    )
                    for i, (role, data) in enumerate(s.get("images", ())):
                        c.execute(inputs.insert().values(job_id=job_id, idx=i, role=role, data=data))

        _retry(tx)
        return ids

    # ---- read -----------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self.engine.begin() as c:
            row = c.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return Job.from_row(row) if row else None

    def get_many(self, ids: list[str]) -> dict[str, Job]:
        with self.engine.begin() as c:
            rows = c.execute(sa.select(jobs).where(jobs.c.id.in_(ids))).all()
        return {r.id: Job.from_row(r) for r in rows}

    def inputs(self, job_id: str) -> list[tuple[str, bytes]]:
        with self.engine.begin() as c:
            rows = c.execute(
                sa.select(inputs.c.role, inputs.c.data)
                .where(inputs.c.job_id == job_id)
                .order_by(inputs.c.idx)
            ).all()
        return [(r.role, r.data) for r in rows]

    def result(self, job_id: str):
        with self.engine.begin() as c:
            return c.execute(sa.select(results).where(results.c.job_id == job_id)).first()

    def preview(self, job_id: str, idx: int) -> bytes | None:
        with self.engine.begin() as c:
            return c.execute(
                sa.select(previews.c.data).where(previews.c.job_id == job_id, previews.c.idx == idx)
            ).scalar()

    def list_jobs(
        self, key_id: str | None, limit: int = 50, before: int | None = None
    ) -> list[tuple[int, Job]]:
        """One caller's jobs, newest first, as (seq, job): `before` (a seq) pages further back."""
        q = sa.select(jobs).where(jobs.c.key_id.is_(None) if key_id is None else jobs.c.key_id == key_id)
        if before is not None:
            q = q.where(jobs.c.seq < before)
        with self.engine.begin() as c:
            rows = c.execute(q.order_by(jobs.c.seq.desc()).limit(limit)).all()
        return [(r.seq, Job.from_row(r)) for r in rows]

    def counts(self) -> dict[str, int]:
        """Jobs by status (for /metrics)."""
        with self.engine.begin() as c:
            rows = c.execute(sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)).all()
        return {s: n for s, n in rows}

    def usage(self, key_id: str | None) -> dict:
        """Accounting of one key (None: requests made without a key): billed jobs, megapixels, credits."""
        with self.engine.begin() as c:
            row = c.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.coalesce(sa.func.sum(jobs.c.input_mp), 0.0),
                    sa.func.coalesce(sa.func.sum(jobs.c.output_mp), 0.0),
                    sa.func.coalesce(sa.func.sum(jobs.c.cost), 0.0),
                ).where(jobs.c.key_id == key_id, jobs.c.status.in_((READY, QUEUED, RUNNING)))
            ).one()
        return {"jobs": row[0], "input_mp": float(row[1]), "output_mp": float(row[2]), "cost": float(row[3])}

    def ping(self) -> None:
        with self.engine.begin() as c:
            c.execute(sa.select(1))

    # ---- cancel ---------------------------------------------------------------------------------------------
    def request_cancel(self, job_id: str) -> Job | None:
        """Queued jobs end Cancelled at once; running ones at their worker's next step boundary."""

        def tx():
            with self.engine.begin() as c:
                c.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id, jobs.c.status == QUEUED)
                    .values(
                        status=CANCELLED, finished_at=time.time(), cost=0.0, error="cancelled", **_hook_now()
                    )
                )
                c.execute(
                    jobs.update().where(jobs.c.id == job_id, jobs.c.status == RUNNING).values(cancel=True)
                )

        _retry(tx)
        return self.get(job_id)

    # ---- worker side ----------------------------------------------------------------------------------------
    def claim(self, worker: str, models: list[str], max_batch: int, lease_s: float) -> tuple[str, list[Job]]:
        """Take the oldest queued job of a served model and up to max_batch - 1 more with the same batch key.
        Returns (claim token, jobs); no jobs when the queue is empty."""
        with self.engine.begin() as c:  # a read first: an idle worker polling must not take the write lock
            if (
                c.execute(
                    sa.select(jobs.c.seq).where(jobs.c.status == QUEUED, jobs.c.model.in_(models)).limit(1)
                ).first()
                is None
            ):
                return "", []
        token = str(uuid.uuid4())
        values = _running(token, worker, lease_s)
        first = (
            sa.select(jobs.c.batch_key)
            .where(jobs.c.status == QUEUED, jobs.c.model.in_(models))
            .order_by(jobs.c.seq)
            .limit(1)
        )

        def tx():
            with self.engine.begin() as c:
                if self.sqlite:
                    ids = (
                        sa.select(jobs.c.id)
                        .where(jobs.c.status == QUEUED, jobs.c.batch_key == first.scalar_subquery())
                        .order_by(jobs.c.seq)
                        .limit(max_batch)
                    )
                    c.execute(
                        jobs.update().where(jobs.c.id.in_(ids), jobs.c.status == QUEUED).values(**values)
                    )
                else:
                    bk = c.execute(first.with_for_update(skip_locked=True)).scalar()
                    if bk is None:
                        return
                    ids = c.execute(
                        sa.select(jobs.c.id)
                        .where(jobs.c.status == QUEUED, jobs.c.batch_key == bk)
                        .order_by(jobs.c.seq)
                        .limit(max_batch)
                        .with_for_update(skip_locked=True)
                    ).scalars()
                    ids = list(ids)
                    if ids:
                        c.execute(jobs.update().where(jobs.c.id.in_(ids)).values(**values))

        _retry(tx)
        with self.engine.begin() as c:
            rows = c.execute(sa.select(jobs).where(jobs.c.claim == token).order_by(jobs.c.seq)).all()
        return token, [Job.from_row(r) for r in rows]

    def claim_more(self, token: str, worker: str, models: list[str], n: int, lease_s: float) -> list[Job]:
        """Admission into a running batch (continuous batching): up to n more queued jobs with the batch key of
        claim `token`, taken under that same token (one heartbeat renews them all, `finish` accepts them).

        Fairness: only jobs queued before the oldest waiting job of another batch key are taken, so a steady
        stream of one shape never starves the others (they are claimed once this batch drains)."""
        if n < 1:
            return []
        key = sa.select(jobs.c.batch_key).where(jobs.c.claim == token).limit(1).scalar_subquery()
        other = (
            sa.select(sa.func.min(jobs.c.seq))
            .where(jobs.c.status == QUEUED, jobs.c.model.in_(models), jobs.c.batch_key != key)
            .scalar_subquery()
        )
        wanted = sa.select(jobs.c.id).where(
            jobs.c.status == QUEUED,
            jobs.c.model.in_(models),
            jobs.c.batch_key == key,
            jobs.c.seq < sa.func.coalesce(other, 2**62),
        )
        with self.engine.begin() as c:  # a read first: most step boundaries find nothing to admit
            if c.execute(wanted.limit(1)).first() is None:
                return []
        values = _running(token, worker, lease_s)

        def tx():
            with self.engine.begin() as c:
                q = wanted.order_by(jobs.c.seq).limit(n)
                if not self.sqlite:
                    q = q.with_for_update(skip_locked=True)
                ids = list(c.execute(q).scalars())
                if ids:  # status re-checked: on SQLite another writer may have claimed one in between
                    c.execute(
                        jobs.update().where(jobs.c.id.in_(ids), jobs.c.status == QUEUED).values(**values)
                    )
                return ids

        ids = _retry(tx)
        if not ids:
            return []
        with self.engine.begin() as c:
            rows = c.execute(
                sa.select(jobs).where(jobs.c.id.in_(ids), jobs.c.claim == token).order_by(jobs.c.seq)
            ).all()
        return [Job.from_row(r) for r in rows]

    def heartbeat(self, token: str, lease_s: float, progress: dict[str, float] | None = None) -> set[str]:
        """Renew the lease of every job under this claim (and record progress); returns the ids whose cancel
        was requested. Jobs whose lease was lost are no longer ours and are not touched."""

        def tx():
            with self.engine.begin() as c:
                c.execute(
                    jobs.update()
                    .where(jobs.c.claim == token, jobs.c.status == RUNNING)
                    .values(lease_until=time.time() + lease_s)
                )
                for job_id, p in (progress or {}).items():
                    c.execute(
                        jobs.update()
                        .where(jobs.c.id == job_id, jobs.c.claim == token, jobs.c.status == RUNNING)
                        .values(progress=p)
                    )
                return set(
                    c.execute(
                        sa.select(jobs.c.id).where(
                            jobs.c.claim == token, jobs.c.status == RUNNING, jobs.c.cancel.is_(True)
                        )
                    ).scalars()
                )

        return _retry(tx)

    def finish(
        self,
        job_id: str,
        token: str,
        status: str,
        *,
        image: bytes | None = None,
        media_type: str = "",
        seed: int = 0,
        worker: str = "",
        error: str | None = None,
        details: dict | None = None,
        result_params: dict | None = None,
    ) -> bool:
        """Terminal write, once: only the current claim holder of a running job succeeds."""

        def tx():
            with self.engine.begin() as c:
                values = dict(
                    status=status, finished_at=time.time(), progress=1.0, error=error, **_hook_now()
                )
                if status != READY:
                    values["cost"] = 0.0  # moderated, cancelled and failed jobs are not charged
                if details:
                    values["details"] = json.dumps(details)
                if result_params is not None:
                    values["params"] = json.dumps(result_params)
                n = c.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id, jobs.c.claim == token, jobs.c.status == RUNNING)
                    .values(**values)
                ).rowcount
                if n != 1:  # not ours any more (lease lost, job re-run elsewhere): nothing was written
                    return False
                if image is not None:
                    c.execute(
                        results.insert().values(
                            job_id=job_id, media_type=media_type, data=image, seed=seed, worker=worker
                        )
                    )
                return True

        return _retry(tx)

    def add_preview(self, job_id: str, token: str, idx: int, data: bytes) -> None:
        def tx():
            with self.engine.begin() as c:
                owned = c.execute(
                    sa.select(jobs.c.id).where(
                        jobs.c.id == job_id, jobs.c.claim == token, jobs.c.status == RUNNING
                    )
                ).first()
                if owned:
                    c.execute(previews.delete().where(previews.c.job_id == job_id, previews.c.idx == idx))
                    c.execute(previews.insert().values(job_id=job_id, idx=idx, data=data))

        _retry(tx)

    def reap(self, max_attempts: int) -> int:
        """Jobs whose lease ran out (their worker died) go back to the queue, or end in Error after
        max_attempts tries. Returns how many were requeued or failed."""
        now = time.time()

        def tx():
            with self.engine.begin() as c:
                expired = (jobs.c.status == RUNNING) & (jobs.c.lease_until < now)
                failed = c.execute(
                    jobs.update()
                    .where(expired, jobs.c.attempts >= max_attempts)
                    .values(
                        status=ERROR,
                        finished_at=now,
                        cost=0.0,
                        claim=None,
                        error=f"the worker running this job stopped {max_attempts} times; not retried again",
                        **_hook_now(),
                    )
                ).rowcount
                cancelled = c.execute(
                    jobs.update()
                    .where(expired, jobs.c.cancel.is_(True))
                    .values(
                        status=CANCELLED,
                        finished_at=now,
                        cost=0.0,
                        claim=None,
                        error="cancelled",
                        **_hook_now(),
                    )
                ).rowcount
                requeued = c.execute(
                    jobs.update().where(expired).values(status=QUEUED, claim=None, worker=None, progress=0.0)
                ).rowcount
                return failed + cancelled + requeued

        return _retry(tx)

    # ---- webhooks -------------------------------------------------------------------------------------------
    def claim_webhooks(self, limit: int, hold_s: float) -> list[Job]:
        """Due deliveries, pushed `hold_s` into the future so no other process sends them meanwhile."""
        now = time.time()
        due = (
            (jobs.c.webhook_state == "pending")
            & (jobs.c.webhook_next_at <= now)
            & jobs.c.status.in_(TERMINAL)
        )

        def tx():
            with self.engine.begin() as c:
                q = sa.select(jobs.c.id).where(due).order_by(jobs.c.webhook_next_at).limit(limit)
                if not self.sqlite:
                    q = q.with_for_update(skip_locked=True)
                ids = list(c.execute(q).scalars())
                if ids:
                    c.execute(
                        jobs.update().where(jobs.c.id.in_(ids), due).values(webhook_next_at=now + hold_s)
                    )
                return ids

        ids = _retry(tx)
        return list(self.get_many(ids).values()) if ids else []

    def webhook_done(self, job_id: str, delivered: bool, next_at: float | None) -> None:
        def tx():
            with self.engine.begin() as c:
                state = "delivered" if delivered else ("pending" if next_at else "failed")
                c.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(
                        webhook_state=state,
                        webhook_attempts=jobs.c.webhook_attempts + 1,
                        webhook_next_at=next_at,
                    )
                )

        _retry(tx)

    # ---- keys -----------------------------------------------------------------------------------------------
    def add_key(self, key_id: str, name: str, secret_hash: str, credits: float | None) -> None:
        def tx():
            with self.engine.begin() as c:
                c.execute(
                    keys.insert().values(
                        id=key_id, name=name, secret_hash=secret_hash, created_at=time.time(), credits=credits
                    )
                )

        _retry(tx)

    def get_key(self, key_id: str):
        with self.engine.begin() as c:
            return c.execute(sa.select(keys).where(keys.c.id == key_id)).first()

    def list_keys(self):
        with self.engine.begin() as c:
            return c.execute(sa.select(keys).order_by(keys.c.created_at)).all()

    def revoke_key(self, key_id: str) -> bool:
        def tx():
            with self.engine.begin() as c:
                return (
                    c.execute(
                        keys.update()
                        .where(keys.c.id == key_id, keys.c.revoked_at.is_(None))
                        .values(revoked_at=time.time())
                    ).rowcount
                    == 1
                )

        return _retry(tx)

    def has_keys(self) -> bool:
        with self.engine.begin() as c:
            return c.execute(sa.select(sa.func.count()).select_from(keys)).scalar_one() > 0


def _hook_now() -> dict:
    """On reaching a terminal status, a pending webhook becomes due now (it stays NULL for jobs without one)."""
    return {"webhook_next_at": sa.case((jobs.c.webhook_state == "pending", time.time()), else_=None)}


class LimitExceeded(Exception):
    def __init__(self, which: str, current: int, limit: int):
        super().__init__(f"{which} limit {limit} reached ({current} active)")
        self.which, self.current, self.limit = which, current, limit


def new_secret() -> str:
    return secrets.token_urlsafe(32)
