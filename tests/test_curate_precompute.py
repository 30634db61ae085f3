"""The precompute stage (fluxion/curate/precompute.py): latents and text embeddings of the kept images, beside the
shards. Checked against direct encodes (the tiny VAE and MiniLM, on the CPU) of the images read straight from the
tar with Pillow, and in the trainer: the first-step loss from precomputed tensors equals the one from images."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from curate_fixtures import base_image, jpeg
from fluxion.curate.pipeline import load_recipe, run
from fluxion.datasets import Record, write_folder


def make_input(folder: Path, n: int = 7) -> None:
    rng = np.random.default_rng(5)
    sizes = [(96, 96), (128, 80), (80, 128), (112, 112), (96, 64), (64, 96), (100, 100)]
    records = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        records.append(
            Record(f"img{i:02d}", jpeg(base_image(rng, 128).resize((w, h))), f"picture number {i}")
        )
    write_folder(folder, records)


def curate(tmp: Path, precompute: str) -> Path:
    make_input(tmp / "raw")
    (tmp / "r.toml").write_text(
        f'input = "{tmp / "raw"}"\noutput = "{tmp / "out"}"\nshard_size = 4\n'
        f"[decode]\nmin_side = 32\n[precompute]\n{precompute}\n"
    )
    run(load_recipe(tmp / "r.toml"), log=lambda *a: None)
    return tmp / "out"


def tar_images(out: Path) -> dict[str, tuple[Image.Image, str]]:
    """key -> (image, caption), read from the shards with tarfile and Pillow."""
    found: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                found.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return {
        k: (Image.open(io.BytesIO(v.get("jpg") or v["png"])).convert("RGB"), v["txt"].decode().strip())
        for k, v in found.items()
    }


def test_precomputed_latents_equal_a_direct_vae_encode(tmp_path):
    from fluxion.config import get_preset
    from fluxion.text.encoder import load_text_encoder
    from fluxion.train.data import buckets, fit_to_bucket, text_digest, weights_digest
    from fluxion.weights.load import load_autoencoder
    from fluxion.weights.models import embedded_model_dir

    pixels = 64 * 64
    out = curate(tmp_path, f"pixels = {pixels}\nbatch_size = 3")
    stats = load_recipe(tmp_path / "r.toml")  # the same recipe
    spec = get_preset("fluxion-tiny")
    vae_file = str(embedded_model_dir() / "vae.safetensors")
    vae = load_autoencoder(vae_file, spec.vae)
    text = load_text_encoder(None, spec.text, dtype=torch.float32)
    kept = {r["key"] for r in pq.read_table(out / "manifest.parquet").to_pylist() if r["kept"]}
    images = tar_images(out)
    assert set(images) == kept and len(kept) == 7
    files = sorted((out / f"precomputed-{pixels}").glob("*.safetensors"))
    assert [f.stem for f in files] == [p.stem for p in sorted(out.glob("*.tar"))]
    seen = set()
    for f in files:
        with safe_open(str(f), "pt") as st:
            meta = st.metadata()
            assert meta["vae"] == weights_digest(vae_file) and meta["text"] == text_digest(text)
            for name in st.keys():
                kind, key = name.split(".", 1)
                image, caption = images[key]
                if kind == "latent":
                    seen.add(key)
                    # The trainer's bucket for this aspect, by hand: buckets of ~pixels, nearest in log aspect.
                    size = min(
                        buckets(pixels),
                        key=lambda wh: abs(np.log(wh[0] / wh[1] * image.height / image.width)),
                    )
                    x = torch.from_numpy(np.asarray(fit_to_bucket(image, size), np.float32) / 127.5 - 1)
                    with torch.no_grad():
                        direct = vae.encode(x.permute(2, 0, 1)[None])[0]
                    got = st.get_tensor(name)
                    assert got.shape == direct.shape == (128, size[1] // 16, size[0] // 16)
                    torch.testing.assert_close(got, direct, rtol=1e-4, atol=1e-5)
                else:
                    with torch.no_grad():
                        direct = text.encode([caption], dtype=torch.float32)[0]
                    torch.testing.assert_close(st.get_tensor(name), direct, rtol=1e-4, atol=1e-5)
    assert seen == kept
    # A re-run finds every shard's file and encodes nothing.
    again = run(stats, log=lambda *a: None)
    assert again["precompute"]["images"] == 0


def test_precompute_recipe_errors_are_named(tmp_path):
    with pytest.raises(ValueError, match="precompute.vae"):
        curate(tmp_path, 'model = "debug-tiny"')


def test_training_from_precomputed_tensors_gives_the_same_first_loss(tmp_path, monkeypatch):
    """`fluxion train` on curated shards: the same first-step loss with precomputed latents and text embeddings
    as when it encodes the images itself; tampered latents (same digests) change it, so they are what it read."""
    from safetensors.torch import save_file

    from fluxion.config import PRESETS
    from fluxion.train.train import TrainConfig, main
    from train_fixtures import TRAIN_SPEC, build_components

    monkeypatch.setitem(PRESETS, TRAIN_SPEC.name, TRAIN_SPEC)
    (tmp_path / "parts").mkdir()
    parts = build_components(tmp_path / "parts")
    pixels = 32 * 32
    out = curate(
        tmp_path,
        f'model = "{TRAIN_SPEC.name}"\nvae = "{parts["vae"]}"\ntext = "{parts["text"]}"\npixels = {pixels}',
    )
    pre = out / f"precomputed-{pixels}"
    assert len(list(pre.glob("*.safetensors"))) == 2

    def first_loss(name: str) -> float:
        cfg = TrainConfig(
            model=TRAIN_SPEC.name,
            data=(str(out),),
            out=str(tmp_path / name),
            vae=parts["vae"],
            text=parts["text"],
            steps=1,
            batch_size=2,
            pixels=pixels,
            caption_dropout=0.5,  # at this seed the first prompt is dropped (encoded), the second precomputed
            log_every=1,
            seed=0,
        )
        return main(cfg)["losses"][0]

    with_pre = first_loss("pre")
    shutil.move(pre, tmp_path / "aside")
    encoded = first_loss("encoded")
    assert with_pre == pytest.approx(encoded, rel=1e-5)
    # Zeroed latents under the same metadata: the trainer reads them (the loss moves).
    (tmp_path / "aside").rename(pre)
    for f in pre.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            meta, tensors = st.metadata(), {k: st.get_tensor(k) for k in st.keys()}
        zeroed = {k: torch.zeros_like(v) if k.startswith("latent.") else v for k, v in tensors.items()}
        save_file(zeroed, str(f), metadata=meta)
    assert first_loss("zeroed") != pytest.approx(encoded, rel=1e-3)
