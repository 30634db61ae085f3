"""`fluxion serve` under load: images per minute and latency percentiles (submit -> image downloaded, as a BFL
client sees it) at concurrency 1 / 8 / 32.

    python benchmarks/bench_serve.py                          # CPU: fluxion-tiny through a real `fluxion serve`
    python benchmarks/bench_serve.py --gpu --out DIR          # one GPU: klein-4B real size, random weights (< 7 min)
    python benchmarks/bench_serve.py --gpu --smoke --out DIR  # the GPU code path at toy sizes on the CPU

Clients wait on each job's event stream (/v1/jobs/ID/events), then download the image (JPEG).
GPU mode: a Qwen3-4B-shaped text encoder (random token ids stand in for the tokenizer), the klein-4B transformer
and the FLUX.2 VAE, all random; 4 steps at 512² and 1024²; the transformer in bf16, then in fp8 (rowwise; eager
unless --compile: a server sees every batch size up to --max-batch). For each precision:
  - `pipeline.generate` warm at batch 1 and at --max-batch: the library's time per image (GPU work plus the
    PIL conversion, no HTTP, store or image encode), the reference for the server overhead;
  - the server as built (continuous batching up to --max-batch, text encoding and decode/encode/store on
    threads beside the denoise loop) at concurrency 1 / 8 / 32;
  - the naive server (batch 1, everything inline: one request at a time) at concurrency 1 / 8 / 32;
and diffusers' Flux2KleinPipeline called in a loop on the same bf16 weights; last, one row with the invisible
watermark on (the `fluxion serve` default; off elsewhere, as it is CPU work outside the issue's overhead list).
Each server row records whether continuous batching was used (jobs admitted into a running batch, from the
worker's /metrics), the mean rows per forward, and `server_overhead_pct`: server time per image over the
library's at the batch the server could form (c=1: p50 latency vs one generate call; c>1: inverse throughput
vs generate at batch min(c, max batch)). The server runs in this process (models built once); the clients run
in a subprocess so their work does not share this GIL. Rows stop starting after --budget-s seconds.
Writes OUT/bench_serve.json (OUT: --out, default bench_out/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parent / "src")


def child_env() -> dict:
    """Our src first, then whatever PYTHONPATH carried (a site folder with fastapi, uvicorn, httpx, ...)."""
    rest = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": SRC + (os.pathsep + rest if rest else "")}


# ---- the client (also run as a subprocess: --client) ----------------------------------------------------------
def run_clients(url: str, model: str, n: int, concurrency: int, size: int, steps: int, poll_s: float) -> dict:
    """n BFL submissions from `concurrency` threads, each waiting for Ready: on the job's event stream
    (poll_s = 0) or by polling get_result every poll_s seconds."""
    import httpx

    lat, errors = [], []

    def one(i: int):
        with httpx.Client(timeout=600) as c:
            t0 = time.perf_counter()
            body = {"prompt": f"bench prompt {i}", "seed": i, "width": size, "height": size, "steps": steps}
            body["output_format"] = "jpeg"
            while True:
                r = c.post(f"{url}/v1/{model}", json=body)
                if r.status_code not in (429, 503):
                    break
                time.sleep(0.05)
            if r.status_code != 200:
                errors.append(r.text)
                return
            job_id = r.json()["id"]
            s = None
            if poll_s > 0:  # BFL-style polling
                while (s := c.get(f"{url}/v1/get_result", params={"id": job_id}).json())[
                    "status"
                ] == "Pending":
                    time.sleep(poll_s)
            else:  # the job's event stream: the server pushes the result as soon as it is stored
                with c.stream("GET", f"{url}/v1/jobs/{job_id}/events") as ev:
                    for line in ev.iter_lines():
                        if line.startswith("data: "):
                            s = json.loads(line[6:])
                            if s["status"] != "Pending":
                                break
            if s["status"] != "Ready":
                errors.append(str(s))
                return
            c.get(
                s["result"]["sample"]
            ).raise_for_status()  # the client downloads its image, as a real one does
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat.sort()

    def pct(p):
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else None

    return {
        "n": n,
        "concurrency": concurrency,
        "ok": len(lat),
        "errors": errors[:3],
        "wall_s": wall,
        "images_per_min": 60 * len(lat) / wall,
        "p50_s": pct(50),
        "p95_s": pct(95),
        "p99_s": pct(99),
        "mean_s": statistics.fmean(lat) if lat else None,
    }


def clients_subprocess(url, model, n, concurrency, size, steps, poll_s) -> dict:
    cmd = [sys.executable, __file__, "--client", url, model, str(n), str(concurrency), str(size), str(steps)]
    out = subprocess.run([*cmd, str(poll_s)], capture_output=True, text=True, env=child_env())
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def show(row: dict) -> None:
    p = {
        k: (f"{row[k]:.3f}" if isinstance(row.get(k), float) else row.get(k))
        for k in ("p50_s", "p95_s", "p99_s")
    }
    print(
        f"{row['label']:<44} c={row['concurrency']:<3} n={row['n']:<4} {row['images_per_min']:8.1f} img/min   "
        f"p50 {p['p50_s']}  p95 {p['p95_s']}  p99 {p['p99_s']}  errors {len(row['errors'])}",
        flush=True,
    )


class Report:
    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {"meta": meta, "rows": []}
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        show(row)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


# ---- CPU: fluxion-tiny through `fluxion serve` ---------------------------------------------------------------------
def tiny(args, report: Report) -> None:
    import socket

    import httpx

    size, steps = 64, 2
    for label, batch, extra in (
        ("fluxion-tiny, server (continuous batching, max batch 16)", 16, []),
        ("fluxion-tiny, naive (batch 1, one request at a time)", 1, ["--no-overlap"]),
    ):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        d = tempfile.mkdtemp(prefix="bench-serve-")
        cmd = [
            sys.executable,
            "-m",
            "fluxion.cli",
            "serve",
            "--db",
            f"sqlite:///{d}/jobs.db",
            "--port",
            str(port),
            *extra,
        ]
        cmd += ["--auth", "off", "--max-batch", str(batch), "--key-limit", "100000", "--log-level", "warning"]
        proc = subprocess.Popen(cmd, env=child_env(), stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError("server exited")
                time.sleep(0.3)
            run_clients(url, "fluxion-tiny", 4, 4, size, steps, 0)  # warm-up
            for c in (1, 8, 32):
                n = max(args.n_min, 2 * c) if not args.quick else c
                before = engine_stats(url)
                row = run_clients(url, "fluxion-tiny", n, c, size, steps, 0)
                row.update(stats_delta(before, engine_stats(url)))
                report.add({"label": label, "size": size, "steps": steps, "max_batch": batch, **row})
        finally:
            proc.terminate()
            proc.wait()


# ---- GPU: klein-4B real size, random weights, server in this process -----------------------------------------------
def build_models(smoke: bool, device: str):
    import torch
    from bench_e2e import TAPS, qwen3_config
    from common import build_ours, default_dtype, small_cfg
    from transformers import Qwen3ForCausalLM

    from fluxion.config import DEBUG_VAE, FLUX2_AE, PRESETS, TextEncoderConfig
    from fluxion.text.encoder import TextEncoder
    from fluxion.vae.autoencoder import AutoEncoder
    from fluxion.weights.models import Models

    spec = PRESETS["flux2-klein-4b"]
    tcfg = small_cfg(spec.transformer) if smoke else spec.transformer
    qcfg = qwen3_config(smoke)
    qcfg._attn_implementation = "sdpa"
    te_cfg = dataclasses.replace(spec.text, hidden_layers=TAPS, hidden_size=qcfg.hidden_size)
    te_cfg = te_cfg if isinstance(te_cfg, TextEncoderConfig) else spec.text
    with default_dtype(torch.float32 if smoke else torch.bfloat16), torch.device(device):  # CPU bf16 is slow
        hf = Qwen3ForCausalLM(qcfg).eval().requires_grad_(False)

    class RandomTokens(TextEncoder):
        """The real-size encoder on token ids drawn from the prompt (no tokenizer offline)."""

        def tokenize(self, prompts):
            ids = []
            for p in prompts:
                g = torch.Generator().manual_seed(abs(hash(p)) % 2**31)
                ids.append(torch.randint(0, qcfg.vocab_size, (te_cfg.max_length,), generator=g))
            ids = torch.stack(ids)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def encode(self, prompts, *, dtype=torch.bfloat16):
            return self.encode_tokens(self.tokenize(list(prompts)), dtype=dtype)

        def token_counts(self, prompts):  # every prompt is exactly max_length ids here
            return [te_cfg.max_length] * len(prompts)

    te = RandomTokens(hf, tokenizer=None, cfg=te_cfg)
    model = build_ours(tcfg, device=device, dtype=torch.bfloat16 if not smoke else torch.float32)
    with torch.device(device):
        vae = AutoEncoder(DEBUG_VAE if smoke else FLUX2_AE).eval().requires_grad_(False)
    vae.bn.running_mean.zero_()
    vae.bn.running_var.fill_(1.0)
    vae_cfg = DEBUG_VAE if smoke else FLUX2_AE
    spec = dataclasses.replace(spec, transformer=tcfg, vae=vae_cfg, text=te_cfg)
    dtype = torch.float32 if smoke else torch.bfloat16
    return Models(
        spec=spec, transformer=model, vae=vae, text=te, device=torch.device(device), dtype=dtype
    ), hf


class InProcessServer:
    """The product in one process (API + worker, SQLite), on models built once; `naive`: batch 1 and no overlap
    (each request encoded, denoised, decoded, encoded and stored in turn: one request at a time)."""

    def __init__(
        self, models, max_batch: int, port: int, overlap: bool = True, watermark: bool = False, previews=True
    ):
        import uvicorn

        from fluxion.serve.app import create_app
        from fluxion.serve.config import ServeConfig

        self.dir = tempfile.mkdtemp(prefix="bench-serve-")
        self.cfg = ServeConfig(
            models=(("flux-2-klein-4b", None),),
            preset="flux2-klein-4b",
            db=f"sqlite:///{self.dir}/jobs.db",
            port=port,
            auth="off",
            key_limit=100_000,
            max_batch=max_batch,
            poll_s=0.005,
            overlap=overlap,
            watermark=watermark,
            live_previews=previews,
        )
        app = create_app(self.cfg, models={"flux-2-klein-4b": models})
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"
        import httpx

        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def engine_stats(url: str) -> dict:
    """The worker's counters from /metrics: jobs admitted into a running batch (continuous batching), forwards
    and rows denoised, seconds in denoising steps."""
    import httpx

    vals = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            vals[name] = float(value)
    return {
        "admitted": vals.get("fluxion_admitted_total", 0.0),
        "forwards": vals.get("fluxion_step_rows_count", 0.0),
        "rows": vals.get("fluxion_step_rows_sum", 0.0),
        "step_s": vals.get("fluxion_step_seconds_sum", 0.0),
        "start_wait_s": vals.get("fluxion_start_wait_seconds_sum", 0.0),
        "started": vals.get("fluxion_start_wait_seconds_count", 0.0),
        "finish_s": vals.get("fluxion_finish_seconds_sum", 0.0),
        "finished": vals.get("fluxion_finish_seconds_count", 0.0),
    }


def stats_delta(before: dict, after: dict) -> dict:
    d = {k: after[k] - before[k] for k in before}
    return {
        "admitted_mid_flight": int(d["admitted"]),
        "continuous_batching_used": d["admitted"] > 0,  # some job joined a batch already denoising
        "batching_used": d["rows"] > d["forwards"],  # some forward denoised more than one job
        "mean_rows_per_forward": round(d["rows"] / d["forwards"], 3) if d["forwards"] else None,
        "denoise_s": round(d["step_s"], 3),
        # inside the worker, per job: claim -> first step (prompt encoding + waiting for a free row), and the
        # finished row's decode + moderation + image encode + store (continuous-batching rows only)
        "mean_start_wait_s": round(d["start_wait_s"] / d["started"], 4) if d["started"] else None,
        "mean_finish_s": round(d["finish_s"] / d["finished"], 4) if d["finished"] else None,
    }


def overhead(row: dict, refs: dict, precision: str, size: int, max_batch: int):
    """Server time per image over the library's (`pipeline.generate`, warm, no HTTP / store / image encode) at
    the batch the server could form, in %: at concurrency 1 the p50 latency against one generate call;
    above, the inverse throughput against generate at batch min(concurrency, max_batch)."""
    c = row["concurrency"]
    b = min(c, max_batch)
    ref_b = max((k[2] for k in refs if k[:2] == (precision, size) and k[2] <= b), default=None)
    if ref_b is None or not row["ok"]:
        return None, None
    ref = refs[(precision, size, ref_b)]
    mine = row["p50_s"] if c == 1 else 60.0 / row["images_per_min"]
    return round(100.0 * (mine / ref - 1.0), 2), f"pipeline.generate batch {ref_b}"


def library_rows(models, sizes, steps, batches, precision, report, refs, deadline, smoke) -> None:
    """Warm `pipeline.generate` (prompts in, PIL images out) at batch B: the GPU time per image the server is
    measured against."""
    import torch

    from fluxion.request import Request
    from fluxion.sampling.pipeline import generate

    for size in sizes:
        for B in batches:
            if time.time() > deadline:
                print(f"budget spent: skipping {precision} library {size}² batch {B}")
                continue
            req = Request(
                prompt=[f"library prompt {i}" for i in range(B)],
                seeds=tuple(range(B)),
                width=size,
                height=size,
                steps=steps,
            )
            generate(models, req)  # warm (cuDNN / cuBLAS picks for this shape)
            times = []
            for _ in range(1 if smoke else (4 if B == 1 else 2)):
                if models.device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                generate(models, req)
                if models.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            per_image = statistics.median(times) / B
            refs[(precision, size, B)] = per_image
            report.add(
                {
                    "label": f"klein-4B {size}² {precision} pipeline.generate batch {B}",
                    "kind": "library",
                    "size": size,
                    "steps": steps,
                    "precision": precision,
                    "batch": B,
                    "n": B * len(times),
                    "concurrency": 1,
                    "ok": B * len(times),
                    "errors": [],
                    "wall_s": sum(times),
                    "images_per_min": 60.0 / per_image,
                    "s_per_image": per_image,
                    "p50_s": statistics.median(times),
                    "p95_s": max(times),
                    "p99_s": max(times),
                }
            )


def gpu(args, report: Report) -> None:
    import socket

    import torch

    from fluxion.accel import AccelOptions, apply

    deadline = time.time() + args.budget_s  # model building counts too: the whole run stays under budget
    device = "cpu" if args.smoke else "cuda"
    models, hf = build_models(args.smoke, device)
    steps = 4
    sizes = (64, 128) if args.smoke else (512, 1024)
    fast = "math" if args.smoke else "cudnn"
    compiled = (
        dict(compile=True, compile_dynamic=None) if args.compile else {}
    )  # one graph for all batch sizes
    refs: dict = {}  # (precision, size, batch) -> library seconds per image
    mb = args.max_batch
    report.data["meta"].update(
        {
            "engine": "continuous batching (admission at step boundaries)"
            + (
                ""
                if args.no_overlap
                else " + overlap threads (prefetch encode, finisher decode/encode/store)"
            ),
            "max_batch": mb,
            "compile": bool(args.compile),
            "watermark": "off except the rows labelled '+ watermark'",
            "live_previews": "on except the rows labelled 'live previews off'",
        }
    )

    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def server_rows(precision: str, variants, sizes=sizes) -> None:
        for label, batch, overlap, watermark, levels, previews in variants:
            if time.time() > deadline:
                print(f"budget spent: skipping {precision} {label}")
                continue
            srv = InProcessServer(
                models, batch, port(), overlap=overlap, watermark=watermark, previews=previews
            )
            try:
                for size in sizes:
                    warm = min(batch, 8)  # the batch sizes this server forms, before the timed rows
                    run_clients(srv.url, "flux-2-klein-4b", warm, warm, size, steps, 0)
                    for c in levels:
                        if time.time() > deadline:
                            print(f"budget spent: skipping {precision} {label} {size}² c={c}")
                            continue
                        if args.smoke:
                            n = max(2, c)
                        elif (
                            batch == 1
                        ):  # one at a time: its rate does not depend on c; one request per client
                            n = {1: 6, 8: 16}.get(c, c)
                        else:
                            n = {1: 6, 8: 32 if size <= 512 else 24}.get(c, 3 * c if size <= 512 else 2 * c)
                        # longer rows: the ramp-up and the drain at the end weigh less in the rate
                        n = max(1, round(n * args.n_factor))
                        before = engine_stats(srv.url)
                        row = clients_subprocess(srv.url, "flux-2-klein-4b", n, c, size, steps, 0)
                        row.update(stats_delta(before, engine_stats(srv.url)))
                        row.update(
                            {
                                "label": f"klein-4B {size}² {precision} {label}",
                                "kind": "naive" if batch == 1 and not overlap else "server",
                                "size": size,
                                "steps": steps,
                                "precision": precision,
                                "max_batch": batch,
                                "overlap": overlap,
                                "watermark": watermark,
                                "live_previews": previews,
                            }
                        )
                        pct, against = overhead(row, refs, precision, size, batch)
                        row["server_overhead_pct"], row["overhead_vs"] = pct, against
                        report.add(row)
            finally:
                srv.stop()

    levels = (1, 8) if args.smoke else (1, 8, 32)
    # (label, max batch, overlap, watermark, concurrency levels, live previews)
    server = [(f"server (continuous batching, max batch {mb})", mb, not args.no_overlap, False, levels, True)]
    naive = [("naive server (batch 1, one request at a time)", 1, False, False, levels, True)]
    # what the live thumbnails cost the server (c > 1)
    off = [(f"server (max batch {mb}), live previews off", mb, not args.no_overlap, False, levels[1:], False)]
    precisions = args.precisions.split(",")
    # In order of importance (rows stop at the budget): bf16 library reference, server and naive server;
    # diffusers on the same bf16 weights (before fp8 converts them in place); then fp8 through the same; last
    # the cost of the invisible watermark (on by default in `fluxion serve`).
    if "bf16" in precisions:
        apply(models.transformer, AccelOptions(attention=fast, **compiled))
        library_rows(models, sizes, steps, (1, mb), "bf16", report, refs, deadline, args.smoke)
        if not args.skip_bf16_server:
            server_rows("bf16", server + (off if args.previews_off else []) + naive)
    if not args.no_diffusers:
        diffusers_loop(args, models, hf, sizes, steps, report, deadline)
    if "fp8" not in precisions:
        return
    if args.smoke:
        apply(models.transformer, AccelOptions(attention=fast))  # no fp8 kernels on the CPU: the path only
    else:
        if args.compile:
            torch._dynamo.reset()
        apply(models.transformer, AccelOptions(attention=fast, fp8=True, **compiled))
    library_rows(models, sizes, steps, (1, mb), "fp8", report, refs, deadline, args.smoke)
    server_rows("fp8", server + (off if args.previews_off else []) + naive)
    wm = [(f"server (max batch {mb}) + watermark", mb, not args.no_overlap, True, (8,), True)]
    server_rows("fp8", wm, sizes=sizes[-1:])


def diffusers_loop(args, models, hf, sizes, steps, report, deadline) -> None:
    """diffusers' Flux2KleinPipeline on the same weights (bf16, eager), one image per call; the text encoder runs
    all 36 layers as diffusers does (token ids instead of a tokenizer)."""
    import torch

    try:
        from common import build_diffusers_sharing
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

        from fluxion.weights.load import diffusers_vae_config
        from fluxion.weights.vae_mapping import vae_bfl_to_diffusers
    except ImportError as e:
        print(f"diffusers loop skipped: {e}")
        return
    import inspect

    device = models.device
    if time.time() > deadline:
        print("budget spent: skipping diffusers")
        return
    dm = build_diffusers_sharing(models.transformer).to(device)  # same storage: no second copy of the weights
    accepted = inspect.signature(AutoencoderKLFlux2.__init__).parameters
    kw = {k: v for k, v in diffusers_vae_config(models.vae.cfg).items() if k in accepted}
    with torch.device("meta"):
        dv = AutoencoderKLFlux2(**kw)
    dv.load_state_dict(vae_bfl_to_diffusers(models.vae.state_dict()), strict=True, assign=True)
    # bf16 as a diffusers user loads it (torch_dtype=bfloat16): its pipeline hands the VAE latents in the
    # transformer's dtype without casting, so an fp32 VAE fails on the first decode.
    dv = dv.to(device, models.dtype).eval()
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    pipe = Flux2KleinPipeline(
        scheduler=sched, vae=dv, text_encoder=hf, tokenizer=None, transformer=dm, is_distilled=True
    )
    pipe.set_progress_bar_config(disable=True)
    te = models.text

    def one(i, size):
        ids = te.tokenize([f"bench prompt {i}"])
        ids = {k: v.to(device) for k, v in ids.items()}
        hs = hf(**ids, output_hidden_states=True, use_cache=False).hidden_states  # all layers, as diffusers
        L = ids["input_ids"].shape[1]
        emb = torch.stack([hs[k] for k in te.cfg.hidden_layers], 1).permute(0, 2, 1, 3).reshape(1, L, -1)
        emb = emb[..., : models.spec.transformer.context_in_dim]
        g = torch.Generator(device).manual_seed(i)
        pipe(
            prompt_embeds=emb.to(models.dtype),
            height=size,
            width=size,
            num_inference_steps=steps,
            generator=g,
            output_type="pil",
            guidance_scale=1.0,  # distilled: no guidance (silences its warning)
        )

    with torch.no_grad():
        for size in sizes:
            if time.time() > deadline:
                print(f"budget spent: skipping diffusers {size}")
                continue
            one(0, size)  # warm
            n, lat = 4 if args.smoke else 12, []
            t0 = time.perf_counter()
            for i in range(n):
                t = time.perf_counter()
                one(i + 1, size)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                lat.append(time.perf_counter() - t)
            wall = time.perf_counter() - t0
            lat.sort()
            report.add(
                {
                    "label": f"klein-4B {size}² bf16 diffusers pipeline loop",
                    "size": size,
                    "steps": steps,
                    "n": n,
                    "concurrency": 1,
                    "ok": n,
                    "errors": [],
                    "wall_s": wall,
                    "images_per_min": 60 * n / wall,
                    "p50_s": lat[n // 2],
                    "p95_s": lat[-1],
                    "p99_s": lat[-1],
                }
            )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        url, model, n, c, size, steps, poll = sys.argv[2:9]
        print(json.dumps(run_clients(url, model, int(n), int(c), int(size), int(steps), float(poll))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="klein-4B real size on one GPU")
    ap.add_argument("--smoke", action="store_true", help="with --gpu: the same code at toy sizes on the CPU")
    ap.add_argument("--quick", action="store_true", help="CPU: one round per concurrency level")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--n-min", type=int, default=16, help="CPU: requests per concurrency level (at least)")
    ap.add_argument(
        "--skip-bf16-server", action="store_true", help="GPU: no bf16 server rows (library rows still run)"
    )
    ap.add_argument("--precisions", default="bf16,fp8", help="GPU: which of bf16,fp8 to run (in that order)")
    ap.add_argument(
        "--n-factor", type=float, default=1.0, help="GPU: requests per row x this (steadier rates)"
    )
    ap.add_argument("--no-diffusers", action="store_true", help="GPU: skip the diffusers loop")
    ap.add_argument(
        "--previews-off",
        action="store_true",
        help="GPU: also the server without live previews (c>1), each precision",
    )
    ap.add_argument("--budget-s", type=float, default=330, help="GPU: start no new row after this (s)")
    ap.add_argument(
        "--no-overlap",
        action="store_true",
        help="GPU: the batching server without its prefetch / finisher threads (as `fluxion serve --no-overlap`)",
    )
    ap.add_argument(
        "--compile", action="store_true", help="GPU: regional compile, dynamic batch (slow start)"
    )
    args = ap.parse_args()
    if not args.n_factor > 0:
        ap.error(f"--n-factor must be positive, got {args.n_factor}")
    if not args.precisions or set(args.precisions.split(",")) - {"bf16", "fp8"}:
        ap.error(f"--precisions: a comma-separated subset of bf16,fp8, got {args.precisions!r}")
    sys.path.insert(0, str(HERE))
    import torch

    if args.smoke:
        torch.set_num_threads(1)  # toy sizes: threads only add synchronisation (and spin on a shared CPU)

    meta = {"mode": "gpu" if args.gpu else "cpu-tiny", "smoke": args.smoke, "torch": torch.__version__}
    if torch.cuda.is_available():
        meta["device"] = torch.cuda.get_device_name()
    report = Report(Path(args.out) / "bench_serve.json", meta)
    (gpu if args.gpu else tiny)(args, report)
    print(f"wrote {report.path}")


if __name__ == "__main__":
    main()
