"""The server's configuration (one frozen dataclass; `fluxion serve` flags map onto its fields) and the table of
served models with their endpoint names."""

from __future__ import annotations

from dataclasses import dataclass, field

from fluxion.config import ModelSpec

# Preset -> BFL endpoint name (flux-2-dev and the base models have no hosted BFL endpoint; they get BFL-style
# names of their own). Every served model is also reachable under its local name.
BFL_ENDPOINTS = {
    "flux2-dev": "flux-2-dev",
    "flux2-klein-4b": "flux-2-klein-4b",
    "flux2-klein-9b": "flux-2-klein-9b",
    "flux2-klein-9b-kv": "flux-2-klein-9b-preview",
    "flux2-klein-base-4b": "flux-2-klein-base-4b",
    "flux2-klein-base-9b": "flux-2-klein-base-9b",
}


@dataclass(frozen=True)
class ServeConfig:
    models: tuple[tuple[str, str | None], ...] = (("fluxion-tiny", None),)  # (local name, checkpoint path)
    preset: str | None = None  # for checkpoints whose preset cannot be read off the file
    db: str = "sqlite:///fluxion-serve.db"
    host: str = "127.0.0.1"
    port: int = 8000
    role: str = "all"  # all | api | worker
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # bf16 | fp16 | fp32 (None: bf16 on CUDA, fp32 on CPU)
    public_url: str | None = None  # base of polling_url / sample URLs; None: http://host:port
    auth: str = "auto"  # on | off | auto (on as soon as one key exists)
    key_limit: int = 24  # active (queued + running) tasks per key -> 429 beyond (BFL's default)
    queue_cap: int = 10_000  # queued jobs in the whole store -> 503 beyond
    max_mp: float = 4.0  # largest output in megapixels this deployment accepts (GPU memory) -> 422 beyond
    max_batch: int = 8  # jobs of one shape run together (rows of one continuously refilled batch)
    overlap: bool = (
        True  # text encoding and decode + encode + store of finished rows on threads (engine.Overlap)
    )
    # A free row waits for the prompts being encoded for it at most this fraction of the last step's time (on
    # CUDA that step is still running, so a wait shorter than it costs no GPU time); 0: never wait.
    admit_wait: float = 0.5
    lease_s: float = 30.0  # a worker that misses its heartbeats this long has its jobs requeued
    max_attempts: int = 3
    poll_s: float = 0.05  # how often an idle worker looks for work
    result_ttl_s: float = 600.0  # sample URLs expire after this (BFL: 10 minutes)
    allow_url_prefixes: tuple[str, ...] = ()  # http(s) input_image URLs accepted only from these
    allow_private_webhooks: bool = False  # loopback / private / link-local webhook targets (tests, LANs)
    prices: str | None = None  # JSON price table overriding BFL's
    blocklist: str | None = None  # moderation terms
    max_body_mb: float = 64.0
    sync_timeout_s: float = 600.0  # OpenAI (synchronous) requests wait at most this long
    metrics_port: int | None = None  # --role worker: serve its /metrics here
    worker_id: str | None = None
    # The studio (issue 12): provenance, moderation, LoRAs, upsampling, a remote text encoder.
    watermark: bool = True  # invisible watermark on every served image (fluxion.provenance)
    live_previews: bool = True  # a thumbnail per step (<= 4/s) in the store for the page / the event stream
    c2pa_cert: str | None = None  # PEM certificate chain: sign a C2PA manifest into every image
    c2pa_key: str | None = None  # its PEM private key
    nsfw: bool = False  # run the optional NSFW image classifier (extra [nsfw]: nudenet, AGPL weights)
    lora_dir: str | None = None  # per-request LoRAs: *.safetensors files in this folder, by file stem
    upsampler: str | None = None  # transformers folder of a chat LLM for prompt_upsampling (None: refused)
    text: str | None = None  # http(s) URL of a `fluxion serve --role text-encoder` (None: load it here)
    prompt_cache: str | None = None  # folder of cached prompt embeddings in front of the text encoder

    def __post_init__(self):
        if not 0 <= self.admit_wait <= 100:
            raise ValueError(
                f"admit_wait (--admit-wait) is a fraction of a step in [0, 100], got {self.admit_wait}"
            )

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


@dataclass(frozen=True)
class Served:
    name: str  # the local name
    path: str | None
    spec: ModelSpec
    aliases: tuple[str, ...] = field(default=())  # BFL endpoint names

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def served_models(cfg: ServeConfig) -> list[Served]:
    """Each configured model's spec, read without loading the weights (the API role never loads them)."""
    from fluxion.config import get_preset
    from fluxion.weights.models import embedded_spec, is_embedded, resolve_preset

    out = []
    for name, path in cfg.models:
        if path in (
            None,
            "fluxion-tiny",
        ):  # the embedded model (or, with preset, models handed to create_app)
            spec = get_preset(cfg.preset or "fluxion-tiny")
        elif is_embedded(path):  # fluxion-tiny-base (refused where this build does not ship it)
            spec = embedded_spec(path)
        else:
            spec = resolve_preset(path, cfg.preset)
        alias = BFL_ENDPOINTS.get(spec.name)
        out.append(Served(name, path, spec, (alias,) if alias and alias != name else ()))
    seen: dict[str, str] = {}
    for s in out:
        for n in s.names:
            if n in seen:
                raise ValueError(
                    f"two served models answer to {n!r}; give them distinct names (--model NAME=PATH)"
                )
            seen[n] = s.name
    return out
