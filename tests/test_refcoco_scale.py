"""benchmarks.refcoco_scale: published counts, Python 2 pickles, and a small stand-in through
``run.py prepare`` (split counts, manifest, same seed same bytes, resume)."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

import run
from benchmarks import refcoco_scale as S
from gtms.data.refer import file_sha256, load_refs_pickle
from gtms.data.shards import read_manifest

SCALE = 0.002  # RefCOCO: 41 images, 101 refs, 284 sentences
SEED = 3


# ------------------------------------------------------------------------------ unit tier


def test_counts_at_full_scale_are_the_published_ones():
    refcoco = S.split_counts("refcoco")
    assert S.totals(refcoco) == (19_994, 50_000, 142_210)
    assert {s: c.sentences for s, c in refcoco.items()} == {
        "train": 120_624, "val": 10_834, "testA": 5_657, "testB": 5_095}
    assert {s: c.refs for s, c in refcoco.items()} == {
        "train": 42_404, "val": 3_811, "testA": 1_975, "testB": 1_810}
    assert {s: c.images for s, c in refcoco.items()} == {
        "train": 16_994, "val": 1_500, "testA": 750, "testB": 750}
    refcocog = S.split_counts("refcocog", 1.0)
    assert S.totals(refcocog) == (25_799, 49_822, 95_010)
    assert {s: c.sentences for s, c in refcocog.items()} == {
        "train": 80_512, "val": 4_896, "test": 9_602}
    assert S.PUBLISHED["refcoco"][0] == "unc" and S.PUBLISHED["refcocog"][0] == "umd"


@pytest.mark.parametrize("dataset", ["refcoco", "refcocog"])
@pytest.mark.parametrize("scale", [1e-5, 0.002, 0.01, 0.5])
def test_scaled_counts_keep_every_split_and_the_ratios(dataset, scale):
    for split, c in S.split_counts(dataset, scale).items():
        full = S.PUBLISHED[dataset][1][split]
        assert 1 <= c.images <= c.refs <= c.sentences <= 3 * c.refs
        if scale >= 0.01:
            assert c.sentences == math.floor(full.sentences * scale + 0.5)
            assert c.refs == math.floor(full.refs * scale + 0.5)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="not in"):
            S.split_counts(dataset, bad)


def test_py2_pickle_is_what_python2_writes_and_the_loader_decodes(tmp_path):
    refs = [{"ref_id": i, "split": "train", "ann_id": 70_000 + i, "big": -2**31,
             "sentences": [{"sent": f"left man {i}", "tokens": ["left", "man", str(i)]}]}
            for i in range(1_500)]   # two APPENDS batches, memo indexes past 256
    refs[3]["sentences"][0]["sent"] = "the café"
    refs[4]["none"], refs[4]["yes"], refs[4]["long"] = None, True, "x" * 300
    path = tmp_path / "refs(unc).p"
    path.write_bytes(S.py2_pickle(refs))
    assert load_refs_pickle(path) == refs
    raw = pickle.loads(path.read_bytes(), encoding="bytes")   # Python 2 str arrive as bytes
    assert raw[3][b"sentences"][0][b"sent"] == "the café".encode()
    with pytest.raises(UnicodeDecodeError):                    # as a real Python 2 file does
        pickle.loads(path.read_bytes())
    with pytest.raises(TypeError, match="float"):
        S.py2_pickle([1.5])


# ------------------------------------------------------------------------------ integration


def generate(out: Path, *extra: str) -> int:
    return S.main(["--out", str(out), "--scale", str(SCALE), "--seed", str(SEED), *extra])


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("refcoco_scale") / "a"
    assert generate(out) == 0
    return out


@pytest.mark.integration
def test_prepare_reads_the_generators_counts(standin, tmp_path, capsys):
    counts = S.split_counts("refcoco", SCALE)
    refer = standin / "refer"
    assert run.main(["prepare", "--dataset", "refcoco", "--refer-root", str(refer), "--images",
                     str(standin / "images"), "--out", str(tmp_path / "prepared")]) == 0
    manifest = read_manifest(tmp_path / "prepared" / "shards")
    assert manifest["counts"] == {s: c.refs for s, c in counts.items()}
    assert manifest["sentences"] == {s: c.sentences for s, c in counts.items()}
    assert (manifest["dataset"], manifest["split_by"], manifest["complete"]) == \
        ("refcoco", "unc", True)
    assert manifest["skipped"] == {} and manifest["skipped_refs"] == 0
    assert manifest["dropped_sentences"] == 0
    source = manifest["source"]
    assert source["refs_sha256"] == file_sha256(refer / "refcoco" / "refs(unc).p")
    assert source["instances_sha256"] == file_sha256(refer / "refcoco" / "instances.json")
    for split, c in counts.items():
        entries = [e for e in manifest["shards"] if e["split"] == split]
        assert sum(e["num_rows"] for e in entries) == c.refs
        assert sum(e["num_sentences"] for e in entries) == c.sentences
    stamp = json.loads((standin / S.STAMP).read_text())
    assert stamp["counts"] == {s: c._asdict() for s, c in counts.items()}


@pytest.mark.integration
def test_refs_and_instances_look_like_refcoco(standin):
    refs = load_refs_pickle(standin / "refer" / "refcoco" / "refs(unc).p")
    instances = json.loads((standin / "refer" / "refcoco" / "instances.json").read_text())
    images = {i["id"]: i for i in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    assert len(images) == len(list((standin / "images").glob("*.jpg"))) == 41
    assert len(anns) / len(images) > 5   # every object of an image, not only the referred
    split_of: dict[int, set[str]] = {}
    for ref in refs:
        split_of.setdefault(ref["image_id"], set()).add(ref["split"])
        assert set(ref) == {"ref_id", "ann_id", "image_id", "split", "sentences",
                            "category_id", "file_name", "sent_ids"}
        assert 2 <= len(ref["sentences"]) <= 3
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        assert all(s["tokens"] == s["sent"].split() for s in ref["sentences"])
        assert anns[ref["ann_id"]]["image_id"] == ref["image_id"]
        assert anns[ref["ann_id"]]["category_id"] == ref["category_id"]
        if ref["split"] in ("testA", "testB"):   # people only, and no people
            assert (ref["category_id"] == 1) == (ref["split"] == "testA")
    assert set(split_of) == set(images) and all(len(s) == 1 for s in split_of.values())
    assert [r["ref_id"] for r in refs] == list(range(len(refs)))


@pytest.mark.integration
def test_objects_are_drawn_where_they_are_annotated(standin):
    """The last object of an image is drawn on top: the mean colour inside its annotated mask
    is its colour (the texture and noise average out)."""
    plans = S.plan_images(S.split_counts("refcoco", SCALE), SEED)
    sizes = []
    for plan in plans[:20]:
        path = standin / "images" / plan.file_name
        sizes.append(path.stat().st_size)
        bgr = cv2.imread(str(path))
        top = plan.objects[-1]
        rle = mask_utils.frPyObjects([top.polygon.tolist()], S.HEIGHT, S.WIDTH)
        mask = mask_utils.decode(mask_utils.merge(rle)).astype(bool)
        mean_rgb = bgr[mask][:, ::-1].mean(axis=0)
        assert np.abs(mean_rgb - np.array(top.rgb)).max() < 15, (plan.file_name, top)
    assert 140_000 < np.mean(sizes) < 180_000   # COCO's typical 640 x 480 JPEG


@pytest.mark.integration
def test_same_seed_same_bytes_and_a_rerun_keeps_the_images(standin, tmp_path, capsys):
    again = tmp_path / "b"
    assert generate(again, "--workers", "2") == 0
    assert digests(again) == digests(standin)
    images = sorted((again / "images").glob("*.jpg"))
    before = {p.name: p.stat().st_mtime_ns for p in images}
    images[0].unlink()
    (again / "refer" / "refcoco" / "refs(unc).p").unlink()
    (again / "images" / f".{images[1].name}.999.tmp").write_bytes(b"half an image")
    capsys.readouterr()
    assert generate(again) == 0
    assert "41 images (40 already written)" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in sorted((again / "images").glob("*.jpg"))}
    assert {n for n in after if after[n] != before[n]} == {images[0].name}
    assert digests(again) == digests(standin)   # the temporary file is gone too
    assert S.main(["--out", str(again), "--scale", str(SCALE), "--seed", "4"]) == 2
    assert "use another --out" in capsys.readouterr().err
