"""Golden loss trace: a short deterministic CPU run whose per-step losses were recorded from the trainer before
the loop / objective refactor (tests/fixtures/train_golden.json, written by `python tests/test_train_golden.py`
at commit 186008a). The refactored loop must reproduce them bit for bit: same RNG draws in the same order, same
arithmetic. Covers caption dropout, edit pairs (reference tokens), EMA and the LR schedule."""

import json
from pathlib import Path

from fluxion.config import PRESETS
from fluxion.train.train import TrainConfig, main
from train_fixtures import TRAIN_SPEC, build_components

FIXTURE = Path(__file__).parent / "fixtures" / "train_golden.json"


def golden_config(parts: dict, out: Path) -> TrainConfig:
    return TrainConfig(
        model=TRAIN_SPEC.name,
        data=(parts["data"],),
        out=str(out),
        vae=parts["vae"],
        text=parts["text"],
        steps=10,
        batch_size=3,
        lr=3e-3,
        warmup=3,
        log_every=1,
        caption_dropout=0.3,
        edit_fraction=0.4,
        ema=0.9,
        seed=7,
    )


def run_golden(root: Path) -> tuple[list[float], str]:
    """Per-step losses and a digest of the exported (EMA) weights' values."""
    import hashlib

    from safetensors.torch import load_file

    PRESETS[TRAIN_SPEC.name] = TRAIN_SPEC
    parts = build_components(root)
    result = main(golden_config(parts, root / "run"))
    weights = load_file(result["exported"])
    digest = hashlib.sha256()
    for k in sorted(weights):
        digest.update(k.encode() + weights[k].numpy().tobytes())
    return result["losses"], digest.hexdigest()


RECORDED_THREADS = (
    2  # CPU reductions split by thread count: the trace is bit-exact only at the recorded count
)


def test_loss_trace_is_bit_identical_to_the_recorded_one(tmp_path, monkeypatch):
    import torch

    monkeypatch.setitem(PRESETS, TRAIN_SPEC.name, TRAIN_SPEC)
    recorded = json.loads(FIXTURE.read_text())
    torch.set_num_threads(RECORDED_THREADS)  # conftest restores the previous count afterwards
    losses, digest = run_golden(tmp_path)
    assert losses == recorded["losses"]  # exact float equality, not approx
    assert digest == recorded["weights_sha256"]


if __name__ == "__main__":  # regenerate the fixture (only when the training arithmetic changes on purpose)
    import tempfile

    import torch

    torch.set_num_threads(RECORDED_THREADS)
    with tempfile.TemporaryDirectory() as d:
        trace, digest = run_golden(Path(d))
    FIXTURE.parent.mkdir(exist_ok=True)
    record = {"commit": "186008a", "losses": trace, "weights_sha256": digest}
    FIXTURE.write_text(json.dumps(record, indent=1) + "\n")
    print(trace)
