"""Diffusion-DPO for flow matching (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
Optimization", adapted from epsilon-MSE to velocity MSE), as a training objective for any FLUX.2 model, full
fine-tune or LoRA.

For a pair (winner w, loser l) of images for one prompt, one time t and one noise draw shared by both:
    err_w = ||v_theta(x_t^w, t) - (noise - x0^w)||^2 (mean over tokens and channels), err_l likewise,
    err_w_ref, err_l_ref the same under the frozen reference model, and
    loss = -log sigmoid(-beta / 2 * ((err_w - err_w_ref) - (err_l - err_l_ref))).
The policy is pushed to lower its error on winners relative to the reference more than on losers. The time
weighting of the flow-matching objective is kept by drawing t exactly as pre-training does (logit-normal,
shifted by the image's mu): each pair's term has weight 1 under that distribution, as each term of the
flow-matching loss does. With policy == reference the argument is 0 and the loss is log 2.

Pairs: a tinyset-like folder with images.npy and pairs.jsonl lines {"prompt": str, "win": i, "lose": j}
(what `python -m fluxion.train.pairs` writes from fluxion's own generations and automatic rewards).

Reference: `reference=` weights if given; for a LoRA run without one, the policy with its adapters switched
off (the base model, no second copy in memory); otherwise the `init` weights, loaded frozen.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fluxion.model.transformer import Flux2
from fluxion.sampling.ids import image_ids, text_ids
from fluxion.train.config import TrainConfig
from fluxion.train.data import Sample, to_tensor
from fluxion.train.flow_matching import interpolate, sample_times
from fluxion.train.objectives import add_char_codes, encode_context, encode_latents, forward_velocity
from fluxion.weights.models import Models


def dpo_loss(err_w: Tensor, err_l: Tensor, err_w_ref: Tensor, err_l_ref: Tensor, beta: float) -> Tensor:
    """Mean over pairs of -log sigmoid(-beta/2 * ((err_w - err_w_ref) - (err_l - err_l_ref))); inputs [B]."""
    inside = -0.5 * beta * ((err_w - err_w_ref) - (err_l - err_l_ref))
    return -F.logsigmoid(inside).mean()


def per_sample_error(pred: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """[B] velocity MSE per sample (mean over tokens and channels), in fp32."""
    return ((pred.float() - (noise.float() - x0.float())) ** 2).mean(dim=tuple(range(1, pred.ndim)))


class PairSet:
    """A preference-pair folder: images.npy uint8 [N, H, W, 3] and pairs.jsonl {"prompt", "win", "lose"}."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        for name in ("images.npy", "pairs.jsonl"):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder} is not a preference-pair folder ({name} is missing); make one with "
                    "python -m fluxion.train.pairs"
                )
        self.folder = folder
        self.images = np.load(folder / "images.npy", mmap_mode="r")
        self.pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines() if line]
        if not self.pairs:
            raise ValueError(f"{folder}/pairs.jsonl holds no pairs")
        n = len(self.images)
        bad = [p for p in self.pairs if not (0 <= p["win"] < n and 0 <= p["lose"] < n)]
        if bad:
            raise ValueError(f"{folder}: pair {bad[0]} names an image outside images.npy ({n} images)")

    def __len__(self) -> int:
        return len(self.pairs)

    def pair(self, index: int) -> tuple[Sample, Sample]:
        p = self.pairs[index]
        w, l = p["win"], p["lose"]
        key = f"{self.folder}:"
        return (
            Sample(to_tensor(self.images[w]), p["prompt"], key=key + str(w)),
            Sample(to_tensor(self.images[l]), p["prompt"], key=key + str(l)),
        )


class PairSampler:
    """Endless batches of pairs from one folder at a time (equal image sizes inside a batch)."""

    def __init__(self, sets: list[PairSet], batch_size: int, seed: int):
        self.sets, self.batch_size, self.rng = sets, batch_size, random.Random(seed)

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])

    def next_batch(self) -> list[tuple[Sample, Sample]]:
        src = self.rng.choices(self.sets, weights=[len(s) for s in self.sets])[0]
        return [src.pair(self.rng.randrange(len(src))) for _ in range(self.batch_size)]


@contextmanager
def adapters_off(model: torch.nn.Module):
    """The base model of a LoRA run: every adapter's scale 0 for the duration (outputs are then exactly the
    base layer's), restored afterwards."""
    from fluxion.lora.lora import LoRALinear

    saved = []
    for m in model.modules():
        if isinstance(m, LoRALinear):
            for adapter in m.lora.values():
                saved.append((adapter, adapter.scale))
                adapter.scale = 0.0
    try:
        yield
    finally:
        for adapter, scale in saved:
            adapter.scale = scale


def attach_shipped_char_encoder(model: Flux2, weights: str, cfg: TrainConfig, device) -> None:
    """A frozen reference / teacher gets the character encoder shipped beside its weights, if any."""
    if not cfg.char_encoder:
        return
    from fluxion.text.charenc import charenc_beside, load_char_encoder

    found = charenc_beside(weights)
    if found is not None:
        model.char_encoder = load_char_encoder(found, model.cfg.context_in_dim, device)


class DiffusionDPO:
    name = "dpo"

    def __init__(self, cfg: TrainConfig, models: Models, cache: Path | None, device: torch.device):
        self.cfg, self.cache = cfg, cache
        self.reference: Flux2 | None = None
        source = cfg.reference or (None if cfg.lora_rank else cfg.init)
        if source is None and not cfg.lora_rank:
            raise ValueError(
                "objective dpo fine-tunes a trained model: give init= (and optionally reference=)"
            )
        if source is not None:
            from fluxion.weights.load import load_transformer

            self.reference = load_transformer(
                source, models.spec.transformer, dtype=torch.float32, device=device
            )
            attach_shipped_char_encoder(self.reference, source, cfg, device)
            self.reference.eval().requires_grad_(False)

    def sampler(self, cfg: TrainConfig, rank: int) -> PairSampler:
        return PairSampler([PairSet(p) for p in cfg.data], cfg.batch_size, cfg.seed + rank)

    def batch(self, models: Models, pairs: list[tuple[Sample, Sample]], gen: torch.Generator) -> dict:
        device = models.device
        wins, loses = [p[0] for p in pairs], [p[1] for p in pairs]
        xw, h, w = encode_latents(models, [s.image for s in wins], [s.key for s in wins], self.cache)
        xl, _, _ = encode_latents(models, [s.image for s in loses], [s.key for s in loses], self.cache)
        B = xw.shape[0]
        prompts = [s.caption for s in wins]
        ctx = encode_context(models, prompts)
        t = sample_times(B, xw.shape[1], generator=gen, device=device)
        noise = torch.randn(xw.shape, generator=gen, device=device)  # shared by winner and loser
        x0 = torch.cat([xw, xl])
        noise2, t2 = torch.cat([noise, noise]), torch.cat([t, t])
        batch = {
            "x0": x0,
            "noise": noise2,
            "t": t2,
            "x_t": interpolate(x0, noise2, t2),
            "x_ids": image_ids(h, w, batch=2 * B, device=device),
            "ctx": torch.cat([ctx, ctx]),
            "ctx_ids": text_ids(ctx.shape[1], 2 * B, device),
            "refs": None,
        }
        add_char_codes(self.cfg, prompts + prompts, batch, device)
        return batch

    def errors(self, model: Flux2, batch: dict) -> tuple[Tensor, Tensor]:
        pred = forward_velocity(model, batch["x_t"], batch["x_ids"], batch["t"], batch["ctx"], batch)
        return per_sample_error(pred, batch["x0"], batch["noise"]).chunk(2)

    def loss(self, model: Flux2, batch: dict) -> tuple[Tensor, dict[str, float]]:
        err_w, err_l = self.errors(model, batch)
        with torch.no_grad():
            if self.reference is not None:
                ref_w, ref_l = self.errors(self.reference, batch)
            else:
                with adapters_off(model):
                    ref_w, ref_l = self.errors(model, batch)
        loss = dpo_loss(err_w, err_l, ref_w, ref_l, self.cfg.dpo_beta)
        margin = ((ref_w - err_w) - (ref_l - err_l)).detach()
        return loss, {"dpo_acc": float((margin > 0).float().mean()), "dpo_margin": float(margin.mean())}
