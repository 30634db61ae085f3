"""Preference pairs for Diffusion-DPO, made by fluxion itself and judged by automatic rewards.

    python -m fluxion.train.pairs --data TINYSET --out PAIRS [--model M] [--prompts 512] [--candidates 4]
        [--steps 20] [--min-gap 0.1] [--device cuda]

For each prompt (records of a tinyset folder, whose fields say what the image must show) the model draws
`candidates` images with different seeds; each gets a reward, and the best and the worst become a pair when
their rewards differ by at least `min_gap`. Rewards (higher is better, each in about [0, 1]):
  - colour: 1 - CIEDE2000(border colour, requested background) / 50, for every record with a background;
  - OCR: character similarity of what rapidocr reads to the requested text (typography records, when
    rapidocr-onnxruntime is installed);
  - retrieval: 1 / rank of the emoji's label among the prompts' emoji labels under the evaluation scorer
    (emoji records, when a scorer is found; the evaluation's held-out families are never used).
Output: images.npy (every candidate kept in a pair), pairs.jsonl {"prompt", "win", "lose", "rewards"},
meta.json. Written to a temporary folder and renamed, so a stopped run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np


def colour_reward(image: np.ndarray, hex_code: str) -> float:
    from fluxion.curate.tinyset.colors import hex_to_rgb
    from fluxion.evaluate.metrics import border_color, delta_e

    return max(0.0, 1.0 - float(delta_e(border_color(image), hex_to_rgb(hex_code))) / 50.0)


class Rewards:
    def __init__(
        self, use_ocr: bool = True, use_scorer: bool = True, text_encoder=None, labels: list[str] = ()
    ):
        """`labels`: the emoji labels the retrieval reward ranks among (the prompts' own; the evaluation's
        held-out families are removed, so DPO never optimises the figures it is judged by)."""
        self.ocr = self.scorer = None
        if use_ocr:
            try:
                from rapidocr_onnxruntime import RapidOCR

                self.ocr = RapidOCR()
            except ImportError:
                print("rapidocr-onnxruntime is not installed: no OCR reward (pip install fluxion[eval])")
        if use_scorer:
            try:
                from fluxion.evaluate.scorer import load_scorer

                self.scorer, meta = load_scorer(None)
                held = {h["label"] for h in meta["heldout"]}
                self.labels = sorted(set(labels) - held)
                self.text_encoder = text_encoder
                self._emb = None
            except (FileNotFoundError, ImportError, ValueError):
                self.scorer = None

    def __call__(self, record: dict, image: np.ndarray) -> float:
        from fluxion.evaluate.metrics import char_similarity

        parts = []
        if record.get("background"):
            parts.append(colour_reward(image, record["background"]))
        if self.ocr is not None and record.get("kind") == "typography" and record.get("text"):
            from fluxion.evaluate.run import read_text

            parts.append(2.0 * char_similarity(record["text"], read_text(self.ocr, image)))
        if self.scorer is not None and record.get("kind") == "emoji" and record.get("label") in self.labels:
            from fluxion.evaluate.scorer import candidate_text, retrieval_ranks, sentence_embeddings

            if self._emb is None:
                self._emb = sentence_embeddings([candidate_text(lb) for lb in self.labels], self.text_encoder)
            rank = retrieval_ranks(self.scorer, image[None], self._emb, [self.labels.index(record["label"])])[
                0
            ]
            parts.append(1.0 / (rank + 1))  # rank 0 is the best
        return float(sum(parts))


def make_pairs(models, records: list[dict], out: Path, *, candidates: int, steps: int | None, min_gap: float,
               rewards: Rewards, seed: int = 0, chunk: int = 16, log=print) -> dict:  # fmt: skip
    from fluxion.request import Request
    from fluxion.sampling.pipeline import generate

    images, pairs = [], []
    # `chunk` prompts x `candidates` images per call (one batch on the GPU); candidate j of prompt i has seed
    # seed + i * candidates + j, so the candidates differ and the pairs do not depend on the chunking.
    for c0 in range(0, len(records), chunk):
        recs = records[c0 : c0 + chunk]
        req = Request(
            prompt=[r["caption"] for r in recs for _ in range(candidates)],
            seeds=tuple(
                seed + i * candidates + j for i in range(c0, c0 + len(recs)) for j in range(candidates)
            ),
            steps=steps,
        )
        outs = [np.asarray(r.image.convert("RGB")) for r in generate(models, req)]
        for k, rec in enumerate(recs):
            cands = outs[k * candidates : (k + 1) * candidates]
            scores = [rewards(rec, im) for im in cands]
            best, worst = int(np.argmax(scores)), int(np.argmin(scores))
            if scores[best] - scores[worst] >= min_gap:
                images += [cands[best], cands[worst]]
                pairs.append({"prompt": rec["caption"], "win": len(images) - 2, "lose": len(images) - 1,
                              "rewards": [round(scores[best], 4), round(scores[worst], 4)]})  # fmt: skip
        if log:
            log(f"{c0 + len(recs)}/{len(records)} prompts, {len(pairs)} pairs")
    if not pairs:
        raise ValueError("no prompt gave candidates whose rewards differ by min_gap; lower --min-gap")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "images.npy", np.stack(images))
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    meta = {"prompts": len(records), "pairs": len(pairs), "candidates": candidates, "min_gap": min_gap,
            "rewards": {"colour": True, "ocr": rewards.ocr is not None, "retrieval": rewards.scorer is not None}}  # fmt: skip
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return meta


def main(argv: list[str] | None = None) -> int:
    import torch

    from fluxion.weights.models import load_models

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", required=True, help="tinyset folder whose captions.jsonl records are the prompts"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="model to sample (default: the embedded fluxion-tiny)")
    p.add_argument("--preset", default=None)
    p.add_argument("--vae", default=None)
    p.add_argument("--text", default=None)
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--min-gap", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ocr", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.candidates < 2:
        raise SystemExit("--candidates must be at least 2 (a pair needs a best and a worst)")
    records_path = Path(args.data) / "captions.jsonl"
    if not records_path.is_file():
        raise SystemExit(f"{args.data} is not a tinyset folder (no captions.jsonl)")
    records = [json.loads(line) for line in records_path.read_text().splitlines() if line]
    rng = np.random.default_rng(args.seed)
    records = [records[i] for i in rng.permutation(len(records))[: args.prompts]]
    try:
        models = load_models(args.model, preset=args.preset, vae=args.vae, text=args.text, device=args.device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    minilm = getattr(getattr(models.text, "cfg", None), "kind", None) == "minilm"
    labels = [r["label"] for r in records if r.get("kind") == "emoji" and r.get("label")]
    rewards = Rewards(not args.no_ocr, True, models.text if minilm else None, labels)
    meta = make_pairs(models, records, Path(args.out), candidates=args.candidates, steps=args.steps,
                      min_gap=args.min_gap, rewards=rewards, seed=args.seed)  # fmt: skip
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
