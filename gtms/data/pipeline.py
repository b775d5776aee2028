"""Ray Data input: Parquet shards -> stateful preprocessing actors -> (kept in memory) -> trainer.

One shard row is one ref (image bytes, box, all sentences, mask RLE; see ``gtms.data.shards``).
:func:`preprocess_ref` turns a row into samples with plain functions; :class:`Preprocessor` is the
stateful ``map_batches`` actor that calls it (tokenizer loaded once per actor);
:func:`build_dataset` wires read -> shuffle -> actor pool. The preprocessing does not depend on
the epoch, so a split whose samples fit the memory budget is preprocessed once and kept
(:func:`fits_in_memory`, ``Dataset.materialize()``); a larger one is streamed every epoch.

Per sample the pipeline emits

===============  =====================  =======================================================
column           shape / dtype          meaning
===============  =====================  =======================================================
image            [3, S, S] uint8        letterboxed RGB (the model applies /255 and CLIP
                                        mean/std on its device: transforms.model_input)
tokens           [L] int64              CLIP BPE ids, SOT ... EOT, zero padded (L = word_len);
                 [K, L] (training)      every sentence of the ref (an empty one is SOT, EOT)
box              [S/4, S/4] float32     box indicator at the output stride (cell centres)
parent           [N] int32              MST of the stride-4 guide image (N = (S/4)^2), root -1
order            [N] int32              BFS order of that tree, root first
dist             [N] float32            squared colour distance to the parent (0 for the root)
forest           [N] int32              structural-forest label, -1 outside the box
mask             [S/4, S/4] float32     ground-truth mask at the output stride (when requested)
ref_id           int64                  the ref
sent_index       int32                  which of the ref's sentences (evaluation)
empty_sentences  int16                  sentences empty after cleaning (training)
skip             object (str)           "" for a usable row, else why the ref cannot be used
orig_hw          [2] int32              original (H, W), evaluation only
mask_rle         object (str)           original-resolution COCO RLE counts, evaluation only
sentence         object (str)           the sentence text, evaluation only
===============  =====================  =======================================================

Training emits one row per ref with all its sentences; the training loop picks the sentence of
each ref per epoch (:func:`select_sentences`, seeded by ``seed``, epoch and ref id) among the
sentences that are not empty after cleaning, which it skips and counts. Evaluation emits every
sentence as its own sample. A row that cannot be used travels as a placeholder row whose
``skip`` names the reason, so the consumer counts it exactly once per pass
(:func:`drop_skipped`); with ``strict`` the actor raises instead.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from gtms.data.tokenizer import EOT_ID, SOT_ID, ClipTokenizer
from gtms.data.transforms import (
    BoxOutsideImageError,
    ImageDecodeError,
    Letterbox,
    decode_image,
    normalize,
    rle_decode,
    validate_box,
)
from gtms.modes import get_mode
from gtms.pseudo.forest import structural_forest
from gtms.pseudo.tree import build_grid_tree

STRIDE = 4
SHARD_COLUMNS = ("ref_id", "image", "height", "width", "box_xywh", "sentences", "mask_rle_counts")
EMPTY_SENTENCE = "empty_sentence"  # counting key of sentences skipped in training


class BadRowError(ValueError):
    """A shard row that cannot become a sample; ``reason`` is the counting key."""

    def __init__(self, reason: str, ref_id: int, detail: str, *, empty_sentences: int = 0):
        super().__init__(f"ref {ref_id}: {reason}: {detail}")
        self.reason = reason
        self.ref_id = ref_id
        self.empty_sentences = empty_sentences


@dataclass(frozen=True)
class SampleSpec:
    """What :func:`preprocess_ref` produces (plain values: it travels to Ray actors)."""

    input_size: int
    word_len: int = 17
    training: bool = True       # one row per ref (all sentences), else one per sentence
    with_tree: bool = True      # tree arrays (GTMS pseudo labels)
    with_forest: bool = True    # structural-forest labels (with the tree only)
    with_mask: bool = False     # ground-truth mask at stride 4
    with_eval_meta: bool = False  # original size, original mask RLE, sentence text
    seed: int = 0


def pick_sentence(seed: int, epoch: int, ref_id: int, n_sentences: int) -> int:
    """The training sentence of ``ref_id`` at ``epoch``: uniform, reproducible, per-epoch."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, int(ref_id) & 0xFFFFFFFFFFFF])
    return int(rng.integers(n_sentences))


def tokenize_sentences(sentences: list[str], tokenizer: ClipTokenizer,
                       word_len: int) -> np.ndarray:
    """Every sentence -> ``[K, word_len]`` ids; one empty after cleaning is ``[SOT, EOT]``."""
    tokens = np.zeros((len(sentences), word_len), np.int64)
    for k, sentence in enumerate(sentences):
        try:
            tokens[k] = tokenizer.encode(sentence, word_len)
        except ValueError:  # an empty expression (tokenizers that refuse it)
            tokens[k, :2] = (SOT_ID, EOT_ID)
    return tokens


def empty_rows(tokens: np.ndarray) -> np.ndarray:
    """``[K, L]`` ids -> ``[K]`` bool: the sentence was empty after cleaning (SOT then EOT)."""
    return tokens[:, 1] == EOT_ID


def preprocess_ref(row: dict[str, Any], spec: SampleSpec,
                   tokenizer: ClipTokenizer) -> list[dict[str, Any]]:
    """One shard row -> its samples (one per ref in training, one per sentence in evaluation).

    Nothing here depends on the epoch. Raises :class:`BadRowError` (with a counting reason) for
    an unusable row.
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
    tokens = tokenize_sentences(sentences, tokenizer, spec.word_len)
    n_empty = int(empty_rows(tokens).sum())
    if spec.training and n_empty == len(sentences):
        raise BadRowError("no_sentences", ref_id, f"all {n_empty} sentences are empty after "
                          "cleaning", empty_sentences=n_empty)
    shared = _image_columns(row, spec, image, box_xywh)
    shared["ref_id"] = np.int64(ref_id)
    shared["skip"] = ""
    if spec.training:
        return [dict(shared, tokens=tokens, sent_index=np.int32(-1),
                     empty_sentences=np.int16(n_empty))]
    samples = []
    for k, sentence in enumerate(sentences):
        sample = dict(shared, tokens=tokens[k], sent_index=np.int32(k),
                      empty_sentences=np.int16(0))
        if spec.with_eval_meta:
            sample["sentence"] = sentence
        samples.append(sample)
    return samples


def _image_columns(row: dict[str, Any], spec: SampleSpec, image: np.ndarray,
                   box_xywh) -> dict[str, Any]:
    """Image, box, tree, forest and mask columns of one ref."""
    ref_id = int(row["ref_id"])
    height, width = image.shape[:2]
    letterbox = Letterbox(height, width, spec.input_size)
    pixels = letterbox.apply_image_uint8(image)
    shared: dict[str, Any] = {
        "image": np.ascontiguousarray(pixels.transpose(2, 0, 1)),   # mean/std on the device
        "box": letterbox.box_at_stride(box_xywh, STRIDE),
    }
    if spec.with_tree:
        image01 = pixels.astype(np.float32) / np.float32(255.0)
        tree = build_grid_tree(letterbox.guide_image(image01, STRIDE))
        shared.update(parent=tree.parent, order=tree.order, dist=tree.dist)
        if spec.with_forest:
            shared["forest"] = structural_forest(tree.parent, shared["box"].reshape(-1) > 0)
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
    return shared


def placeholder_sample(spec: SampleSpec, err: BadRowError) -> dict[str, Any]:
    """The row that stands for an unusable ref: zeros, its id and ``skip`` = the reason."""
    sample = {key: column[0] for key, column in _zero_columns(spec, 1).items()}
    sample.update(ref_id=np.int64(err.ref_id), skip=err.reason,
                  empty_sentences=np.int16(err.empty_sentences))
    return sample


def stack_samples(samples: list[dict[str, Any]], spec: SampleSpec) -> dict[str, np.ndarray]:
    """Samples -> a numpy batch; an empty list gives correctly shaped empty columns.

    Arrays of different shapes (training ``tokens`` of refs with different sentence counts)
    become an object array of arrays, which Ray Data stores as a variable-shaped tensor column.
    """
    if not samples:
        return _zero_columns(spec, 0)
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], str):
            out[key] = np.array(values, dtype=object)
        elif isinstance(values[0], np.ndarray) and \
                len({v.shape for v in values}) > 1:
            out[key] = np.empty(len(values), object)
            out[key][:] = values
        else:
            out[key] = np.stack(values)
    return out


def _zero_columns(spec: SampleSpec, n: int) -> dict[str, np.ndarray]:
    """Every column of ``spec`` for ``n`` rows, zero filled (strings empty)."""
    side, cells = spec.input_size, (spec.input_size // STRIDE) ** 2
    grid = (side // STRIDE, side // STRIDE)
    tokens = (n, 1, spec.word_len) if spec.training else (n, spec.word_len)
    out = {"image": np.zeros((n, 3, side, side), np.uint8),
           "box": np.zeros((n, *grid), np.float32)}
    if spec.with_tree:
        out.update(parent=np.zeros((n, cells), np.int32), order=np.zeros((n, cells), np.int32),
                   dist=np.zeros((n, cells), np.float32))
        if spec.with_forest:
            out["forest"] = np.zeros((n, cells), np.int32)
    if spec.with_mask:
        out["mask"] = np.zeros((n, *grid), np.float32)
    if spec.with_eval_meta:
        out.update(orig_hw=np.zeros((n, 2), np.int32), mask_rle=np.full(n, "", object))
    out.update(ref_id=np.zeros(n, np.int64), skip=np.full(n, "", object),
               tokens=np.zeros(tokens, np.int64), sent_index=np.zeros(n, np.int32),
               empty_sentences=np.zeros(n, np.int16))
    if spec.with_eval_meta and not spec.training:
        out["sentence"] = np.full(n, "", object)
    return out


def sample_nbytes(spec: SampleSpec, sentences: float = 1.0) -> int:
    """Approximate bytes of one preprocessed row (``sentences``: token rows it carries)."""
    cells = (spec.input_size // STRIDE) ** 2
    total = 3 * spec.input_size ** 2 + cells * 4 + int(sentences * spec.word_len * 8) + 64  # uint8
    if spec.with_tree:
        total += (4 if spec.with_forest else 3) * cells * 4
    if spec.with_mask:
        total += cells * 4
    if spec.with_eval_meta:
        total += cells * 2  # the original mask's RLE string and the sentence, roughly
    return total


def split_size(root: str, split: str, limit: int = 0) -> tuple[int, int]:
    """(refs, sentences) of a split's shards (the first ``limit`` refs when set)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    table = pads.dataset(shard_uri(root, split), format="parquet").to_table(
        columns=["sentences"])
    if limit:
        table = table.slice(0, limit)
    lengths = pc.list_value_length(table.column("sentences"))
    return table.num_rows, int(pc.sum(lengths).as_py() or 0)


def preprocessed_nbytes(spec: SampleSpec, refs: int, sentences: int) -> int:
    """Approximate bytes of a split's preprocessed samples (what materialising it holds)."""
    if spec.training:
        return refs * sample_nbytes(spec, sentences / max(refs, 1))
    return max(sentences, refs) * sample_nbytes(spec)


def fits_in_memory(sizes: list[int], budget_bytes: int) -> list[bool]:
    """Which splits to keep in memory, in order of priority (e.g. [val, train]): each one that
    fits what the ones before it left of ``budget_bytes``; after the first that does not fit,
    none."""
    keep, used = [], 0
    for size in sizes:
        fits = bool(keep == [] or keep[-1]) and used + size <= budget_bytes
        keep.append(fits)
        used += size if fits else 0
    return keep


def batch_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A column batch (numpy format) -> a list of row dicts."""
    n = len(next(iter(batch.values())))
    return [{key: column[i] for key, column in batch.items()} for i in range(n)]


# --------------------------------------------------------------------------- Ray parts


class Preprocessor:
    """Stateful ``map_batches`` UDF: tokenizer and settings loaded once per actor.

    An unusable row becomes a placeholder row naming the reason (see :func:`drop_skipped`), or
    stops the pipeline with ``strict``.
    """

    def __init__(self, spec: SampleSpec, strict: bool = False):
        self.spec = spec
        self.strict = strict
        self.tokenizer = ClipTokenizer()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = []
        for row in batch_rows(batch):
            try:
                samples.extend(preprocess_ref(row, self.spec, self.tokenizer))
            except BadRowError as err:
                if self.strict:
                    raise
                samples.append(placeholder_sample(self.spec, err))
        return stack_samples(samples, self.spec)


def drop_skipped(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Counter]:
    """Remove the placeholder rows of unusable refs; returns (batch, counts by reason)."""
    skip = np.asarray(batch["skip"])
    bad = skip != ""
    counts = Counter(str(reason) for reason in skip[bad])
    if bad.any():
        batch = {key: value[~bad] for key, value in batch.items()}
    return batch, counts


def select_sentences(batch: dict[str, np.ndarray], *, seed: int,
                     epoch: int) -> tuple[dict[str, np.ndarray], Counter]:
    """A training batch (one row per ref, ``tokens`` ``[K, L]`` each) -> samples of this epoch.

    Drops the placeholder rows (counted by reason), picks each ref's sentence with
    :func:`pick_sentence` among its sentences that are not empty after cleaning, and counts
    those empty ones under ``empty_sentence``. Returns (batch with ``tokens [B, L]`` and
    ``sent_index``, counts).
    """
    empty = int(np.asarray(batch["empty_sentences"]).sum())
    batch, counts = drop_skipped(batch)
    if empty:
        counts[EMPTY_SENTENCE] += empty
    all_tokens = batch["tokens"]
    n, word_len = len(batch["ref_id"]), all_tokens[0].shape[-1] if len(all_tokens) else 0
    tokens = np.zeros((n, word_len), np.int64)
    sent_index = np.zeros(n, np.int32)
    for i in range(n):
        usable = np.flatnonzero(~empty_rows(all_tokens[i]))
        k = usable[pick_sentence(seed, epoch, int(batch["ref_id"][i]), len(usable))]
        tokens[i], sent_index[i] = all_tokens[i][k], k
    batch = dict(batch, tokens=tokens, sent_index=sent_index)
    del batch["empty_sentences"], batch["skip"]
    return batch, counts


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

    @classmethod
    def of(cls, ray) -> PoolSpec:
        """The pool the ``ray`` section of a config (:class:`gtms.config.RayConfig`) asks for."""
        return cls(ray.preprocess_actors, ray.preprocess_actors_max, ray.actor_cpus,
                   batch_size=ray.preprocess_batch_size)

    def compute(self):
        import ray.data

        if self.max_size > self.size:
            return ray.data.ActorPoolStrategy(min_size=self.size, max_size=self.max_size)
        return ray.data.ActorPoolStrategy(size=self.size)

    def per_part(self, parts: int) -> PoolSpec:
        """The pool of one of ``parts`` datasets that run at once (one per trainer worker): at
        least one actor each, the CPUs of this pool shared out, so that the parts together
        reserve what this pool does (the local resource plan, :mod:`gtms.runtime`)."""
        if parts <= 1:
            return self
        size = -(-self.size // parts)
        max_size = -(-self.max_size // parts) if self.max_size > self.size else 0
        return PoolSpec(size, max_size if max_size > size else 0,
                        self.actor_cpus * self.size / (parts * size), self.batch_size)


def part_name(role: str, rank: int) -> str:
    """The name of trainer worker ``rank``'s own dataset of ``role`` (``train`` or ``val``)."""
    return f"{role}_{rank}"


def _part_filter(rank: int, parts: int):
    """A ``map_batches`` function (pyarrow batches) that keeps the rows of part ``rank``: the
    refs whose ``ref_id % parts == rank``."""

    def keep(table):
        import pyarrow as pa

        ids = table.column("ref_id").to_numpy(zero_copy_only=False)
        return table.filter(pa.array(ids % parts == rank))

    return keep


def build_dataset(root: str, split: str, spec: SampleSpec, pool: PoolSpec, *,
                  strict: bool = False, limit: int = 0, shuffle_seed: int | None = None,
                  part: tuple[int, int] | None = None):
    """Read a split's shards and map them through the preprocessing actor pool (lazy).

    The rows come out in a fixed order (``preserve_order``): the files' order, or with
    ``shuffle_seed`` a seeded random order of their blocks. ``limit`` keeps the first rows of
    the files' order. ``part = (rank, parts)`` keeps the refs with ``ref_id % parts == rank``
    (before preprocessing: each ref is preprocessed by one part only).
    """
    import ray.data

    ds = ray.data.read_parquet(shard_uri(root, split)).select_columns(list(SHARD_COLUMNS))
    # Without it, limit() and the output order follow whichever task finishes first.
    ds.context.execution_options.preserve_order = True
    if limit:
        ds = ds.limit(limit)
    if part is not None and part[1] > 1:
        ds = ds.map_batches(_part_filter(*part), batch_format="pyarrow", batch_size=None,
                            zero_copy_batch=True)
    if shuffle_seed is not None:
        ds = ds.randomize_block_order(seed=shuffle_seed)
    ds = ds.map_batches(
        Preprocessor,
        fn_constructor_kwargs={"spec": spec, "strict": strict},
        batch_size=pool.batch_size, batch_format="numpy", compute=pool.compute(),
        num_cpus=pool.actor_cpus)
    # Small output blocks: the local shuffle buffer mixes rows across blocks, and a block is
    # what the iterator prefetches.
    ds.context.target_max_block_size = max(sample_nbytes(spec) * pool.batch_size, 1 << 20)
    return ds


def ingest_options():
    """Ray Data options for a trainer's datasets: this process's ``DataContext`` limits and
    verbosity, and the rows in their fixed order (Ray Train's
    ``DataConfig.default_ingest_options()`` also copies the deprecated ``exclude_resources``,
    which warns on every run)."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=copy.deepcopy(current.resource_limits),
                            preserve_order=True,
                            verbose_progress=current.verbose_progress)


def per_worker_data_config():
    """A Ray Train ``DataConfig`` for datasets made per worker (:func:`part_name`): nothing is
    split by Ray; each worker reads only its own, in its fixed order.

    Ray's ``streaming_split`` hands blocks to whichever worker asks first, so which refs a
    worker trained on, and in what order, followed timing, and two runs of the same command
    gave different numbers. Here the split is a pure function of ``ref_id`` and the worker
    count, and every ref is used exactly once per epoch (the training loop handles the uneven
    tail with DDP's ``join()``).
    """
    from ray.train import DataConfig

    class PerWorkerDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = ingest_options()
                for i in range(world_size):
                    output[i][name] = ds.iterator()
            return output

    return PerWorkerDataConfig(datasets_to_split=[])


def spec_for(split_role: str, *, input_size: int, word_len: int, mode: str, seed: int,
             with_tree_in_eval: bool = False) -> SampleSpec:
    """The :class:`SampleSpec` of a split role: ``train``, ``val`` (in-training validation,
    with trees for pseudo-label quality) or ``eval``."""
    if split_role == "train":
        needs = get_mode(mode)
        # GradCAM rows carry the mask to measure A's health against (AttentionMeter); only
        # mask-bce trains on it (gtms.train.step.compute_losses).
        return SampleSpec(input_size, word_len, training=True, with_tree=needs.tree,
                          with_forest=needs.forest, with_mask=needs.mask or needs.gradcam,
                          seed=seed)
    if split_role in ("val", "eval"):
        return SampleSpec(input_size, word_len, training=False,
                          with_tree=split_role == "val" or with_tree_in_eval, with_mask=True,
                          with_eval_meta=True, seed=seed)
    raise ValueError(f"unknown split role {split_role!r}; expected train, val or eval")
