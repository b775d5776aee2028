"""Preprocessing of shard rows (plain functions) and the real Ray Data pipeline."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from gtms.data.pipeline import (
    BadRowError,
    PoolSpec,
    Preprocessor,
    SampleSpec,
    build_dataset,
    drop_skipped,
    fits_in_memory,
    pick_sentence,
    preprocess_ref,
    preprocessed_nbytes,
    select_sentences,
    spec_for,
    split_size,
    stack_samples,
)
from gtms.data.reading import iter_shard_rows
from gtms.data.tokenizer import EOT_ID, SOT_ID, ClipTokenizer
from gtms.pseudo import build_grid_tree, structural_forest

SIZE = 64


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


@pytest.fixture(scope="module")
def rows(synthref_small):
    return list(iter_shard_rows(str(synthref_small), "val"))


def test_training_sample_shapes_and_tree(rows, tokenizer):
    spec = spec_for("train", input_size=SIZE, word_len=17, mode="forest-gradcam", seed=0)
    row = max(rows, key=lambda r: len(r["sentences"]))
    (sample,) = preprocess_ref(row, spec, tokenizer)
    n = (SIZE // 4) ** 2
    assert sample["image"].shape == (3, SIZE, SIZE) and sample["image"].dtype == np.uint8
    # Training rows carry every sentence; the loop picks one per epoch.
    assert sample["tokens"].shape == (len(row["sentences"]), 17)
    np.testing.assert_array_equal(sample["tokens"], tokenizer(list(row["sentences"]), 17))
    assert sample["skip"] == "" and sample["empty_sentences"] == 0
    assert sample["box"].shape == (SIZE // 4, SIZE // 4) and sample["box"].sum() > 0
    for key in ("parent", "order", "dist", "forest"):
        assert sample[key].shape == (n,)
    assert (sample["parent"] == -1).sum() == 1
    inside = sample["box"].reshape(-1) > 0
    assert np.all(sample["forest"][~inside] == -1) and np.all(sample["forest"][inside] >= 0)
    # The GT mask travels to measure GradCAM against (never trained on); no evaluation meta.
    assert sample["mask"].shape == (SIZE // 4, SIZE // 4) and "mask_rle" not in sample
    box_lloc = spec_for("train", input_size=SIZE, word_len=17, mode="box-lloc", seed=0)
    assert "mask" not in preprocess_ref(row, box_lloc, tokenizer)[0]


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
    ("sentences", np.array(["   "], dtype=object), "no_sentences"),
    ("sentences", np.array(["", "&nbsp;", "\x00"], dtype=object), "no_sentences"),
])
def test_bad_rows_raise_with_reason(rows, tokenizer, field, value, reason):
    row = dict(rows[0], **{field: value})
    spec = spec_for("train", input_size=SIZE, word_len=17, mode="tree", seed=0)
    with pytest.raises(BadRowError) as info:
        preprocess_ref(row, spec, tokenizer)
    assert info.value.reason == reason and info.value.ref_id == int(rows[0]["ref_id"])


EMPTY_AFTER_CLEANING = ["", "&nbsp;"]


def _with_empty_sentences(rows):
    """Every third row gets the empty expressions appended to its sentences."""
    return [dict(r, sentences=np.array(list(r["sentences"]) + EMPTY_AFTER_CLEANING,
                                       dtype=object)) if k % 3 == 0 else r
            for k, r in enumerate(rows)]


def test_eval_scores_every_sentence_empty_ones_as_sot_eot(rows, tokenizer):
    spec = spec_for("eval", input_size=SIZE, word_len=17, mode="box-bce", seed=0)
    changed = _with_empty_sentences(rows[:6])
    samples = [s for r in changed for s in preprocess_ref(r, spec, tokenizer)]
    assert len(samples) == sum(len(r["sentences"]) for r in changed)
    empty = [s for s in samples if s["sentence"] in EMPTY_AFTER_CLEANING]
    assert len(empty) == 2 * len(EMPTY_AFTER_CLEANING)
    for sample in empty:
        assert sample["tokens"].tolist() == [49406, 49407] + [0] * 15


def test_empty_sentences_are_never_chosen_and_are_counted(rows, tokenizer):
    spec = spec_for("train", input_size=SIZE, word_len=17, mode="tree", seed=3)
    row = dict(rows[0], sentences=np.array(["  ", "the red ring", " \t", "the blue star"],
                                           dtype=object))
    (sample,) = preprocess_ref(row, spec, tokenizer)
    assert sample["empty_sentences"] == 2
    np.testing.assert_array_equal(sample["tokens"][0][:3], [SOT_ID, EOT_ID, 0])
    chosen = set()
    for epoch in range(20):
        batch, counts = select_sentences(stack_samples([sample], spec), seed=3, epoch=epoch)
        assert counts == {"empty_sentence": 2}
        (k,) = batch["sent_index"]
        assert k in (1, 3)
        # Deterministic: pick_sentence over the usable sentences, in order.
        assert k == [1, 3][pick_sentence(3, epoch, int(row["ref_id"]), 2)]
        np.testing.assert_array_equal(batch["tokens"][0], sample["tokens"][k])
        chosen.add(int(k))
    assert chosen == {1, 3}
    # Evaluation keeps every sentence, an empty one as [SOT, EOT].
    eval_spec = spec_for("eval", input_size=SIZE, word_len=17, mode="box-bce", seed=0)
    samples = preprocess_ref(row, eval_spec, tokenizer)
    assert len(samples) == 4 and samples[2]["tokens"][1] == EOT_ID


def test_select_sentences_drops_placeholders_and_counts_exactly(rows, tokenizer):
    spec = spec_for("train", input_size=SIZE, word_len=17, mode="forest-gradcam", seed=0)
    batch = {key: np.array([r[key] for r in rows[:5]], dtype=object) for key in rows[0]}
    batch["image"][1] = b"junk"
    batch["box_xywh"][3] = np.array([900.0, 900.0, 4.0, 4.0], np.float32)
    batch["sentences"][4] = np.array(["", "  "], dtype=object)
    udf = Preprocessor(spec)
    out = udf(batch)
    assert list(out["skip"]) == ["", "undecodable_image", "", "box_outside_image",
                                 "no_sentences"]
    assert list(out["ref_id"]) == [int(r["ref_id"]) for r in rows[:5]]
    selected, counts = select_sentences(out, seed=0, epoch=2)
    assert counts == {"undecodable_image": 1, "box_outside_image": 1, "no_sentences": 1,
                      "empty_sentence": 2}
    assert list(selected["ref_id"]) == [int(rows[0]["ref_id"]), int(rows[2]["ref_id"])]
    assert selected["tokens"].shape == (2, 17) and "skip" not in selected
    for i, row in enumerate((rows[0], rows[2])):
        k = pick_sentence(0, 2, int(row["ref_id"]), len(row["sentences"]))
        assert selected["sent_index"][i] == k
        np.testing.assert_array_equal(selected["tokens"][i], tokenizer([row["sentences"][k]]
                                                                       )[0])
    np.testing.assert_array_equal(selected["image"][1], out["image"][2])
    udf.strict = True
    with pytest.raises(BadRowError, match="undecodable_image"):
        udf(batch)


def test_drop_skipped_keeps_eval_rows(rows):
    spec = spec_for("eval", input_size=SIZE, word_len=17, mode="box-bce", seed=0)
    batch = {key: np.array([r[key] for r in rows[:3]], dtype=object) for key in rows[0]}
    batch["image"][0] = b"junk"
    out = Preprocessor(spec)(batch)
    kept, counts = drop_skipped(out)
    assert counts == {"undecodable_image": 1}
    n_sentences = sum(len(r["sentences"]) for r in rows[1:3])
    assert len(kept["ref_id"]) == n_sentences and set(kept["skip"]) == {""}


def test_memory_plan_and_size_estimate(synthref_small, rows, tokenizer):
    assert fits_in_memory([10, 20], 30) == [True, True]
    assert fits_in_memory([10, 30], 30) == [True, False]
    assert fits_in_memory([40, 5], 30) == [False, False]   # val first; train never alone
    assert fits_in_memory([10, 20], 0) == [False, False]
    refs, sentences = split_size(str(synthref_small), "val")
    assert refs == len(rows) and sentences == sum(len(r["sentences"]) for r in rows)
    assert split_size(str(synthref_small), "val", limit=5)[0] == 5
    for role in ("train", "val"):
        spec = spec_for(role, input_size=SIZE, word_len=17, mode="forest-gradcam", seed=0)
        samples = [s for r in rows for s in preprocess_ref(r, spec, tokenizer)]
        actual = sum(v.nbytes for s in samples for v in s.values() if isinstance(v, np.ndarray))
        estimate = preprocessed_nbytes(spec, refs, sentences)
        assert 0.9 * actual <= estimate <= 1.3 * actual, (role, actual, estimate)


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
    ds = build_dataset(str(synthref_small), "train", spec, PoolSpec(1, 0, 1.0, 4),
                       shuffle_seed=7).materialize()
    # Two consumers (as two trainer workers) cover every ref exactly once, in two epochs.
    import threading

    table = pq.read_table(str(synthref_small / "shards" / "train"), columns=["ref_id"])
    plain_rows = {int(r["ref_id"]): r for r in iter_shard_rows(str(synthref_small), "train")}
    splits = ds.streaming_split(2, equal=False)
    for epoch in (0, 1):
        seen: dict[int, list[dict]] = {0: [], 1: []}

        def consume(i, it, seen=seen, epoch=epoch):
            for batch in it.iter_batches(batch_size=4, batch_format="numpy"):
                batch, counts = select_sentences(batch, seed=7, epoch=epoch)
                assert not counts
                n = len(batch["ref_id"])
                seen[i].extend({k: v[j] for k, v in batch.items()} for j in range(n))

        threads = [threading.Thread(target=consume, args=(i, it)) for i, it in enumerate(splits)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        ids = [int(s["ref_id"]) for part in seen.values() for s in part]
        assert sorted(ids) == sorted(table.column("ref_id").to_pylist())
        assert seen[0] and seen[1]
        # Every sample equals the plain functions on the same row, with this epoch's sentence.
        for sample in seen[0][:5] + seen[1][:5]:
            row = plain_rows[int(sample["ref_id"])]
            (expected,) = preprocess_ref(row, spec, tokenizer)
            k = pick_sentence(7, epoch, int(row["ref_id"]), len(row["sentences"]))
            assert sample["sent_index"] == k
            np.testing.assert_array_equal(sample["tokens"], expected["tokens"][k])
            for key in ("image", "box", "parent", "order", "dist", "forest"):
                np.testing.assert_array_equal(sample[key], expected[key], err_msg=key)


def test_strict_preprocessor_does_not_stop_on_empty_sentences(rows):
    changed = _with_empty_sentences(rows[:4])
    batch = {key: np.array([r[key] for r in changed], dtype=object) for key in changed[0]}
    spec = spec_for("train", input_size=SIZE, word_len=17, mode="box-bce", seed=0)
    out = Preprocessor(spec, strict=True)(batch)
    assert list(out["skip"]) == [""] * 4
    assert list(out["empty_sentences"]) == [2, 0, 0, 2]
    _, counts = select_sentences(out, seed=0, epoch=1)
    assert counts == {"empty_sentence": 4}


@pytest.mark.integration
def test_ray_eval_pipeline_scores_every_sentence(tmp_path, synthref_small, ray_cluster):
    """Through Ray Data: the eval samples are the split's sentences, empty expressions included."""
    import pyarrow as pa

    table = pq.read_table(str(synthref_small / "shards" / "val"))
    sentences = [s + EMPTY_AFTER_CLEANING if k % 3 == 0 else s
                 for k, s in enumerate(table.column("sentences").to_pylist())]
    table = table.set_column(table.schema.get_field_index("sentences"), "sentences",
                             pa.array(sentences, table.schema.field("sentences").type))
    (tmp_path / "shards" / "val").mkdir(parents=True)
    pq.write_table(table, tmp_path / "shards" / "val" / "part-00000.parquet")
    spec = spec_for("eval", input_size=SIZE, word_len=17, mode="box-bce", seed=0)
    frame = build_dataset(str(tmp_path), "val", spec, PoolSpec(1, 0, 1.0, 8)).to_pandas()
    assert len(frame) == sum(len(s) for s in sentences)
    empty = frame[frame["sentence"].isin(EMPTY_AFTER_CLEANING)]
    assert len(empty) == 2 * len(range(0, len(sentences), 3))
    assert all(list(t[:3]) == [49406, 49407, 0] for t in empty["tokens"])


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
    ds = build_dataset(str(tmp_path), "val", spec, PoolSpec(1, 0, 1.0, 4))
    counts, refs = {}, set()
    for batch in ds.iter_batches(batch_size=8, batch_format="numpy"):
        batch, dropped = drop_skipped(batch)
        refs.update(int(r) for r in batch["ref_id"])
        for reason, n in dropped.items():
            counts[reason] = counts.get(reason, 0) + n
    assert len(refs) == table.num_rows - 2
    assert counts == {"undecodable_image": 1, "box_outside_image": 1}
    strict = build_dataset(str(tmp_path), "val", spec, PoolSpec(1, 0, 1.0, 4), strict=True)
    with pytest.raises(Exception, match="undecodable_image|box_outside_image"):
        strict.materialize()


def test_ingest_options_use_no_deprecated_ray_option():
    """The trainer's shard options copy the DataContext without ``exclude_resources`` (Ray
    warns "ExecutionOptions.exclude_resources is deprecated" on every run otherwise)."""
    import warnings

    from ray.data import DataContext
    from ray.util.annotations import RayDeprecationWarning

    from gtms.data.pipeline import ingest_options

    DataContext.get_current()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        options = ingest_options()
    current = DataContext.get_current().execution_options
    assert options.resource_limits == current.resource_limits
    assert options.preserve_order   # the workers' rows in a fixed order (issue 27)
    assert options is not current


def test_pool_per_part_keeps_the_local_resource_plan():
    """One pool per trainer worker: at least one actor each, together the CPUs of the one pool
    the resource plan counts (gtms.runtime.local_num_cpus)."""
    from gtms.data.pipeline import PoolSpec

    assert PoolSpec(1, 0, 1.0, 32).per_part(1) == PoolSpec(1, 0, 1.0, 32)
    assert PoolSpec(1, 0, 1.0, 32).per_part(2) == PoolSpec(1, 0, 0.5, 32)
    assert PoolSpec(4, 8, 1.0, 32).per_part(2) == PoolSpec(2, 4, 1.0, 32)
    for pool in (PoolSpec(3, 0, 1.0, 8), PoolSpec(2, 4, 0.5, 8), PoolSpec(1, 3, 1.0, 8)):
        for parts in (2, 3, 4):
            each = pool.per_part(parts)
            assert each.size >= 1
            assert parts * each.size * each.actor_cpus == pytest.approx(pool.size *
                                                                         pool.actor_cpus)
