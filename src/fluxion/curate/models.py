"""Stages that run a model: the watermark classifier, score heads on image embeddings, and VLM captioning.

Each loads its weights in `setup()` (once per Ray actor), runs batched, and takes `device` from its config so a
GPU stage is the same code with `device = "cuda"` and `num_gpus` set in the recipe. torch is imported inside the
stages: a recipe without model stages never pays for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fluxion.curate.stages import Stage, drop, rgb


# --- watermark ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WatermarkConfig:
    weights: str = ""  # "" = the classifier shipped in fluxion/assets/watermark
    threshold: float = 0.5  # drop when P(watermark) >= threshold
    batch_size: int = 64
    device: str = "cpu"
    num_gpus: float = 0.0


class Watermark(Stage):
    name = "watermark"
    schema = {"watermark": "float64"}
    stateful = True

    def __init__(self, cfg: WatermarkConfig):
        self.cfg = cfg
        self.num_gpus = cfg.num_gpus

    def setup(self) -> None:
        from fluxion.curate.watermark import ASSET, load_classifier

        self.model = load_classifier(self.cfg.weights or ASSET).to(self.cfg.device)

    def process(self, rows: list[dict]) -> None:
        import torch

        from fluxion.curate.watermark import to_input

        bs = self.cfg.batch_size
        for s in range(0, len(rows), bs):
            chunk = rows[s : s + bs]
            x = to_input([rgb(r) for r in chunk]).to(self.cfg.device)
            with torch.no_grad():
                probs = torch.sigmoid(self.model(x)).float().cpu().tolist()
            for row, p in zip(chunk, probs):
                row["watermark"] = p
                if p >= self.cfg.threshold:
                    drop(row, self.name, f"watermark: p={p:.2f} >= {self.cfg.threshold}")


# --- score heads on embeddings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadConfig:
    """An MLP head on the embedding, weights from the operator: a .safetensors file with `layers.{i}.weight` /
    `layers.{i}.bias` for i = 0..n-1 (ReLU between layers), e.g. the LAION aesthetic MLP's Linear layers
    re-saved under those names. The score is the last layer's first output (after a sigmoid if `sigmoid`)."""

    name: str  # the manifest column is score_<name>
    weights: str
    min: float = float("-inf")  # drop when score < min
    max: float = float("inf")  # drop when score > max (NSFW)
    sigmoid: bool = False
    normalize: bool = True  # L2-normalise the embedding first (LAION's heads expect it)


@dataclass(frozen=True)
class ScoresConfig:
    """`embedder`: "open_clip" (needs the open_clip extra: `model` e.g. "ViT-L-14" and `pretrained` a local
    weights file) or "thumbnail" (an 8x8x3 colour thumbnail, 192-d: no weights, for tests and as a cheap
    semantic-dedup signal)."""

    embedder: str = "thumbnail"
    model: str = ""
    pretrained: str = ""
    heads: tuple[HeadConfig, ...] = ()
    keep_embedding: bool = False  # store the embedding (float32 bytes) for semantic dedup
    batch_size: int = 64
    device: str = "cpu"
    num_gpus: float = 0.0


def load_head(path: str | Path) -> list:
    """[(weight, bias)] float32 tensors of each layer."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"score head weights not found: {path}")
    sd = load_file(path)
    layers, i = [], 0
    while f"layers.{i}.weight" in sd:
        layers.append((sd.pop(f"layers.{i}.weight").float(), sd.pop(f"layers.{i}.bias").float()))
        i += 1
    if not layers or sd:
        raise ValueError(
            f"{path}: a score head holds layers.{{i}}.weight/bias only"
            + (f"; unexpected keys: {', '.join(sorted(sd))}" if sd else "; none found")
        )
    return layers


class Scores(Stage):
    name = "scores"
    stateful = True

    def __init__(self, cfg: ScoresConfig):
        if cfg.embedder not in ("open_clip", "thumbnail"):
            raise ValueError(f"scores.embedder must be open_clip or thumbnail, not {cfg.embedder!r}")
        self.cfg = cfg
        self.num_gpus = cfg.num_gpus
        self.schema = {f"score_{h.name}": "float64" for h in cfg.heads}
        if cfg.keep_embedding:
            self.schema["embedding"] = "binary"

    def setup(self) -> None:
        c = self.cfg
        self.heads = [
            (h, [(w.to(c.device), b.to(c.device)) for w, b in load_head(h.weights)]) for h in c.heads
        ]
        if c.embedder == "open_clip":
            try:
                import open_clip
            except ImportError:
                raise ValueError("scores.embedder = open_clip needs `pip install open_clip_torch`") from None
            if not Path(c.pretrained).is_file():
                raise FileNotFoundError(f"open_clip weights not found: {c.pretrained!r} (scores.pretrained)")
            model, _, preprocess = open_clip.create_model_and_transforms(c.model, pretrained=c.pretrained)
            self.clip, self.preprocess = model.to(c.device).eval(), preprocess

    def embed(self, rows: list[dict]):
        import torch

        if self.cfg.embedder == "thumbnail":
            arr = np.stack([np.asarray(rgb(r).resize((8, 8), 2), np.float32).ravel() / 255.0 for r in rows])
            return torch.from_numpy(arr - arr.mean(1, keepdims=True)).to(self.cfg.device)
        x = torch.stack([self.preprocess(rgb(r)) for r in rows]).to(self.cfg.device)
        return self.clip.encode_image(x).float()

    def process(self, rows: list[dict]) -> None:
        import torch

        bs = self.cfg.batch_size
        for s in range(0, len(rows), bs):
            chunk = rows[s : s + bs]
            with torch.no_grad():
                emb = self.embed(chunk)
            if self.cfg.keep_embedding:
                for row, e in zip(chunk, emb.cpu().numpy().astype(np.float32)):
                    row["embedding"] = e.tobytes()
            for head, layers in self.heads:
                x = torch.nn.functional.normalize(emb, dim=-1) if head.normalize else emb
                for i, (w, b) in enumerate(layers):
                    x = x @ w.T + b
                    if i < len(layers) - 1:
                        x = torch.relu(x)
                score = torch.sigmoid(x[:, 0]) if head.sigmoid else x[:, 0]
                for row, v in zip(chunk, score.cpu().tolist()):
                    row[f"score_{head.name}"] = v
                    if row["dropped_by"]:
                        continue
                    if v < head.min:
                        drop(row, self.name, f"{head.name}: {v:.3f} < {head.min}")
                    elif v > head.max:
                        drop(row, self.name, f"{head.name}: {v:.3f} > {head.max}")


# --- captioning ---------------------------------------------------------------------------------------------------
LONG_PROMPT = (
    "Describe this image in detail for an image-generation training caption: the subject, its attributes and "
    "colours, the setting, the composition and camera view, the lighting and the style. Quote any visible text "
    "exactly. One paragraph, no preamble."
)
SHORT_PROMPT = "Write a one-sentence caption of this image (at most 20 words), no preamble."


@dataclass(frozen=True)
class CaptionConfig:
    """A VLM from a local transformers folder (anything AutoModelForImageTextToText + AutoProcessor load: Qwen2.5-VL,
    LLaVA, ...). Two captions per image, long and short (FLUX.2 trains on both styles). When the text stage ran,
    the OCR text is given to the model so typography is quoted correctly."""

    model: str
    long_prompt: str = LONG_PROMPT
    short_prompt: str = SHORT_PROMPT
    max_new_tokens_long: int = 256
    max_new_tokens_short: int = 40
    max_side: int = 768  # images are downscaled to this long side on the CPU worker before the processor
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    num_gpus: float = 0.0


class Caption(Stage):
    name = "caption"
    schema = {"caption_long": "string", "caption_short": "string"}
    stateful = True

    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg
        self.num_gpus = cfg.num_gpus

    def setup(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        c = self.cfg
        if not Path(c.model).is_dir():
            raise FileNotFoundError(f"caption.model must be a local transformers folder: {c.model}")
        self.processor = AutoProcessor.from_pretrained(c.model)
        self.processor.tokenizer.padding_side = "left"  # batched generation appends after the prompt
        self.model = AutoModelForImageTextToText.from_pretrained(c.model, dtype=getattr(torch, c.dtype))
        self.model.to(c.device).eval()

    def _generate(self, rows: list[dict], prompt: str, max_new_tokens: int) -> list[str]:
        c = self.cfg
        texts, images = [], []
        for row in rows:
            extra = f' The image contains the text: "{row["ocr_text"]}".' if row.get("ocr_text") else ""
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt + extra}]}
            ]
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True))
            im = rgb(row)
            if max(im.size) > c.max_side:
                im = im.copy()
                im.thumbnail((c.max_side, c.max_side))
            images.append(im)
        import torch

        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True).to(c.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    def process(self, rows: list[dict]) -> None:
        c = self.cfg
        for s in range(0, len(rows), c.batch_size):
            chunk = rows[s : s + c.batch_size]
            longs = self._generate(chunk, c.long_prompt, c.max_new_tokens_long)
            shorts = self._generate(chunk, c.short_prompt, c.max_new_tokens_short)
            for row, lo, sh in zip(chunk, longs, shorts):
                row["caption_long"], row["caption_short"] = lo, sh
