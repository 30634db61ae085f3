"""Peak GPU memory of the DiT process with a local vs a remote text encoder (klein-4B sizes, random weights).

    python benchmarks/bench_remote_text.py [--out DIR] [--size 1024] [--steps 4] [--smoke]

Three processes, so each peak is one process's own (torch.cuda.max_memory_allocated is per process):
  server   `create_text_encoder_app` over a Qwen3-4B-shaped encoder (bf16, pruned after the last tap) on the GPU
  local    transformer + VAE + the same encoder in one process; one generate() at SIZE², STEPS steps
  remote   transformer + VAE only; prompts encoded by the server over HTTP (text/remote.py, safetensors bytes)
Both DiT rows run the same `pipeline.generate` and report the peak allocated / reserved memory, the weights
resident after loading, and the time of a warm generate. Tokenisation is excluded (fixed random token ids of the
encoder's max_length), as in bench_e2e.py. --smoke: tiny shapes on the CPU (no memory figures), to check the
plumbing. Writes DIR/bench_remote_text.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import build_ours, default_dtype, small_cfg

from fluxion.config import DEBUG_VAE, PRESETS
from fluxion.text.encoder import TextEncoder


def spec_for(smoke: bool):
    spec = PRESETS["flux2-klein-4b"]
    if not smoke:
        return spec
    text = dataclasses.replace(spec.text, hidden_size=32, max_length=64)
    return dataclasses.replace(spec, transformer=small_cfg(spec.transformer), vae=DEBUG_VAE, text=text)


class FixedTokens(TextEncoder):
    """The real encoder path minus tokenisation: every prompt becomes max_length random (seeded) token ids."""

    identity = "bench-remote-text-random-qwen3"

    def tokenize(self, prompts):
        g = torch.Generator().manual_seed(len(prompts))
        ids = torch.randint(0, self.vocab, (len(prompts), self.cfg.max_length), generator=g)
        return {"input_ids": ids.to(self.device), "attention_mask": torch.ones_like(ids).to(self.device)}

    def token_counts(self, prompts):  # no tokenizer: every prompt is exactly max_length tokens
        return [self.cfg.max_length] * len(prompts)


def build_encoder(spec, smoke: bool, device: str) -> TextEncoder:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if smoke:
        cfg = Qwen3Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=spec.text.hidden_layers[-1],
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=1000,
        )
    else:
        cfg = Qwen3Config(  # Qwen3-4B, cut after the last tap (what fluxion's TextEncoder runs)
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=spec.text.hidden_layers[-1],
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            rope_theta=1_000_000,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        )
    cfg._attn_implementation = "sdpa"
    with default_dtype(torch.bfloat16), torch.device(device):
        model = Qwen3ForCausalLM(cfg).eval().requires_grad_(False)
    enc = FixedTokens(model, tokenizer=None, cfg=spec.text)
    enc.vocab = cfg.vocab_size
    return enc


def gib(n: int) -> float:
    return round(n / 2**30, 3)


def run_server(args) -> None:
    import uvicorn

    from fluxion.serve.text_encoder import create_text_encoder_app

    device = "cpu" if args.smoke else "cuda"
    enc = build_encoder(spec_for(args.smoke), args.smoke, device)
    uvicorn.run(create_text_encoder_app(enc), host="127.0.0.1", port=args.port, log_level="warning")


def run_dit(args) -> dict:
    from fluxion.request import Request
    from fluxion.sampling.pipeline import generate
    from fluxion.text.remote import RemoteTextEncoder
    from fluxion.vae.autoencoder import AutoEncoder
    from fluxion.weights.models import Models

    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    spec = spec_for(smoke)
    transformer = build_ours(spec.transformer, device=device, dtype=torch.bfloat16)
    with torch.device(device):
        vae = AutoEncoder(spec.vae).eval().requires_grad_(False)  # fp32, as load_models keeps it
    vae.bn.running_mean.zero_()
    vae.bn.running_var.fill_(1.0)
    if args.text == "local":
        text = build_encoder(spec, smoke, str(device))
    else:
        text = RemoteTextEncoder(args.text, spec.text)
    models = Models(
        spec=spec, transformer=transformer, vae=vae, text=text, device=device, dtype=torch.bfloat16
    )
    cuda = device.type == "cuda"
    resident = torch.cuda.memory_allocated() if cuda else 0
    size = 64 if smoke else args.size
    req = Request(prompt="a lighthouse at dusk", width=size, height=size, steps=args.steps, seed=0)
    generate(models, req)  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    generate(models, req)
    if cuda:
        torch.cuda.synchronize()
    row = {
        "text": "local" if args.text == "local" else "remote",
        "size": size,
        "steps": args.steps,
        "generate_s": round(time.perf_counter() - t0, 3),
        "resident_gib": gib(resident),
        "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
        "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()) if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    print(json.dumps(row), flush=True)
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(*argv: str) -> list[str]:
    return [sys.executable, __file__, *argv]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--role", choices=["main", "server", "dit"], default="main")
    ap.add_argument("--port", type=int)
    ap.add_argument("--text", default="local")
    args = ap.parse_args()
    if args.role == "server":
        return run_server(args)
    if args.role == "dit":
        run_dit(args)
        return None
    common = ["--size", str(args.size), "--steps", str(args.steps)] + (["--smoke"] if args.smoke else [])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])
        ),
    }
    rows = []
    out = subprocess.run(
        child("--role", "dit", "--text", "local", *common), env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"local run failed:\n{out.stderr[-3000:]}")
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    port = free_port()
    server = subprocess.Popen(child("--role", "server", "--port", str(port), *common), env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 600
        import urllib.request

        while True:
            try:
                urllib.request.urlopen(url + "/healthz", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("the text-encoder server did not start") from None
                time.sleep(1)
        out = subprocess.run(
            child("--role", "dit", "--text", url, *common), env=env, capture_output=True, text=True
        )
        if out.returncode:
            raise SystemExit(f"remote run failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {"rows": rows}
    if rows[0]["peak_allocated_gib"]:
        result["saved_gib"] = round(rows[0]["peak_allocated_gib"] - rows[1]["peak_allocated_gib"], 3)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_remote_text.json").write_text(json.dumps(result, indent=2))
    for r in rows:
        print(
            f"{r['text']:>6}: peak {r['peak_allocated_gib']} GiB allocated / {r['peak_reserved_gib']} GiB reserved, "
            f"resident {r['resident_gib']} GiB, generate {r['generate_s']} s ({r['size']}², {r['steps']} steps)"
        )
    if "saved_gib" in result:
        print(f"remote encoder saves {result['saved_gib']} GiB of peak GPU memory in the DiT process")


if __name__ == "__main__":
    main()
