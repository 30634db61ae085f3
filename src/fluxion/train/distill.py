"""Step distillation with guidance distilled in: a student that samples in `student_steps` (<= 4) Euler steps
of one forward each, from a true-CFG teacher sampled in `teacher_steps` (20) steps of two forwards each - as
FLUX.2 [klein] is to [klein base].

Trajectory matching on the teacher's Euler trajectories, segment by segment. The student's schedule is
get_schedule(student_steps); for a segment [s_k, s_k+1] the teacher integrates x from s_k to s_k+1 in
m = teacher_steps / student_steps Euler sub-steps (evenly spaced in t inside the segment) with CFG at scale g;
the student must land on the same point in one step:

    target velocity  u = (x_teacher(s_k+1) - x(s_k)) / (s_k+1 - s_k),   loss = ||v_student(x(s_k), s_k) - u||^2.

The start point x(s_k) of segment k is the training image noised to s_k (k = 0 is pure noise, what sampling
starts from); each sample in a batch draws its own segment, so all segments train together. The student is
usually initialised from the teacher (`init` = `teacher`). One teacher segment costs m CFG passes, not 20.

Teacher: the `teacher=` weights, loaded frozen in fp32; for a LoRA run without a separate teacher (`teacher`
unset or equal to `init`), the trained model itself with its adapters switched off (the base, no second copy
in memory - a klein-base-4B teacher is ~16 GB in fp32). That teacher sees the trained model, which `batch` does
not, so its target is then computed in `loss`, before the student's forward; the random draws are the same.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from fluxion.config import get_preset
from fluxion.model.transformer import Flux2
from fluxion.sampling.ids import image_ids, text_ids
from fluxion.sampling.schedule import get_schedule
from fluxion.train.config import TrainConfig
from fluxion.train.data import Sample
from fluxion.train.dpo import adapters_off, attach_shipped_char_encoder
from fluxion.train.objectives import (
    FlowMatching,
    add_char_codes,
    add_references,
    encode_context,
    encode_latents,
    forward_velocity,
)
from fluxion.train.precision import precision_policy
from fluxion.weights.models import Models


def cfg_velocity(
    teacher: Flux2, x: Tensor, x_ids: Tensor, t: Tensor, ctx: Tensor, neg: Tensor, batch: dict, scale: float
) -> Tensor:
    """True CFG, both halves in one batch of 2B: v_u + scale * (v_c - v_u). t is per sample [B]."""
    both = {**batch, "ctx_ids": torch.cat([batch["ctx_ids"], batch["ctx_ids"]])}
    if batch.get("char_codes") is not None:  # the negative (empty) prompt has no quoted letters
        both["char_codes"] = torch.cat([torch.zeros_like(batch["char_codes"]), batch["char_codes"]])
    if batch.get("refs") is not None:
        both["refs"] = torch.cat([batch["refs"], batch["refs"]])
        both["ref_ids"] = torch.cat([batch["ref_ids"], batch["ref_ids"]])
    v = forward_velocity(
        teacher, torch.cat([x, x]), torch.cat([x_ids, x_ids]), torch.cat([t, t]), torch.cat([neg, ctx]), both
    )
    v_u, v_c = v.float().chunk(2)
    return v_u + scale * (v_c - v_u)


@torch.no_grad()
def teacher_segment(
    teacher: Flux2, x: Tensor, batch: dict, t_from: Tensor, t_to: Tensor, substeps: int, scale: float
) -> Tensor:
    """Euler with CFG from t_from to t_to [B] in `substeps` equal steps; fp32 state, like sampling."""
    x = x.float()
    for j in range(substeps):
        a = t_from + (t_to - t_from) * (j / substeps)
        b = t_from + (t_to - t_from) * ((j + 1) / substeps)
        v = cfg_velocity(teacher, x, batch["x_ids"], a, batch["ctx"], batch["neg_ctx"], batch, scale)
        x = x + (b - a).view(-1, 1, 1) * v
    return x


class StepDistillation(FlowMatching):
    """Its data and batches of samples are flow matching's (the sampler is inherited); `batch` adds the teacher's
    segment targets and `loss` matches them."""

    name = "distill"

    def __init__(self, cfg: TrainConfig, models: Models, cache: Path | None, device: torch.device):
        from fluxion.weights.load import load_transformer

        self.cfg, self.cache = cfg, cache
        spec = get_preset(cfg.teacher_model or cfg.model)
        # None: the teacher is the trained model with its LoRA adapters off, run in `loss`.
        self.teacher: Flux2 | None = None
        if not (cfg.lora_rank and cfg.teacher in (None, cfg.init)):  # TrainConfig checked the options
            self.teacher = load_transformer(cfg.teacher, spec.transformer, dtype=torch.float32, device=device)
            attach_shipped_char_encoder(self.teacher, cfg.teacher, cfg, device)
            self.teacher.eval().requires_grad_(False)
        self.scale = cfg.teacher_guidance if cfg.teacher_guidance is not None else spec.default_guidance
        self.substeps = cfg.teacher_steps // cfg.student_steps
        self.precision = precision_policy(cfg.compute_dtype, device)  # the teacher runs as the student does

    def batch(self, models: Models, samples: list[Sample], gen: torch.Generator) -> dict:
        device = models.device
        x0, h, w = encode_latents(models, [s.image for s in samples], [s.key for s in samples], self.cache)
        B, n = x0.shape[:2]
        drop = torch.rand(B, generator=gen, device=device) < self.cfg.caption_dropout
        prompts = ["" if d else s.caption for s, d in zip(samples, drop.tolist())]
        ctx = encode_context(models, prompts)
        neg = encode_context(models, [""]).expand(B, -1, -1)
        schedule = torch.tensor(get_schedule(self.cfg.student_steps, n), device=device)
        k = torch.randint(0, self.cfg.student_steps, (B,), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        s_from, s_to = schedule[k], schedule[k + 1]
        x = (1 - s_from).view(-1, 1, 1) * x0 + s_from.view(-1, 1, 1) * noise
        batch = {
            "x": x,
            "x_ids": image_ids(h, w, batch=B, device=device),
            "ctx": ctx,
            "neg_ctx": neg,
            "ctx_ids": text_ids(ctx.shape[1], B, device),
            "t": s_from,
            "refs": None,
            "ref_ids": None,
        }
        add_references(models, samples, batch, self.cache)
        add_char_codes(self.cfg, prompts, batch, device)
        batch["t_to"] = s_to
        if self.teacher is not None:
            batch["target"] = self.target(self.teacher, batch)
        return batch

    def target(self, teacher: Flux2, batch: dict) -> Tensor:
        """The teacher's segment velocity (x_teacher(s_k+1) - x(s_k)) / (s_k+1 - s_k), [B, n, C] fp32."""
        x, s_from, s_to = batch["x"], batch["t"], batch["t_to"]
        with torch.no_grad(), self.precision.autocast():
            x_next = teacher_segment(teacher, x, batch, s_from, s_to, self.substeps, self.scale)
        return (x_next - x.float()) / (s_to - s_from).view(-1, 1, 1)

    def loss(self, model: Flux2, batch: dict) -> tuple[Tensor, dict[str, float]]:
        target = batch.get("target")
        if target is None:  # LoRA: the teacher is the base, i.e. this model with its adapters off
            with adapters_off(model):
                target = self.target(model, batch)
        v = forward_velocity(model, batch["x"], batch["x_ids"], batch["t"], batch["ctx"], batch)
        return torch.mean((v.float() - target) ** 2), {}
