"""The trainer on CPU with tiny components: the loss falls, edit pairs train, resume is exact."""

import json

import pytest
import torch

from fluxion.config import PRESETS
from fluxion.train.train import TrainConfig, config_from_dict, lr_at, main
from train_fixtures import TRAIN_SPEC, build_components


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_components(tmp_path_factory.mktemp("train"))


@pytest.fixture(autouse=True)
def preset(monkeypatch):
    monkeypatch.setitem(PRESETS, TRAIN_SPEC.name, TRAIN_SPEC)


def config(parts, out, **kw):
    base = dict(
        model=TRAIN_SPEC.name,
        data=(parts["data"],),
        out=str(out),
        vae=parts["vae"],
        text=parts["text"],
        steps=60,
        batch_size=4,
        lr=3e-3,
        warmup=5,
        log_every=1,
        caption_dropout=0.0,
        seed=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_from_scratch(parts, tmp_path):
    result = main(config(parts, tmp_path / "run"))
    losses = result["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"loss {first:.3f} -> {last:.3f}")
    assert last < 0.8 * first
    assert (tmp_path / "run" / "transformer.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 59


def test_edit_pairs_train_and_samples_are_written(parts, tmp_path):
    result = main(config(parts, tmp_path / "run", steps=8, edit_fraction=1.0, sample_every=4, sample_steps=2))
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == [
        "step-000004.png",
        "step-000008.png",
    ]
    assert len(result["losses"]) == 8 and all(l == l for l in result["losses"])  # finite, ran with references


def test_encoder_caches_give_the_same_training(parts, tmp_path):
    """Cached latents and text embeddings are what the encoders produce: the same losses as uncached, up to the
    fp32 rounding of encoding in batches of another size (~1e-7 relative)."""
    plain = main(config(parts, tmp_path / "plain", steps=6, edit_fraction=0.5, caption_dropout=0.3))
    cached = main(
        config(
            parts,
            tmp_path / "cached",
            steps=6,
            edit_fraction=0.5,
            caption_dropout=0.3,
            cache_latents=True,
            cache_text=True,
        )
    )
    assert cached["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    on_device = main(
        config(
            parts,
            tmp_path / "dev",
            steps=6,
            edit_fraction=0.5,
            caption_dropout=0.3,
            cache_latents_on_device=True,
        )
    )
    assert on_device["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert not (tmp_path / "dev" / "cache").exists()
    assert (
        len(list((tmp_path / "cached" / "cache" / "latents").iterdir())) == 4
    )  # 4 images, each encoded once
    assert any((tmp_path / "cached" / "cache" / "text").rglob("*.safetensors"))


def test_resume_is_exact_single_process(parts, tmp_path):
    full = main(config(parts, tmp_path / "full", steps=12, ema=0.9))
    main(config(parts, tmp_path / "split", steps=12, ema=0.9, max_steps_this_run=5))
    rest = main(config(parts, tmp_path / "split", steps=12, ema=0.9))
    assert rest["losses"] == full["losses"][5:]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "transformer.safetensors"))
    b = load_file(str(tmp_path / "split" / "transformer.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lr_schedule():
    cfg = TrainConfig(
        model="x", data=("d",), out="o", vae="v", steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1
    )
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 99) == pytest.approx(0.1, abs=1e-3)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="lerning_rate"):
        config_from_dict({"model": "x", "lerning_rate": 1})
    with pytest.raises(ValueError, match="caption_dropout"):
        TrainConfig(model="x", data=("d",), out="o", vae="v", caption_dropout=1.5)


def test_vae_training_reconstructs_and_fits_latent_norm(parts, tmp_path, monkeypatch):
    from fluxion.train.vae import VAETrainConfig
    from fluxion.train.vae import main as train_vae
    from fluxion.weights.load import load_autoencoder

    result = train_vae(
        VAETrainConfig(
            model=TRAIN_SPEC.name,
            data=(parts["data"],),
            out=str(tmp_path),
            steps=40,
            batch_size=4,
            lr=2e-3,
            warmup=5,
            stats_images=8,
            log_every=10,
        )
    )
    log = [json.loads(line) for line in (tmp_path / "vae_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    ae = load_autoencoder(result["exported"])
    assert not torch.equal(
        ae.bn.running_var, torch.ones_like(ae.bn.running_var)
    )  # the statistics were fitted
    from fluxion.train.data import TinySet
    from fluxion.train.vae import fit_latent_norm

    x = torch.stack([TinySet(parts["data"]).sample(i).image for i in range(4)])
    fit_latent_norm(ae, [x[:2], x[2:]])
    z = ae.encode(x)  # normalised with statistics fitted on x: zero mean, unit variance per channel
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (z.var(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-2


def test_recipe_file_toml(parts, tmp_path):
    from fluxion.train.recipes import load_recipe_file

    path = tmp_path / "r.toml"
    path.write_text(
        f'model = "{TRAIN_SPEC.name}"\ndata = ["{parts["data"]}"]\nout = "o"\nvae = "v"\nsteps = 7\n'
    )
    assert load_recipe_file(path).steps == 7
    path.write_text('model = "x"\nsteeps = 7\n')
    with pytest.raises(ValueError, match="steeps"):
        load_recipe_file(path)


def test_webdataset_shards_and_curriculum(parts, tmp_path):
    """Tar shards (image + .txt per key) train; a two-stage curriculum hands its weights from stage to stage."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from fluxion.train.data import TarShards
    from fluxion.train.recipes import curriculum
    from fluxion.train.train import run_stages

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w") as tar:
        for i, (w, h) in enumerate([(32, 32), (48, 32), (32, 32), (32, 48)]):
            for name, data in [
                (f"{i:04d}.png", _png(np.full((h, w, 3), 40 * i, np.uint8), Image, io)),
                (f"{i:04d}.txt", f"a grey square number {i}".encode()),
            ]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = TarShards(shards, pixels=32 * 32)
    assert len(data) == 4 and data.sample(1).caption == "a grey square number 1"
    assert data.sample(1).image.shape[1:] == (data.sizes[1][1], data.sizes[1][0])
    stages = curriculum(
        config(parts, tmp_path / "cur", steps=1),
        [(3, (str(shards),), 32 * 32), (2, (parts["data"],), 32 * 32)],
    )
    assert stages[1].init.endswith("stage-0/transformer.safetensors")
    summary = run_stages(stages)
    assert summary["steps"] == 2 and (tmp_path / "cur" / "stage-1" / "transformer.safetensors").is_file()


@pytest.mark.parametrize("fmt,compress", [("gnu", ""), ("pax", ""), ("ustar", "gz")])
def test_tar_shards_read_each_image_by_its_offset(tmp_path, fmt, compress):
    """Every sample's pixels are those of its own member: plain shards are read at the indexed byte offset
    (long names add extra header blocks in GNU and PAX tars), a gzip stream named .tar through tarfile."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from fluxion.train.data import TarShards

    shards = tmp_path / "shards"
    shards.mkdir()
    mode = "w:gz" if compress else "w"
    longdir = "" if fmt == "ustar" else "d" * 120 + "/"  # > 100 characters: a long-name header block first
    fmt_code = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT, "ustar": tarfile.USTAR_FORMAT}[fmt]
    values = [7, 70, 140, 210, 250]
    with tarfile.open(shards / "000000.tar", mode, format=fmt_code) as tar:
        for i, v in enumerate(values):
            for name, data in [
                (f"{longdir}{i:04d}.png", _png(np.full((32, 32, 3), v, np.uint8), Image, io)),
                (f"{longdir}{i:04d}.txt", f"grey {v}".encode()),
            ]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = TarShards(shards, pixels=32 * 32)
    assert len(data) == len(values)
    assert (all(s is not None for s in data.spans)) == (not compress)  # compressed: no offsets to seek to
    for i in range(len(data)):
        sample = data.sample(i)
        v = int(sample.caption.split()[1])
        expected = v / 127.5 - 1  # to_tensor maps [0, 255] to [-1, 1]
        assert abs(float(sample.image.mean()) - expected) < 1e-3, (i, sample.caption)


def _png(arr, Image, io) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_prefetcher_draws_the_same_batches_and_resumes_at_the_same_place(tmp_path):
    """The GPU path draws batches in a background thread; batches and checkpointed sampler state must be those
    of the plain sampler (the state after the last batch handed out, not after those drawn ahead)."""
    import numpy as np

    from fluxion.train.data import BatchSampler, Prefetcher, TinySet

    folder = tmp_path / "set"
    folder.mkdir()
    np.save(folder / "images.npy", np.arange(40 * 8 * 8 * 3, dtype=np.uint8).reshape(40, 8, 8, 3))
    (folder / "captions.jsonl").write_text(
        "".join(json.dumps({"caption": f"c{i}"}) + "\n" for i in range(40))
    )

    def sampler():
        return BatchSampler([TinySet(folder)], batch_size=3, seed=7)

    plain, ahead = sampler(), Prefetcher(sampler(), depth=3)
    for _ in range(4):
        assert [s.caption for s in plain.next_batch()] == [s.caption for s in ahead.next_batch()]
    state = ahead.state_dict()
    assert state == plain.state_dict()  # although the thread has drawn up to 3 batches further
    resumed = Prefetcher(sampler())
    resumed.load_state_dict(state)
    for _ in range(3):
        assert [s.caption for s in plain.next_batch()] == [s.caption for s in resumed.next_batch()]
