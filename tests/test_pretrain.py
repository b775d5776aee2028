"""SynthCLIP pretraining: the metrics on hand-made inputs, the loss, the export, a 1-epoch run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import run
from gtms.backend import LocalBackend, RayBackend
from gtms.commands.common import DEFAULT_CONFIG
from gtms.config import load_config
from gtms.data.shards import read_manifest, shards_dir
from gtms.model.build import build_model
from gtms.pretrain.metrics import pointing, recall_at_k
from gtms.pretrain.objective import contrastive_loss


def test_recall_at_k_counts_ranks():
    image = torch.eye(4)                       # four orthogonal gallery images
    text = torch.tensor([[1.0, 0, 0, 0],        # -> image 0 (right, rank 0)
                         [0.9, 0.1, 0, 0],      # -> image 0 best, image 1 second (own: 1)
                         [0.1, 0, 0, 1.0],      # -> image 3, then 0 (own: 2, third)
                         [0, 0.2, 0.1, 1.0]])   # own 3: rank 0
    text = torch.nn.functional.normalize(text, dim=1)
    out = recall_at_k(text, image, [0, 1, 2, 3], ks=(1, 2))
    assert out == {"R@1": 0.5, "R@2": 0.75}


def test_pointing_on_hand_made_maps():
    box = np.zeros((2, 4, 4))
    box[:, :2, :2] = 1                           # a 2x2 box in the corner
    mask = np.zeros((2, 4, 4))
    mask[:, 0, 0] = 1                            # the object covers one of its 4 cells
    attention = np.zeros((2, 4, 4))
    attention[0, 0, 0] = 1.0                     # ref 0: A peaks on the object
    attention[1, 1, 1], attention[1, 0, 0] = 1.0, 0.5  # ref 1: A peaks beside it
    raw = np.zeros((2, 4, 4))
    raw[0, 3, 3] = 5                             # ref 0: over the image, outside the box
    raw[1, 0, 0] = 5                             # ref 1: on the object
    out = pointing(raw, attention, box, mask)
    assert out["pointing_box"] == 0.5 and out["pointing_image"] == 0.5
    assert out["pointing_box_chance"] == 0.25 and out["pointing_image_chance"] == 1 / 16
    # contrast: ref 0: 1 - 0 ; ref 1: 0.5 - 1/3
    assert out["a_contrast"] == pytest.approx((1.0 + 0.5 - 1 / 3) / 2)


def test_contrastive_loss_is_clips_on_distinct_captions_and_shares_repeated_ones():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    scale = torch.tensor(10.0)
    logits = scale * image @ text.t()
    labels = torch.arange(5)
    clip = (torch.nn.functional.cross_entropy(logits, labels)
            + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
    assert contrastive_loss(image, text, scale)["loss"] == pytest.approx(float(clip), rel=1e-6)
    assert contrastive_loss(image, text, scale, torch.arange(5))["loss"] == \
        pytest.approx(float(clip), rel=1e-6)
    # Pairs 0 and 1 share a caption: each of their rows has two positives, weight 1/2 each.
    group = torch.tensor([7, 7, 1, 2, 3])
    row0 = -(logits[0].log_softmax(0)[:2].mean())
    got = contrastive_loss(image, text, scale, group)["image_to_text"]
    expected = (row0 - logits[1].log_softmax(0)[:2].mean()
                + sum(-logits[i].log_softmax(0)[i] for i in range(2, 5))) / 5
    assert float(got) == pytest.approx(float(expected), rel=1e-6)


@pytest.fixture(scope="module")
def pretrained(synthref_small, small_data, tmp_path_factory):
    """A 1-epoch SynthCLIP of the tiny preset on the small SynthRef, through the CLI."""
    out = tmp_path_factory.mktemp("synthclip")
    overrides = [*small_data, "data.input_size=64", "pretrain.epochs=1",
                 "pretrain.batch_size=32", "pretrain.crop_size=32", "data.limit_eval_refs=24",
                 "pretrain.scenes=true"]
    argv = ["pretrain", "--no-ray", "--out", str(out)]
    for o in overrides:
        argv += ["--set", o]
    assert run.main(argv) == 0
    return out, load_config(DEFAULT_CONFIG, overrides)


def test_pretrain_writes_openai_layout_weights_that_build_model_loads(pretrained):
    out, cfg = pretrained
    state = torch.load(out / "clip.pt", weights_only=True)
    assert not any(k.startswith("visual.attnpool.connect.") for k in state)
    assert int(state["input_resolution"]) == 64 and int(state["context_length"]) == 77
    model = build_model(cfg.model.preset, clip_weights=out / "clip.pt")
    loaded = model.backbone.state_dict()
    weights = [k for k in state if k not in ("input_resolution", "context_length", "vocab_size")]
    assert "visual.attnpool.positional_embedding" in weights and len(weights) > 100
    for key in weights:
        assert torch.equal(loaded[key], state[key]), key
    assert not (out / "pairs.npz").exists()


def test_pretrain_report_has_metrics_before_and_after(pretrained, synthref_small):
    out, _ = pretrained
    report = json.loads((out / "report.json").read_text())
    for when in ("before", "after"):
        m = report[when]
        assert 0 <= m["R@1"] <= m["R@5"] <= 1
        assert 0 < m["pointing_box_chance"] <= 1 and 0 < m["pointing_image_chance"] < 1
        assert math.isfinite(m["a_contrast"])
    assert report["pairs"]["scenes"] > 0 and report["pairs"]["crops"] > 0
    assert [e["epoch"] for e in report["epochs"]] == [1] and report["epochs"][0]["loss"] > 0
    assert report["probe_refs"] == read_manifest(shards_dir(synthref_small))["counts"]["val"]


def test_pretrain_reuses_finished_output_unless_forced(pretrained, capsys):
    out, _ = pretrained
    stamp = (out / "clip.pt").stat().st_mtime_ns
    assert run.main(["pretrain", "--no-ray", "--out", str(out)]) == 0
    assert "already holds" in capsys.readouterr().out
    assert (out / "clip.pt").stat().st_mtime_ns == stamp


def test_train_pretrains_once_then_reuses_the_cache(synthref_small, small_data, tmp_path,
                                                    capsys):
    """pretrain.before_train (the laptop default): the first fit pretrains into
    <data.root>/synthclip/, starts from those weights, and a second fit reuses them."""
    from gtms.pretrain.run import cache_dir
    from gtms.train.fit import fit

    overrides = [*small_data, "data.input_size=64", "data.limit_train_refs=8",
                 "data.limit_eval_refs=4", "train.epochs=1", "train.batch_size=8",
                 "train.image_grid_every=0", f"train.run_dir={tmp_path}",
                 "pretrain.before_train=true", "pretrain.epochs=1", "pretrain.limit_refs=16",
                 "pretrain.crop_size=32", "pretrain.batch_size=16"]
    cfg = load_config(DEFAULT_CONFIG, [*overrides, "train.name=first"])
    weights = cache_dir(cfg, str(synthref_small)) / "clip.pt"
    assert not weights.exists()
    fit(cfg, LocalBackend())
    assert "pretraining them once" in capsys.readouterr().out and weights.is_file()
    stamp = weights.stat().st_mtime_ns
    used = load_config(tmp_path / "first" / "config.yaml")
    assert used.model.clip_weights == str(weights)
    fit(load_config(DEFAULT_CONFIG, [*overrides, "train.name=second"]), LocalBackend())
    assert "pretraining them once" not in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == stamp


@pytest.mark.integration
def test_pretrain_on_ray_train_with_two_workers(synthref_small, small_data, tmp_path, ray_cluster):
    """The Ray path: two DDP workers, the weights and every epoch's metrics come back through
    rank 0's final checkpoint (Ray refuses tensors as a train function's return value)."""
    from gtms.pretrain.run import run_pretrain

    cfg = load_config(DEFAULT_CONFIG, [*small_data, "data.input_size=64", "pretrain.epochs=2",
                                       "pretrain.limit_refs=16", "pretrain.crop_size=32",
                                       "pretrain.batch_size=16", "data.limit_eval_refs=8",
                                       "ray.num_workers=2", "ray.cpus_per_worker=1"])
    report = run_pretrain(cfg, synthref_small, tmp_path / "synthclip", RayBackend())
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert all(math.isfinite(e["loss"]) and e["pairs_per_s"] > 0 for e in report["epochs"])
    state = torch.load(tmp_path / "synthclip" / "clip.pt", weights_only=True)
    model = build_model(cfg.model.preset, clip_weights=tmp_path / "synthclip" / "clip.pt")
    key = "visual.attnpool.positional_embedding"
    assert torch.equal(model.backbone.state_dict()[key], state[key])
    assert 0 <= report["after"]["R@1"] <= report["after"]["R@5"] <= 1
    assert not (tmp_path / "synthclip" / "ray").exists()  # Ray's run copy is not kept
