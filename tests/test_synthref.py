"""SynthRef generator: determinism, unambiguous expressions, hard masks, splits (DESIGN.md "Data").

The expression check re-parses every sentence with a parser written here (not the generator's
grammar code) and evaluates it with plain, margin-free semantics against the scene the generator
wrote (``scenes.json`` colours + ``instances.json`` boxes and areas).
"""

from __future__ import annotations

import contextlib
import filecmp
import io
import json
import pickle
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from gtms.data.synthref import SynthRefSettings, generate_synthref, prepare_synthref
from gtms.data.synthref.expressions import Expression, Facts, Head, picks_only
from gtms.data.synthref.shapes import GROUP_A, GROUP_B
from gtms.data.transforms import rle_decode

NUM_IMAGES = 40


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthref")
    prepare_synthref(out, SynthRefSettings(num_images=NUM_IMAGES, seed=3), progress=False,
                     rows_per_file=64, rows_per_row_group=16)
    return out


def load(out: Path):
    with open(out / "synthref" / "instances.json") as f:
        instances = json.load(f)
    with open(out / "synthref" / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    with open(out / "synthref" / "scenes.json") as f:
        scenes = json.load(f)
    return instances, refs, scenes


def all_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()
                  and p.name != ".prepare.lock")


# ------------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_bytes(dataset, tmp_path):
    again = tmp_path / "again"
    prepare_synthref(again, SynthRefSettings(num_images=NUM_IMAGES, seed=3), progress=False,
                     rows_per_file=64, rows_per_row_group=16)
    files = all_files(dataset)
    assert files == all_files(again)
    kinds = Counter(p.suffix for p in files)
    assert kinds[".jpg"] == NUM_IMAGES and kinds[".parquet"] >= 4 and kinds[".json"] >= 4
    _, mismatch, errors = filecmp.cmpfiles(dataset, again, [str(p) for p in files],
                                           shallow=False)
    assert mismatch == [] and errors == []


def test_different_seed_differs(dataset, tmp_path):
    other = tmp_path / "other"
    generate_synthref(other, SynthRefSettings(num_images=NUM_IMAGES, seed=4), progress=False)
    for name in ("synthref/instances.json", "synthref/refs(unc).p", "images/synthref_000001.jpg"):
        assert (dataset / name).read_bytes() != (other / name).read_bytes()


# ------------------------------------------------------------------ independent expression check

NOUNS = {"square": "square", "box": "square", "triangle": "triangle", "ellipse": "ellipse",
         "oval": "ellipse", "cross": "cross", "plus sign": "cross", "ring": "ring",
         "donut": "ring", "star": "star", "crescent": "crescent", "moon": "crescent",
         "blob": "blob", "splotch": "blob"}
RELATION_WORDS = [("to the left of", "left_of"), ("on the left of", "left_of"),
                  ("left of", "left_of"), ("to the right of", "right_of"),
                  ("on the right of", "right_of"), ("right of", "right_of"),
                  ("above", "above"), ("over", "above"), ("below", "below"),
                  ("under", "below"), ("beneath", "below")]
POSITION_WORDS = {"left": "left", "leftmost": "left", "right": "right", "rightmost": "right",
                  "top": "top", "topmost": "top", "upper": "top", "bottom": "bottom",
                  "bottommost": "bottom", "lower": "bottom", "middle": "middle",
                  "center": "middle"}
SIZE_WORDS = {"bigger": "big", "larger": "big", "big": "big", "biggest": "big",
              "largest": "big", "smaller": "small", "small": "small", "little": "small",
              "smallest": "small"}
FILLER = {"the", "on", "at", "in"}


def parse_noun_phrase(text: str, colours: set[str]) -> tuple[str, str | None, list[str]]:
    """'the left red plus sign' -> ('cross', 'red', ['left'])."""
    for noun in sorted(NOUNS, key=len, reverse=True):
        if f" {noun} " in f" {text} ":
            before, after = f" {text} ".split(f" {noun} ", 1)
            words = [w for w in (before.split() + after.split()) if w not in FILLER]
            colour = [w for w in words if w in colours]
            rest = [w for w in words if w not in colours]
            assert len(colour) <= 1, text
            return NOUNS[noun], (colour[0] if colour else None), rest
    raise AssertionError(f"no noun in {text!r}")


def check_sentence(sentence: str, target: int, objs: list[dict], width: int, height: int,
                   colours: set[str]) -> str:
    """Assert the sentence picks ``target`` alone; returns the construction used."""
    def matching(category, colour):
        return [i for i, o in enumerate(objs)
                if o["category"] == category and colour in (None, o["colour"])]

    for phrase, relation in RELATION_WORDS:
        if f" {phrase} the " in f" {sentence} ":
            head, landmark = f" {sentence} ".split(f" {phrase} the ", 1)
            category, colour, rest = parse_noun_phrase(head, colours)
            lm_cat, lm_colour, lm_rest = parse_noun_phrase(landmark, colours)
            assert rest == [] and lm_rest == [], sentence
            (lm,) = matching(lm_cat, lm_colour)  # the landmark itself is unique
            sign = {"left_of": ("cx", -1), "right_of": ("cx", 1), "above": ("cy", -1),
                    "below": ("cy", 1)}[relation]
            key, direction = sign
            chosen = [i for i in matching(category, colour) if i != lm
                      and direction * (objs[i][key] - objs[lm][key]) > 0]
            assert chosen == [target], sentence
            return "relation"
    category, colour, rest = parse_noun_phrase(sentence, colours)
    cands = matching(category, colour)
    assert target in cands, sentence
    if not rest:
        assert cands == [target], sentence
        return "plain"
    (word,) = rest
    if word in SIZE_WORDS:
        areas = sorted((objs[i]["area"] * (1 if SIZE_WORDS[word] == "big" else -1), i)
                       for i in cands)
        assert len(cands) >= 2 and areas[-1][1] == target and areas[-1][0] > areas[-2][0]
        return "size"
    position = POSITION_WORDS[word]
    if position == "middle":
        if len(cands) == 1:
            o = objs[target]
            assert abs(o["cx"] - width / 2) < width / 4 and abs(o["cy"] - height / 2) < height / 4
        else:
            assert len(cands) == 3 and sorted(cands, key=lambda i: objs[i]["cx"])[1] == target
        return "position"
    key = "cx" if position in ("left", "right") else "cy"
    sign = -1 if position in ("left", "top") else 1
    if len(cands) == 1:
        assert sign * (objs[target][key] - (width if key == "cx" else height) / 2) > 0, sentence
    else:
        best = max(cands, key=lambda i: sign * objs[i][key])
        others = [sign * objs[i][key] for i in cands if i != target]
        assert best == target and sign * objs[target][key] > max(others), sentence
    return "position"


def scene_objects(instances, scenes):
    anns = {a["id"]: a for a in instances["annotations"]}
    by_image = {}
    for row in scenes["images"]:
        objs = []
        for o in row["objects"]:
            x, y, w, h = anns[o["ann_id"]]["bbox"]
            objs.append({**o, "cx": x + w / 2, "cy": y + h / 2, "area": anns[o["ann_id"]]["area"]})
        by_image[row["image_id"]] = objs
    return by_image


def test_every_sentence_picks_exactly_its_object(dataset):
    instances, refs, scenes = load(dataset)
    images = {im["id"]: im for im in instances["images"]}
    objects = scene_objects(instances, scenes)
    colours = set(scenes["colours"])
    kinds = Counter()
    for ref in refs:
        objs = objects[ref["image_id"]]
        target = [o["ann_id"] for o in objs].index(ref["ann_id"])
        im = images[ref["image_id"]]
        assert 1 <= len(ref["sentences"]) <= 3
        for s in ref["sentences"]:
            assert s["tokens"] == s["sent"].split() and s["raw"].lower().startswith(s["sent"])
            kinds[check_sentence(s["sent"], target, objs, im["width"], im["height"], colours)] += 1
    print("constructions:", dict(kinds))
    # every construction of the grammar is exercised
    assert set(kinds) == {"plain", "size", "position", "relation"}
    # most refs need more than the category name: a same-category distractor is present
    assert kinds["plain"] < 0.5 * sum(kinds.values())


def facts(*rows):
    return [Facts(category=c, colour=col, cx=x, cy=y, area=a) for c, col, x, y, a in rows]


def test_verifier_rejects_ambiguous_expressions():
    two_red_stars = facts(("star", "red", 20, 50, 400), ("star", "red", 80, 50, 420),
                          ("ring", "blue", 50, 50, 500))
    star = Head("star", "red")
    assert not picks_only(Expression(star), 0, two_red_stars, 100, 100)
    assert picks_only(Expression(star, position="left"), 0, two_red_stars, 100, 100)
    assert picks_only(Expression(star, relation="left_of", landmark=Head("ring")), 0,
                      two_red_stars, 100, 100)
    # sizes 400 vs 420: "bigger" is not clear
    assert not picks_only(Expression(star, size="big"), 1, two_red_stars, 100, 100)
    # centres 4 px apart: "left" is not clear
    close = facts(("star", "red", 48, 20, 400), ("star", "red", 52, 80, 400))
    assert not picks_only(Expression(star, position="left"), 0, close, 100, 100)
    assert picks_only(Expression(star, position="top"), 0, close, 100, 100)
    # landmark not unique -> relation unusable
    two_rings = two_red_stars + facts(("ring", "blue", 90, 90, 500))
    assert not picks_only(Expression(star, relation="left_of", landmark=Head("ring")), 0,
                          two_rings, 100, 100)
    # a candidate only slightly left of the landmark makes "left of" unclear
    slight = facts(("star", "red", 10, 50, 400), ("star", "red", 47, 50, 400),
                   ("ring", "blue", 50, 50, 500))
    assert not picks_only(Expression(star, relation="left_of", landmark=Head("ring")), 0,
                          slight, 100, 100)


# ---------------------------------------------------------------------- scenes are a real test


def test_masks_are_far_from_boxes(dataset):
    instances, _, _ = load(dataset)
    ratios = Counter()
    per_category: dict[str, list[float]] = {}
    names = {c["id"]: c["name"] for c in instances["categories"]}
    for a in instances["annotations"]:
        ratio = a["area"] / (a["bbox"][2] * a["bbox"][3])
        per_category.setdefault(names[a["category_id"]], []).append(ratio)
        ratios["n"] += 1
    mean = float(np.mean([r for v in per_category.values() for r in v]))
    print(f"mean mask/box area ratio {mean:.3f};",
          {k: round(float(np.mean(v)), 2) for k, v in sorted(per_category.items())})
    assert mean < 0.65
    for shape in ("ring", "star", "crescent"):
        assert np.mean(per_category[shape]) < 0.55, shape
    assert len(per_category) == 8


def test_scenes_have_distractors_colours_sizes_and_overlaps(dataset):
    instances, refs, scenes = load(dataset)
    anns_by_image: dict[int, list[dict]] = {}
    for a in instances["annotations"]:
        anns_by_image.setdefault(a["image_id"], []).append(a)
    sizes = {(im["height"], im["width"]) for im in instances["images"]}
    assert len(sizes) > NUM_IMAGES // 2
    assert all(128 <= h <= 224 and 128 <= w <= 224 for h, w in sizes)
    assert sum(h != w for h, w in sizes) > 0.8 * len(sizes)
    overlapping = 0
    for row in scenes["images"]:
        cats = Counter(o["category"] for o in row["objects"])
        assert len(row["objects"]) >= 2 and max(cats.values()) >= 2
        boxes = [a["bbox"] for a in anns_by_image[row["image_id"]]]
        overlapping += any(_box_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert overlapping > 0.3 * NUM_IMAGES
    assert len({o["colour"] for r in scenes["images"] for o in r["objects"]}) >= 8
    # large enough at stride 4 of a 128 px input: the letterboxed box spans >= 2 cells a side
    images = {im["id"]: im for im in instances["images"]}
    spans = [min(a["bbox"][2:]) * 128 / max(images[a["image_id"]]["height"],
                                             images[a["image_id"]]["width"]) / 4
             for a in instances["annotations"]]
    print(f"letterboxed box side at stride 4 (cells): min {min(spans):.1f}, "
          f"median {np.median(spans):.1f}")
    assert np.percentile(spans, 5) >= 2.0


def _box_overlap(a, b) -> bool:
    return (min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0])
            and min(a[1] + a[3], b[1] + b[3]) > max(a[1], b[1]))


def test_image_shows_each_object_in_its_named_colour(dataset):
    instances, _, scenes = load(dataset)
    palette = {k: np.array(v, float) for k, v in scenes["colours"].items()}
    colour_of = {o["ann_id"]: o["colour"] for r in scenes["images"] for o in r["objects"]}
    images = {im["id"]: im for im in instances["images"]}
    coco = COCO()
    coco.dataset = instances
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    hits = total = 0
    for a in instances["annotations"]:
        im = images[a["image_id"]]
        rgb = cv2.cvtColor(cv2.imread(str(dataset / "images" / im["file_name"])),
                           cv2.COLOR_BGR2RGB)
        full = rle_decode(coco.annToRLE(a)["counts"], im["height"], im["width"])
        mask = cv2.erode(full, np.ones((3, 3), np.uint8))
        if mask.sum() < 20:
            continue
        mean = rgb[mask.astype(bool)].mean(axis=0)
        nearest = min(palette, key=lambda k: np.linalg.norm(palette[k] - mean))
        hits += nearest == colour_of[a["id"]]
        total += 1
    print(f"objects whose mean colour is nearest their colour name: {hits}/{total}")
    assert hits >= 0.95 * total


def test_splits_like_refcoco(dataset):
    _, refs, _ = load(dataset)
    splits = Counter(r["split"] for r in refs)
    assert set(splits) == {"train", "val", "testA", "testB"}
    assert splits["train"] > splits["val"] and splits["train"] > splits["testA"]
    image_split = {}
    for r in refs:
        assert image_split.setdefault(r["image_id"], r["split"]) == r["split"]
    names = ("square", "triangle", "ellipse", "cross", "ring", "star", "crescent", "blob")
    cats = {s: {names[r["category_id"] - 1] for r in refs if r["split"] == s} for s in splits}
    assert cats["testA"] <= set(GROUP_A) and cats["testB"] <= set(GROUP_B)
    assert not cats["testA"] & cats["testB"]
    assert len(cats["train"]) == 8
    assert len({r["ref_id"] for r in refs}) == len(refs)
    sent_ids = [s["sent_id"] for r in refs for s in r["sentences"]]
    assert len(set(sent_ids)) == len(sent_ids)


def test_difficulty_changes_crowding(tmp_path):
    counts = {}
    for level in ("easy", "hard"):
        generate_synthref(tmp_path / level, SynthRefSettings(num_images=12, seed=1,
                                                             difficulty=level), progress=False)
        instances, _, _ = load(tmp_path / level)
        counts[level] = len(instances["annotations"]) / len(instances["images"])
    print("objects per image:", counts)
    assert counts["easy"] + 1 < counts["hard"]


# ------------------------------------------------------------------ v2 scale statistics


def test_statistics_of_hand_made_refs():
    from gtms.data.synthref.stats import reference_statistics

    images = [{"id": 1, "height": 100, "width": 200}]
    anns = [{"id": 10, "image_id": 1, "category_id": 5, "bbox": [0, 0, 100, 50], "area": 2500},
            {"id": 11, "image_id": 1, "category_id": 5, "bbox": [0, 0, 20, 20], "area": 400},
            {"id": 12, "image_id": 1, "category_id": 6, "bbox": [0, 0, 40, 10], "area": 100}]
    refs = [{"ann_id": 10, "image_id": 1, "split": "train", "sentences": [1, 2]},
            {"ann_id": 12, "image_id": 1, "split": "val", "sentences": [1]}]
    stats = reference_statistics(refs, anns, images)
    assert stats["train"]["box_fraction_median"] == 0.25       # 5000 / 20000
    assert stats["train"]["mask_box_ratio_mean"] == 0.5
    assert stats["train"]["same_category_distractor"] == 1.0  # another category-5 object
    assert stats["val"]["same_category_distractor"] == 0.0
    assert stats["all"]["refs"] == 2 and stats["all"]["objects_per_image"] == 3.0
    assert stats["all"]["sentences_per_ref"] == 1.5


def test_v2_is_refcoco_like_in_scale_and_the_manifest_says_so(dataset):
    from gtms.data.shards import read_manifest, shards_dir
    from gtms.data.synthref.stats import (
        MAX_MEAN_MASK_BOX_RATIO,
        MIN_MEDIAN_BOX_FRACTION,
        reference_statistics,
    )

    instances, refs, _ = load(dataset)
    stats = reference_statistics(refs, instances["annotations"], instances["images"])
    overall = stats["all"]
    assert overall["box_fraction_median"] >= MIN_MEDIAN_BOX_FRACTION
    assert overall["mask_box_ratio_mean"] <= MAX_MEAN_MASK_BOX_RATIO
    assert overall["same_category_distractor"] >= 0.5
    manifest = read_manifest(shards_dir(dataset))
    assert manifest["generator"]["version"] == 2
    assert manifest["statistics"] == json.loads(json.dumps(stats))
