"""Streaming input on Ray Data: Parquet shards -> stateful preprocessing actors -> trainer.

One shard row is one ref (image bytes, box, all sentences, mask RLE; see ``gtms.data.shards``).
:func:`preprocess_ref` turns a row into samples with plain functions; :class:`Preprocessor` is the
stateful ``map_batches`` actor that calls it (tokenizer loaded once per actor);
:func:`build_dataset` wires read -> shuffle -> actor pool. Per sample the trainer receives

=============  =====================  ==========================================================
column         shape / dtype          meaning
=============  =====================  ==========================================================
image          [3, S, S] float32      letterboxed RGB, CLIP mean/std normalised
tokens         [L] int64              CLIP BPE ids, SOT ... EOT, zero padded (L = word_len)
box            [S/4, S/4] float32     box indicator at the output stride (cell centres)
parent         [N] int32              MST of the stride-4 guide image (N = (S/4)^2), root -1
order          [N] int32              BFS order of that tree, root first
dist           [N] float32            squared colour distance to the parent (0 for the root)
forest         [N] int32              structural-forest label, -1 outside the box
mask           [S/4, S/4] float32     ground-truth mask at the output stride (when requested)
ref_id         int64                  the ref
sent_index     int32                  which of the ref's sentences was used
orig_hw        [2] int32              original (H, W), evaluation only
mask_rle       object (str)           original-resolution COCO RLE counts, evaluation only
sentence       object (str)           the sentence text, evaluation only
=============  =====================  ==========================================================

Training picks one random sentence per ref per epoch (seeded by ``seed``, epoch and ref id);
evaluation emits every sentence as its own sample. A row that cannot be used is counted by
reason in the :class:`PipelineMonitor` actor (and stops the run only with ``strict``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from gtms.data.tokenizer import ClipTokenizer
from gtms.data.transforms import (
    BoxOutsideImageError,
    ImageDecodeError,
    Letterbox,
    decode_image,
    normalize,
    rle_decode,
    validate_box,
)
from gtms.pseudo.forest import structural_forest
from gtms.pseudo.tree import build_grid_tree

STRIDE = 4
SHARD_COLUMNS = ("ref_id", "image", "height", "width", "box_xywh", "sentences", "mask_rle_counts")
TRAIN_TENSOR_COLUMNS = ("image", "tokens", "box", "parent", "order", "dist", "forest", "mask",
                        "ref_id", "sent_index")


class BadRowError(ValueError):
    """A shard row that cannot become a sample; ``reason`` is the counting key."""

    def __init__(self, reason: str, ref_id: int, detail: str):
        super().__init__(f"ref {ref_id}: {reason}: {detail}")
        self.reason = reason
        self.ref_id = ref_id


@dataclass(frozen=True)
class SampleSpec:
    """What :func:`preprocess_ref` produces (plain values: it travels to Ray actors)."""

    input_size: int
    word_len: int = 17
    training: bool = True       # one random sentence per ref per epoch, else every sentence
    with_tree: bool = True      # tree + forest arrays (GTMS pseudo labels)
    with_mask: bool = False     # ground-truth mask at stride 4
    with_eval_meta: bool = False  # original size, original mask RLE, sentence text
    seed: int = 0


def pick_sentence(seed: int, epoch: int, ref_id: int, n_sentences: int) -> int:
    """The training sentence of ``ref_id`` at ``epoch``: uniform, reproducible, per-epoch."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, int(ref_id) & 0xFFFFFFFFFFFF])
    return int(rng.integers(n_sentences))


def preprocess_ref(row: dict[str, Any], spec: SampleSpec, tokenizer: ClipTokenizer,
                   epoch: int = 0) -> list[dict[str, Any]]:
    """One shard row -> its samples (one in training, one per sentence in evaluation).

    Raises :class:`BadRowError` (with a counting reason) for an unusable row.
    """
    ref_id = int(row["ref_id"])
    height, width = int(row["height"]), int(row["width"])
    try:
        image = decode_image(row["image"])
    except ImageDecodeError as err:
        raise BadRowError("undecodable_image", ref_id, str(err)) from None
    if image.shape[:2] != (height, width):
        raise BadRowError("image_size_mismatch", ref_id,
                          f"decoded {image.shape[:2]}, shard says {(height, width)}")
    try:
        box_xywh = validate_box(row["box_xywh"], height, width)
    except BoxOutsideImageError as err:
        raise BadRowError("box_outside_image", ref_id, str(err)) from None
    sentences = [str(s) for s in row["sentences"]]
    if not sentences:
        raise BadRowError("no_sentences", ref_id, "the ref has no sentences")
    if spec.training:
        chosen = [pick_sentence(spec.seed, epoch, ref_id, len(sentences))]
    else:
        chosen = list(range(len(sentences)))
    try:
        tokens = tokenizer([sentences[i] for i in chosen], spec.word_len)
    except ValueError as err:
        raise BadRowError("empty_sentence", ref_id, str(err)) from None

    letterbox = Letterbox(height, width, spec.input_size)
    image01 = letterbox.apply_image(image)
    shared: dict[str, Any] = {
        "image": normalize(image01),
        "box": letterbox.box_at_stride(box_xywh, STRIDE),
        "ref_id": np.int64(ref_id),
    }
    if spec.with_tree:
        tree = build_grid_tree(letterbox.guide_image(image01, STRIDE))
        shared.update(parent=tree.parent, order=tree.order, dist=tree.dist,
                      forest=structural_forest(tree.parent, shared["box"].reshape(-1) > 0))
    if spec.with_mask or spec.with_eval_meta:
        try:
            mask = rle_decode(row["mask_rle_counts"], height, width)
        except Exception as err:  # pycocotools raises bare exceptions on corrupt counts
            raise BadRowError("bad_mask", ref_id, str(err)) from None
        if spec.with_mask:
            shared["mask"] = letterbox.mask_at_stride(mask, STRIDE)
        if spec.with_eval_meta:
            shared["orig_hw"] = np.array([height, width], np.int32)
            shared["mask_rle"] = row["mask_rle_counts"]
    samples = []
    for k, index in enumerate(chosen):
        sample = dict(shared, tokens=tokens[k], sent_index=np.int32(index))
        if spec.with_eval_meta:
            sample["sentence"] = sentences[index]
        samples.append(sample)
    return samples


def stack_samples(samples: list[dict[str, Any]], spec: SampleSpec) -> dict[str, np.ndarray]:
    """Samples -> a numpy batch; an empty list gives correctly shaped empty columns."""
    if samples:
        out = {}
        for key in samples[0]:
            values = [s[key] for s in samples]
            if isinstance(values[0], str):
                out[key] = np.array(values, dtype=object)
            else:
                out[key] = np.stack(values)
        return out
    side, n = spec.input_size, (spec.input_size // STRIDE) ** 2
    cells = (side // STRIDE, side // STRIDE)
    empty = {"image": np.zeros((0, 3, side, side), np.float32),
             "box": np.zeros((0, *cells), np.float32), "ref_id": np.zeros(0, np.int64),
             "tokens": np.zeros((0, spec.word_len), np.int64),
             "sent_index": np.zeros(0, np.int32)}
    if spec.with_tree:
        empty.update(parent=np.zeros((0, n), np.int32), order=np.zeros((0, n), np.int32),
                     dist=np.zeros((0, n), np.float32), forest=np.zeros((0, n), np.int32))
    if spec.with_mask:
        empty["mask"] = np.zeros((0, *cells), np.float32)
    if spec.with_eval_meta:
        empty.update(orig_hw=np.zeros((0, 2), np.int32), mask_rle=np.zeros(0, object),
                     sentence=np.zeros(0, object))
    return empty


def sample_nbytes(spec: SampleSpec) -> int:
    """Approximate bytes of one preprocessed sample (for block sizing)."""
    cells = (spec.input_size // STRIDE) ** 2
    total = 3 * spec.input_size ** 2 * 4 + cells * 4 + spec.word_len * 8
    if spec.with_tree:
        total += 4 * cells * 4
    if spec.with_mask:
        total += cells * 4
    return total


def batch_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A column batch (numpy format) -> a list of row dicts."""
    n = len(next(iter(batch.values())))
    return [{key: column[i] for key, column in batch.items()} for i in range(n)]


# --------------------------------------------------------------------------- Ray parts


class PipelineMonitor:
    """Named Ray actor: the current epoch (read by the preprocessing actors) and bad-row counts
    per (split, epoch) and reason, with a few example ref ids per reason."""

    def __init__(self):
        self._epoch = 0
        self._counts: dict[tuple[str, int], Counter] = defaultdict(Counter)
        self._examples: dict[tuple[str, int, str], list[int]] = defaultdict(list)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def epoch(self) -> int:
        return self._epoch

    def record(self, split: str, epoch: int, failures: list[tuple[str, int]]) -> None:
        for reason, ref_id in failures:
            self._counts[(split, epoch)][reason] += 1
            examples = self._examples[(split, epoch, reason)]
            if len(examples) < 5:
                examples.append(ref_id)

    def counts(self, split: str, epoch: int) -> dict[str, int]:
        return dict(self._counts.get((split, epoch), {}))

    def examples(self, split: str, epoch: int) -> dict[str, list[int]]:
        return {reason: list(self._examples[(split, epoch, reason)])
                for reason in self._counts.get((split, epoch), {})}


def start_monitor(name: str):
    """Create (or find) the named monitor actor; it takes no CPU so it can never block."""
    import ray

    cls = ray.remote(num_cpus=0)(PipelineMonitor)
    return cls.options(name=name, get_if_exists=True).remote()


class Preprocessor:
    """Stateful ``map_batches`` UDF: tokenizer and settings loaded once per actor."""

    def __init__(self, spec: SampleSpec, split: str, monitor_name: str | None = None,
                 strict: bool = False):
        import ray

        self.spec = spec
        self.split = split
        self.strict = strict
        self.tokenizer = ClipTokenizer()
        self.monitor = ray.get_actor(monitor_name) if monitor_name else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        epoch = ray.get(self.monitor.epoch.remote()) if self.monitor else 0
        samples, failures = [], []
        for row in batch_rows(batch):
            try:
                samples.extend(preprocess_ref(row, self.spec, self.tokenizer, epoch))
            except BadRowError as err:
                if self.strict:
                    raise
                failures.append((err.reason, err.ref_id))
        if failures and self.monitor is not None:
            self.monitor.record.remote(self.split, epoch, failures)
        return stack_samples(samples, self.spec)


def shard_uri(root: str, split: str) -> str:
    """Where ``prepare`` wrote a split's Parquet files (local path or any pyarrow URI)."""
    return f"{root.rstrip('/')}/shards/{split}"


@dataclass(frozen=True)
class PoolSpec:
    """Preprocessing actor pool: fixed ``size`` or autoscaling up to ``max_size``."""

    size: int = 1
    max_size: int = 0
    actor_cpus: float = 1.0
    batch_size: int = 32

    def compute(self):
        import ray.data

        if self.max_size > self.size:
            return ray.data.ActorPoolStrategy(min_size=self.size, max_size=self.max_size)
        return ray.data.ActorPoolStrategy(size=self.size)


def build_dataset(root: str, split: str, spec: SampleSpec, pool: PoolSpec, *,
                  monitor_name: str | None = None, strict: bool = False, limit: int = 0,
                  shuffle_seed: int | None = None):
    """Read a split's shards and map them through the preprocessing actor pool (lazy)."""
    import ray.data

    ds = ray.data.read_parquet(shard_uri(root, split)).select_columns(list(SHARD_COLUMNS))
    if limit:
        ds = ds.limit(limit)
    if shuffle_seed is not None:
        ds = ds.randomize_block_order(seed=shuffle_seed)
    ds = ds.map_batches(
        Preprocessor,
        fn_constructor_kwargs={"spec": spec, "split": split, "monitor_name": monitor_name,
                               "strict": strict},
        batch_size=pool.batch_size, batch_format="numpy", compute=pool.compute(),
        num_cpus=pool.actor_cpus)
    # Small output blocks: a streaming split hands out whole blocks, so one big block (a whole
    # row group) would feed a single trainer worker while the others wait.
    ds.context.target_max_block_size = max(sample_nbytes(spec) * pool.batch_size, 1 << 20)
    return ds


def exact_split_data_config(datasets_to_split: list[str]):
    """A Ray Train ``DataConfig`` whose splits cover every row exactly once.

    Ray's default ``streaming_split(equal=True)`` drops up to ``world_size - 1`` rows per epoch
    to equalise the shards; this one keeps every row (``equal=False``) and the training loop
    handles the uneven tail with DDP's ``join()``.
    """
    import copy

    from ray.train import DataConfig

    class ExactSplitDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = copy.deepcopy(self.default_ingest_options())
                if name in self._datasets_to_split:
                    for i, part in enumerate(ds.streaming_split(world_size, equal=False)):
                        output[i][name] = part
                else:
                    for i in range(world_size):
                        output[i][name] = ds.iterator()
            return output

    return ExactSplitDataConfig(datasets_to_split=datasets_to_split)


def spec_for(split_role: str, *, input_size: int, word_len: int, mode: str, seed: int,
             with_tree_in_eval: bool = False) -> SampleSpec:
    """The :class:`SampleSpec` of a split role: ``train``, ``val`` (in-training validation,
    with trees for pseudo-label quality) or ``eval``."""
    if split_role == "train":
        return SampleSpec(input_size, word_len, training=True,
                          with_tree=mode in ("tree", "forest-gradcam"),
                          with_mask=mode == "mask-bce", seed=seed)
    if split_role in ("val", "eval"):
        return SampleSpec(input_size, word_len, training=False,
                          with_tree=split_role == "val" or with_tree_in_eval, with_mask=True,
                          with_eval_meta=True, seed=seed)
    raise ValueError(f"unknown split role {split_role!r}; expected train, val or eval")


def replace_spec(spec: SampleSpec, **changes) -> SampleSpec:
    return dataclasses.replace(spec, **changes)
