"""End-to-end parity of `fluxion.sampling.pipeline` with diffusers' FLUX.2 pipelines, plus the pipeline's own rules
(schedule, output size, seeds, batches, callbacks, input errors).

Both sides run the same random tiny models on CPU in fp32: diffusers gets the modules in memory, fluxion loads the
folder they were saved to (so our readers and key mappings are part of what is tested). Same prompt, same seed:
diffusers draws its noise with `torch.Generator("cpu").manual_seed(s)`, we with `generator_device="cpu"`.
We compare the final latent tokens (diffusers' `callback_on_step_end` sees them packed and normalised, exactly as
our loop holds them; ours are taken where the pipeline hands them to the VAE) and the decoded float pixels
(diffusers `output_type="pt"`, ours before quantisation), each in [0, 1] after the same clamp.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinInpaintPipeline, Flux2KleinKVPipeline, Flux2KleinPipeline, Flux2Pipeline
from PIL import Image

from fluxion.editing.references import InputImageError
from fluxion.sampling import pipeline as P
from fluxion.sampling.schedule import get_schedule
from fluxion.weights.models import load_models
from pipeline_fixtures import (
    DEV,
    KLEIN,
    KLEIN_BASE,
    KLEIN_KV,
    build_diffusers_folder,
    diffusers_pipeline,
    register_specs,
)

# Tolerance for every parity comparison (latent tokens of magnitude ~5, pixels in [0, 1]). Both sides are fp32 and
# one transformer forward agrees to ~1e-6 (test_transformer.py); what differs is rounding order: diffusers feeds
# t as sigma*1000 (fp32) divided by 1000 again (1 ulp off t), computes the shifted schedule in float64 numpy
# before casting (ours in fp32 torch: 1 ulp), builds RoPE angles in fp64 (ours fp32) and uses torch's RMSNorm.
# Over <= 4 Euler steps and a VAE decode the measured max differences are 1e-6..1e-5 (printed by each test).
# 1e-4 keeps a margin, and real disagreements are far above it: on the 2-reference CFG case, guidance 3.9 instead
# of 4 moves the tokens by 2e-2, swapping the two references by 8e-2, dropping one by 0.5.
TOL = 1e-4
PROMPT = "A fluffy orange cat sitting on a windowsill"
PROMPT_2 = "A red apple on a wooden table"


@pytest.fixture(scope="module", autouse=True)
def _presets():
    with pytest.MonkeyPatch.context() as mp:
        register_specs(mp)
        yield


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """(diffusers components, our Models) for the klein-shaped tiny model (Qwen3 text encoder)."""
    folder = tmp_path_factory.mktemp("klein")
    comps = build_diffusers_folder(folder, KLEIN, seed=0)
    return comps, load_models(str(folder), preset=KLEIN.name)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """The dev-shaped tiny model: guidance embedder, Mistral3 text encoder."""
    folder = tmp_path_factory.mktemp("dev")
    comps = build_diffusers_folder(folder, DEV, seed=1)
    return comps, load_models(str(folder), preset=DEV.name)


def with_spec(models: P.Models, spec) -> P.Models:
    """Same loaded weights, another variant (distilled / base / KV share the transformer shapes)."""
    return dataclasses.replace(models, spec=spec)


@pytest.fixture
def capture(monkeypatch):
    """Record, per pipeline call, the timesteps the Euler loop gets and the tokens/pixels at the VAE decode."""
    calls = {"timesteps": [], "tokens": [], "pixels": []}
    denoise_steps, decode = P.denoise_steps, P.decode

    def recording_denoise_steps(model, x, x_ids, cond, timesteps, *args):
        calls["timesteps"].append(list(timesteps))
        return denoise_steps(model, x, x_ids, cond, timesteps, *args)

    def recording_decode(models, tokens, h, w):
        pixels = decode(models, tokens, h, w)
        calls["tokens"].append(tokens.clone())
        calls["pixels"].append(pixels.clone())
        return pixels

    monkeypatch.setattr(P, "denoise_steps", recording_denoise_steps)
    monkeypatch.setattr(P, "decode", recording_decode)
    return calls


def image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random RGB test image (low-frequency noise upsampled), deterministic in `seed`."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (max(height // 16, 1), max(width // 16, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def run_diffusers(pipe, steps: int, seeds: list[int], text_cfg, **kwargs):
    """(final tokens [B, N, 128], float images [B, 3, H, W] in [0, 1]) from one diffusers call."""
    latents = []

    def keep_latents(_pipe, _i, _t, tensors):
        latents.append(tensors["latents"].clone())
        return {}

    generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(
        num_inference_steps=steps,
        generator=generator[0] if len(generator) == 1 else generator,
        output_type="pt",
        max_sequence_length=text_cfg.max_length,
        text_encoder_out_layers=text_cfg.hidden_layers,
        callback_on_step_end=keep_latents,
        **kwargs,
    )
    return latents[-1], out.images


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """Our decoded [-1, 1] pixels -> [0, 1], as diffusers' postprocess does."""
    return (pixels / 2 + 0.5).clamp(0, 1)


def check_quantisation(results: list[P.Result], pixels: torch.Tensor, theirs01: torch.Tensor) -> None:
    """Our uint8 is the BFL truncation of our floats; diffusers rounds, so it sits 0 or 1 above ours."""
    ours = np.stack([np.asarray(r.image) for r in results]).astype(np.int16)
    trunc = (127.5 * (pixels.clamp(-1, 1) + 1)).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(ours, trunc)
    rounded = (theirs01.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.int16)
    assert set(np.unique(rounded - ours)) <= {0, 1}


def report(case: str, d_tok: float, d_px: float) -> None:
    print(f"\n[pipeline parity {case}] tokens max|diff| = {d_tok:.2e}, pixels max|diff| = {d_px:.2e}")


# --- parity cases -------------------------------------------------------------------------------------------------
# Each: which fixture/spec, the diffusers pipeline (class, constructor kwargs, call kwargs), our Request fields.
REFS_2 = ((64, 64, 11), (96, 64, 12))  # (width, height, seed): multiples of 16, far below every pixel cap
CASES = {
    "klein-distilled": dict(
        model="klein", spec=KLEIN, cls=Flux2KleinPipeline, init=dict(is_distilled=True), steps=4, guidance=1.0
    ),
    "klein-base-cfg": dict(
        model="klein",
        spec=KLEIN_BASE,
        cls=Flux2KleinPipeline,
        init=dict(is_distilled=False),
        steps=3,
        guidance=4.0,
    ),
    "klein-base-cfg-2refs": dict(
        model="klein",
        spec=KLEIN_BASE,
        cls=Flux2KleinPipeline,
        init=dict(is_distilled=False),
        steps=3,
        guidance=4.0,
        refs=REFS_2,
    ),
    "klein-distilled-2prompts": dict(
        model="klein",
        spec=KLEIN,
        cls=Flux2KleinPipeline,
        init=dict(is_distilled=True),
        steps=4,
        guidance=1.0,
        prompts=[PROMPT, PROMPT_2],
    ),
    "klein-distilled-2images": dict(
        model="klein",
        spec=KLEIN,
        cls=Flux2KleinPipeline,
        init=dict(is_distilled=True),
        steps=4,
        guidance=1.0,
        num_images=2,
    ),
    "klein-kv-2refs": dict(
        model="klein", spec=KLEIN_KV, cls=Flux2KleinKVPipeline, init={}, steps=4, guidance=None, refs=REFS_2
    ),
    # dev: diffusers passes `guidance=torch.full([B], guidance_scale)` to the transformer, which scales it by 1000
    # like the time (no /1000 round trip, unlike the timestep); ours feeds the same [B] vector of 4.0.
    "dev-embedded": dict(model="dev", spec=DEV, cls=Flux2Pipeline, init={}, steps=3, guidance=4.0),
    "dev-embedded-ref": dict(
        model="dev", spec=DEV, cls=Flux2Pipeline, init={}, steps=3, guidance=4.0, refs=REFS_2[1:]
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_generate_matches_diffusers(case, request, capture):
    c = CASES[case]
    comps, models = request.getfixturevalue(c["model"])
    models = with_spec(models, c["spec"])
    width, height, seed = 64, 80, 7
    prompts = c.get("prompts", [PROMPT])
    n = c.get("num_images", 1)
    refs = [image(*r) for r in c.get("refs", ())]
    seeds = [seed + i for i in range(n)] * len(prompts)  # per image: the seed of its generator

    pipe = diffusers_pipeline(c["cls"], comps, **c["init"])
    kwargs = dict(prompt=prompts if len(prompts) > 1 else prompts[0], height=height, width=width)
    if c["guidance"] is not None:
        kwargs["guidance_scale"] = c["guidance"]
    if n > 1:
        kwargs["num_images_per_prompt"] = n
    if refs:
        kwargs["image"] = refs
    want_tokens, want_px = run_diffusers(pipe, c["steps"], seeds, c["spec"].text, **kwargs)

    results = P.generate(
        models,
        P.Request(
            prompt=prompts if len(prompts) > 1 else prompts[0],
            width=width,
            height=height,
            steps=c["steps"],
            seed=seed,
            num_images=n,
            references=tuple(refs),
            generator_device="cpu",
        ),
    )
    tokens, pixels = capture["tokens"][-1], capture["pixels"][-1]
    assert tokens.shape == want_tokens.shape == (len(seeds), (height // 16) * (width // 16), 128)
    d_tok = (tokens - want_tokens).abs().max().item()
    d_px = (to_unit(pixels) - want_px).abs().max().item()
    report(case, d_tok, d_px)
    assert d_tok <= TOL and d_px <= TOL
    assert want_tokens.abs().max() > 1 and want_px.std() > 0.05  # not a comparison of near-constant tensors
    # the schedule our loop ran is the BFL one, and the same times as diffusers' scheduler (which adds sigma 0)
    assert capture["timesteps"][-1] == get_schedule(c["steps"], tokens.shape[1])
    assert capture["timesteps"][-1] == pytest.approx(pipe.scheduler.sigmas.tolist(), abs=1e-6)
    assert [r.seed for r in results] == seeds
    assert [r.params["prompt"] for r in results] == [p for p in prompts for _ in range(n)]
    assert all(r.image.size == (width, height) for r in results)
    check_quantisation(results, pixels, want_px)
    if c[
        "spec"
    ].kv_cache:  # the KV path is not the plain path with the same weights (spec 7.3): both are tested
        P.generate(
            with_spec(models, KLEIN),
            P.Request(
                prompt=prompts[0],
                width=width,
                height=height,
                seed=seed,
                references=tuple(refs),
                generator_device="cpu",
            ),
        )
        assert (capture["tokens"][-1] - want_tokens).abs().max() > 100 * TOL


def test_inpaint_matches_diffusers(klein, capture):
    """Flux2KleinInpaintPipeline, distilled, strength 0.75, with an extra reference. Compared before our optional
    pixel composite (composite=False); the composite itself is checked in test_inpaint_composite_keeps_source."""
    comps, models = klein
    models = with_spec(models, KLEIN)
    width, height, seed, steps, strength = 64, 80, 3, 4, 0.75
    source, ref = image(width, height, 21), image(64, 64, 22)
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (16, 16, 48, 64))  # white = repaint
    pipe = diffusers_pipeline(Flux2KleinInpaintPipeline, comps, is_distilled=True)
    want_tokens, want_px = run_diffusers(
        pipe,
        steps,
        [seed],
        KLEIN.text,
        prompt=PROMPT,
        image=source,
        mask_image=mask,
        image_reference=ref,
        strength=strength,
        guidance_scale=1.0,
    )
    results = P.inpaint(
        models,
        P.Request(prompt=PROMPT, steps=steps, seed=seed, references=(ref,), generator_device="cpu"),
        source,
        mask,
        strength=strength,
        composite=False,
    )
    tokens, pixels = capture["tokens"][-1], capture["pixels"][-1]
    d_tok = (tokens - want_tokens).abs().max().item()
    d_px = (to_unit(pixels) - want_px).abs().max().item()
    report("klein-inpaint", d_tok, d_px)
    assert d_tok <= TOL and d_px <= TOL
    # strength 0.75 of 4 steps: the last 3 times of the 4-step schedule, as diffusers' get_timesteps truncates
    full = get_schedule(steps, tokens.shape[1])
    assert capture["timesteps"][-1] == full[1:]
    assert full == pytest.approx(pipe.scheduler.sigmas.tolist(), abs=1e-6)
    assert results[0].image.size == (width, height) and results[0].params["strength"] == strength
    check_quantisation(results, pixels, want_px)


def test_inpaint_composite_keeps_source(klein):
    """With composite=True every pixel outside the mask is the source's, bit for bit; inside, the generation."""
    _, models = klein
    models = with_spec(models, KLEIN)
    source = image(72, 88, 31)  # not a multiple of 16: padded for generation, cropped back
    mask = Image.new("L", source.size, 0)
    mask.paste(255, (8, 8, 40, 56))
    request = P.Request(prompt=PROMPT, seed=1, generator_device="cpu")
    plain = P.inpaint(models, request, source, mask, strength=0.75, composite=False)[0]
    comp = P.inpaint(models, request, source, mask, strength=0.75, composite=True)[0]
    assert comp.image.size == plain.image.size == source.size
    keep = np.asarray(mask) < 128
    src, got, gen = np.asarray(source), np.asarray(comp.image), np.asarray(plain.image)
    assert np.array_equal(got[keep], src[keep])
    assert np.array_equal(got[~keep], gen[~keep])
    assert not np.array_equal(gen[keep], src[keep])  # without the composite the outside does drift


# --- the pipeline's own rules -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size,times",
    [  # spec 6.2 worked examples, 4 steps
        ((1024, 1024), [1.0, 0.967384, 0.908144, 0.767200, 0.0]),
        ((512, 512), [1.0, 0.958085, 0.883982, 0.717497, 0.0]),
    ],
)
def test_schedule_of_a_run_is_the_spec_example(klein, capture, monkeypatch, size, times):
    """The times the transformer actually receives for a 4-step run (the VAE decode is skipped: not under test)."""
    _, models = klein
    models = with_spec(models, KLEIN)
    seen = []
    handle = models.transformer.register_forward_pre_hook(lambda _m, args: seen.append(args[2][0].item()))
    monkeypatch.setattr(P, "decode", lambda m, tokens, h, w: torch.zeros(tokens.shape[0], 3, 16 * h, 16 * w))
    try:
        P.generate(models, P.Request(prompt=PROMPT, width=size[0], height=size[1], seed=0))
    finally:
        handle.remove()
    assert capture["timesteps"][-1] == pytest.approx(times, abs=1e-6)
    assert seen == pytest.approx(times[:-1], abs=1e-6)


@pytest.mark.parametrize("size,generated", [((72, 88), (80, 96)), ((70, 90), (80, 96))])
def test_output_size_is_exact_and_centre_cropped(klein, size, generated):
    """A size off the 16-px grid is generated at the next multiple up (same noise grid, same schedule) and
    centre-cropped: the result is exactly the crop of the on-grid generation."""
    _, models = klein
    models = with_spec(models, KLEIN)
    req = P.Request(prompt=PROMPT, seed=4, generator_device="cpu")
    small = P.generate(models, dataclasses.replace(req, width=size[0], height=size[1]))[0]
    big = P.generate(models, dataclasses.replace(req, width=generated[0], height=generated[1]))[0]
    assert small.image.size == size and small.params["width"] == size[0] and small.params["height"] == size[1]
    left, top = (generated[0] - size[0]) // 2, (generated[1] - size[1]) // 2
    crop = big.image.crop((left, top, left + size[0], top + size[1]))
    assert np.array_equal(np.asarray(small.image), np.asarray(crop))


def test_seeds_are_reported_and_reproducible(klein, capture):
    _, models = klein
    models = with_spec(models, KLEIN)
    req = P.Request(prompt=PROMPT, seed=5, num_images=2)
    first, again = P.generate(models, req), P.generate(models, req)
    assert [r.seed for r in first] == [5, 6] and [r.params["seed"] for r in first] == [5, 6]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(first, again))
    assert not np.array_equal(np.asarray(first[0].image), np.asarray(first[1].image))
    # image i of a batch is the image of seed + i alone (up to batch-dependent rounding of the fp32 kernels)
    batch_pixels = capture["pixels"][0]
    alone = P.generate(models, dataclasses.replace(req, seed=6, num_images=1))
    torch.testing.assert_close(capture["pixels"][-1][0], batch_pixels[1], rtol=0, atol=1e-5)
    assert alone[0].seed == 6
    unseeded = P.generate(models, P.Request(prompt=PROMPT))[0]  # a random seed, reported ...
    assert isinstance(unseeded.seed, int)
    replay = P.generate(models, P.Request(prompt=PROMPT, seed=unseeded.seed))[0]  # ... reproduces the image
    assert np.array_equal(np.asarray(unseeded.image), np.asarray(replay.image))


def test_batch_of_prompts(klein):
    _, models = klein
    models = with_spec(models, KLEIN)
    results = P.generate(models, P.Request(prompt=[PROMPT, PROMPT_2], seed=9, num_images=2))
    assert [(r.params["prompt"], r.seed) for r in results] == [
        (PROMPT, 9),
        (PROMPT, 10),
        (PROMPT_2, 9),
        (PROMPT_2, 10),
    ]
    a, b = np.asarray(results[0].image), np.asarray(results[2].image)  # same seed, different prompt
    assert not np.array_equal(a, b)


def test_progress_callback_once_per_step(klein):
    _, models = klein
    calls = []
    P.generate(
        with_spec(models, KLEIN_BASE),
        P.Request(prompt=PROMPT, steps=5, seed=0),
        progress=lambda i, n, dt: calls.append((i, n, dt)),
    )
    assert [(i, n) for i, n, _ in calls] == [(i, 5) for i in range(1, 6)]
    assert all(dt >= 0 for *_, dt in calls)


def test_guidance_override_needs_permission(klein):
    _, models = klein
    models = with_spec(models, KLEIN)
    with pytest.raises(ValueError, match="guidance-distilled"):
        P.generate(models, P.Request(prompt=PROMPT, guidance=3.0, seed=0))
    with pytest.warns(UserWarning, match="overriding the fixed guidance"):
        result = P.generate(models, P.Request(prompt=PROMPT, guidance=3.0, seed=0, allow_override=True))[0]
    assert result.params["guidance"] == 3.0


def test_ignored_negative_prompt_warns(klein):
    _, models = klein
    with pytest.warns(UserWarning, match="negative prompt is ignored"):
        P.generate(with_spec(models, KLEIN), P.Request(prompt=PROMPT, negative_prompt="blurry", seed=0))


ERRORS = {
    "zero steps": (dict(steps=0), ValueError, "at least 1"),
    "negative guidance": (dict(guidance=-1.0), ValueError, "guidance must be >= 0"),
    "too small": (dict(width=48, height=64), InputImageError, "at least 64"),
    "above 4 MP": (dict(width=2048, height=2064), InputImageError, "limit is 4 MP"),
    "aspect beyond 8": (dict(width=64, height=528), InputImageError, "aspect ratio"),
    "too many references": (dict(references=(image(64, 64, 0),) * 5), InputImageError, "at most 4"),
    "small reference": (dict(references=(image(32, 64, 0),)), InputImageError, "at least 64"),
    "no images": (dict(num_images=0), ValueError, "num_images"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_requests_are_rejected(klein, case):
    _, models = klein
    fields, error, message = ERRORS[case]
    spec = KLEIN_BASE if "guidance" in fields else KLEIN
    with pytest.raises(error, match=message):
        P.generate(with_spec(models, spec), P.Request(prompt=PROMPT, seed=0, **fields))


def test_inpaint_rejects_mismatched_mask_and_bad_strength(klein):
    _, models = klein
    models = with_spec(models, KLEIN)
    source = image(64, 80, 0)
    req = P.Request(prompt=PROMPT, seed=0)
    with pytest.raises(InputImageError, match="mask is 64x64 but the image is 64x80"):
        P.inpaint(models, req, source, Image.new("L", (64, 64)))
    with pytest.raises(ValueError, match="strength"):
        P.inpaint(models, req, source, Image.new("L", (64, 80)), strength=0.0)


def test_prompt_cache_then_released_encoder_and_offload_give_the_same_image(klein, tmp_path):
    """Encode once through the disk cache, free the text encoder, run again from the cache with component
    offload on: the same image, bit for bit."""
    from fluxion.text.cache import PromptCache

    _, models = klein
    models = with_spec(models, KLEIN)
    request = P.Request(prompt=PROMPT, seed=3)
    first = P.generate(models, request)[0]
    cached = P.Models(**{**vars(models), "prompt_cache": PromptCache(tmp_path / "cache")})
    assert np.array_equal(np.asarray(P.generate(cached, request)[0].image), np.asarray(first.image))
    text = cached.text
    cached.release_text_encoder()  # from here on, prompts come from the cache only
    assert np.array_equal(np.asarray(P.generate(cached, request)[0].image), np.asarray(first.image))
    with pytest.raises(ValueError, match="not cached"):
        P.generate(cached, P.Request(prompt="a prompt never seen", seed=3))
    cached.text = text
    offloaded = P.Models(**{**vars(cached), "offload": True})
    assert np.array_equal(np.asarray(P.generate(offloaded, request)[0].image), np.asarray(first.image))


# --- parity switches and stated notes (issue 9) -------------------------------------------------------------------
def test_diffusers_noise_mode_matches_a_batch_from_one_generator(klein, capture):
    """--noise diffusers: diffusers' Flux2KleinPipeline given ONE generator for a batch of 2 (its randn_tensor
    draws [B, 128, h, w] at once) gives the same latents and pixels as ours with noise="diffusers"."""
    comps, models = klein
    models = with_spec(models, KLEIN)
    width, height, seed = 64, 80, 5
    pipe = diffusers_pipeline(Flux2KleinPipeline, comps, is_distilled=True)
    want_tokens, want_px = run_diffusers(
        pipe, 4, [seed], KLEIN.text, prompt=PROMPT, height=height, width=width, num_images_per_prompt=2
    )
    request = P.Request(
        prompt=PROMPT,
        width=width,
        height=height,
        seed=seed,
        num_images=2,
        noise="diffusers",
        generator_device="cpu",
    )
    results = P.generate(models, request)
    d_tok = (capture["tokens"][-1] - want_tokens).abs().max().item()
    d_px = (to_unit(capture["pixels"][-1]) - want_px).abs().max().item()
    report("klein-diffusers-noise", d_tok, d_px)
    assert d_tok <= TOL and d_px <= TOL
    assert [r.params["batch_index"] for r in results] == [0, 1] and {r.seed for r in results} == {seed}
    # the default per-image seeds draw other noise for image 2 (seed + 1), so the modes really differ
    P.generate(models, dataclasses.replace(request, noise="fluxion"))
    assert (capture["tokens"][-1][1] - want_tokens[1]).abs().max() > 100 * TOL


def test_true_cfg_at_guidance_1_is_one_forward_as_in_diffusers(klein, capture):
    """klein base asked for guidance 1: diffusers runs no CFG (guidance_scale > 1 only); so do we, with a note."""
    comps, models = klein
    models = with_spec(models, KLEIN_BASE)
    width, height, seed, steps = 64, 64, 9, 3
    pipe = diffusers_pipeline(Flux2KleinPipeline, comps, is_distilled=False)
    want_tokens, _ = run_diffusers(
        pipe, steps, [seed], KLEIN_BASE.text, prompt=PROMPT, height=height, width=width, guidance_scale=1.0
    )
    calls = []
    handle = models.transformer.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        with pytest.warns(P.Note, match="turns classifier-free guidance off"):
            P.generate(
                models,
                P.Request(
                    prompt=PROMPT,
                    width=width,
                    height=height,
                    steps=steps,
                    seed=seed,
                    guidance=1.0,
                    generator_device="cpu",
                ),
            )
    finally:
        handle.remove()
    assert calls == [1] * steps  # one forward of batch 1 per step, not a batch of 2
    assert (capture["tokens"][-1] - want_tokens).abs().max().item() <= TOL


def test_notes_and_warnings_of_the_pipeline(klein):
    """Stated, never silent: a prompt over the token limit, an all-black mask, a huge reference, a size far
    from the model's."""
    _, models = klein
    small = dataclasses.replace(KLEIN, reference_pixels=(64 * 64, 64 * 64), default_size=(64, 64))
    models = with_spec(models, small)
    long_prompt = " ".join(["cat"] * 80)  # TINY_QWEN3 reads 48 tokens
    with pytest.warns(UserWarning, match=r"is \d+ tokens; the text encoder reads 48: the last \d+ tokens"):
        P.generate(models, P.Request(prompt=long_prompt, seed=0, steps=1))
    source = image(64, 64, 1)
    with pytest.warns(P.Note, match="mask is all black"):
        out = P.inpaint(models, P.Request(prompt=PROMPT, seed=0, steps=1), source, Image.new("L", (64, 64)))
    assert np.array_equal(np.asarray(out[0].image), np.asarray(source))  # composite keeps every pixel
    with pytest.warns(P.Note, match=r"reference image 1 is 512x512; resized to 64x64"):
        P.generate(models, P.Request(prompt=PROMPT, seed=0, steps=1, references=(image(512, 512, 2),)))
    with pytest.warns(UserWarning, match="far from the sizes"):
        P.generate(models, P.Request(prompt=PROMPT, seed=0, steps=1, width=512, height=512))


def test_request_checks_before_any_model(klein):
    """Checked when the Request is built (no model needed): the CLI does this before loading."""
    for fields, message in [
        (dict(guidance=float("nan")), "finite"),
        (dict(guidance=float("inf")), "finite"),
        (dict(guidance=1e30), "at most 100"),
        (dict(width=0), "at least 64"),
        (dict(seed=2**64), "seed must be in"),
        (dict(seed=2**64 - 1, num_images=2), "seed must be in"),
        (dict(steps=1001), "at most 1000"),
        (dict(prompt="caf\udce9"), "not valid UTF-8"),
        (dict(noise="numpy"), "noise must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            P.Request(**{"prompt": PROMPT, **fields})
    P.Request(prompt=PROMPT, seed=2**64 - 1)  # the top of the range is fine
