"""The worker's continuous batching on fluxion-tiny-base (CPU; true CFG, the harder case for row batching), in process with a real SQLite store: a job submitted
while another denoises joins its batch at a step boundary, each row at its own step, and both images equal the
same jobs run alone through `pipeline.generate` (the library's solo path, an independent run); per-row cancel;
the finished-row handoff (finisher threads) stores the same bytes as the inline path; the store's admission
query (same key, FIFO-fair, one claim)."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")

from fluxion.serve import store as st  # noqa: E402
from fluxion.serve.config import ServeConfig  # noqa: E402
from fluxion.serve.engine import Metrics, Worker  # noqa: E402
from fluxion.serve.moderation import Blocklist  # noqa: E402

SIZE, STEPS = 64, 8
MODEL = (
    "fluxion-tiny-base"  # the embedded CFG model (fluxion-tiny is its distilled student: one pass per step)
)
GUIDANCE = 4.0  # the base's default: true CFG, so the rows share the empty negative prompt


@pytest.fixture(scope="module")
def models():
    from fluxion.weights.models import load_models

    return load_models(MODEL)


def job_spec(prompt: str, seed: int, steps: int = STEPS, fmt: str = "png") -> dict:
    """A queued job as the API stores it (app.Service.job_spec) for MODEL at SIZE² and `steps`."""
    return {
        "api": "bfl",
        "model": MODEL,
        "batch_key": f"{MODEL}|{SIZE}x{SIZE}|{steps}|{GUIDANCE:g}",
        "params": {
            "prompt": prompt,
            "seed": seed,
            "width": SIZE,
            "height": SIZE,
            "steps": steps,
            "guidance": GUIDANCE,
            "output_format": fmt,
            "safety_tolerance": 2,
            "inputs": 0,
        },
    }


class Running:
    """A Worker on its own thread; `hook` runs (once per call) on every on_change of the worker."""

    def __init__(self, tmp_path, models, hook=None, overlap=True, **cfg):
        cfg = {"watermark": False, "max_batch": 4, "poll_s": 0.01, **cfg}
        self.cfg = ServeConfig(db=f"sqlite:///{tmp_path}/jobs.db", **cfg)
        self.store = st.Store(self.cfg.db)
        self.metrics = Metrics()
        self.hook = hook or (lambda: None)
        self.worker = Worker(
            self.cfg,
            self.store,
            {MODEL: models},
            Blocklist(),
            self.metrics,
            on_change=lambda job_ids=None: self.hook(),
            overlap=overlap,
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.worker.run, args=(self.stop,), daemon=True)

    def start(self):
        self.thread.start()
        return self

    def wait(self, ids, timeout=120.0) -> dict[str, st.Job]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            jobs = self.store.get_many(ids)
            if all(j.status in st.TERMINAL for j in jobs.values()):
                return jobs
            time.sleep(0.02)
        raise TimeoutError({j.id: j.status for j in self.store.get_many(ids).values()})

    def until_done(self, ids: dict[str, str], names: str) -> dict[str, st.Job]:
        """Start, wait until a hook has submitted the last of `names` (keys of `ids`), wait for all of them to
        end, stop; their jobs by id."""
        self.start()
        try:
            deadline = time.time() + 60
            while names[-1] not in ids and time.time() < deadline:
                time.sleep(0.01)
            return self.wait([ids[k] for k in names])
        finally:
            self.close()

    def close(self):
        self.stop.set()
        self.worker.poke()  # out of an idle wait (poll_s may be long)
        self.thread.join(60)

    def image(self, job_id) -> np.ndarray:
        data = self.store.result(job_id).data
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def solo(models, prompt, seed, steps=STEPS) -> np.ndarray:
    from fluxion.request import Request
    from fluxion.sampling.pipeline import generate

    [res] = generate(
        models, Request(prompt=prompt, seed=seed, width=SIZE, height=SIZE, steps=steps, guidance=GUIDANCE)
    )
    return np.asarray(res.image, dtype=np.int16)


def test_euler_step_rows_equals_denoise_steps(models):
    """Rows at one time: the same bits as `denoise_steps` on that batch. Rows at different times: each row
    equals its own solo step (float rounding of the batched forward only)."""
    from fluxion.sampling.denoise import Conditioning, Guidance, denoise_steps, euler_step_rows
    from fluxion.sampling.ids import image_ids, text_ids
    from fluxion.sampling.pipeline import draw_noise, encode_prompts
    from fluxion.sampling.schedule import get_schedule

    h = w = SIZE // 16
    model, g = models.transformer, Guidance()
    x = draw_noise(models.spec, [1, 2], h, w, "cpu", torch.float32)
    ctx = encode_prompts(models, ["a red heart", "a blue square"])
    cond = Conditioning(ctx=ctx, ctx_ids=text_ids(ctx.shape[1], 2))
    ids = image_ids(h, w, batch=2)
    ts = get_schedule(6, h * w)
    with torch.no_grad():
        _, want = next(denoise_steps(model, x, ids, cond, ts[2:4], g))
        got = euler_step_rows(model, x, ids, cond, [ts[2]] * 2, [ts[3]] * 2, g)
        assert torch.equal(got, want)
        mixed = euler_step_rows(model, x, ids, cond, [ts[0], ts[3]], [ts[1], ts[4]], g)
        for b, (t0, t1) in enumerate([(ts[0], ts[1]), (ts[3], ts[4])]):
            c1 = Conditioning(ctx=ctx[b : b + 1], ctx_ids=text_ids(ctx.shape[1], 1))
            _, alone = next(denoise_steps(model, x[b : b + 1], ids[:1], c1, [t0, t1], g))
            torch.testing.assert_close(mixed[b : b + 1], alone, rtol=0, atol=1e-5)
        # a wrong time for a row is far outside that tolerance (the check can fail)
        assert (
            mixed[1:] - euler_step_rows(model, x, ids, cond, [ts[0]] * 2, [ts[1]] * 2, g)[1:]
        ).abs().max() > 1e-2
        with pytest.raises(ValueError, match="batch of 2"):
            euler_step_rows(model, x, ids, cond, [ts[0]], [ts[1]], g)


def test_job_admitted_mid_flight_equals_solo_runs(tmp_path, models):
    """A runs alone for a step; B, submitted then, joins A's batch at the next step boundary (same claim) and
    the two share forwards at different steps; each image equals its solo run."""
    A, B = ("a red heart", 11), ("a blue square", 22)
    ids = {}
    lock = threading.Lock()

    def hook():  # on the worker thread, right after A's first progress write
        with lock:
            if "b" not in ids and "a" in ids and run.store.get(ids["a"]).progress > 0:
                [ids["b"]] = run.store.submit([job_spec(*B)], key_id=None)

    run = Running(tmp_path, models, hook)
    [ids["a"]] = run.store.submit([job_spec(*A)], key_id=None)
    jobs = run.until_done(ids, "ab")
    a, b = jobs[ids["a"]], jobs[ids["b"]]
    assert a.status == b.status == st.READY, (a.error, b.error)
    assert a.claim == b.claim and a.started_at < b.started_at < a.finished_at <= b.finished_at  # joined A
    reg = run.metrics.registry
    assert reg.get_sample_value("fluxion_admitted_total") == 1
    shared = reg.get_sample_value("fluxion_step_rows_count") - reg.get_sample_value(
        "fluxion_step_rows_bucket", {"le": "1.0"}
    )
    assert 1 <= shared <= STEPS - 1  # B joined after A's first step
    for job, (prompt, seed) in ((a, A), (b, B)):
        got, want = run.image(job.id), solo(models, prompt, seed)
        # float tolerance: the batched forward rounds differently from batch 1 (about 1e-6 in the latents)
        assert got.shape == want.shape == (SIZE, SIZE, 3)
        assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.02
    from fluxion.metadata import read_params

    path = tmp_path / "b.png"
    path.write_bytes(run.store.result(b.id).data)
    assert read_params(path)["prompt"] == B[0] and read_params(path)["seed"] == B[1]


def test_cancel_one_row_the_other_goes_on(tmp_path, models):
    A, B = ("a green tree", 5), ("a yellow sun", 6)
    ids = {}

    def hook():
        if "b" in ids and "cancelled" not in ids and run.store.get(ids["b"]).progress > 0:
            ids["cancelled"] = run.store.request_cancel(ids["b"])

    run = Running(tmp_path, models, hook)
    ids["a"], ids["b"] = run.store.submit([job_spec(*A), job_spec(*B)], key_id=None)
    run.start()
    try:
        jobs = run.wait([ids["a"], ids["b"]])
    finally:
        run.close()
    assert jobs[ids["b"]].status == st.CANCELLED and run.store.result(ids["b"]) is None
    assert jobs[ids["a"]].status == st.READY
    got, want = run.image(ids["a"]), solo(models, *A)
    assert np.abs(got - want).max() <= 1


def test_finished_row_handoff_stores_the_same_bytes_as_inline(tmp_path, models):
    """Decode + watermark + encode + store on finisher threads (and text encoding on the prefetch thread) give
    byte-identical files to the same work done inline on the worker thread."""
    specs = [job_spec("a red heart", 1, steps=3), job_spec("a blue square", 2, steps=3, fmt="jpeg")]
    out = {}
    for overlap in (True, False):
        (tmp_path / str(overlap)).mkdir()
        run = Running(tmp_path / str(overlap), models, overlap=overlap, watermark=True)
        ids = run.store.submit(specs, key_id=None)
        run.start()
        try:
            jobs = run.wait(ids)
        finally:
            run.close()
        assert all(j.status == st.READY for j in jobs.values())
        assert (run.worker.overlap.finish_pool is not None) == overlap
        out[overlap] = [run.store.result(i).data for i in ids]
    assert out[True] == out[False]


def test_store_claim_more_same_key_fifo_fair_one_claim(tmp_path):
    store = st.Store(f"sqlite:///{tmp_path}/s.db")
    spec = {"api": "bfl", "model": "m", "params": {"prompt": "p", "seed": 1}}
    k = store.submit([{**spec, "batch_key": "k"}] * 2, key_id=None)
    token, first = store.claim("w1", ["m"], 1, lease_s=60)
    assert [j.id for j in first] == k[:1]
    k += store.submit([{**spec, "batch_key": "k"}], key_id=None)
    other = store.submit([{**spec, "batch_key": "other"}], key_id=None)
    late = store.submit([{**spec, "batch_key": "k"}], key_id=None)  # queued after `other`: waits for it
    assert store.claim_more(token, "w1", ["m"], 0, 60) == []
    more = store.claim_more(token, "w1", ["m"], 10, 60)
    assert [j.id for j in more] == k[1:3] and all(j.claim == token and j.status == st.RUNNING for j in more)
    assert store.claim_more(token, "w1", ["m"], 10, 60) == []
    assert store.claim_more(token, "w1", ["other-model"], 10, 60) == []
    t2, nxt = store.claim("w2", ["m"], 8, lease_s=60)
    assert [j.id for j in nxt] == other  # the oldest waiting key runs next
    assert [j.id for j in store.claim_more(token, "w1", ["m"], 10, 60)] == late  # no foreign job waits now
    assert store.finish(late[0], token, st.READY, image=b"x", media_type="image/png", seed=1, worker="w1")


def test_a_failing_job_fails_alone(tmp_path, models):
    """A job whose preparation fails (prompt upsampling on a server without an upsampler) ends Error with the
    fix in its message; the job claimed with it is stored Ready."""
    bad = job_spec("a red heart", 1, steps=2)
    bad["params"]["prompt_upsampling"] = True
    run = Running(tmp_path, models)
    ids = run.store.submit([bad, job_spec("a blue square", 2, steps=2)], key_id=None)
    run.start()
    try:
        jobs = run.wait(ids)
    finally:
        run.close()
    assert jobs[ids[0]].status == st.ERROR and "--upsampler" in jobs[ids[0]].error
    assert jobs[ids[1]].status == st.READY and jobs[ids[1]].claim == jobs[ids[0]].claim


def test_freed_rows_are_refilled_at_once_with_a_slow_text_encoder(tmp_path, models):
    """max_batch 2: A runs one step alone, then B joins; C and D queue behind them. Prompt preparation (the
    text encoder) is slowed to several steps' time, as a large encoder sharing the GPU with the denoise loop can
    be: admission claims two steps ahead and the loop waits for the prompts at a freed row, so every forward but
    A's first and D's last has two rows: 2 * STEPS + 1 forwards, two of them single-row."""
    queued = [("a red heart", 1), ("a blue square", 2), ("a green circle", 3)]
    ids: dict[str, str] = {}

    def hook():  # on the worker thread, at A's first progress write: B, C and D arrive together
        if "b" not in ids and "a" in ids and run.store.get(ids["a"]).progress > 0:
            for name, spec in zip("bcd", run.store.submit([job_spec(*q) for q in queued], key_id=None)):
                ids[name] = spec

    run = Running(tmp_path, models, hook, max_batch=2, admit_wait=100.0)
    prepare = run.worker._prepare

    def slow_prepare(sh, jobs):
        time.sleep(0.4)  # several steps of the tiny model at 64² on a CPU
        return prepare(sh, jobs)

    run.worker._prepare = slow_prepare
    [ids["a"]] = run.store.submit([job_spec("a yellow star", 0)], key_id=None)
    jobs = run.until_done(ids, "abcd")
    assert all(j.status == st.READY for j in jobs.values()), [j.error for j in jobs.values()]
    reg = run.metrics.registry
    forwards = reg.get_sample_value("fluxion_step_rows_count")
    single = reg.get_sample_value("fluxion_step_rows_bucket", {"le": "1.0"})
    assert reg.get_sample_value("fluxion_step_rows_sum") == 4 * STEPS  # every job's steps, once
    assert (forwards, single) == (2 * STEPS + 1, 2)
    # claim -> first step and the finishing of each row, as /metrics shows them: every job, its 0.4 s encode in
    assert reg.get_sample_value("fluxion_start_wait_seconds_count") == 4
    assert reg.get_sample_value("fluxion_start_wait_seconds_sum") >= 4 * 0.4
    assert reg.get_sample_value("fluxion_finish_seconds_count") == 4


def test_an_idle_worker_claims_a_job_queued_in_process_at_once(tmp_path, models):
    """With a 30 s poll, a job queued through the in-process API (the default `fluxion serve`) still starts at
    once: the API pokes the worker. Without the poke it would wait for the next poll."""
    from fastapi.testclient import TestClient

    from fluxion.serve.app import create_app

    cfg = ServeConfig(
        db=f"sqlite:///{tmp_path}/jobs.db", watermark=False, poll_s=30.0, auth="off", models=((MODEL, None),)
    )
    with TestClient(create_app(cfg, models={MODEL: models})) as client:
        deadline = time.time() + 60
        while not client.get("/readyz").status_code == 200 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the worker is now idle in its 30 s wait
        t0 = time.time()
        r = client.post(f"/v1/{MODEL}", json={"prompt": "a red heart", "width": 64, "height": 64, "steps": 2})
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        while time.time() < t0 + 20:
            body = client.get("/v1/get_result", params={"id": job_id}).json()
            if body["status"] != "Pending":
                break
            time.sleep(0.05)
        assert body["status"] == "Ready", body
        assert time.time() - t0 < 15  # far below the 30 s poll


def test_the_queue_is_asked_when_poked_not_every_step(tmp_path, models):
    """A running batch asks the store for more jobs after a poke (a submit in this process) or poll_s after the
    queue was last found empty, not in a write transaction every step: with a 30 s poll, B (submitted and poked
    at A's first step) still joins A's batch, and the store is asked a handful of times over 2 x STEPS steps."""
    ids = {}

    def hook():
        if "b" not in ids and "a" in ids and run.store.get(ids["a"]).progress > 0:
            [ids["b"]] = run.store.submit([job_spec("a blue square", 22)], key_id=None)
            run.worker.poke()  # what the in-process API does after a submit

    run = Running(tmp_path, models, hook, poll_s=30.0)
    asked = []
    claim_more = run.store.claim_more

    def counting(*a, **k):
        got = claim_more(*a, **k)
        asked.append(len(got))
        return got

    run.store.claim_more = counting
    [ids["a"]] = run.store.submit([job_spec("a red heart", 11)], key_id=None)
    jobs = run.until_done(ids, "ab")
    a, b = jobs[ids["a"]], jobs[ids["b"]]
    assert a.status == b.status == st.READY and a.claim == b.claim  # B joined A's running batch
    assert run.metrics.registry.get_sample_value("fluxion_admitted_total") == 1
    assert 1 in asked and len(asked) <= 3, asked  # every step would ask about 2 * STEPS times
