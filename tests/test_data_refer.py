"""refer-layout loader: ground truth, the restricted unpickler, and every kind of bad input."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from gtms.commands import prepare as prepare_command
from gtms.data.records import BadInputError, DataError, SkipLog, UnsafePickleError
from gtms.data.refer import ReferSource, load_refer, load_refs_pickle
from gtms.data.shards import build_shards, read_manifest
from gtms.data.synthref import SynthRefSettings, generate_synthref
from gtms.data.synthref.generate import assign_splits, synthesize_image
from gtms.data.synthref.scene import DIFFICULTIES

SETTINGS = SynthRefSettings(num_images=24, seed=11)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthref")
    generate_synthref(out, SETTINGS, progress=False)
    return out


@pytest.fixture()
def refcoco(generated, tmp_path) -> ReferSource:
    """The generated dataset copied into a refcoco-named refer layout we may damage."""
    root = tmp_path / "refer"
    (root / "refcoco").mkdir(parents=True)
    shutil.copy(generated / "synthref" / "instances.json", root / "refcoco" / "instances.json")
    shutil.copy(generated / "synthref" / "refs(unc).p", root / "refcoco" / "refs(unc).p")
    shutil.copytree(generated / "images", tmp_path / "images")
    return ReferSource(refer_root=root, dataset="refcoco", split_by="unc",
                       images_dir=tmp_path / "images")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    prepare_command.register(parser.add_subparsers())
    args = parser.parse_args(["prepare", *argv])
    return args.func(args)


# ------------------------------------------------------------------------------ ground truth


def test_loader_returns_the_generators_ground_truth(generated):
    source = ReferSource(generated, "synthref", "unc", generated / "images")
    skips = SkipLog(strict=True)
    records = load_refer(source, skips)
    with open(source.refs_path, "rb") as f:
        refs = pickle.load(f)
    assert [r.ref_id for r in records] == [r["ref_id"] for r in refs]
    by_image: dict[int, list] = {}
    for record in records:
        by_image.setdefault(record.image_id, []).append(record)
    with open(source.instances_path) as f:
        instances = json.load(f)
    first_ann = {}
    for a in instances["annotations"]:
        first_ann.setdefault(a["image_id"], a["id"])
    splits = assign_splits(SETTINGS.num_images, SETTINGS.seed)
    difficulty = DIFFICULTIES[SETTINGS.difficulty]
    checked = 0
    for image_id, recs in by_image.items():
        rng = np.random.default_rng([SETTINGS.seed, image_id - 1])
        image, objects, truth = synthesize_image(rng, splits[image_id - 1], difficulty)
        truth_by_ann = {first_ann[image_id] + k: (objects[k], sentences)
                        for k, sentences in truth}
        assert {r.ann_id for r in recs} == set(truth_by_ann)
        for r in recs:
            obj, sentences = truth_by_ann[r.ann_id]
            assert (r.height, r.width) == image.shape[:2]
            assert r.box_xywh == obj.box_xywh
            assert r.category == obj.category and r.split == splits[image_id - 1]
            assert list(r.sentences) == sentences
            assert np.array_equal(r.decode_mask(), obj.mask)
            checked += 1
    assert checked == len(records) > 40


# ------------------------------------------------------------------------ restricted unpickler


class Touch:
    """Unpickling this would create ``path`` through os.system."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_refused_without_running(refcoco, tmp_path):
    marker = tmp_path / "pwned"
    refs = load_refs_pickle(refcoco.refs_path)
    refs[0]["sentences"] = [{"sent": "x", "evil": Touch(marker)}]
    refcoco.refs_path.write_bytes(pickle.dumps(refs))
    with pytest.raises(UnsafePickleError) as info:
        load_refer(refcoco, SkipLog(strict=False))
    assert not marker.exists()
    message = str(info.value)
    assert str(refcoco.refs_path) in message and "system" in message
    # the CLI stops with the same message (default, non-strict mode too: the file is refused)
    assert cli(["--dataset", "refcoco", "--refer-root", str(refcoco.refer_root), "--images",
                str(refcoco.images_dir), "--out", str(tmp_path / "out")]) == 2
    assert not marker.exists()
    assert not (tmp_path / "out" / "shards" / "manifest.json").exists()


@pytest.mark.parametrize("payload", [
    OrderedDict(a=1),          # a harmless class is still a class
    {1, 2, 3},                 # set needs builtins.set under protocol 2
    np.float32(1.0),
])
def test_pickle_with_any_class_is_refused(tmp_path, payload):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"x": payload}], protocol=2))
    with pytest.raises(UnsafePickleError, match="refused to unpickle"):
        load_refs_pickle(path)


def test_pickle_of_builtins_loads(tmp_path):
    refs = [{"ref_id": 1, "sentences": [{"sent": "a é", "tokens": ["a"]}], "t": (1, 2.5, None),
             "ok": True, "big": 2**70}]
    for protocol in (0, 2, 4, 5):
        path = tmp_path / f"p{protocol}.p"
        path.write_bytes(pickle.dumps(refs, protocol=protocol))
        assert load_refs_pickle(path) == refs
    # bytes need a class (_codecs.encode) below protocol 3, and are admitted from protocol 3 on
    path.write_bytes(pickle.dumps([{"b": b"raw"}], protocol=3))
    assert load_refs_pickle(path) == [{"b": b"raw"}]


def test_damaged_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"a": 1}])[:-5])
    with pytest.raises(DataError, match="not a readable refs pickle"):
        load_refs_pickle(path)


# ------------------------------------------------------------------------------- bad input


def damage(source: ReferSource, case: str) -> tuple[set[int], str, int]:
    """Break the dataset one way; returns (ref ids to blame, reason, refs expected skipped)."""
    refs = load_refs_pickle(source.refs_path)
    instances = json.loads(source.instances_path.read_text())
    images = {im["id"]: im for im in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    ref = refs[3]
    on_image = {r["ref_id"] for r in refs if r["image_id"] == ref["image_id"]}
    image_file = source.image_path(images[ref["image_id"]]["file_name"])
    if case == "missing_image":
        image_file.unlink()
        return on_image, "missing_image", len(on_image)
    if case == "undecodable_image":
        image_file.write_bytes(b"this is not a jpeg")
        return on_image, "undecodable_image", len(on_image)
    if case == "truncated_image":
        image_file.write_bytes(image_file.read_bytes()[:600])
        return on_image, "undecodable_image", len(on_image)
    if case == "box_outside_image":
        anns[ref["ann_id"]]["bbox"][0] = images[ref["image_id"]]["width"] + 5.0
        reason = "box_outside_image"
    elif case == "box_zero_area":
        anns[ref["ann_id"]]["bbox"][2] = 0.0
        reason = "box_zero_area"
    elif case == "no_sentences":
        ref["sentences"] = []
        reason = "no_sentences"
    elif case == "only_empty_sentences":
        ref["sentences"] = [{"sent": "  ", "tokens": []}, {"sent": "", "tokens": []}]
        reason = "no_sentences"
    elif case == "missing_annotation":
        ref["ann_id"] = 987654
        reason = "missing_annotation"
    else:
        raise AssertionError(case)
    source.instances_path.write_text(json.dumps(instances))
    source.refs_path.write_bytes(pickle.dumps(refs))
    return {ref["ref_id"]}, reason, 1


CASES = ["missing_image", "undecodable_image", "truncated_image", "box_outside_image",
         "box_zero_area", "no_sentences", "only_empty_sentences", "missing_annotation"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_skipped_and_counted(refcoco, tmp_path, case, capsys):
    ref_ids, reason, expected = damage(refcoco, case)
    total = len(load_refs_pickle(refcoco.refs_path))
    out = tmp_path / "out"
    argv = ["--dataset", "refcoco", "--refer-root", str(refcoco.refer_root), "--images",
            str(refcoco.images_dir), "--out", str(out), "--rows-per-file", "16"]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    manifest = read_manifest(out / "shards")
    skipped = dict(manifest["skipped"])
    skipped.pop("empty_sentence", None)  # counts dropped sentences, not refs
    assert skipped == {reason: expected}
    assert f"{reason}: {expected}" in printed
    assert {e["ref_id"] for e in manifest["skipped_examples"][reason]} == ref_ids
    assert sum(manifest["counts"].values()) == total - expected


@pytest.mark.parametrize("case", CASES)
def test_bad_input_stops_strict_mode_naming_file_and_ref(refcoco, tmp_path, case, capsys):
    ref_ids, reason, _ = damage(refcoco, case)
    with pytest.raises(BadInputError) as info:
        build_shards(refcoco, tmp_path / "out", strict=True, progress=False)
    assert info.value.reason == reason
    message = str(info.value)
    assert info.value.ref_id in ref_ids and f"ref {info.value.ref_id}:" in message
    assert str(refcoco.refer_root) in message or str(refcoco.images_dir) in message
    argv = ["--dataset", "refcoco", "--refer-root", str(refcoco.refer_root), "--images",
            str(refcoco.images_dir), "--out", str(tmp_path / "out2"), "--strict"]
    assert cli(argv) == 2
    assert f"ref {info.value.ref_id}:" in capsys.readouterr().err


def test_partly_empty_sentences_keep_the_ref_and_are_counted(refcoco):
    refs = load_refs_pickle(refcoco.refs_path)
    refs[0]["sentences"].append({"sent": " ", "tokens": []})
    refcoco.refs_path.write_bytes(pickle.dumps(refs))
    skips = SkipLog(strict=False)
    records = load_refer(refcoco, skips)
    assert records[0].ref_id == refs[0]["ref_id"] and all(records[0].sentences)
    assert skips.counts == {"empty_sentence": 1}


def test_partition_and_arguments_are_checked(refcoco, tmp_path, capsys):
    with pytest.raises(DataError, match="no 'umd' partition"):
        ReferSource(refcoco.refer_root, "refcoco", "umd", refcoco.images_dir)
    assert cli(["--dataset", "refcoco"]) == 2
    assert "--refer-root" in capsys.readouterr().err
    assert cli(["--dataset", "refcoco", "--refer-root", str(refcoco.refer_root), "--images",
                str(refcoco.images_dir), "--num-images", "5"]) == 2
    assert "--num-images" in capsys.readouterr().err
    assert cli(["--dataset", "refcocog", "--refer-root", str(refcoco.refer_root), "--images",
                str(refcoco.images_dir), "--out", str(tmp_path / "g")]) == 2
    assert "refs(umd).p" in capsys.readouterr().err
