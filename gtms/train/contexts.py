"""The two homes of the training loop: one plain process, or a Ray Train worker."""

from __future__ import annotations

import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gtms import console
from gtms.data.pipeline import (
    SHARD_COLUMNS,
    BadRowError,
    SampleSpec,
    batch_rows,
    drop_skipped,
    part_name,
    placeholder_sample,
    preprocess_ref,
    select_sentences,
    shard_uri,
    stack_samples,
)
from gtms.data.tokenizer import ClipTokenizer
from gtms.train import retention
from gtms.train.checkpoint import checkpoint_dir_name, checkpoint_dirs, read_metrics

Batch = dict[str, np.ndarray]


def shard_row_groups(root: str, split: str) -> list:
    """A split's Parquet row groups (one pyarrow fragment each), in storage order."""
    import pyarrow.dataset as pads

    dataset = pads.dataset(shard_uri(root, split), format="parquet")
    fragments = []
    for fragment in dataset.get_fragments():
        fragments.extend(fragment.split_by_row_group())
    return fragments


def row_positions(sizes: list[int], *, limit: int = 0,
                  shuffle_seed: int | None = None) -> list[tuple[int, int]]:
    """The rows of one pass as ``(row group, row)`` positions, from the row groups' ``sizes``
    alone: the first ``limit`` rows in storage order (all when 0) and, with ``shuffle_seed``,
    the row groups and then the rows inside each in a seeded order.

    A pass's order is a function of the split, ``limit`` and the seed only: what the samples
    carry (the training mode's columns) and where they come from (read now or kept from an
    earlier pass, or a resumed run) do not change it, so the Table 2 rows of one seed see the
    same data order."""
    if limit:
        left, cut = limit, []
        for size in sizes:
            cut.append(min(size, left))
            left -= cut[-1]
        sizes = cut
    groups = [g for g, size in enumerate(sizes) if size]
    if shuffle_seed is None:
        return [(g, i) for g in groups for i in range(sizes[g])]
    rng = np.random.default_rng(shuffle_seed)
    groups = [groups[i] for i in rng.permutation(len(groups))]
    return [(g, int(i)) for g in groups for i in rng.permutation(sizes[g])]


def row_group_sizes(fragments: list) -> list[int]:
    return [sum(group.num_rows for group in fragment.row_groups) for fragment in fragments]


def iter_positioned_rows(root: str, split: str, *, limit: int = 0,
                         shuffle_seed: int | None = None
                         ) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
    """``(position, row)`` of a split's shards read with pyarrow in this process (local path
    or URI), in the order of :func:`row_positions`."""
    fragments = shard_row_groups(root, split)
    positions = row_positions(row_group_sizes(fragments), limit=limit,
                              shuffle_seed=shuffle_seed)
    group, rows = None, []
    for position in positions:
        if position[0] != group:
            group = position[0]
            table = fragments[group].to_table(columns=list(SHARD_COLUMNS))
            rows = batch_rows({name: table.column(name).to_numpy(zero_copy_only=False)
                               for name in SHARD_COLUMNS})
        yield position, rows[position[1]]


def iter_shard_rows(root: str, split: str, *, limit: int = 0,
                    shuffle_seed: int | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a split's shards read with pyarrow in this process (local path or URI): the
    first ``limit`` rows in storage order (all when 0); with ``shuffle_seed`` the row groups
    and the rows inside each group are shuffled (:func:`row_positions`)."""
    for _, row in iter_positioned_rows(root, split, limit=limit, shuffle_seed=shuffle_seed):
        yield row


def count_rows(root: str, split: str) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(shard_uri(root, split), format="parquet").count_rows()


class BadRowCounter:
    """Bad rows (and skipped empty sentences) this process saw, per (role, epoch) and reason."""

    def __init__(self):
        self._counts: dict[tuple[str, int], Counter] = {}

    def add(self, role: str, epoch: int, counts: Counter) -> None:
        if counts:
            self._counts.setdefault((role, epoch), Counter()).update(counts)

    def of_epoch(self, epoch: int) -> dict[str, dict[str, int]]:
        return {role: dict(counts) for (role, e), counts in self._counts.items() if e == epoch}


def finished_batches(batches: Iterable[Batch], finish: Callable[[Batch], tuple[Batch, Counter]],
                     count: Callable[[Counter], None]) -> Iterator[Batch]:
    """Pipeline batches -> what the loop trains or validates on: ``finish`` (sentence choice or
    placeholder removal) counts what it drops; batches left empty are not yielded."""
    for batch in batches:
        batch, counts = finish(batch)
        count(counts)
        if len(batch["ref_id"]):
            yield batch


def without_single_samples(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Training batches where a batch of one sample is merged into its neighbour: batch norm
    cannot train on one sample, and dropped bad rows or an uneven tail can leave one. Each
    batch is held until the next arrives (the last may absorb a final single sample)."""
    held = None
    for batch in batches:
        if held is not None and (len(batch["ref_id"]) < 2 or len(held["ref_id"]) < 2):
            held = {key: np.concatenate([held[key], batch[key]]) for key in held}
            continue
        if held is not None:
            yield held
        held = batch
    if held is not None:
        yield held


def preprocessed_rows(root: str, split: str, spec: SampleSpec, tokenizer: ClipTokenizer, *,
                      limit: int = 0, shuffle_seed: int | None = None, strict: bool = False
                      ) -> Iterator[tuple[tuple[int, int], list[dict[str, Any]]]]:
    """``(position, samples)`` per row of a split, preprocessed in this process as the Ray Data
    actors do; a row that cannot be used gives a placeholder (counted and dropped downstream)
    or, with ``strict``, stops with its error."""
    for position, row in iter_positioned_rows(root, split, limit=limit,
                                              shuffle_seed=shuffle_seed):
        try:
            yield position, preprocess_ref(row, spec, tokenizer)
        except BadRowError as err:
            if strict:
                raise
            yield position, [placeholder_sample(spec, err)]


def preprocessed_samples(root: str, split: str, spec: SampleSpec, tokenizer: ClipTokenizer, *,
                         limit: int = 0, shuffle_seed: int | None = None,
                         strict: bool = False) -> Iterator[dict[str, Any]]:
    """The samples of a split preprocessed in this process (:func:`preprocessed_rows`)."""
    for _, samples in preprocessed_rows(root, split, spec, tokenizer, limit=limit,
                                        shuffle_seed=shuffle_seed, strict=strict):
        yield from samples


def stacked_batches(samples: Iterable[dict[str, Any]], spec: SampleSpec,
                    batch_size: int) -> Iterator[Batch]:
    """``samples`` stacked into batches of ``batch_size`` (the last one smaller)."""
    pending: list[dict[str, Any]] = []
    for sample in samples:
        pending.append(sample)
        if len(pending) == batch_size:
            yield stack_samples(pending, spec)
            pending = []
    if pending:
        yield stack_samples(pending, spec)


class LocalContext:
    """One process, no Ray: rows are read with pyarrow and preprocessed inline.

    A split whose ``keep_*`` flag is set is preprocessed once (during its first pass) and kept
    in this process; later passes take the kept samples in the order a fresh read would give
    them (:func:`row_positions`), so keeping a split never changes its data order.
    """

    rank = 0
    world_size = 1

    def __init__(self, *, root: str, train_split: str, val_split: str, train_spec: SampleSpec,
                 val_spec: SampleSpec, limit_train: int, limit_eval: int, strict: bool,
                 checkpoint_root: Path, keep_checkpoints: int, keep_train: bool = False,
                 keep_val: bool = False, device: torch.device | None = None):
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.root, self.train_split, self.val_split = root, train_split, val_split
        self.train_spec, self.val_spec = train_spec, val_spec
        self.limit_train, self.limit_eval, self.strict = limit_train, limit_eval, strict
        self.checkpoint_root = Path(checkpoint_root)
        self.keep_checkpoints = keep_checkpoints
        # The metrics of every checkpoint in the run folder (a resumed run's earlier ones too),
        # by epoch: what retention ranks and the summary picks the best from.
        self.checkpoints = {epoch: read_metrics(folder)
                            for epoch, folder in checkpoint_dirs(self.checkpoint_root).items()}
        self.keep = {"train": keep_train, "val": keep_val}
        self.tokenizer = ClipTokenizer()
        self.epoch = 0
        # role -> (row-group sizes, samples by row position) of a split kept in memory
        self._kept: dict[str, tuple[list[int], dict[tuple[int, int], list[dict]]]] = {}
        self._bad = BadRowCounter()

    def prepare_model(self, model):
        return model

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _samples(self, role: str, split: str, spec: SampleSpec, limit: int,
                 shuffle_seed: int | None) -> Iterator[dict[str, Any]]:
        """A pass over ``split`` in the order of :func:`row_positions`, whether its samples
        are read now or were kept from an earlier pass."""
        if role in self._kept:
            sizes, kept = self._kept[role]
            for position in row_positions(sizes, limit=limit, shuffle_seed=shuffle_seed):
                yield from kept[position]
            return
        kept = {}
        for position, samples in preprocessed_rows(self.root, split, spec, self.tokenizer,
                                                   limit=limit, shuffle_seed=shuffle_seed,
                                                   strict=self.strict):
            if self.keep[role]:
                kept[position] = samples
            yield from samples
        if self.keep[role]:
            sizes = row_group_sizes(shard_row_groups(self.root, split))
            self._kept[role] = (sizes, kept)

    def _batches(self, role: str, samples: Iterator[dict[str, Any]], spec: SampleSpec,
                 batch_size: int, finish) -> Iterator[Batch]:
        epoch = self.epoch
        return finished_batches(stacked_batches(samples, spec, batch_size), finish,
                                lambda c: self._bad.add(role, epoch, c))

    def train_batches(self, epoch: int, batch_size: int) -> Iterable[Batch]:
        seed = self.train_spec.seed
        samples = self._samples("train", self.train_split, self.train_spec, self.limit_train,
                                seed + epoch)
        return without_single_samples(self._batches(
            "train", samples, self.train_spec, batch_size,
            lambda b: select_sentences(b, seed=seed, epoch=epoch)))

    def val_batches(self, batch_size: int) -> Iterable[Batch]:
        samples = self._samples("val", self.val_split, self.val_spec, self.limit_eval, None)
        return self._batches("val", samples, self.val_spec, batch_size, drop_skipped)

    def bad_rows(self, epoch: int) -> dict[str, dict[str, int]]:
        return self._bad.of_epoch(epoch)

    def latest_checkpoint(self) -> Path | None:
        found = checkpoint_dirs(self.checkpoint_root)
        return found[max(found)] if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Copy the epoch's checkpoint into the run folder, then remove the folders that
        ``train.keep_checkpoints`` does not keep (:mod:`gtms.train.retention`, as Ray does)."""
        if checkpoint_dir is None:
            return
        metrics = retention.scored(metrics)
        target = self.checkpoint_root / checkpoint_dir_name(metrics["epoch"])
        target.mkdir(parents=True, exist_ok=True)
        for file in checkpoint_dir.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
        self.checkpoints[metrics["epoch"]] = metrics
        kept = retention.kept_epochs(list(self.checkpoints.values()), self.keep_checkpoints)
        for epoch in sorted(set(self.checkpoints) - kept):
            shutil.rmtree(self.checkpoint_root / checkpoint_dir_name(epoch))
            del self.checkpoints[epoch]

    def gather(self, obj: Any) -> list[Any]:
        return [obj]


def _quiet_ray_train_worker() -> None:
    """A Ray Train worker's console: no Ray Data progress bars, no DDP stride note, and no
    INFO line per report and checkpoint (:func:`_quiet_ray_train_reports`)."""
    import warnings

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    # DDP's note that a 1x1 conv's gradient is not laid out like its bucket: harmless here.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    _quiet_ray_train_reports()


def _quiet_ray_train_reports() -> None:
    """Silence the two INFO lines Ray Train (2.60) logs on every worker at every report:
    "Reporting training result N: ..." and "Checkpoint successfully created at ...". They
    bury the loop's one progress line per epoch; warnings and errors still show.

    This names two loggers of Ray's private ``ray.train.v2._internal`` modules, because the
    public switch does not reach them: ``RunConfig(logging_config=ray.train.LoggingConfig(
    log_level="WARNING"))`` filters only records of loggers named ``ray.train.*``, while the
    module that logs the reports names its logger by its file path (``getLogger(__file__)``),
    so its records reach the console through the root logger; that switch would also hide the
    controller's "Requesting resources" lines that tell a user why a run waits on a cluster.
    If a Ray upgrade renames these modules nothing breaks: the two lines come back per epoch.
    """
    import logging

    logging.getLogger("ray.train.v2._internal.execution.storage").setLevel(logging.WARNING)
    try:
        import ray.train.v2._internal.execution.context as reports
    except ImportError:
        return
    logging.getLogger(reports.__file__).setLevel(logging.WARNING)


class RayTrainContext:
    """Inside a Ray Train worker: dataset shards, ``ray.train.report``, DDP."""

    def __init__(self, *, seed: int):
        import ray.train
        from ray.train.torch import get_device

        _quiet_ray_train_worker()
        console.forward_to_driver()
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = get_device()
        self.seed = seed
        self.epoch = 0
        self._bad = BadRowCounter()
        self._tmp = tempfile.TemporaryDirectory()

    def prepare_model(self, model):
        from ray.train.torch import prepare_model

        return prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def train_batches(self, epoch: int, batch_size: int) -> Iterable[Batch]:
        import ray.train

        shard = ray.train.get_dataset_shard(part_name("train", self.rank))
        batches = shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                     prefetch_batches=4, local_shuffle_buffer_size=4 * batch_size,
                                     local_shuffle_seed=self.seed + 1000 * epoch + self.rank)
        return without_single_samples(finished_batches(
            batches, lambda b: select_sentences(b, seed=self.seed, epoch=epoch),
            lambda c: self._bad.add("train", epoch, c)))

    def val_batches(self, batch_size: int) -> Iterable[Batch]:
        import ray.train

        epoch = self.epoch
        batches = ray.train.get_dataset_shard(part_name("val", self.rank)).iter_batches(
            batch_size=batch_size, batch_format="numpy")
        return finished_batches(batches, drop_skipped, lambda c: self._bad.add("val", epoch, c))

    def bad_rows(self, epoch: int) -> dict[str, dict[str, int]]:
        """This worker's counts; the loop sums them over the workers."""
        return self._bad.of_epoch(epoch)

    def latest_checkpoint(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        return Path(checkpoint.to_directory(tempfile.mkdtemp(dir=self._tmp.name)))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train
        from ray.train import Checkpoint

        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # Ray keeps checkpoints by retention.ray_checkpoint_config (the trainer's RunConfig).
        ray.train.report(retention.scored(metrics), checkpoint=checkpoint,
                         checkpoint_dir_name=checkpoint_dir_name(metrics["epoch"]))

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Remove the restored-checkpoint copies of this worker."""
        self._tmp.cleanup()


def steps_per_epoch(n_refs: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps of an epoch over ``n_refs`` good refs (for the per-iteration gamma ramp
    and the plan ``run.py train`` prints): batches of ``batch_size`` with a final single sample
    merged into its neighbour (:func:`without_single_samples`).

    Exact for one worker. Several workers step together (DDP) as often as the one with the most
    batches; this assumes an even share, but worker ``r`` gets the refs with
    ``ref_id % world_size == r`` (:func:`gtms.data.pipeline.part_name`), so the busiest worker
    may get a few batches more (the loop records the real count).
    """
    share = math.ceil(n_refs / max(world_size, 1))
    sizes = [batch_size] * (share // batch_size) + ([share % batch_size] if share % batch_size
                                                    else [])
    merged = without_single_samples({"ref_id": np.zeros(size)} for size in sizes)
    return max(1, sum(1 for _ in merged))
