"""A split's Parquet shards read in this process: rows in a seeded order, preprocessed as the
Ray Data actors do, and stacked into batches.

Both homes of a worker read through here when Ray is not used (:class:`gtms.data.feeds.LocalFeed`,
``eval --no-ray``), and so do ``visualize`` and the example image ``train`` copies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from gtms.data.pipeline import (
    SHARD_COLUMNS,
    BadRowError,
    SampleSpec,
    batch_rows,
    placeholder_sample,
    preprocess_ref,
    shard_uri,
    stack_samples,
)
from gtms.data.tokenizer import ClipTokenizer

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
