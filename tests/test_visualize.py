"""``run.py visualize``: Fig. 5-style panels per sample and a contact sheet, checked for content.

One tiny GTMS checkpoint (input 64, one epoch on 8 refs) is trained per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_predict import synthref_overrides, train_tiny_checkpoint

import run
from gtms.config import load_config
from gtms.data.pipeline import spec_for, stack_samples
from gtms.eval.validation import new_meters, validation_step
from gtms.infer.visualize import collect_samples
from gtms.model.checkpoint import load_trained
from gtms.viz import PANEL_TITLES, sample_panels

REPO_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "synthref.yaml"
PANELS = len(PANEL_TITLES)
PANEL = 96


@pytest.fixture(scope="module")
def checkpoint(synthref_small, tmp_path_factory) -> Path:
    return train_tiny_checkpoint(synthref_small, tmp_path_factory.mktemp("visualize_runs"))


def panel_bodies(png: np.ndarray, size: int) -> list[np.ndarray]:
    """A saved row -> its panels without their caption strips (int arrays)."""
    assert png.shape[1] == PANELS * size
    return [png[-size:, k * size:(k + 1) * size].astype(int) for k in range(PANELS)]


def test_visualize_writes_panels_and_contact_sheet(checkpoint, tmp_path, capsys):
    out = tmp_path / "pictures"
    assert run.main(["visualize", "--checkpoint", str(checkpoint), "--n", "3", "--out", str(out),
                     "--panel-size", str(PANEL)]) == 0
    assert "contact_sheet.png written" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 and len({r["ref_id"] for r in records}) == 3
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        ["contact_sheet.png"] + [f"ref{r['ref_id']}_s{r['sent_index']}.png" for r in records])
    rows = []
    for record in records:
        assert 0 <= record["iou"] <= 1 and 0 <= record["pseudo_label_iou"] <= 1
        png = cv2.cvtColor(cv2.imread(record["path"]), cv2.COLOR_BGR2RGB)
        strip = png.shape[0] - PANEL
        assert strip > 0 and png[:strip].std() > 5  # sentence and titles printed
        image, forest, attention, weights, p_hat, prediction, truth = panel_bodies(png, PANEL)
        for name, body in (("image", image), ("forest", forest), ("weights", weights),
                           ("ground truth", truth)):
            assert body.std() > 10, f"{name} panel of {record['path']} is blank"
        assert (forest == 0).all(axis=-1).any()  # outside the box
        assert np.abs(forest - attention).mean() > 10
        assert np.abs(prediction - truth).mean() > 1
        assert np.abs(image - forest).mean() > 10
        rows.append(png)
    sheet = cv2.cvtColor(cv2.imread(str(out / "contact_sheet.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(sheet, np.concatenate(rows, axis=0))


def test_visualize_all_sentences_seed_and_bad_split(checkpoint, tmp_path, capsys):
    out = tmp_path / "all"
    assert run.main(["visualize", "--checkpoint", str(checkpoint), "--n", "4", "--out", str(out),
                     "--all-sentences", "--seed", "1", "--split", "testA"]) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 4 and any(r["sent_index"] > 0 for r in records)
    assert len({(r["ref_id"], r["sent_index"]) for r in records}) == 4
    capsys.readouterr()
    assert run.main(["visualize", "--checkpoint", str(checkpoint), "--split", "nosuch",
                     "--out", str(tmp_path / "bad")]) == 2
    assert "no shards" in capsys.readouterr().err


def test_sample_panels_grid_keeps_the_trainer_layout(synthref_small, checkpoint):
    """The TensorBoard grid (``sample_panels``) stays at the input size, one row per sample."""
    cfg = load_config(REPO_CONFIG, synthref_overrides(synthref_small) + ["data.input_size=64"])
    model, cfg, _ = load_trained(checkpoint, cfg)
    spec = spec_for("val", input_size=64, word_len=17, mode="forest-gradcam", seed=0)
    samples, _ = collect_samples(str(synthref_small), "val", spec, 2)
    batch = stack_samples(samples, spec)
    result = validation_step(model.eval(), batch, new_meters(), input_size=64, threshold=0.35,
                             pseudo_mode="forest-gradcam", sigma=0.02)
    grid = sample_panels(batch, result, max_samples=4)
    assert grid.dtype == np.uint8 and grid.shape[1] == PANELS * 64
    assert grid.shape[0] % 2 == 0 and grid.shape[0] > 2 * 64
