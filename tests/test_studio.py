"""The studio's server side, in process with fluxion-tiny loaded (role "all", a real SQLite store): the job
history, live previews, mask_image inpainting, per-request LoRAs (and that they never leak), prompt upsampling
(recorded in the result, 422 when not configured), watermark + PNG metadata + C2PA on served images, and the
moderation stages (an image classifier -> Content Moderated through the HTTP API; nudenet's label mapping)."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from c2pa_certs import make_signing_identity  # noqa: E402
from fluxion.lora import inject_lora, lora_parameters, save_lora  # noqa: E402
from fluxion.lora.lora import LoRALinear  # noqa: E402
from fluxion.metadata import PARAMS_KEY  # noqa: E402
from fluxion.provenance import detect_watermark, read_c2pa  # noqa: E402
from fluxion.serve import store as st  # noqa: E402
from fluxion.serve.app import create_app  # noqa: E402
from fluxion.serve.config import ServeConfig  # noqa: E402
from fluxion.serve.moderation import Blocklist, NSFWClassifier, Stages, reasons_for  # noqa: E402
from fluxion.weights.models import load_models  # noqa: E402
from serve_fixtures import png_b64  # noqa: E402
from text_fixtures import build_tiny_qwen3  # noqa: E402

FAST = {"width": 128, "height": 128, "steps": 2, "output_format": "png"}


class BrightnessDetector:
    """A real (if crude) detector with nudenet's interface: reports FEMALE_BREAST_EXPOSED with a score equal to the
    fraction of pixels brighter than `level` (mean of RGB), one box for the whole image."""

    def __init__(self, level: float):
        self.level, self.calls = level, 0

    def detect(self, image_path: str) -> list[dict]:
        self.calls += 1
        with Image.open(image_path) as im:
            px = np.asarray(im.convert("RGB"), dtype=np.float32).mean(-1)
        score = float((px > self.level).mean())
        w, h = im.size
        return [{"class": "FEMALE_BREAST_EXPOSED", "score": score, "box": [0, 0, w, h]}] if score else []


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    d = tmp_path_factory.mktemp("studio")
    models = load_models()
    # A LoRA for the served transformer: random (non-zero) up weights so it changes the image.
    donor = load_models().transformer
    inject_lora(donor, rank=4, alpha=4, targets="diffusers")
    g = torch.Generator().manual_seed(0)
    for p in lora_parameters(donor):
        p.data = torch.randn(p.shape, generator=g) * 0.05
    (d / "loras").mkdir()
    save_lora(donor, d / "loras" / "style.safetensors")
    llm = build_tiny_qwen3(d / "llm", num_layers=2)
    flat = llm / "text_encoder"
    for f in (llm / "tokenizer").iterdir():
        (flat / f.name).write_bytes(f.read_bytes())
    cert, key = make_signing_identity()
    (d / "cert.pem").write_bytes(cert)
    (d / "key.pem").write_bytes(key)
    cfg = ServeConfig(
        db=f"sqlite:///{d}/jobs.db",
        auth="off",
        lora_dir=str(d / "loras"),
        upsampler=str(flat),
        c2pa_cert=str(d / "cert.pem"),
        c2pa_key=str(d / "key.pem"),
    )
    app = create_app(cfg, models={"fluxion-tiny": models})
    detector = BrightnessDetector(level=1.0)  # almost every pixel is brighter than 1/255: flags everything
    app.state.service.moderator = Stages((Blocklist({"forbidden": 5}), NSFWClassifier(detector)))
    with TestClient(app) as client:
        deadline = time.time() + 120
        while client.get("/readyz").status_code != 200:
            assert time.time() < deadline, "worker did not start"
            time.sleep(0.1)
        yield client, models, detector


def run(client, body: dict, timeout: float = 180) -> dict:
    r = client.post("/v1/fluxion-tiny", json=body)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    deadline = time.time() + timeout
    while True:
        out = client.get("/v1/get_result", params={"id": job_id}).json()
        if out["status"] != "Pending":
            return out
        assert time.time() < deadline, out
        time.sleep(0.05)


def image_of(client, out: dict) -> tuple[bytes, Image.Image]:
    data = client.get(out["result"]["sample"]).content  # the ASGI test transport answers any host
    return data, Image.open(io.BytesIO(data))


def test_generate_history_metadata_watermark_c2pa(studio):
    client, _, _ = studio
    out = run(client, {**FAST, "prompt": "a blue sky", "seed": 4, "safety_tolerance": 5})
    assert out["status"] == "Ready", out
    data, im = image_of(client, out)
    assert im.format == "PNG" and im.size == (128, 128)
    assert '"prompt": "a blue sky"' in im.text[PARAMS_KEY] and im.text["seed"] == "4"  # a download keeps them
    assert detect_watermark(im).found
    manifest = read_c2pa(data, "image/png")
    assert manifest is not None and "c2pa.edited" not in str(manifest["manifest"])
    jobs = client.get("/v1/jobs", params={"limit": 5}).json()["jobs"]
    assert jobs[0]["id"] == out["id"] and jobs[0]["params"]["seed"] == 4 and jobs[0]["status"] == "Ready"
    assert client.get(f"/v1/jobs/{out['id']}/preview").status_code in (200, 404)
    assert client.get("/v1/jobs/nope/preview").status_code == 404
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_live_preview_rows_are_written_every_step(studio):
    client, _, _ = studio
    r = client.post("/v1/fluxion-tiny", json={**FAST, "steps": 12, "prompt": "x", "safety_tolerance": 5})
    job_id, seen = r.json()["id"], 0
    svc = client.app.state.service
    while svc.store.get(job_id).status not in st.TERMINAL:
        got = client.get(f"/v1/jobs/{job_id}/preview")
        if got.status_code == 200:
            thumb = Image.open(io.BytesIO(got.content))
            assert thumb.size == (32, 32)  # 8x8 latent tokens, 4x nearest upscale
            seen += 1
        time.sleep(0.02)
    assert seen >= 1


def test_inpaint_through_mask_image(studio):
    client, _, _ = studio
    src = png_b64((128, 128), (20, 200, 20))
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    m64 = base64.b64encode(buf.getvalue()).decode()
    body = {"prompt": "a hole", "steps": 2, "output_format": "png", "safety_tolerance": 5}
    out = run(client, {**body, "input_image": src, "mask_image": m64})
    assert out["status"] == "Ready", out
    data, im = image_of(client, out)
    px = im.convert("RGB").load()
    assert abs(px[2, 2][1] - 200) <= 12 and abs(px[2, 2][0] - 20) <= 12  # unmasked: the source (+ watermark)
    assert "c2pa.edited" in str(read_c2pa(data, "image/png")["manifest"])
    small = base64.b64encode(_png(Image.new("L", (64, 64)))).decode()
    r = client.post("/v1/fluxion-tiny", json={**body, "input_image": src, "mask_image": small})
    assert r.status_code == 422 and "mask is 64x64" in r.json()["detail"]
    r = client.post("/v1/fluxion-tiny", json={**body, "mask_image": m64})
    assert r.status_code == 422 and "needs input_image" in r.json()["detail"]


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_per_request_lora_changes_the_image_and_never_leaks(studio):
    client, models, _ = studio
    assert client.get("/v1/loras").json() == {"data": [{"name": "style"}]}
    body = {**FAST, "prompt": "a blue square", "seed": 11, "safety_tolerance": 5}
    plain = image_of(client, run(client, body))[1]
    styled = image_of(client, run(client, {**body, "loras": [{"name": "style", "scale": 1.0}]}))[1]
    again = image_of(client, run(client, body))[1]
    assert not any(isinstance(m, LoRALinear) for m in models.transformer.modules())  # removed after the job
    diff = lambda a, b: np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()  # noqa: E731
    assert diff(plain, styled) > 1.0 and diff(plain, again) == 0
    r = client.post("/v1/fluxion-tiny", json={**body, "loras": [{"name": "../etc/passwd"}]})
    assert r.status_code == 422 and "GET /v1/loras" in r.json()["detail"]


def test_prompt_upsampling_is_recorded(studio):
    client, _, _ = studio
    out = run(client, {**FAST, "prompt": "a cat", "prompt_upsampling": True, "safety_tolerance": 5})
    assert out["status"] == "Ready", out
    assert out["result"]["prompt_original"] == "a cat" and out["result"]["prompt"]
    _, im = image_of(client, out)
    assert '"prompt_original": "a cat"' in im.text[PARAMS_KEY]
    [job] = [j for j in client.get("/v1/jobs").json()["jobs"] if j["id"] == out["id"]]
    assert job["params"]["prompt_original"] == "a cat"


def test_prompt_upsampling_not_configured_is_422(tmp_path):
    app = create_app(ServeConfig(db=f"sqlite:///{tmp_path}/j.db", role="api", auth="off"))
    with TestClient(app) as client:
        r = client.post("/v1/fluxion-tiny", json={"prompt": "a cat", "prompt_upsampling": True})
        assert r.status_code == 422 and "not configured" in r.json()["detail"]
        assert client.get("/v1/studio").json()["upsampling"] is False
        page = client.get("/")
        assert page.status_code == 200 and "<title>fluxion studio</title>" in page.text
        assert client.get("/static/studio.js").status_code == 200


def test_moderation_statuses_through_http(studio):
    client, _, detector = studio
    before = detector.calls
    out = run(client, {**FAST, "prompt": "a forbidden thing"})
    assert out["status"] == "Request Moderated" and detector.calls == before  # never ran, never classified
    out = run(client, {**FAST, "prompt": "a lamp", "safety_tolerance": 2})
    assert out["status"] == "Content Moderated", out
    assert out["details"]["Moderation Reasons"][0].startswith("image classifier: female_breast_exposed")
    assert run(client, {**FAST, "prompt": "a lamp", "safety_tolerance": 5})["status"] == "Ready"


def test_nudenet_label_mapping_by_tolerance():
    det = [
        {"class": "FEMALE_BREAST_EXPOSED", "score": 0.55, "box": [0, 0, 1, 1]},
        {"class": "FEMALE_BREAST_EXPOSED", "score": 0.35, "box": [0, 0, 1, 1]},
        {"class": "BELLY_EXPOSED", "score": 0.6, "box": [0, 0, 1, 1]},
        {"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 1, 1]},
    ]
    # explicit label blocks from 0.3 + 0.1 * tolerance (best score 0.55: tolerances 0, 1, 2);
    # suggestive (belly 0.6 >= 0.5) only at tolerance <= 1; faces never.
    assert [len(reasons_for(det, t)) for t in range(6)] == [2, 2, 1, 0, 0, 0]
    assert reasons_for(det, 2) == ["image classifier: female_breast_exposed (0.55)"]
    try:
        import nudenet  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"fluxion\[nsfw\].*AGPL"):
            NSFWClassifier.nudenet()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--c2pa-cert", "chain.pem"], "give both --c2pa-cert and --c2pa-key"),
        (["--text", "localhost:8001"], "give the http(s) URL"),
    ],
)
def test_serve_studio_flags_bad_input_one_line(argv, words, capsys):
    from fluxion.serve.cli import serve_main

    assert serve_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
