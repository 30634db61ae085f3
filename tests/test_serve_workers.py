"""API and workers as separate processes sharing one store (SQLite WAL, and a real PostgreSQL cluster): two
workers under load, one killed with -9 mid-batch; its jobs return to the queue when its lease runs out and the
other worker finishes them. Every accepted job ends Ready exactly once."""

from __future__ import annotations

import json
import threading
import time

import pytest
import sqlalchemy as sa

from serve_fixtures import PostgresCluster, Proc, free_port, pg_bindir, submit_many, wait_terminal

pytest.importorskip("fastapi")

from fluxion.serve import store as st  # noqa: E402

FAST = {"width": 64, "height": 64, "steps": 1}


def run_two_workers_kill_one(tmp_path, db_url: str, n: int = 80):
    port = free_port()
    common = ["--db", db_url, "--lease", "2", "--max-batch", "4"]
    api = Proc(
        [*common, "--role", "api", "--port", str(port), "--auth", "off", "--key-limit", "100000"],
        tmp_path / "api.log",
        port,
    )
    w1 = Proc([*common, "--role", "worker", "--worker-id", "doomed"], tmp_path / "w1.log")
    w2 = Proc([*common, "--role", "worker", "--worker-id", "survivor"], tmp_path / "w2.log")
    procs = [api, w1, w2]
    try:
        api.wait_ready(need_worker=False)
        store = st.Store(db_url)
        result = {}

        def load():
            result["accepted"], result["failed"] = submit_many(
                api.url, n, 32, lambda i: {**FAST, "prompt": f"job {i}", "seed": i}
            )

        t = threading.Thread(target=load)
        t.start()
        deadline = time.time() + 600
        killed = False
        while time.time() < deadline and not killed:  # kill the doomed worker while it holds a batch
            with store.engine.begin() as c:
                held = c.execute(
                    sa.select(sa.func.count()).where(
                        st.jobs.c.worker == "doomed", st.jobs.c.status == st.RUNNING
                    )
                ).scalar_one()
            if held:
                w1.kill9()
                killed = True
            time.sleep(0.05)
        t.join()
        assert killed, "the doomed worker never held a job:\n" + w1.tail()
        accepted = result["accepted"]
        assert result["failed"] == 0 and len(accepted) == n
        done = wait_terminal(api.url, accepted, timeout=900, procs=[api, w2])
        assert all(b["status"] == "Ready" for b in done.values()), {b["status"] for b in done.values()}
        with store.engine.begin() as c:
            jobs = {r.id: r for r in c.execute(sa.select(st.jobs)).all()}
            results = c.execute(sa.select(st.results.c.job_id, st.results.c.seed, st.results.c.worker)).all()
        assert set(jobs) == set(accepted)
        assert len(results) == len({r.job_id for r in results}) == n  # exactly once
        assert all(json.loads(jobs[r.job_id].params)["seed"] == r.seed for r in results)
        assert any(j.attempts >= 2 for j in jobs.values())  # the doomed worker's batch was re-run
        assert {r.worker.split(":")[0] for r in results} <= {"doomed", "survivor"}
        assert any(r.worker == "survivor" for r in results)
    finally:
        for p in procs:
            p.stop()


@pytest.mark.slow
def test_two_workers_sqlite_kill9_one(tmp_path):
    run_two_workers_kill_one(tmp_path, f"sqlite:///{tmp_path}/jobs.db")


@pytest.fixture(scope="module")
def postgres():
    if pg_bindir() is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not installed: apt-get install -y postgresql"
        )
    pytest.importorskip("psycopg")
    cluster = PostgresCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_postgres_claims_are_exclusive_under_concurrency(postgres):
    """Many threads claiming at once (FOR UPDATE SKIP LOCKED): every job claimed by exactly one."""
    store = st.Store(postgres.url)
    spec = {"api": "bfl", "model": "m", "params": {"prompt": "p", "seed": 1}}
    ids = store.submit([{**spec, "batch_key": f"k{i % 3}"} for i in range(60)], key_id=None)
    got, lock = [], threading.Lock()

    def claimer(w):
        while True:
            _, batch = store.claim(f"w{w}", ["m"], 4, lease_s=60)
            if not batch:
                return
            assert len({j.params["prompt"] for j in batch}) == 1 and len({j.id for j in batch}) == len(batch)
            with lock:
                got.extend(j.id for j in batch)

    threads = [threading.Thread(target=claimer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(ids)


def test_postgres_claim_more_admits_into_one_claim_fairly(postgres):
    """Admission into a running batch on PostgreSQL (FOR UPDATE SKIP LOCKED): same key only, under the same
    claim, never past an older job of another key, never a job another claimer holds."""
    store = st.Store(postgres.url)
    spec = {"api": "bfl", "model": "adm", "params": {"prompt": "p", "seed": 1}}
    first = store.submit([{**spec, "batch_key": "k"}], key_id=None)
    token, got = store.claim("w1", ["adm"], 1, lease_s=60)
    assert [j.id for j in got] == first
    same = store.submit([{**spec, "batch_key": "k"}] * 3, key_id=None)
    other = store.submit([{**spec, "batch_key": "o"}], key_id=None)
    store.submit([{**spec, "batch_key": "k"}], key_id=None)  # behind `other`: not admitted
    taken, lock = [], threading.Lock()

    def admit():
        more = store.claim_more(token, "w1", ["adm"], 2, 60)
        with lock:
            taken.extend(j.id for j in more)

    threads = [threading.Thread(target=admit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(same)  # each once, all three, none of the later ones
    assert {j.claim for j in store.get_many(taken).values()} == {token}
    _, nxt = store.claim("w2", ["adm"], 8, lease_s=60)
    assert [j.id for j in nxt] == other


@pytest.mark.slow
def test_two_workers_postgres_kill9_one(tmp_path, postgres):
    with sa.create_engine(postgres.url.replace("postgresql://", "postgresql+psycopg://")).connect() as c:
        c.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("CREATE DATABASE fluxion_kill")
    run_two_workers_kill_one(tmp_path, postgres.url.rsplit("/", 1)[0] + "/fluxion_kill")
