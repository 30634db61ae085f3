"""Remote text encoder: a real HTTP server (uvicorn in a thread) serving fluxion-tiny's encoder; the client's
embeddings are bit-identical to the local encoder's, the image is the same, and mismatches are refused."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402

from fluxion.request import Request  # noqa: E402
from fluxion.sampling.pipeline import generate  # noqa: E402
from fluxion.serve.text_encoder import create_text_encoder_app  # noqa: E402
from fluxion.text.remote import RemoteEncoderError, RemoteTextEncoder  # noqa: E402
from fluxion.weights.models import load_models  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    models = load_models()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_text_encoder_app(models.text), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield models, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_remote_embeddings_equal_local(served):
    models, url = served
    remote = RemoteTextEncoder(url, models.spec.text)
    prompts = ["a red heart", "two blue circles on white", "ünïcode ✓ prompt"]
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(
            remote.encode(prompts, dtype=dtype), models.text.encode(prompts, dtype=dtype).cpu()
        )


def test_generation_with_remote_encoder_is_identical(served):
    models, url = served
    req = Request(prompt="a yellow star", seed=5, steps=3)
    [local] = generate(models, req)
    remote_models = dataclasses.replace(models, text=RemoteTextEncoder(url, models.spec.text))
    [remote] = generate(remote_models, req)
    assert local.image.tobytes() == remote.image.tobytes()


def test_mismatches_are_refused(served):
    models, url = served
    other = dataclasses.replace(models.spec.text, hidden_layers=(1, 3, 5))
    with pytest.raises(RemoteEncoderError, match="this model needs"):
        RemoteTextEncoder(url, other)
    with pytest.raises(RemoteEncoderError, match="expected 'nope'"):
        RemoteTextEncoder(url, models.spec.text, identity="nope")
    with pytest.raises(RemoteEncoderError, match="cannot reach"):
        RemoteTextEncoder(f"http://127.0.0.1:{free_port()}", models.spec.text, timeout=2)
    with pytest.raises(ValueError, match="http://"):
        RemoteTextEncoder("ftp://x", models.spec.text)


def test_answers_are_safetensors_not_pickle(served):
    import json
    import urllib.error
    import urllib.request

    _, url = served
    req = urllib.request.Request(
        url + "/v1/encode",
        data=json.dumps({"prompts": ["x"]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    data = urllib.request.urlopen(req).read()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    assert header["ctx"]["dtype"] == "BF16" and "identity" in header["__metadata__"]
    bad = urllib.request.Request(
        url + "/v1/encode",
        data=json.dumps({"prompts": []}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad)
    assert e.value.code == 422
