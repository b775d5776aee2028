"""Preprocessing of shard rows (plain functions) and the real Ray Data pipeline."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from gtms.data.pipeline import (
    BadRowError,
    PipelineMonitor,
    PoolSpec,
    Preprocessor,
    SampleSpec,
    build_dataset,
    pick_sentence,
    preprocess_ref,
    spec_for,
    stack_samples,
    start_monitor,
)
from gtms.data.tokenizer import ClipTokenizer
from gtms.pseudo import build_grid_tree, structural_forest
from gtms.train.contexts import iter_shard_rows

SIZE = 64


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


@pytest.fixture(scope="module")
def rows(synthref_small):
    return list(iter_shard_rows(str(synthref_small), "val"))


def test_training_sample_shapes_and_tree(rows, tokenizer):
    spec = spec_for("train", input_size=SIZE, word_len=17, mode="forest-gradcam", seed=0)
    (sample,) = preprocess_ref(rows[0], spec, tokenizer, epoch=0)
    n = (SIZE // 4) ** 2
    assert sample["image"].shape == (3, SIZE, SIZE) and sample["image"].dtype == np.float32
    assert sample["tokens"].shape == (17,) and sample["tokens"][0] == 49406
    assert sample["box"].shape == (SIZE // 4, SIZE // 4) and sample["box"].sum() > 0
    for key in ("parent", "order", "dist", "forest"):
        assert sample[key].shape == (n,)
    assert (sample["parent"] == -1).sum() == 1
    inside = sample["box"].reshape(-1) > 0
    assert np.all(sample["forest"][~inside] == -1) and np.all(sample["forest"][inside] >= 0)
    assert "mask" not in sample and "mask_rle" not in sample


def test_eval_emits_every_sentence(rows, tokenizer):
    spec = spec_for("eval", input_size=SIZE, word_len=17, mode="box-bce", seed=0)
    row = max(rows, key=lambda r: len(r["sentences"]))
    samples = preprocess_ref(row, spec, tokenizer)
    assert [s["sentence"] for s in samples] == list(row["sentences"])
    assert [int(s["sent_index"]) for s in samples] == list(range(len(samples)))
    assert all(s["mask"].shape == (SIZE // 4, SIZE // 4) for s in samples)
    assert tuple(samples[0]["orig_hw"]) == (row["height"], row["width"])


def test_sentence_choice_is_seeded_per_epoch():
    picks = [pick_sentence(0, epoch, 123, 3) for epoch in range(30)]
    assert picks == [pick_sentence(0, epoch, 123, 3) for epoch in range(30)]
    assert len(set(picks)) == 3                 # changes across epochs
    assert picks != [pick_sentence(1, epoch, 123, 3) for epoch in range(30)]


@pytest.mark.parametrize("field, value, reason", [
    ("image", b"not a jpeg", "undecodable_image"),
    ("box_xywh", np.array([500.0, 500.0, 10.0, 10.0], np.float32), "box_outside_image"),
    ("box_xywh", np.array([1.0, 1.0, 0.0, 5.0], np.float32), "box_outside_image"),
    ("sentences", np.array([], dtype=object), "no_sentences"),
    ("sentences", np.array(["   "], dtype=object), "empty_sentence"),
])
def test_bad_rows_raise_with_reason(rows, tokenizer, field, value, reason):
    row = dict(rows[0], **{field: value})
    spec = spec_for("train", input_size=SIZE, word_len=17, mode="tree", seed=0)
    with pytest.raises(BadRowError) as info:
        preprocess_ref(row, spec, tokenizer)
    assert info.value.reason == reason and info.value.ref_id == int(rows[0]["ref_id"])


def test_preprocessor_counts_bad_rows_and_strict_stops(rows):
    batch = {key: np.array([r[key] for r in rows[:3]] + [b"junk" if key == "image"
                                                       else rows[3][key]], dtype=object)
             for key in rows[0]}
    spec = spec_for("train", input_size=SIZE, word_len=17, mode="tree", seed=0)
    udf = Preprocessor.__new__(Preprocessor)       # without Ray: no monitor actor
    udf.spec, udf.split, udf.strict, udf.monitor = spec, "val", False, None
    udf.tokenizer = ClipTokenizer()
    out = udf(batch)
    assert len(out["image"]) == 3
    udf.strict = True
    with pytest.raises(BadRowError, match="undecodable_image"):
        udf(batch)


def test_monitor_counts_by_reason():
    monitor = PipelineMonitor()
    monitor.record("train", 2, [("undecodable_image", 1), ("undecodable_image", 2),
                                ("box_outside_image", 3)])
    assert monitor.counts("train", 2) == {"undecodable_image": 2, "box_outside_image": 1}
    assert monitor.counts("train", 1) == {}
    assert monitor.examples("train", 2)["box_outside_image"] == [3]


def test_empty_batch_keeps_shapes():
    spec = SampleSpec(SIZE, with_tree=True, with_mask=True, with_eval_meta=True, training=False)
    empty = stack_samples([], spec)
    assert empty["image"].shape == (0, 3, SIZE, SIZE) and empty["forest"].shape[1] == 256


def test_tree_columns_match_the_pseudo_functions(rows, tokenizer):
    from gtms.data.transforms import Letterbox, decode_image

    spec = spec_for("train", input_size=SIZE, word_len=17, mode="forest-gradcam", seed=0)
    (sample,) = preprocess_ref(rows[1], spec, tokenizer)
    lb = Letterbox(int(rows[1]["height"]), int(rows[1]["width"]), SIZE)
    tree = build_grid_tree(lb.guide_image(lb.apply_image(decode_image(rows[1]["image"]))))
    np.testing.assert_array_equal(sample["parent"], tree.parent)
    np.testing.assert_array_equal(
        sample["forest"], structural_forest(tree.parent, sample["box"].reshape(-1) > 0))


# ------------------------------------------------------------------------ real Ray pipeline


@pytest.mark.integration
def test_ray_pipeline_equals_plain_functions_and_split_covers_once(synthref_small, ray_cluster,
                                                                   tokenizer):
    spec = spec_for("train", input_size=SIZE, word_len=17, mode="forest-gradcam", seed=7)
    monitor = start_monitor("test-monitor-1")
    ray_cluster.get(monitor.set_epoch.remote(3))
    ds = build_dataset(str(synthref_small), "train", spec, PoolSpec(1, 0, 1.0, 4),
                       monitor_name="test-monitor-1")
    # Two consumers (as two trainer workers) cover every ref exactly once.
    import threading

    seen: dict[int, list[dict]] = {0: [], 1: []}

    def consume(i, it):
        for batch in it.iter_batches(batch_size=4, batch_format="numpy"):
            n = len(batch["ref_id"])
            seen[i].extend({k: v[j] for k, v in batch.items()} for j in range(n))

    threads = [threading.Thread(target=consume, args=(i, it))
               for i, it in enumerate(ds.streaming_split(2, equal=False))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    ids = [int(s["ref_id"]) for part in seen.values() for s in part]
    table = pq.read_table(str(synthref_small / "shards" / "train"), columns=["ref_id"])
    assert sorted(ids) == sorted(table.column("ref_id").to_pylist())
    assert seen[0] and seen[1]
    # Every sample equals the plain functions on the same row, epoch 3 sentence choice included.
    plain_rows = {int(r["ref_id"]): r for r in iter_shard_rows(str(synthref_small), "train")}
    for sample in seen[0][:5] + seen[1][:5]:
        (expected,) = preprocess_ref(plain_rows[int(sample["ref_id"])], spec, tokenizer, epoch=3)
        for key, value in expected.items():
            np.testing.assert_array_equal(sample[key], value, err_msg=key)
    ray_cluster.kill(monitor)


@pytest.mark.integration
def test_ray_pipeline_counts_bad_rows(tmp_path, synthref_small, ray_cluster):
    table = pq.read_table(str(synthref_small / "shards" / "val"))
    images = table.column("image").to_pylist()
    images[0] = b"broken bytes"
    boxes = table.column("box_xywh").to_pylist()
    boxes[1] = [1000.0, 1000.0, 5.0, 5.0]
    import pyarrow as pa

    table = table.set_column(table.schema.get_field_index("image"), "image",
                             pa.array(images, pa.binary()))
    table = table.set_column(table.schema.get_field_index("box_xywh"), "box_xywh",
                             pa.array(boxes, table.schema.field("box_xywh").type))
    (tmp_path / "shards" / "val").mkdir(parents=True)
    pq.write_table(table, tmp_path / "shards" / "val" / "part-00000.parquet")
    spec = spec_for("eval", input_size=SIZE, word_len=17, mode="box-bce", seed=0)
    monitor = start_monitor("test-monitor-2")
    ds = build_dataset(str(tmp_path), "val", spec, PoolSpec(1, 0, 1.0, 4),
                       monitor_name="test-monitor-2")
    refs = {int(r) for r in ds.to_pandas()["ref_id"]}
    assert len(refs) == table.num_rows - 2
    counts = ray_cluster.get(monitor.counts.remote("val", 0))
    assert counts == {"undecodable_image": 1, "box_outside_image": 1}
    strict = build_dataset(str(tmp_path), "val", spec, PoolSpec(1, 0, 1.0, 4), strict=True)
    with pytest.raises(Exception, match="undecodable_image|box_outside_image"):
        strict.materialize()
    ray_cluster.kill(monitor)
