"""Training objectives on CPU with tiny components: Diffusion-DPO (hand-computed loss, log 2 at policy ==
reference, learns the preference, exact resume) and step distillation (the few-step student moves toward the
20-step CFG teacher)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fluxion.config import PRESETS
from fluxion.train.train import TrainConfig, main
from train_fixtures import TRAIN_SPEC, build_components

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_parts(tmp_path_factory.mktemp("objectives"))


def make_parts(root) -> dict:
    """The shared components plus preference pairs and a perturbed ("trained") init.safetensors under root."""
    parts = build_components(root)
    # Preference pairs over the fixture's four squares: warm colours (red, yellow) win over cool ones.
    pairs = root / "pairs"
    pairs.mkdir()
    images = np.load(f"{parts['data']}/images.npy")
    np.save(pairs / "images.npy", images)
    pairs_idx = [(0, 1), (0, 2), (3, 1), (3, 2)]  # fixture order: red, green, blue, yellow
    lines = [json.dumps({"prompt": "a square", "win": w, "lose": l}) for w, l in pairs_idx]
    (pairs / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    parts["pairs"] = str(pairs)
    # A "trained" model: the adaLN-Zero init perturbed so every layer (and the output) is non-trivial.
    from fluxion.model.init import init_weights
    from fluxion.model.transformer import Flux2

    model = Flux2(TRAIN_SPEC.transformer)
    init_weights(model, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "init.safetensors"))
    parts["init"] = str(root / "init.safetensors")
    return parts


@pytest.fixture(autouse=True)
def preset(monkeypatch):
    monkeypatch.setitem(PRESETS, TRAIN_SPEC.name, TRAIN_SPEC)


def config(parts, out, **kw):
    base = dict(
        model=TRAIN_SPEC.name,
        data=(parts["pairs"],),
        out=str(out),
        vae=parts["vae"],
        text=parts["text"],
        init=parts["init"],
        objective="dpo",
        steps=4,
        batch_size=4,
        lr=1e-3,
        warmup=1,
        log_every=1,
        caption_dropout=0.0,
        seed=2,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_dpo_loss_matches_a_hand_computation():
    from fluxion.train.dpo import dpo_loss

    err_w, err_l = torch.tensor([0.5, 0.2]), torch.tensor([0.3, 0.4])
    ref_w, ref_l = torch.tensor([0.4, 0.25]), torch.tensor([0.35, 0.3])
    beta = 2.0
    # pair 1: -beta/2 * ((0.5 - 0.4) - (0.3 - 0.35)) = -0.15; pair 2: -((0.2 - 0.25) - (0.4 - 0.3)) = +0.15
    expected = (math.log(1 + math.exp(0.15)) + math.log(1 + math.exp(-0.15))) / 2
    assert float(dpo_loss(err_w, err_l, ref_w, ref_l, beta)) == pytest.approx(expected, rel=1e-6)
    # A policy that lowers its winner error more than its loser error (relative to the reference) pays less.
    better = dpo_loss(
        torch.tensor([0.1]), torch.tensor([0.5]), torch.tensor([0.3]), torch.tensor([0.3]), 10.0
    )
    assert float(better) == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)


@pytest.mark.parametrize("lora", [0, 4])
def test_dpo_with_policy_equal_to_reference_gives_log_2(parts, tmp_path, lora):
    """Step 0: policy == reference (full fine-tune: both loaded from init; LoRA: zero-initialised adapters vs
    adapters off), so every pair's argument is 0."""
    result = main(config(parts, tmp_path / "run", steps=1, lora_rank=lora))
    assert result["losses"][0] == pytest.approx(math.log(2), abs=1e-6)


def _preference_margin(parts, weights: str) -> float:
    """Mean implicit reward margin (ref_w - err_w) - (ref_l - err_l) of `weights` against init, over 8 fixed
    draws of times and noise for every pair: > 0 when the model fits winners better than losers, relative to
    the reference."""
    from fluxion.train.dpo import DiffusionDPO
    from fluxion.train.loop import build_transformer, load_frozen

    cfg = config(parts, "unused", init=weights, reference=parts["init"], batch_size=4)
    policy = build_transformer(TRAIN_SPEC, cfg, torch.device("cpu")).eval()
    models = load_frozen(TRAIN_SPEC, cfg, policy, torch.device("cpu"))
    objective = DiffusionDPO(cfg, models, None, torch.device("cpu"))
    sampler, gen = objective.sampler(cfg, 0), torch.Generator().manual_seed(123)
    margins = []
    with torch.no_grad():
        for _ in range(8):
            batch = objective.batch(models, sampler.next_batch(), gen)
            err_w, err_l = objective.errors(policy, batch)
            ref_w, ref_l = objective.errors(objective.reference, batch)
            margins.append(float(((ref_w - err_w) - (ref_l - err_l)).mean()))
    return sum(margins) / len(margins)


def test_dpo_learns_the_preference_and_resumes_exactly(parts, tmp_path):
    kw = dict(steps=10, dpo_beta=1000.0, lr=1e-3)
    full = main(config(parts, tmp_path / "full", **kw))
    margin = _preference_margin(parts, full["exported"])
    print("dpo losses", [round(x, 4) for x in full["losses"]], "margin", margin)
    assert margin > 0  # the policy now fits the winners better than the losers, relative to the reference
    main(config(parts, tmp_path / "split", max_steps_this_run=4, **kw))
    rest = main(config(parts, tmp_path / "split", **kw))
    assert rest["losses"] == full["losses"][4:]


def _gap(parts, student_path, prompts, seed=0) -> float:
    """Mean squared difference of final latents: student 4 steps, one pass each, vs teacher 20 CFG steps."""
    from fluxion.sampling.denoise import Conditioning, Guidance, denoise
    from fluxion.sampling.ids import image_ids, text_ids
    from fluxion.sampling.schedule import get_schedule
    from fluxion.text.encoder import load_text_encoder
    from fluxion.weights.load import load_transformer

    text = load_text_encoder(parts["text"], TRAIN_SPEC.text, dtype=torch.float32)
    teacher = load_transformer(parts["init"], TRAIN_SPEC.transformer, dtype=torch.float32)
    student = load_transformer(student_path, TRAIN_SPEC.transformer, dtype=torch.float32)
    B, h, w = len(prompts), 2, 2  # 32 px images -> 2x2 latent tokens with the debug VAE
    ctx = text.encode(prompts, dtype=torch.float32)
    neg = text.encode([""], dtype=torch.float32).expand(B, -1, -1)
    cond = Conditioning(ctx=ctx, ctx_ids=text_ids(ctx.shape[1], B), neg_ctx=neg)
    x1 = torch.randn(B, h * w, 128, generator=torch.Generator().manual_seed(seed))
    ids = image_ids(h, w, batch=B)
    t_teacher = get_schedule(20, h * w)
    t_student = get_schedule(4, h * w)
    a = denoise(teacher, x1, ids, cond, t_teacher, Guidance("cfg", TRAIN_SPEC.default_guidance))
    b = denoise(student, x1, ids, cond, t_student, Guidance("distilled"))
    return float(((a - b) ** 2).mean())


def test_distillation_moves_the_few_step_student_toward_the_cfg_teacher(parts, tmp_path):
    prompts = ["a red square", "a blue square", "a green square", "a yellow square"]
    before = _gap(parts, parts["init"], prompts)
    cfg = config(
        parts,
        tmp_path / "distill",
        data=(parts["data"],),
        objective="distill",
        teacher=parts["init"],
        steps=40,
        lr=1e-3,
        warmup=2,
        log_every=10,
    )
    result = main(cfg)
    after = _gap(parts, result["exported"], prompts)
    print(f"student-teacher gap {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before


def _distill_setup(parts, **kw):
    """A distillation objective, its trained model and frozen encoders, on CPU (no training)."""
    from fluxion.train.distill import StepDistillation
    from fluxion.train.loop import build_transformer, load_frozen

    cfg = config(parts, "unused", data=(parts["data"],), objective="distill", caption_dropout=0.3, **kw)
    model = build_transformer(TRAIN_SPEC, cfg, torch.device("cpu"))
    models = load_frozen(TRAIN_SPEC, cfg, model, torch.device("cpu"))
    return cfg, model, models, StepDistillation(cfg, models, None, torch.device("cpu"))


@pytest.mark.parametrize("teacher", [None, "init"])
def test_lora_distillation_teacher_is_the_base_with_adapters_off(parts, teacher):
    """A LoRA run without a separate teacher (or with teacher = init) keeps no second copy: its targets are the
    ones a separately loaded copy of the base gives (full fine-tune path, teacher = the base weights file) for
    the same random draws, also after the adapters have learned something (nothing of them leaks in)."""
    from fluxion.lora.lora import LoRALinear
    from fluxion.train.objectives import forward_velocity

    teacher = parts["init"] if teacher else None
    _, lora_model, models, lora_obj = _distill_setup(parts, lora_rank=4, teacher=teacher)
    assert lora_obj.teacher is None  # no second copy of the base in memory
    sep_cfg, _, sep_models, sep_obj = _distill_setup(parts, teacher=parts["init"])
    assert sep_obj.teacher is not None
    samples = sep_obj.sampler(sep_cfg, 0).next_batch()
    sep_batch = sep_obj.batch(sep_models, samples, torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    lora_batch = lora_obj.batch(models, samples, gen)
    assert "target" not in lora_batch  # the teacher needs the trained model: it runs in `loss`
    for key in ("x", "t", "t_to", "ctx", "neg_ctx"):
        assert torch.equal(lora_batch[key], sep_batch[key]), key  # same draws in the same order

    def expected_loss(model):  # the student's own forward against the separately loaded teacher's targets
        with torch.no_grad():
            v = forward_velocity(model, lora_batch["x"], lora_batch["x_ids"], lora_batch["t"], lora_batch["ctx"],
                                 lora_batch)  # fmt: skip
        return torch.mean((v.float() - sep_batch["target"]) ** 2)

    loss, _ = lora_obj.loss(lora_model, lora_batch)
    assert torch.allclose(loss, expected_loss(lora_model), rtol=1e-6, atol=0)
    # Adapters that have learned something: the student moves, the teacher must not.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora_model.modules():
            if isinstance(m, LoRALinear):
                for adapter in m.lora.values():
                    adapter.up.copy_(0.5 * torch.randn(adapter.up.shape, generator=g))
    moved = expected_loss(lora_model)
    assert not torch.allclose(moved, loss, rtol=1e-3)  # the adapters change the student's output
    loss2, _ = lora_obj.loss(lora_model, lora_batch)
    assert torch.allclose(loss2, moved, rtol=1e-6, atol=0)
    assert all(
        a.scale != 0 for m in lora_model.modules() if isinstance(m, LoRALinear) for a in m.lora.values()
    )


def test_lora_distillation_trains_only_the_adapters(parts, tmp_path):
    """The real trainer entry with objective distill and lora_rank: the base stays the init weights, the
    adapters' up matrices leave zero, and lora.safetensors is exported."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    cfg = config(parts, tmp_path / "run", data=(parts["data"],), objective="distill", lora_rank=4,
                 teacher_steps=4, student_steps=2, steps=3, caption_dropout=0.3)  # fmt: skip
    result = main(cfg)
    assert all(math.isfinite(x) and x > 0 for x in result["losses"])
    assert result["exported"].endswith("lora.safetensors")
    dcp_to_torch_save(tmp_path / "run" / "checkpoint" / "step-3", tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)["model"]
    init = load_file(parts["init"])
    base = {k: v for k, v in state.items() if ".lora." not in k}
    assert set(base) == set(init)
    for k, v in init.items():
        assert torch.equal(base[k], v), k  # the base (the teacher) is untouched
    ups = [v for k, v in state.items() if k.endswith(".lora.default.up")]
    assert ups and all(v.abs().max() > 0 for v in ups)  # every adapter learned (zero-initialised B)


def test_objective_options_are_checked():
    with pytest.raises(ValueError, match="teacher= .*or lora_rank= with init="):
        TrainConfig(model="x", data=("d",), out="o", vae="v", objective="distill")
    with pytest.raises(ValueError, match="lora_rank= with init="):  # a LoRA of a random model: no teacher
        TrainConfig(model="x", data=("d",), out="o", vae="v", objective="distill", lora_rank=4)
    TrainConfig(model="x", data=("d",), out="o", vae="v", objective="distill", lora_rank=4, init="base")
    with pytest.raises(ValueError, match="its own base"):
        TrainConfig(model="x", data=("d",), out="o", vae="v", objective="distill", lora_rank=4, init="base",
                    teacher_model="y")  # fmt: skip
    with pytest.raises(ValueError, match="divide"):
        TrainConfig(
            model="x", data=("d",), out="o", vae="v", objective="distill", teacher="t", student_steps=3
        )
    with pytest.raises(ValueError, match="dpo"):
        TrainConfig(model="x", data=("d",), out="o", vae="v", objective="ppo")


@pytest.mark.slow  # ~70 s on 2 shared cores (sampling through the whole pipeline)
def test_pairs_from_own_generations_feed_dpo(parts, tmp_path):
    """fluxion.train.pairs: candidates per prompt from the model, judged by the colour reward (border colour
    against the requested background); the folder it writes is what the DPO objective reads."""
    from fluxion.train.dpo import PairSet
    from fluxion.train.pairs import Rewards, colour_reward, make_pairs
    from fluxion.weights.models import load_models

    white = np.full((32, 32, 3), 255, np.uint8)
    assert colour_reward(white, "#FFFFFF") == pytest.approx(1.0)
    assert colour_reward(white, "#000000") == 0.0  # dE00 white/black is 100: clipped at 0
    models = load_models(parts["init"], preset=TRAIN_SPEC.name, vae=parts["vae"], text=parts["text"])
    records = [
        {"caption": "a red square", "background": "#FFFFFF"},
        {"caption": "a blue square", "background": "#FFFFFF"},
    ]
    meta = make_pairs(
        models, records, tmp_path / "pairs", candidates=3, steps=2, min_gap=0.0,
        rewards=Rewards(use_ocr=False, use_scorer=False), log=None,
    )  # fmt: skip
    assert meta["pairs"] == 2 and not (tmp_path / "pairs.tmp").exists()
    pairs = PairSet(tmp_path / "pairs")
    win, lose = pairs.pair(0)
    assert win.caption == "a red square" and win.image.shape == lose.image.shape
    assert not torch.equal(win.image, lose.image)  # candidates of one prompt have their own seeds
    r = pairs.pairs[0]["rewards"]
    assert r[0] >= r[1]


# ---------------------------------------------------------------------------------------------------------
# Distillation golden trace: per-step losses of a short full fine-tune distillation with a separately loaded
# teacher, recorded from the trainer at commit 10b59db (before the LoRA teacher path) by
# `python tests/test_objectives.py`. The separate-teacher path must reproduce them bit for bit (same random
# draws in the same order, same arithmetic).

DISTILL_GOLDEN = Path(__file__).parent / "fixtures" / "distill_golden.json"
RECORDED_THREADS = 2  # CPU reductions split by thread count: the trace is bit-exact only at this count


def distill_golden_run(parts: dict, out) -> tuple[list[float], str]:
    import hashlib

    from safetensors.torch import load_file

    cfg = config(
        parts,
        out,
        data=(parts["data"],),
        objective="distill",
        teacher=parts["init"],
        teacher_steps=4,
        student_steps=2,
        steps=4,
        batch_size=3,
        caption_dropout=0.3,
        seed=5,
    )
    result = main(cfg)
    weights = load_file(result["exported"])
    digest = hashlib.sha256()
    for k in sorted(weights):
        digest.update(k.encode() + weights[k].numpy().tobytes())
    return result["losses"], digest.hexdigest()


def test_distillation_with_a_separate_teacher_matches_the_recorded_trace(parts, tmp_path):
    recorded = json.loads(DISTILL_GOLDEN.read_text())
    torch.set_num_threads(RECORDED_THREADS)  # conftest restores the previous count afterwards
    losses, digest = distill_golden_run(parts, tmp_path / "run")
    assert losses == recorded["losses"]  # exact float equality, not approx
    assert digest == recorded["weights_sha256"]


if __name__ == "__main__":  # regenerate the golden fixture (only when the arithmetic changes on purpose)
    import tempfile

    torch.set_num_threads(RECORDED_THREADS)
    PRESETS[TRAIN_SPEC.name] = TRAIN_SPEC
    with tempfile.TemporaryDirectory() as d:
        trace, digest = distill_golden_run(make_parts(Path(d)), Path(d) / "run")
    record = {"commit": "10b59db", "losses": trace, "weights_sha256": digest}
    DISTILL_GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(trace)
