"""refer-layout loader: ground truth, the restricted unpickler, and every kind of bad input."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gtms.commands import prepare as prepare_command
from gtms.data.records import (
    SENTENCE_REASONS,
    BadInputError,
    DataError,
    SkipLog,
    UnsafePickleError,
)
from gtms.data.refer import (
    PickleTooLargeError,
    ReferSource,
    load_refer,
    load_refs_pickle,
)
from gtms.data.shards import build_shards, read_manifest, read_shard_records
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
    # bytes need a class (_codecs.encode) below protocol 3, and are admitted from protocol 3 on;
    # a refs pickle holds no binary data, so they are text (as Python 2 str values are)
    path.write_bytes(pickle.dumps([{"b": b"raw"}], protocol=3))
    assert load_refs_pickle(path) == [{"b": "raw"}]


# A refs pickle as Python 2's cPickle writes it (protocol 2): keys and values are Python 2 `str`,
# i.e. SHORT_BINSTRING bytes, one of them latin-1 (0xe9 = é), one UTF-8, and one `unicode`.
PY2_PICKLE = (
    b"\x80\x02"                                        # PROTO 2
    b"]q\x00"                                          # EMPTY_LIST, BINPUT 0
    b"}q\x01("                                         # EMPTY_DICT, BINPUT 1, MARK
    b"U\x06ref_idq\x02K\x07"                           # 'ref_id': BININT1 7
    b"U\x05splitq\x03U\x05trainq\x04"                  # 'split': 'train'
    b"U\tsentencesq\x05]q\x06("                        # 'sentences': [ MARK
    b"}q\x07(U\x04sentq\x08U\x04caf\xe9q\t"            #   {'sent': 'caf\xe9' (latin-1),
    b"U\x03rawq\nX\x05\x00\x00\x00caf\xc3\xa9q\x0bu"     #    'raw': u'café'}  SETITEMS
    b"}q\x0cU\x04sentq\rU\x05caf\xc3\xa9q\x0es"        #   {'sent': 'caf\xc3\xa9' (UTF-8)}
    b"e"                                               # ] APPENDS
    b"u"                                               # } SETITEMS
    b"a."                                              # APPEND, STOP
)


# The same kind of file at protocol 0 (text opcodes): STRING 'caf\xe9', UNICODE u'café'.
PY2_PICKLE_PROTOCOL_0 = (b"(lp0\n(dp1\nS'sent'\np2\nS'caf\\xe9'\np3\n"
                         b"sS'raw'\np4\nVcaf\\u00e9\np5\nsa.")


def test_python2_pickle_with_latin1_and_utf8_str_loads(tmp_path):
    with pytest.raises(UnicodeDecodeError):  # what a plain Python 3 load does with it
        pickle.loads(PY2_PICKLE)
    path = tmp_path / "refs(unc).p"
    path.write_bytes(PY2_PICKLE)
    assert load_refs_pickle(path) == [{"ref_id": 7, "split": "train", "sentences": [
        {"sent": "café", "raw": "café"}, {"sent": "café"}]}]
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(PY2_PICKLE_PROTOCOL_0)
    path.write_bytes(PY2_PICKLE_PROTOCOL_0)
    assert load_refs_pickle(path) == [{"sent": "café", "raw": "café"}]


def py2_dumps(value) -> bytes:
    """``value`` pickled as Python 2 does at protocol 2: ``bytes`` stand for Python 2 ``str``
    (SHORT_BINSTRING / BINSTRING), ``str`` for ``unicode`` (BINUNICODE)."""
    out = [b"\x80\x02"]

    def put(v):
        if v is None or isinstance(v, bool):
            out.append({None: b"N", True: b"\x88", False: b"\x89"}[v])
        elif isinstance(v, int):
            out.append(b"J" + struct.pack("<i", v) if -2**31 <= v < 2**31 else
                       b"\x8a" + bytes([8]) + v.to_bytes(8, "little", signed=True))
        elif isinstance(v, float):
            out.append(b"G" + struct.pack(">d", v))
        elif isinstance(v, bytes):
            out.append(b"U" + bytes([len(v)]) + v if len(v) < 256 else
                       b"T" + struct.pack("<i", len(v)) + v)
        elif isinstance(v, str):
            data = v.encode("utf-8")
            out.append(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(v, (list, tuple)):
            out.append(b"](" if isinstance(v, list) else b"(")
            for item in v:
                put(item)
            out.append(b"e" if isinstance(v, list) else b"t")
        elif isinstance(v, dict):
            out.append(b"}(")
            for key, item in v.items():
                put(key)
                put(item)
            out.append(b"u")
        else:
            raise TypeError(type(v))

    put(value)
    return b"".join(out) + b"."


def as_py2_str(value):
    """Every str of ``value`` (dict keys too) as a Python 2 ``str`` in UTF-8."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, list):
        return [as_py2_str(v) for v in value]
    if isinstance(value, dict):
        return {as_py2_str(k): as_py2_str(v) for k, v in value.items()}
    return value


def test_python2_refs_pickle_prepares_with_its_accents(refcoco, tmp_path):
    refs = load_refs_pickle(refcoco.refs_path)
    py2 = as_py2_str(refs)
    py2[0][b"sentences"][0][b"sent"] = b"the caf\xe9 on the left"   # latin-1
    py2[1][b"sentences"][0][b"sent"] = "the café".encode()           # UTF-8
    py2[2][b"sentences"][0][b"sent"] = "the crème brûlée"            # unicode
    refcoco.refs_path.write_bytes(py2_dumps(py2))
    records = load_refer(refcoco, SkipLog(strict=True))
    assert [r.ref_id for r in records] == [r["ref_id"] for r in refs]
    assert [r.sentences[0] for r in records[:3]] == [
        "the café on the left", "the café", "the crème brûlée"]
    assert records[3].sentences == tuple(s["sent"] for s in refs[3]["sentences"])
    assert cli(["--dataset", "refcoco", "--refer-root", str(refcoco.refer_root), "--images",
                str(refcoco.images_dir), "--out", str(tmp_path / "out")]) == 0
    shard_rows = {row.record.ref_id: row.record for row in read_shard_records(
        tmp_path / "out" / "shards")}
    assert shard_rows[refs[0]["ref_id"]].sentences[0] == "the café on the left"


def test_deeply_nested_refs_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "refs(unc).p"
    depth = 200_000
    path.write_bytes(b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")
    with pytest.raises(DataError, match="nested too deeply") as info:
        load_refs_pickle(path)
    assert str(path) in str(info.value)


def shared_reference_bomb(levels: int = 20, width: int = 40) -> bytes:
    """A 1.7 KB pickle of lists that hold the list below ``width`` times (40**20 values)."""
    level: list = ["lol"]
    for _ in range(levels):
        level = [level] * width
    return pickle.dumps(level, protocol=2)


def test_shared_reference_bomb_is_refused_before_it_expands(refcoco, tmp_path, capsys):
    import time

    data = shared_reference_bomb()
    assert len(data) < 1800
    refcoco.refs_path.write_bytes(data)
    start = time.monotonic()
    with pytest.raises(PickleTooLargeError, match="expand to more than 20,000,000 values") as \
            info:
        load_refs_pickle(refcoco.refs_path)
    assert str(info.value).startswith(f"{refcoco.refs_path}: refused")
    assert cli(["--dataset", "refcoco", "--refer-root", str(refcoco.refer_root), "--images",
                str(refcoco.images_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prepare: error: {refcoco.refs_path}: refused") and \
        err.count("\n") == 1
    assert time.monotonic() - start < 10


def test_shared_text_bomb_and_self_reference_are_refused(tmp_path):
    path = tmp_path / "refs(unc).p"
    level: list = ["x" * 100_000]   # 100 KB of text, named 10**4 times: 1 GB
    for _ in range(4):
        level = [level] * 10
    path.write_bytes(pickle.dumps(level, protocol=2))
    assert path.stat().st_size < 110_000
    with pytest.raises(PickleTooLargeError, match="512 MB of text"):
        load_refs_pickle(path)
    loop: list = [{"ref_id": 1}]
    loop.append(loop)
    path.write_bytes(pickle.dumps(loop, protocol=2))
    with pytest.raises(DataError, match="a list contains itself") as info:
        load_refs_pickle(path)
    assert str(path) in str(info.value)


def test_refs_pickle_reading_is_capped_in_time(refcoco, monkeypatch):
    from gtms.data import refer

    refs = load_refs_pickle(refcoco.refs_path)   # a normal file: far below every cap
    assert refer.check_expansion(refs, "x")[0] < refer.MAX_PICKLE_VALUES // 1000
    monkeypatch.setattr(refer, "MAX_PICKLE_SECONDS", -1.0)
    with pytest.raises(PickleTooLargeError, match="reading it took more than") as info:
        load_refs_pickle(refcoco.refs_path)
    assert str(refcoco.refs_path) in str(info.value)


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
    if case == "oversized_image":  # refused from the header, before decoding
        from tests.test_images import png_header_only
        image_file.write_bytes(png_header_only(20000, 20000))
        return on_image, "image_too_large", len(on_image)
    if case == "truncated_image":
        image_file.write_bytes(image_file.read_bytes()[:600])
        return on_image, "undecodable_image", len(on_image)
    if case.endswith("_format_image"):  # Pillow reads these, OpenCV (training's decoder) not
        buffer = io.BytesIO()
        Image.open(image_file).convert("RGB").save(buffer, format=case.split("_")[0].upper())
        image_file.write_bytes(buffer.getvalue())
        return on_image, "undecodable_image", len(on_image)
    on_ann = {r["ref_id"] for r in refs if r["ann_id"] == ref["ann_id"]}
    if case == "ann_without_image_id":
        del anns[ref["ann_id"]]["image_id"]
        reason, blamed = "malformed_annotation", on_ann
    elif case == "bbox_with_null":
        anns[ref["ann_id"]]["bbox"][1] = None
        reason, blamed = "malformed_annotation", on_ann
    elif case == "image_without_height":
        del images[ref["image_id"]]["height"]
        reason, blamed = "malformed_image_info", on_image
    elif case in ("absolute_file_name", "dotdot_file_name"):  # a readable image outside
        secret = Path(source.images_dir).parent / "secret.jpg"
        shutil.copy(image_file, secret)
        images[ref["image_id"]]["file_name"] = str(secret) if case == "absolute_file_name" \
            else "../secret.jpg"
        reason, blamed = "path_outside_images", on_image
    elif case in MALFORMED_REFS:
        key, value = MALFORMED_REFS[case]
        ref[key] = value(ref) if callable(value) else value
        reason, blamed = "malformed_ref", {ref["ref_id"] if key != "ref_id" else None}
    if case in MALFORMED_REFS or case in ("ann_without_image_id", "bbox_with_null",
                                          "image_without_height", "absolute_file_name",
                                          "dotdot_file_name"):
        source.instances_path.write_text(json.dumps(instances))
        source.refs_path.write_bytes(pickle.dumps(refs))
        return blamed, reason, len(blamed)
    if case == "box_outside_image":
        anns[ref["ann_id"]]["bbox"][0] = images[ref["image_id"]]["width"] + 5.0
        reason = "box_outside_image"
    elif case == "box_zero_area":
        anns[ref["ann_id"]]["bbox"][2] = 0.0
        reason = "box_zero_area"
    elif case == "no_sentences":
        ref["sentences"] = []
        reason = "no_sentences"
    elif case == "only_malformed_sentences":
        ref["sentences"] = [{"sent": None}, "not a sentence dict"]
        reason = "no_sentences"
    elif case == "missing_annotation":
        ref["ann_id"] = 987654
        reason = "missing_annotation"
    else:
        raise AssertionError(case)
    source.instances_path.write_text(json.dumps(instances))
    source.refs_path.write_bytes(pickle.dumps(refs))
    return {ref["ref_id"]}, reason, 1


MALFORMED_REFS = {  # case -> (key, bad value or a function of the ref giving it)
    "ref_id_text": ("ref_id", "abc"),
    "ref_id_none": ("ref_id", None),
    "ann_id_list": ("ann_id", lambda ref: [ref["ann_id"]]),
    "category_id_text": ("category_id", "person"),
    "sentences_not_list": ("sentences", "the man on the left"),
    "split_none": ("split", None),
}
CASES = ["missing_image", "undecodable_image", "oversized_image", "truncated_image",
         "box_outside_image", "box_zero_area", "no_sentences", "only_malformed_sentences",
         "missing_annotation",
         "ann_without_image_id", "bbox_with_null", "image_without_height",
         "absolute_file_name", "dotdot_file_name",
         "pcx_format_image", "tga_format_image", "sgi_format_image", "qoi_format_image",
         *MALFORMED_REFS]


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
    skipped = {r: n for r, n in manifest["skipped"].items() if r not in SENTENCE_REASONS}
    assert skipped == {reason: expected} and manifest["skipped_refs"] == expected
    assert f"skipped {expected} ref(s)" in printed and f"{reason}: {expected}" in printed
    assert "None" not in manifest["counts"]
    assert {e["ref_id"] for e in manifest["skipped_examples"][reason]} == ref_ids
    assert sum(manifest["counts"].values()) == total - expected


@pytest.mark.parametrize("case", CASES)
def test_bad_input_stops_strict_mode_naming_file_and_ref(refcoco, tmp_path, case, capsys):
    ref_ids, reason, _ = damage(refcoco, case)
    with pytest.raises(BadInputError) as info:
        build_shards(refcoco, tmp_path / "out", strict=True, progress=False)
    assert info.value.reason == reason
    message = str(info.value)
    # a ref without a usable ref_id is named by its place in the pickle
    where = f"ref {info.value.ref_id}:" if info.value.ref_id is not None else "entry 3 "
    assert info.value.ref_id in ref_ids and where in message
    assert str(refcoco.refer_root) in message or str(refcoco.images_dir) in message
    argv = ["--dataset", "refcoco", "--refer-root", str(refcoco.refer_root), "--images",
            str(refcoco.images_dir), "--out", str(tmp_path / "out2"), "--strict"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert where in err and "Traceback" not in err and err.count("error:") == 1


@pytest.mark.parametrize("case", ["absolute_file_name", "dotdot_file_name"])
def test_image_outside_the_images_folder_is_never_read(refcoco, tmp_path, case, monkeypatch):
    from gtms.data.refer import image_path_problem

    damage(refcoco, case)
    secret = Path(refcoco.images_dir).parent / "secret.jpg"
    opened = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(self.resolve()) or
                        real_read_bytes(self))
    build_shards(refcoco, tmp_path / "out", progress=False)
    assert secret.resolve() not in opened and opened
    assert all(p.is_relative_to(Path(refcoco.images_dir).resolve()) or p.suffix != ".jpg"
               for p in opened)
    for name in ("/etc/passwd", "../x.jpg", "a/../../x.jpg", "a\0.jpg"):
        assert image_path_problem(name) is not None
        with pytest.raises(DataError, match="file_name"):
            refcoco.image_path(name)
    assert image_path_problem("sub/COCO_train2014_1.jpg") is None
    assert image_path_problem("..jpg") is None


def test_empty_sentences_are_kept_malformed_ones_dropped_and_counted(refcoco, tmp_path, capsys):
    refs = load_refs_pickle(refcoco.refs_path)
    refs[0]["sentences"].append({"sent": " ", "tokens": []})
    refs[1]["sentences"].append("not a sentence dict")
    refs[1]["sentences"].append({"sent": None})
    refs[1]["sentences"].append({"sent": None})
    refs[2]["sentences"] = [{"sent": "", "tokens": []}]  # kept: CRIS scores it in evaluation
    refcoco.refs_path.write_bytes(pickle.dumps(refs))
    skips = SkipLog(strict=False)
    records = load_refer(refcoco, skips)
    assert records[0].ref_id == refs[0]["ref_id"] and records[0].sentences[-1] == ""
    assert len(records[0].sentences) == len(refs[0]["sentences"])
    assert len(records[1].sentences) == len(refs[1]["sentences"]) - 3
    assert records[2].sentences == ("",)
    assert skips.counts == {"malformed_sentence": 3}
    # the summary counts dropped sentences apart from skipped refs
    assert cli(["--dataset", "refcoco", "--refer-root", str(refcoco.refer_root), "--images",
                str(refcoco.images_dir), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "skipped: none" in printed and "ref(s)" not in printed
    assert "dropped 3 sentence(s)" in printed
    manifest = read_manifest(tmp_path / "out" / "shards")
    assert manifest["skipped_refs"] == 0 and manifest["dropped_sentences"] == 3
    assert sum(manifest["counts"].values()) == len(refs)


def test_over_long_sentence_is_kept_and_counted_as_truncated(refcoco, tmp_path, capsys):
    refs = load_refs_pickle(refcoco.refs_path)
    long = " ".join(["the", "small", "red", "star"] * 2500)      # 10,000 words
    refs[0]["sentences"].append({"sent": long, "tokens": long.split()})
    refs[1]["sentences"].append({"sent": " ".join(["dog"] * 75)})   # 77 tokens: fits exactly
    refcoco.refs_path.write_bytes(pickle.dumps(refs))
    out = tmp_path / "out"
    assert cli(["--dataset", "refcoco", "--refer-root", str(refcoco.refer_root), "--images",
                str(refcoco.images_dir), "--out", str(out), "--strict"]) == 0
    printed = capsys.readouterr().out
    manifest = read_manifest(out / "shards")
    assert manifest["skipped"] == {"truncated_sentence": 1} and manifest["noted"] == 1
    assert manifest["skipped_refs"] == 0 and manifest["dropped_sentences"] == 0
    assert sum(manifest["counts"].values()) == len(refs)
    (example,) = manifest["skipped_examples"]["truncated_sentence"]
    assert example["ref_id"] == refs[0]["ref_id"] and "10,002 tokens" in example["detail"]
    assert "skipped: none" in printed and "truncated_sentence: 1" in printed
    assert len(printed) < 3000   # the sentence is shown shortened
    rows = {row.record.ref_id: row.record for row in read_shard_records(out / "shards")}
    assert rows[refs[0]["ref_id"]].sentences[-1] == long   # kept whole


def test_libjpeg_warnings_are_captured_and_counted(refcoco, tmp_path, capfd):
    """libjpeg writes "Corrupt JPEG data" to file descriptor 2 itself: prepare keeps it off
    the console and counts the refs of such an image (kept: it decodes)."""
    refs = load_refs_pickle(refcoco.refs_path)
    instances = json.loads(refcoco.instances_path.read_text())
    image = next(im for im in instances["images"] if im["id"] == refs[3]["image_id"])
    on_image = {r["ref_id"] for r in refs if r["image_id"] == image["id"]}
    path = refcoco.image_path(image["file_name"])
    data = path.read_bytes()
    at = data.index(b"\xff\xdb")                     # 3 stray bytes before the DQT marker
    path.write_bytes(data[:at] + b"\x00\x00\x00" + data[at:])
    for strict in ([], ["--strict"]):
        out = tmp_path / f"out{len(strict)}"
        assert cli(["--dataset", "refcoco", "--refer-root", str(refcoco.refer_root), "--images",
                    str(refcoco.images_dir), "--out", str(out), *strict]) == 0
        captured = capfd.readouterr()
        assert "Corrupt JPEG" not in captured.err, captured.err
        manifest = read_manifest(out / "shards")
        assert manifest["skipped"] == {"corrupt_jpeg_warning": len(on_image)}
        assert manifest["skipped_refs"] == 0 and manifest["noted"] == len(on_image)
        assert sum(manifest["counts"].values()) == len(refs)
        example = manifest["skipped_examples"]["corrupt_jpeg_warning"][0]
        assert example["ref_id"] in on_image and example["file"] == str(path)
        assert "3 extraneous bytes before marker 0xdb" in example["detail"]
        assert f"corrupt_jpeg_warning: {len(on_image)}" in captured.out


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


def test_deeply_nested_instances_json_is_a_clear_error(refcoco, tmp_path, capsys):
    depth = 200_000
    refcoco.instances_path.write_text(
        '{"images": ' + "[" * depth + "]" * depth + ', "annotations": [], "categories": []}')
    with pytest.raises(DataError, match="nested too deeply") as info:
        load_refer(refcoco, SkipLog(strict=False))
    assert str(refcoco.instances_path) in str(info.value)
    assert cli(["--dataset", "refcoco", "--refer-root", str(refcoco.refer_root), "--images",
                str(refcoco.images_dir), "--out", str(tmp_path / "out")]) == 2
    assert str(refcoco.instances_path) in capsys.readouterr().err


@pytest.mark.parametrize("images", ["empty", "absent"])
def test_wrong_images_folder_fails_naming_it(refcoco, tmp_path, images, capsys):
    folder = tmp_path / "wrong"
    if images == "empty":
        folder.mkdir()
    out = tmp_path / "out"
    assert cli(["--dataset", "refcoco", "--refer-root", str(refcoco.refer_root), "--images",
                str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "Traceback" not in err and err.count("error:") == 1
    manifest = read_manifest(out / "shards")
    assert manifest is None or not manifest["complete"]
    if images == "empty":
        assert "nothing usable" in err and "missing_image" in err
        assert manifest["skipped"]["missing_image"] == len(load_refs_pickle(refcoco.refs_path))


def test_refs_pickle_without_refs_fails(refcoco, tmp_path, capsys):
    refcoco.refs_path.write_bytes(pickle.dumps([]))
    assert cli(["--dataset", "refcoco", "--refer-root", str(refcoco.refer_root), "--images",
                str(refcoco.images_dir), "--out", str(tmp_path / "out")]) == 2
    assert f"{refcoco.refs_path} holds no ref" in capsys.readouterr().err
    assert not read_manifest(tmp_path / "out" / "shards")["complete"]
