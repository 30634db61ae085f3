"""A small watermark classifier, trained here on synthetic data, shipped in assets/watermark/.

No public watermark detector's weights can be fetched offline (LAION's is an EfficientNet-B3 from GitHub), so we
make our own task: backgrounds (crops of the two photos scikit-learn ships, with shuffled colour channels, and
procedural images: 1/f noise, smooth noise, shapes, opaque sign-like text) with or without an overlaid watermark (semi-transparent text in a
corner, centred, or tiled diagonally; a translucent logo badge with text; a copyright line). Opaque text on
solid panels is a *negative*: typography is wanted data, watermarks are not.

Held-out evaluation (``evaluate``) uses unseen fonts, another seed and photo crops from the other 40% of each
photo's width (training sees only the left 60%). A first model trained on one photo and tested on the other
flagged every crop of the unseen photo: with two photos, any real-photo generalisation claim is unmeasured.

    python -m fluxion.curate.watermark train OUT_DIR [--steps N]     # writes watermark.safetensors + metrics
    python -m fluxion.curate.watermark eval WEIGHTS                  # precision / recall on held-out synthetic data
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

SIDE = 128  # the classifier's input: RGB resized (not cropped) to SIDE x SIDE
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
TRAIN_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf")
HELD_OUT_FONTS = ("DejaVuSansMono-Bold.ttf", "DejaVuSansCondensed.ttf", "DejaVuSerifCondensed-Italic.ttf")
WORDS = (
    "stock photo preview sample copyright studio images getty pixel lens media photo agency shot "
    "draft proof licensed content creative archive gallery pictures visual frame"
).split()
ASSET = Path(__file__).resolve().parents[1] / "assets" / "watermark" / "watermark.safetensors"


class WatermarkNet(nn.Module):
    """Five strided 3x3 conv layers (16-32-64-64-96 channels, BN + ReLU) -> global average and max pool ->
    linear -> one logit. About 100k parameters; 128x128 input."""

    def __init__(self):
        super().__init__()
        chans = [3, 16, 32, 64, 64, 96]
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * chans[-1], 1)

    def forward(self, x):  # x [B, 3, SIDE, SIDE] in [0, 1] -> logits [B]
        f = self.features(x * 2 - 1)
        return self.head(torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)).squeeze(1)


def load_classifier(path: str | Path = ASSET) -> WatermarkNet:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"watermark classifier weights not found: {path}")
    model = WatermarkNet()
    model.load_state_dict(load_file(path), strict=True)
    return model.eval()


def to_input(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((SIDE, SIDE), Image.BILINEAR)) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


# --- synthetic data -----------------------------------------------------------------------------------------------
@dataclass
class Synth:
    """Makes (image, has_watermark) pairs. Photo backgrounds are square crops of `photos` taken inside `region`
    (a horizontal band of each photo, as fractions of its width) so training and evaluation can use disjoint
    pixels."""

    photos: list[np.ndarray]
    fonts: tuple[str, ...]
    rng: np.random.Generator
    region: tuple[float, float] = (0.0, 1.0)
    side: int = 192  # generated images are this size; the classifier resizes them

    def font(self, size: int) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(str(FONT_DIR / self.fonts[self.rng.integers(len(self.fonts))]), size)

    def photo_crop(self) -> Image.Image:
        r, s = self.rng, self.side
        photo = self.photos[r.integers(len(self.photos))]
        h, w = photo.shape[:2]
        x_lo, x_hi = int(self.region[0] * w), int(self.region[1] * w)
        c = int(r.integers(min(h, x_hi - x_lo) // 4, min(h, x_hi - x_lo)))
        y, x = r.integers(0, h - c + 1), r.integers(x_lo, x_hi - c + 1)
        arr = photo[y : y + c, x : x + c][
            ..., r.permutation(3)
        ]  # channel shuffle: new colours, same structure
        im = Image.fromarray(arr).resize((s, s), Image.BILINEAR)
        if r.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return Image.fromarray(np.clip(np.asarray(im) * r.uniform(0.6, 1.3), 0, 255).astype(np.uint8))

    def pink_noise(self) -> Image.Image:
        """1/f noise per channel: the power spectrum of natural images, with no particular content."""
        r, s = self.rng, self.side
        f = np.sqrt(np.fft.fftfreq(s)[:, None] ** 2 + np.fft.fftfreq(s)[None, :] ** 2)
        f[0, 0] = 1.0
        chans = []
        for _ in range(3):
            spec = (r.normal(size=(s, s)) + 1j * r.normal(size=(s, s))) / f ** r.uniform(0.8, 1.4)
            x = np.fft.ifft2(spec).real
            chans.append((x - x.mean()) / (x.std() + 1e-8))
        mix = r.normal(size=(3, 3)) * 0.5 + np.eye(3)  # correlated channels, like photos
        img = np.tensordot(mix, np.stack(chans), 1).transpose(1, 2, 0) * r.uniform(25, 60) + r.uniform(
            60, 200, 3
        )
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))

    def background(self) -> Image.Image:
        r, s = self.rng, self.side
        kind = r.integers(5)
        if kind <= 1 and self.photos:
            return self.photo_crop()
        if kind == 2:  # smooth noise, bicubic-upsampled
            g = r.integers(2, 12)
            small = (r.random((g, g, 3)) * 255).astype(np.uint8)
            return Image.fromarray(small).resize((s, s), Image.BICUBIC)
        if kind == 3 or not self.photos:
            return self.pink_noise()
        # Shapes and strokes on a flat, smooth or 1/f background: edges and lines are not watermarks.
        under = r.integers(3)
        if under == 0:
            im = Image.new("RGB", (s, s), tuple(int(v) for v in r.integers(0, 256, 3)))
        elif under == 1:
            small = (r.random((int(r.integers(2, 8)),) * 2 + (3,)) * 255).astype(np.uint8)
            im = Image.fromarray(small).resize((s, s), Image.BICUBIC)
        else:
            im = self.pink_noise()
        d = ImageDraw.Draw(im)
        for _ in range(r.integers(1, 8)):
            x0, y0 = r.integers(-s // 4, s, 2)
            x1, y1 = x0 + r.integers(15, s), y0 + r.integers(15, s)
            fill = tuple(int(v) for v in r.integers(0, 256, 3))
            (d.ellipse if r.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=fill)
        for _ in range(r.integers(0, 5)):
            d.line(
                tuple(int(v) for v in r.integers(0, s, 4)),
                fill=tuple(int(v) for v in r.integers(0, 256, 3)),
                width=int(r.integers(1, 6)),
            )
        if r.random() < 0.5:  # opaque sign-like text on a panel: a hard negative
            panel = tuple(int(v) for v in r.integers(0, 256, 3))
            ink = tuple(255 - v for v in panel)
            y = int(r.integers(0, s - 50))
            d.rectangle((8, y, s - 8, y + 40), fill=panel)
            d.text((14, y + 6), " ".join(r.choice(WORDS, 2)).upper(), fill=ink, font=self.font(22))
        return im

    def watermark(self, im: Image.Image) -> Image.Image:
        r, s = self.rng, self.side
        layer = Image.new("RGBA", im.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(layer)
        shade = 255 if r.random() < 0.6 else int(r.integers(0, 80))
        alpha = int(r.integers(80, 190))  # 0.3-0.75 opacity: visible, as stock-photo marks are
        color = (shade, shade, shade, alpha)
        text = ("© " if r.random() < 0.5 else "") + " ".join(r.choice(WORDS, int(r.integers(1, 3))))
        kind = r.integers(4)
        if kind == 0:  # tiled diagonal text
            size = int(r.integers(16, 30))
            tile = Image.new("RGBA", (s * 2, s * 2), (0, 0, 0, 0))
            td = ImageDraw.Draw(tile)
            step = int(size * r.uniform(2.5, 4.5))
            for y in range(0, 2 * s, step):
                td.text(
                    (int(r.integers(0, step)) - step, y), (text + "   ") * 6, fill=color, font=self.font(size)
                )
            tile = tile.rotate(float(r.uniform(20, 50)), resample=Image.BILINEAR)
            layer = tile.crop((s // 2, s // 2, s // 2 + s, s // 2 + s))
        elif kind == 1:  # one large centred word
            size = int(r.integers(24, 48))
            font = self.font(size)
            w = d.textlength(text, font=font)
            d.text(((s - w) / 2, (s - size) / 2 + r.integers(-30, 30)), text, fill=color, font=font)
        elif kind == 2:  # logo badge
            cx, cy, rad = r.integers(50, s - 50), r.integers(50, s - 50), int(r.integers(25, 45))
            d.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), outline=color, width=int(r.integers(2, 6)))
            d.text((cx - rad * 0.8, cy - 8), text[:8], fill=color, font=self.font(16))
        else:  # small corner line
            size = int(r.integers(14, 24))
            x = 6 if r.random() < 0.5 else s - int(d.textlength(text, font=self.font(size))) - 6
            y = 6 if r.random() < 0.5 else s - size - 8
            d.text((x, y), text, fill=(shade, shade, shade, min(255, alpha + 60)), font=self.font(size))
        return Image.alpha_composite(im.convert("RGBA"), layer).convert("RGB")

    def sample(self) -> tuple[Image.Image, bool]:
        im = self.background()
        marked = bool(self.rng.random() < 0.5)
        return (self.watermark(im) if marked else im), marked


def sklearn_photos(which: tuple[str, ...] = ("china.jpg", "flower.jpg")) -> list[np.ndarray]:
    """The two photos scikit-learn ships (BSD; in the test extras through rapidocr's deps is not assumed)."""
    try:
        import sklearn
    except ImportError:
        return []
    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    return [np.asarray(Image.open(folder / n).convert("RGB")) for n in which if (folder / n).is_file()]


TRAIN_REGION, HELD_OUT_REGION = (0.0, 0.6), (0.6, 1.0)  # of each photo's width: disjoint pixels


def held_out_synth(seed: int = 12345) -> Synth:
    return Synth(sklearn_photos(), HELD_OUT_FONTS, np.random.default_rng(seed), HELD_OUT_REGION)


# --- training and evaluation --------------------------------------------------------------------------------------
def precision_recall(scores: np.ndarray, truth: np.ndarray, threshold: float) -> tuple[float, float]:
    pred = scores >= threshold
    tp = float((pred & truth).sum())
    return tp / max(1.0, float(pred.sum())), tp / max(1.0, float(truth.sum()))


@torch.no_grad()
def evaluate(model: WatermarkNet, n: int = 1000, seed: int = 12345, threshold: float = 0.5) -> dict:
    synth = held_out_synth(seed)
    pairs = [synth.sample() for _ in range(n)]
    scores = torch.cat(
        [torch.sigmoid(model(to_input([p[0] for p in pairs[i : i + 64]]))) for i in range(0, n, 64)]
    ).numpy()
    truth = np.array([p[1] for p in pairs])
    p, r = precision_recall(scores, truth, threshold)
    return {
        "n": n,
        "threshold": threshold,
        "precision": p,
        "recall": r,
        "accuracy": float(((scores >= threshold) == truth).mean()),
    }


def make_pool(synth: Synth, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples as classifier inputs (uint8 [n, 3, SIDE, SIDE]) and labels: drawing is the slow part of
    training on a CPU, so a fixed pool is drawn once and revisited with flips."""
    pairs = [synth.sample() for _ in range(n)]
    x = (to_input([p[0] for p in pairs]) * 255).round().to(torch.uint8)
    return x, torch.tensor([float(p[1]) for p in pairs])


def train(
    out: Path,
    steps: int = 3000,
    batch: int = 32,
    pool: int = 4000,
    seed: int = 0,
    lr: float = 2e-3,
    log=print,
) -> dict:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # small convs: one thread beats two fighting over a shared 2-core machine by 9x
    synth = Synth(sklearn_photos(), TRAIN_FONTS, np.random.default_rng(seed), TRAIN_REGION)
    start = time.time()
    xs, ys = make_pool(synth, pool)
    log(f"drew {pool} training images in {time.time() - start:.0f} s")
    model = WatermarkNet()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, pool, (batch,), generator=gen)
        x = xs[idx].float() / 255.0
        flip = torch.rand(batch, generator=gen) < 0.5  # mirrored text is still a watermark
        x[flip] = x[flip].flip(3)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "watermark.safetensors"))
    metrics = {
        "held_out": evaluate(model),
        "steps": steps,
        "batch": batch,
        "pool": pool,
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.time() - start, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fluxion.curate.watermark")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("out", type=Path)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--pool", type=int, default=4000)
    e = sub.add_parser("eval")
    e.add_argument("weights", type=Path, nargs="?", default=ASSET)
    e.add_argument("-n", type=int, default=1000)
    args = p.parse_args(argv)
    if args.cmd == "train":
        print(json.dumps(train(args.out, args.steps, pool=args.pool), indent=2))
    else:
        print(json.dumps(evaluate(load_classifier(args.weights), args.n), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
