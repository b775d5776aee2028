"""Where a training worker's batches come from: its own process (:class:`LocalFeed`) or its Ray
Dataset shards, preprocessed by Ray Data's actors (:class:`RayFeed`). Both give the same
samples; the training loop sees only ``train_batches`` / ``val_batches`` / ``bad_rows``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gtms.data.pipeline import SampleSpec, drop_skipped, part_name, select_sentences
from gtms.data.reading import (
    BadRowCounter,
    Batch,
    finished_batches,
    preprocessed_rows,
    row_group_sizes,
    row_positions,
    shard_row_groups,
    stacked_batches,
    without_single_samples,
)
from gtms.data.tokenizer import ClipTokenizer


class LocalFeed:
    """Rows read with pyarrow and preprocessed in this process.

    A split whose ``in_memory_*`` flag is set is preprocessed once (during its first pass) and kept
    in this process; later passes take the kept samples in the order a fresh read would give
    them (:func:`gtms.data.reading.row_positions`), so keeping a split never changes its data
    order.
    """

    def __init__(self, *, root: str, train_split: str, val_split: str, train_spec: SampleSpec,
                 val_spec: SampleSpec, limit_train: int = 0, limit_eval: int = 0,
                 strict: bool = False, in_memory_train: bool = False, in_memory_val: bool = False):
        self.root = root
        self.splits = {"train": (train_split, train_spec, limit_train),
                       "val": (val_split, val_spec, limit_eval)}
        self.strict = strict
        self.in_memory = {"train": in_memory_train, "val": in_memory_val}
        self.tokenizer = ClipTokenizer()
        self.epoch = 0
        # role -> (row-group sizes, samples by row position) of a split kept in memory
        self._kept: dict[str, tuple[list[int], dict[tuple[int, int], list[dict]]]] = {}
        self._bad = BadRowCounter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _samples(self, role: str, shuffle_seed: int | None) -> Iterator[dict[str, Any]]:
        """A pass over the split of ``role`` in the order of :func:`row_positions`, whether its
        samples are read now or were kept from an earlier pass."""
        split, spec, limit = self.splits[role]
        if role in self._kept:
            sizes, kept = self._kept[role]
            for position in row_positions(sizes, limit=limit, shuffle_seed=shuffle_seed):
                yield from kept[position]
            return
        kept = {}
        for position, samples in preprocessed_rows(self.root, split, spec, self.tokenizer,
                                                   limit=limit, shuffle_seed=shuffle_seed,
                                                   strict=self.strict):
            if self.in_memory[role]:
                kept[position] = samples
            yield from samples
        if self.in_memory[role]:
            self._kept[role] = (row_group_sizes(shard_row_groups(self.root, split)), kept)

    def _batches(self, role: str, samples: Iterator[dict[str, Any]], batch_size: int,
                 finish) -> Iterator[Batch]:
        epoch = self.epoch
        return finished_batches(stacked_batches(samples, self.splits[role][1], batch_size),
                                finish, lambda c: self._bad.add(role, epoch, c))

    def train_batches(self, epoch: int, batch_size: int) -> Iterable[Batch]:
        seed = self.splits["train"][1].seed
        return without_single_samples(self._batches(
            "train", self._samples("train", seed + epoch), batch_size,
            lambda b: select_sentences(b, seed=seed, epoch=epoch)))

    def val_batches(self, batch_size: int) -> Iterable[Batch]:
        return self._batches("val", self._samples("val", None), batch_size, drop_skipped)

    def bad_rows(self, epoch: int) -> dict[str, dict[str, int]]:
        return self._bad.of_epoch(epoch)


class RayFeed:
    """A Ray Train worker's own train and val Dataset shards
    (:func:`gtms.data.pipeline.part_name`), streamed through Ray Data's actors."""

    def __init__(self, shard_of: Callable[[str], Any], *, rank: int, seed: int):
        self.shard_of, self.rank, self.seed = shard_of, rank, seed
        self.epoch = 0
        self._bad = BadRowCounter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def train_batches(self, epoch: int, batch_size: int) -> Iterable[Batch]:
        shard = self.shard_of(part_name("train", self.rank))
        batches = shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                     prefetch_batches=4, local_shuffle_buffer_size=4 * batch_size,
                                     local_shuffle_seed=self.seed + 1000 * epoch + self.rank)
        return without_single_samples(finished_batches(
            batches, lambda b: select_sentences(b, seed=self.seed, epoch=epoch),
            lambda c: self._bad.add("train", epoch, c)))

    def val_batches(self, batch_size: int) -> Iterable[Batch]:
        epoch = self.epoch
        batches = self.shard_of(part_name("val", self.rank)).iter_batches(
            batch_size=batch_size, batch_format="numpy")
        return finished_batches(batches, drop_skipped, lambda c: self._bad.add("val", epoch, c))

    def bad_rows(self, epoch: int) -> dict[str, dict[str, int]]:
        """This worker's counts; the loop sums them over the workers."""
        return self._bad.of_epoch(epoch)
