"""``run.py predict``: masks at the original size, overlays, batches with bad pairs, exit codes.

One tiny GTMS checkpoint (input 64, one epoch on 8 refs) is trained per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import run
from gtms.backend import LocalBackend
from gtms.config import load_config
from gtms.data.pipeline import preprocess_ref, spec_for
from gtms.data.reading import iter_shard_rows
from gtms.data.shards import read_manifest, shards_dir
from gtms.data.tokenizer import ClipTokenizer
from gtms.data.transforms import decode_image, rle_decode
from gtms.eval.metrics import intersection_union, score_prediction
from gtms.infer.predict import Predictor, read_image
from gtms.train.fit import fit
from gtms.viz import overlay_mask

REPO = Path(__file__).resolve().parents[1]


def synthref_overrides(root: Path) -> list[str]:
    """``data.*`` keys naming a prepared SynthRef exactly, so nothing is regenerated."""
    generator = read_manifest(shards_dir(root))["generator"]
    return [f"data.root={root}", f"data.synthref_images={generator['num_images']}",
            f"data.synthref_seed={generator['seed']}",
            f"data.synthref_difficulty={generator['difficulty']}"]


def train_tiny_checkpoint(root: Path, run_dir: Path) -> Path:
    """A briefly trained tiny GTMS checkpoint (input 64, 1 epoch on 8 refs, no Ray)."""
    cfg = load_config(REPO / "experiments" / "synthref.yaml", [
        *synthref_overrides(root), "data.input_size=64", "data.limit_train_refs=8",
        "data.limit_eval_refs=4", f"train.run_dir={run_dir}", "train.name=tiny",
        "train.batch_size=8", "train.eval_batch_size=8", "train.epochs=1",
        "train.image_grid_every=0", "pretrain.before_train=false"])
    return Path(fit(cfg, LocalBackend())["latest_checkpoint"])


@pytest.fixture(scope="module")
def checkpoint(synthref_small, tmp_path_factory) -> Path:
    return train_tiny_checkpoint(synthref_small, tmp_path_factory.mktemp("predict_runs"))


@pytest.fixture(scope="module")
def images(synthref_small) -> list[Path]:
    return sorted((synthref_small / "images").glob("*.jpg"))[:2]


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_overlay_tints_inside_and_keeps_outside():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    mask = np.zeros((50, 70), np.uint8)
    mask[10:30, 20:50] = 1
    out = overlay_mask(image, mask, "the thing")
    strip = out.shape[0] - 50
    assert out.shape == (strip + 50, 70, 3) and strip > 0
    body = out[strip:].astype(int)
    assert np.abs(body[12:28, 22:48] - image[12:28, 22:48]).mean() > 20
    outside = cv2.dilate(mask, np.ones((5, 5), np.uint8)) == 0
    assert np.array_equal(body[outside], image[outside])
    assert out[:strip].std() > 5  # the sentence is printed


def test_predictor_mask_is_the_mask_evaluation_scores(synthref_small, checkpoint):
    """Predict on a file == CRIS evaluation of the same sentence (same letterbox, threshold)."""
    predictor = Predictor.from_checkpoint(checkpoint)
    assert (predictor.input_size, predictor.threshold) == (64, 0.35)
    row = next(iter_shard_rows(str(synthref_small), "val"))
    spec = spec_for("eval", input_size=64, word_len=17, mode="forest-gradcam", seed=0)
    sample = preprocess_ref(row, spec, ClipTokenizer())[0]
    image = decode_image(row["image"])
    (probs,) = predictor.probabilities([predictor.prepare(image, sample["sentence"])])
    assert probs.shape == (row["height"], row["width"])
    with torch.no_grad():
        logits = predictor.model(torch.from_numpy(sample["image"][None]),
                                 torch.from_numpy(sample["tokens"][None])).logits
    at_stride = torch.sigmoid(logits)[0, 0].numpy()
    expected = score_prediction(at_stride, sample["orig_hw"], sample["mask_rle"], 64, 0.35)
    target = rle_decode(sample["mask_rle"], row["height"], row["width"])
    (mask,) = predictor.masks([predictor.prepare(image, sample["sentence"])])
    assert intersection_union(mask, target) == expected


def test_predict_writes_mask_at_original_size_and_overlay(checkpoint, images, tmp_path, capsys):
    image_path, text = images[0], "the green crescent on the right"
    image = read_image(image_path)
    height, width = image.shape[:2]
    predictor = Predictor.from_checkpoint(checkpoint)
    (probs,) = predictor.probabilities([predictor.prepare(image, text)])
    # A threshold that keeps ~30% of the image, whatever the briefly trained model outputs.
    threshold = float(np.clip(np.quantile(probs, 0.7), 0.01, 0.99))
    out = tmp_path / "out"
    assert run.main(["predict", "--checkpoint", str(checkpoint), "--image", str(image_path),
                     "--text", text, "--out", str(out), "--threshold", str(threshold)]) == 0
    printed = capsys.readouterr().out
    assert "1 ok, 0 failed" in printed and f"threshold {threshold}" in printed
    (record,) = read_records(out)
    assert record["error"] is None and (record["height"], record["width"]) == (height, width)
    mask = cv2.imread(record["mask"], cv2.IMREAD_UNCHANGED)
    assert mask.shape == (height, width) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask > 0, probs > threshold)
    assert record["mask_area_fraction"] == pytest.approx((mask > 0).mean(), abs=1e-6)
    assert 0.1 < record["mask_area_fraction"] < 0.5
    overlay = cv2.cvtColor(cv2.imread(record["overlay"]), cv2.COLOR_BGR2RGB)
    strip = overlay.shape[0] - height
    assert overlay.shape[1] == width and strip > 0
    body, inside = overlay[strip:].astype(int), mask > 0
    assert np.abs(body[inside] - image[inside]).mean() > 20
    assert overlay[:strip].std() > 5
    # The input size can be overridden; the mask stays at the original resolution.
    assert run.main(["predict", "--checkpoint", str(checkpoint), "--image", str(image_path),
                     "--text", text, "--out", str(tmp_path / "s128"), "--input-size", "128"]) == 0
    (record,) = read_records(tmp_path / "s128")
    assert cv2.imread(record["mask"], cv2.IMREAD_UNCHANGED).shape == (height, width)


def test_predict_batch_reports_bad_pairs_and_goes_on(checkpoint, images, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not a jpeg at all")
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "near.jpg").write_bytes(images[1].read_bytes())
    jsonl = pairs / "pairs.jsonl"
    jsonl.write_text("\n".join([json.dumps({"image": "near.jpg", "text": "the left crescent"}),
                                "{not json", "",
                                json.dumps({"image": "near.jpg"})]) + "\n")
    argv = ["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
            "--batch-size", "2"]
    for image, text in ((images[0], "the top star"), (tmp_path / "missing.jpg", "a dog"),
                        (images[0], "   "), (images[0], "the bottom ring"), (corrupt, "it")):
        argv += ["--image", str(image), "--text", text]
    assert run.main([*argv, "--jsonl", str(jsonl)]) == 1
    printed = capsys.readouterr().out
    assert "3 ok, 5 failed" in printed and printed.count("FAILED") == 5
    records = read_records(tmp_path / "out")
    assert [r["error"] is None for r in records] == [True, False, False, True, False, True,
                                                    False, False]
    errors = [r["error"] for r in records if r["error"]]
    for expected, error in zip(("image not found", "empty referring expression",
                                "not an image", "not valid JSON", "text missing"), errors):
        assert expected in error
    assert records[5]["image"] == str(pairs / "near.jpg")
    good = [r for r in records if r["error"] is None]
    paths = {r["mask"] for r in good} | {r["overlay"] for r in good}
    assert len(paths) == 6 and all(Path(p).is_file() for p in paths)
    assert all(r["mask"] is None and r["overlay"] is None for r in records if r["error"])


def test_over_long_expression_is_reported_not_echoed(checkpoint, images, tmp_path, capsys):
    words = ("the", "red", "star", "on", "the", "left", "of", "a", "blue", "ring")
    text = " ".join(words[i % len(words)] for i in range(10_000))
    count = len(ClipTokenizer().bpe_ids(text)) + 2
    assert run.main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
                     "--image", str(images[0]), "--text", text, "--image", str(images[0]),
                     "--text", "the red star"]) == 0
    captured = capsys.readouterr()
    assert "2 ok, 0 failed" in captured.out
    assert len(captured.out) + len(captured.err) < 2000   # the sentence is never echoed whole
    assert repr(text[:80].rstrip() + "…") in captured.out
    (warning,) = [line for line in captured.err.splitlines() if "warning" in line]
    assert f"[1/2] {images[0]}" in warning and f"{count:,} tokens" in warning
    assert "data.word_len 17" in warning
    long, short = read_records(tmp_path / "out")
    assert long["text"] == text and f"{count:,} tokens" in long["warning"]
    assert short["warning"] is None


def test_unusable_checkpoint_or_arguments_exit_2(checkpoint, images, tmp_path, capsys):
    pair = ["--image", str(images[0]), "--text", "the top star", "--out", str(tmp_path)]
    base = ["predict", "--checkpoint", str(checkpoint)]
    assert run.main([*base, *pair, "--set", "model.preset=rn50"]) == 2
    assert "architecture" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    assert run.main(["predict", "--checkpoint", str(junk), *pair]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert run.main(["predict", "--checkpoint", str(tmp_path / "nothing"), *pair]) == 2
    assert run.main([*base, *pair, "--input-size", "100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert run.main([*base, "--image", str(images[0]), "--image", str(images[1]),
                     "--text", "one text"]) == 2
    assert "pairs" in capsys.readouterr().err
    assert run.main([*base, "--out", str(tmp_path)]) == 2
    assert "nothing to predict" in capsys.readouterr().err
    assert run.main([*base, *pair, "--jsonl", str(tmp_path / "none.jsonl")]) == 2
    # CRIS-layout checkpoints: one that does not fit the config is refused, a whole one works.
    weights = torch.load(checkpoint / "model.pt", weights_only=True)["model"]
    config = ["--config", str(REPO / "experiments" / "synthref.yaml"), "--input-size", "64"]
    partial = tmp_path / "partial.pth"
    torch.save({"state_dict": {k: v for k, v in weights.items() if not k.startswith("proj.")}},
               partial)
    assert run.main(["predict", "--checkpoint", str(partial), *pair, *config]) == 2
    assert "partial.pth" in capsys.readouterr().err
    cris = tmp_path / "cris.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, cris)
    assert run.main(["predict", "--checkpoint", str(cris), *pair, *config]) == 0


def test_huge_image_is_refused_from_its_header(tmp_path):
    from test_images import png_header_only

    from gtms.infer.predict import PairError

    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(20000, 20000))
    with pytest.raises(PairError) as info:
        read_image(huge)
    message = str(info.value)
    for needle in (str(huge), "20000 x 20000 = 400,000,000 pixels", "limit of 89,478,485",
                   "--max-image-pixels 400000000", "data.max_image_pixels"):
        assert needle in message
    unknown = tmp_path / "scene.hdr"
    ok, encoded = cv2.imencode(".hdr", np.ones((6, 8, 3), np.float32))
    unknown.write_bytes(encoded.tobytes())
    with pytest.raises(PairError, match="size Pillow can read"):
        read_image(unknown)
    assert read_image(unknown, max_pixels=0).shape == (6, 8, 3)   # no limit: decoded as before


def test_pixel_limit_flag_refuses_and_raising_it_accepts(checkpoint, images, tmp_path):
    height, width = read_image(images[0]).shape[:2]
    base = ["predict", "--checkpoint", str(checkpoint), "--image", str(images[0]), "--text",
            "the top star"]
    assert run.main([*base, "--out", str(tmp_path / "small"),
                     "--max-image-pixels", str(height * width - 1)]) == 1
    (record,) = read_records(tmp_path / "small")
    assert f"{width} x {height}" in record["error"] and str(images[0]) in record["error"]
    assert run.main([*base, "--out", str(tmp_path / "exact"), "--set",
                     f"data.max_image_pixels={height * width}"]) == 0


def test_exif_orientation_is_applied_unless_ignored(checkpoint, images, tmp_path):
    from PIL import Image

    stored = read_image(images[0])[:40, :60]  # [H=40, W=60] as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    photo = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(photo, exif=exif)
    for flags, shape in (([], (60, 40)), (["--ignore-orientation"], (40, 60))):
        out = tmp_path / ("stored" if flags else "shown")
        assert run.main(["predict", "--checkpoint", str(checkpoint), "--image", str(photo),
                         "--text", "the star", "--out", str(out), *flags]) == 0
        (record,) = read_records(out)
        assert cv2.imread(record["mask"], cv2.IMREAD_UNCHANGED).shape == shape
        assert (record["height"], record["width"]) == shape
