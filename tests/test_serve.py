"""`fluxion serve`, in-process (no model loaded: role "api"): every bad input is a 4xx that says what to change
and writes nothing; limits, moderation, accounting, keys, signed URLs. The store is a real SQLite file."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from PIL import Image

pytest.importorskip("fastapi")

from fluxion.serve import store as st  # noqa: E402
from fluxion.serve.app import create_app  # noqa: E402
from fluxion.serve.auth import create_key  # noqa: E402
from fluxion.serve.cli import keys_main  # noqa: E402
from fluxion.serve.config import ServeConfig  # noqa: E402
from serve_fixtures import png_b64  # noqa: E402


def make(tmp_path, **kw):
    cfg = ServeConfig(db=f"sqlite:///{tmp_path}/jobs.db", role="api", auth="on", **kw)
    store = st.Store(cfg.db)
    key = create_key(store, "test")
    client = TestClient(create_app(cfg, store))
    return client, store, {"x-key": key}


def rows(store):
    with store.engine.begin() as c:
        return (
            c.execute(sa.select(sa.func.count()).select_from(st.jobs)).scalar_one(),
            c.execute(sa.select(sa.func.count()).select_from(st.inputs)).scalar_one(),
        )


@pytest.fixture
def api(tmp_path):
    client, store, headers = make(tmp_path)
    with client:
        yield client, store, headers


def _bomb() -> str:
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")  # 144 MP of zeros: a few KB on disk
    return base64.b64encode(buf.getvalue()).decode()


def _truncated() -> str:
    raw = base64.b64decode(png_b64((128, 128), (10, 200, 90)))
    return base64.b64encode(raw[: len(raw) // 2]).decode()


GOOD = {"prompt": "a red heart", "width": 64, "height": 64, "steps": 1}
BAD = [
    # (name, body or raw bytes, expected status, words that the message must contain)
    ("malformed json", b'{"prompt": "x",', 422, "malformed JSON"),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}', 422, "UTF-8"),
    ("not an object", b"[1, 2]", 422, "JSON object"),
    ("wrong type", {**GOOD, "width": "wide"}, 422, "width"),
    ("missing prompt", {"width": 64, "height": 64}, 422, "prompt"),
    ("empty prompt", {**GOOD, "prompt": "  "}, 422, "describe the image"),
    ("100 KB prompt", {**GOOD, "prompt": "x" * 100_000}, 422, "at most 32000"),
    ("bad base64", {**GOOD, "input_image": "not*base64!"}, 422, "not valid base64"),
    (
        "non-image",
        {**GOOD, "input_image": base64.b64encode(b"hello, world" * 20).decode()},
        422,
        "not an image",
    ),
    ("truncated png", {**GOOD, "input_image": _truncated()}, 422, "truncated"),
    ("decompression bomb", {**GOOD, "input_image": _bomb()}, 422, "downscale"),
    ("aspect 10:1", {**GOOD, "input_image": png_b64((640, 64))}, 422, "aspect ratio"),
    ("11 references", {**GOOD, **{f"input_image_{i}": png_b64() for i in range(2, 12)}}, 422, "at most 10"),
    (
        "5 references (tiny takes 4)",
        {**GOOD, **{f"input_image_{i}": png_b64() for i in range(2, 6)}, "input_image": png_b64()},
        422,
        "at most 4",
    ),
    ("width not /16", {**GOOD, "width": 100}, 422, "multiple of 16: use 96 or 112"),
    ("height below 64", {**GOOD, "height": 48}, 422, "at least 64"),
    ("above 4 MP", {**GOOD, "width": 4096, "height": 2048}, 422, "at most 4 MP"),
    ("NaN guidance", b'{"prompt": "x", "guidance": NaN}', 422, "finite"),
    ("inf guidance", b'{"prompt": "x", "guidance": Infinity}', 422, "finite"),
    ("negative guidance", {**GOOD, "guidance": -1}, 422, "greater than or equal to 0"),
    ("steps 0", {**GOOD, "steps": 0}, 422, "steps"),
    ("steps 51", {**GOOD, "steps": 51}, 422, "less than or equal to 50"),
    ("seed -1", {**GOOD, "seed": -1}, 422, "seed"),
    ("seed 2^40", {**GOOD, "seed": 2**40}, 422, "seed"),
    ("safety_tolerance 6", {**GOOD, "safety_tolerance": 6}, 422, "safety_tolerance"),
    ("typo field", {**GOOD, "widht": 64}, 422, "unknown field"),
    (
        "url not allowed",
        {**GOOD, "input_image": "http://169.254.169.254/latest/meta-data"},
        422,
        "allow-list",
    ),
    ("webhook loopback", {**GOOD, "webhook_url": "http://127.0.0.1:9/hook"}, 422, "non-public"),
    ("webhook metadata", {**GOOD, "webhook_url": "http://169.254.169.254/x"}, 422, "non-public"),
    ("webhook private", {**GOOD, "webhook_url": "http://10.1.2.3/x"}, 422, "non-public"),
    ("webhook not http", {**GOOD, "webhook_url": "file:///etc/passwd"}, 422, "http(s) URL"),
]


@pytest.mark.parametrize("name,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bfl_bad_input_is_4xx_with_a_fix_and_nothing_stored(api, name, body, status, words):
    client, store, headers = api
    if isinstance(body, bytes):
        r = client.post(
            "/v1/fluxion-tiny", content=body, headers={**headers, "content-type": "application/json"}
        )
    else:
        r = client.post("/v1/fluxion-tiny", json=body, headers=headers)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and words in detail, detail
    assert "\n" not in detail and len(detail) < 600
    assert rows(store) == (0, 0)


def test_unknown_model_and_keys(api):
    client, store, headers = api
    r = client.post("/v1/flux-2-max", json=GOOD, headers=headers)
    assert r.status_code == 404 and "serves: fluxion-tiny" in r.json()["detail"]
    r = client.post("/v1/fluxion-tiny", json=GOOD)
    assert r.status_code == 401 and "x-key" in r.json()["detail"]
    r = client.post("/v1/fluxion-tiny", json=GOOD, headers={"x-key": "flx_0000_wrong"})
    assert r.status_code == 401 and "fluxion keys create" in r.json()["detail"]
    r = client.post("/v1/images/generations", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert rows(store) == (0, 0)


OPENAI_BAD = [
    ({"prompt": "x", "size": "big"}, "WIDTHxHEIGHT", "size"),
    ({"prompt": "x", "size": "100x64"}, "multiple of 16", "width"),
    ({"prompt": "x", "n": 11}, "less than or equal to 10", "n"),
    ({"size": "64x64"}, "Field required", "prompt"),
    ({"prompt": "x", "response_format": "gif"}, "b64_json", "response_format"),
    ({"prompt": "x", "model": "dall-e-3"}, "serves", "model"),
]


@pytest.mark.parametrize("body,words,param", OPENAI_BAD)
def test_openai_bad_input_has_openai_error_shape(api, body, words, param):
    client, store, headers = api
    r = client.post(
        "/v1/images/generations", json=body, headers={"Authorization": "Bearer " + headers["x-key"]}
    )
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param and err["type"] == "invalid_request_error"
    assert rows(store) == (0, 0)


def test_openai_edits_bad_multipart(api):
    client, store, headers = api
    auth = {"Authorization": "Bearer " + headers["x-key"]}
    r = client.post("/v1/images/edits", data={"prompt": "x"}, headers=auth)
    assert r.status_code == 400 and "image[]" in r.json()["error"]["message"]
    r = client.post(
        "/v1/images/edits",
        data={"prompt": "x"},
        files={"image[]": ("a.png", b"nope", "image/png")},
        headers=auth,
    )
    assert r.status_code == 400 and "not an image" in r.json()["error"]["message"]
    img = base64.b64decode(png_b64((64, 64)))
    mask = base64.b64decode(png_b64((80, 64)))
    files = [("image[]", ("a.png", img, "image/png")), ("mask", ("m.png", mask, "image/png"))]
    r = client.post("/v1/images/edits", data={"prompt": "x"}, files=files, headers=auth)
    assert r.status_code == 400 and "mask is 80x64" in r.json()["error"]["message"]
    assert rows(store) == (0, 0)


def test_key_limit_429_and_queue_cap_503(tmp_path):
    client, store, headers = make(tmp_path, key_limit=2, queue_cap=3)
    with client:
        for _ in range(2):
            assert client.post("/v1/fluxion-tiny", json=GOOD, headers=headers).status_code == 200
        r = client.post("/v1/fluxion-tiny", json=GOOD, headers=headers)
        assert r.status_code == 429 and r.headers["Retry-After"] == "5" and "limit 2" in r.json()["detail"]
        other = {"x-key": create_key(store, "other")}
        assert client.post("/v1/fluxion-tiny", json=GOOD, headers=other).status_code == 200
        r = client.post("/v1/fluxion-tiny", json=GOOD, headers={"x-key": create_key(store, "third")})
        assert r.status_code == 503 and "queue is full" in r.json()["detail"] and r.headers["Retry-After"]
        assert rows(store)[0] == 3
        # OpenAI n=2 over the limit: refused whole, nothing half-submitted
        r = client.post(
            "/v1/images/generations",
            json={"prompt": "x", "n": 2},
            headers={"Authorization": "Bearer " + other["x-key"]},
        )
        assert r.status_code == 429 and rows(store)[0] == 3  # 1 active + 2 > the limit of 2


def test_moderation_blocklist_and_tolerance(tmp_path):
    terms = tmp_path / "block.txt"
    terms.write_text("forbidden\nmild\t1\n")
    client, store, headers = make(tmp_path, blocklist=str(terms))
    with client:
        r = client.post("/v1/fluxion-tiny", json={**GOOD, "prompt": "a Forbidden fruit"}, headers=headers)
        assert r.status_code == 200 and r.json()["cost"] == 0.0
        body = client.get("/v1/get_result", params={"id": r.json()["id"]}, headers=headers).json()
        assert body["status"] == "Request Moderated"
        assert body["details"]["Moderation Reasons"] == ["blocked term: forbidden"]
        # "mild" blocks only at tolerance <= 1
        r = client.post(
            "/v1/fluxion-tiny", json={**GOOD, "prompt": "mild", "safety_tolerance": 1}, headers=headers
        )
        assert client.get("/v1/get_result", params={"id": r.json()["id"]}, headers=headers).json()[
            "status"
        ] == ("Request Moderated")
        r = client.post(
            "/v1/fluxion-tiny", json={**GOOD, "prompt": "mild", "safety_tolerance": 3}, headers=headers
        )
        assert (
            client.get("/v1/get_result", params={"id": r.json()["id"]}, headers=headers).json()["status"]
            == "Pending"
        )
        r = client.post(
            "/v1/images/generations",
            json={"prompt": "forbidden"},
            headers={"Authorization": "Bearer " + headers["x-key"]},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "moderation_blocked"


def test_accounting_prices_and_credits(tmp_path):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"fluxion-tiny": [1.4, 0.1]}))  # klein 4B's BFL price
    client, store, _ = make(tmp_path, prices=str(prices))
    headers = {"x-key": create_key(store, "budget", credits=3.0)}
    with client:
        # 1024x2048 output (2 MP) + one 1024x1024 input (1 MP): 1.4 + (2 - 1) * 0.1 + 1 * 0.1 = 1.6 credits
        body = {"prompt": "x", "width": 1024, "height": 2048, "input_image": png_b64((1024, 1024))}
        r = client.post("/v1/fluxion-tiny", json=body, headers=headers)
        assert r.status_code == 200, r.text
        assert (
            r.json()["cost"] == pytest.approx(1.6)
            and r.json()["input_mp"] == 1.0
            and r.json()["output_mp"] == 2.0
        )
        c = client.get("/v1/credits", headers=headers).json()
        assert c["credits"] == pytest.approx(1.4) and c["used"] == pytest.approx(1.6)
        r = client.post("/v1/fluxion-tiny", json=body, headers=headers)
        assert r.status_code == 402 and "insufficient credits" in r.json()["detail"]
        assert rows(store) == (1, 1)


def test_cancel_queued_and_task_not_found(api):
    client, store, headers = api
    job_id = client.post("/v1/fluxion-tiny", json=GOOD, headers=headers).json()["id"]
    r = client.delete(f"/v1/jobs/{job_id}", headers=headers)
    assert (
        r.status_code == 200 and r.json()["status"] == "Error" and "cancelled" in r.json()["details"]["error"]
    )
    assert store.get(job_id).status == st.CANCELLED and store.get(job_id).cost == 0.0
    r = client.get("/v1/get_result", params={"id": "0000"}, headers=headers)
    assert r.status_code == 404 and r.json()["status"] == "Task not found"
    other = {"x-key": create_key(store, "other")}  # another key cannot see or cancel it
    assert (
        client.get("/v1/get_result", params={"id": job_id}, headers=other).json()["status"]
        == "Task not found"
    )
    assert client.delete(f"/v1/jobs/{job_id}", headers=other).status_code == 404


def test_keys_cli_create_list_revoke(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/k.db"
    assert keys_main(["--db", db, "create", "--name", "studio"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("flx_")
    store = st.Store(db)
    [row] = store.list_keys()
    assert key.split("_")[1] == row.id and key not in row.secret_hash  # stored hashed only
    assert keys_main(["--db", db, "list"]) == 0
    assert "studio" in capsys.readouterr().out
    client = TestClient(create_app(ServeConfig(db=db, role="api"), store))
    assert client.get("/v1/credits", headers={"x-key": key}).status_code == 200
    assert keys_main(["--db", db, "revoke", row.id]) == 0
    assert client.get("/v1/credits", headers={"x-key": key}).status_code == 401
    assert keys_main(["--db", db, "revoke", row.id]) == 2  # one-line error, exit 2


def test_signed_sample_urls_expire_and_resist_tampering(api):
    client, store, _ = api
    svc = client.app.state.service
    url = svc.sample_url("abc")
    path = url.split("127.0.0.1:8000")[1]
    assert client.get(path).status_code == 404  # signature fine, no image for that id
    assert client.get(path.replace("sig=", "sig=0")).status_code == 403
    past = int(time.time()) - 1
    assert not svc.check_sample("abc", past, url.split("sig=")[1])


def test_store_claim_is_exclusive_and_leases_requeue(tmp_path):
    """Claims never overlap; an expired lease requeues the job; the old holder's late finish is refused."""
    store = st.Store(f"sqlite:///{tmp_path}/s.db")
    spec = {"api": "bfl", "model": "m", "batch_key": "k", "params": {"prompt": "p", "seed": 1}}
    ids = store.submit([spec] * 5 + [{**spec, "batch_key": "other"}], key_id=None)
    t1, a = store.claim("w1", ["m"], 3, lease_s=0.2)
    t2, b = store.claim("w2", ["m"], 3, lease_s=60)
    assert [j.id for j in a] == ids[:3] and [j.id for j in b] == ids[3:5]  # same batch key only
    time.sleep(0.3)
    assert store.reap(max_attempts=3) == 3
    t3, c = store.claim("w3", ["m"], 8, lease_s=60)
    assert [j.id for j in c] == ids[:3] and all(j.attempts == 2 for j in c)
    assert not store.finish(ids[0], t1, st.READY, image=b"x", media_type="image/png", seed=1, worker="w1")
    assert store.finish(ids[0], t3, st.READY, image=b"y", media_type="image/png", seed=1, worker="w3")
    assert not store.finish(ids[0], t3, st.READY, image=b"z", media_type="image/png", seed=1, worker="w3")
    assert store.result(ids[0]).data == b"y"


def test_serve_cli_bad_flags_one_line(capsys, tmp_path):
    from fluxion.cli import main

    db = f"sqlite:///{tmp_path}/jobs.db"
    assert main(["serve", "--db", db, "--max-batch", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fluxion serve: error: --max-batch must be at least 1, got 0"
    assert main(["serve", "--db", db, "--admit-wait", "-0.5"]) == 2
    err = capsys.readouterr().err
    assert "--admit-wait" in err and "is a fraction of a step in [0, 100], got -0.5" in err
    assert main(["serve", "--db", db, "--model", "klein=/nonexistent/folder", "--role", "api"]) == 2
    assert "/nonexistent/folder" in capsys.readouterr().err
    assert not (tmp_path / "jobs.db").exists()  # nothing created for a command that failed


def test_changes_wake_only_the_waiters_of_the_changed_jobs():
    """A change to job a wakes a's waiter and not b's (b's returns at its timeout); a change not tied to jobs
    wakes everyone; a token read before a change makes wait() return at once; a forgotten job version reads as
    changed (one extra store read, never a missed wake)."""
    import asyncio

    from fluxion.serve.app import Changes

    async def main():
        ch = Changes()
        ch.loop = asyncio.get_running_loop()
        t0 = time.perf_counter()

        async def waiter(ids, timeout):
            await ch.wait(timeout, ch.seen(ids), ids)
            return time.perf_counter() - t0

        a = asyncio.create_task(waiter(["a"], 2.0))
        b = asyncio.create_task(waiter(["b"], 0.6))
        anyone = asyncio.create_task(waiter(None, 2.0))
        await asyncio.sleep(0.05)
        ch.notify(["a", "c"])
        ta, tany = await a, await anyone
        assert ta < 0.5 and tany < 0.5  # woken by the change
        assert await b >= 0.6  # not woken: its timeout
        seen = ch.seen(["b"])
        ch.notify(None)  # a change for every job
        await asyncio.sleep(0.01)
        assert ch.seen(["b"]) != seen
        t1 = time.perf_counter()
        await ch.wait(2.0, seen, ["b"])  # stale token: returns at once
        assert time.perf_counter() - t1 < 0.1
        ch.KEEP = 2
        seen_a = ch.seen(["a"])
        ch.notify(["x"])
        ch.notify(["y"])
        await asyncio.sleep(0.01)
        assert "a" not in ch.jobs and ch.seen(["a"]) != seen_a  # forgotten: reads as changed
        assert not ch.waiters  # none left behind

    asyncio.run(main())
