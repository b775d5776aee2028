"""run.py export: ONNX and TorchScript files that give PyTorch's logits, run by predict --model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import run
from gtms.infer.export import ExportedModel, MaskLogits, example_inputs
from gtms.model.checkpoint import load_trained

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(synthref_small, small_data, tmp_path_factory) -> Path:
    from gtms.backend import LocalBackend
    from gtms.config import load_config
    from gtms.train.fit import fit

    cfg = load_config(REPO / "experiments" / "synthref.yaml", [
        *small_data, "data.input_size=64", "data.limit_train_refs=8", "data.limit_eval_refs=4",
        "train.epochs=1", f"train.run_dir={tmp_path_factory.mktemp('runs')}",
        "train.name=export", "pretrain.before_train=false"])
    return Path(fit(cfg, LocalBackend())["latest_checkpoint"])


@pytest.mark.parametrize("fmt, suffix", [("onnx", "onnx"), ("torchscript", "pt")])
def test_exported_logits_equal_pytorch_and_predict_runs_them(fmt, suffix, checkpoint,
                                                            synthref_small, tmp_path):
    out = tmp_path / f"model.{suffix}"
    assert run.main(["export", "--checkpoint", str(checkpoint), "--format", fmt,
                     "--out", str(out)]) == 0
    meta = json.loads(Path(f"{out}.json").read_text())
    assert (meta["format"], meta["input_size"]) == (fmt, 64)
    # 8 samples (the batch is dynamic: exported with 2), within 1e-4 of PyTorch
    image, tokens = example_inputs(64, meta["word_len"], batch=8, seed=3)
    with torch.no_grad():
        expected = MaskLogits(load_trained(checkpoint).model.eval())(image, tokens)
    got = ExportedModel(out)(image, tokens).logits
    assert got.shape == expected.shape == (8, 1, 16, 16)
    assert float((got - expected).abs().max()) <= 1e-4
    # predict --model gives the same mask PNG as predict --checkpoint
    picture = sorted((synthref_small / "images").glob("*.jpg"))[0]
    pair = ["--image", str(picture), "--text", "the red circle on the left"]
    assert run.main(["predict", "--checkpoint", str(checkpoint), *pair,
                     "--out", str(tmp_path / "torch")]) == 0
    assert run.main(["predict", "--model", str(out), *pair, "--out", str(tmp_path / "file")]) == 0
    import cv2

    masks = [cv2.imread(str(next((tmp_path / where).glob("*_mask.png"))), cv2.IMREAD_UNCHANGED)
             for where in ("torch", "file")]
    assert masks[0].shape == masks[1].shape and np.array_equal(masks[0], masks[1])


def test_predict_model_needs_an_exported_file(tmp_path, capsys):
    stray = tmp_path / "model.onnx"
    stray.write_bytes(b"not a model")
    assert run.main(["predict", "--model", str(stray), "--image", "x.jpg", "--text", "a"]) == 2
    assert "not an exported model" in capsys.readouterr().err
