"""Paired comparisons of two Table 2 rows trained with the same seeds.

Every row of a seed starts from the same weights and sees the same data order
(:func:`gtms.train.loop.initial_model`, :func:`gtms.data.reading.row_positions`), so two
rows are compared seed by seed: the per-seed difference (higher row minus lower row) of the
mean IoU over the held-out sentences, with

* a t interval over seeds (``df = seeds - 1``): the seed-to-seed spread of the difference;
* a paired two-stage bootstrap that resamples seeds and, inside the held-out splits, refs (a
  ref's sentences stay together), from the trials' per-sentence IoUs
  (:data:`gtms.eval.evaluate.SENTENCES`). With three seeds the seed stage only redraws three
  values, so this interval is narrower than the t interval mostly because it cannot see much
  seed spread; the verdicts read the t interval.

Values are fractions in [0, 1]; no torch, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
NAN = float("nan")

_REF_BITS, _SENT_BITS = 40, 16   # sentence key: split index | ref id | sentence index


def pooled_mean_iou(metrics: dict, splits: Sequence[str]) -> float:
    """Mean IoU over the sentences of ``splits`` together: the splits' ``<split>_mean_iou``
    weighted by their sentence counts ``<split>_n``; NaN when a split misses either."""
    total = weight = 0.0
    for split in splits:
        mean, n = metrics.get(f"{split}_mean_iou"), metrics.get(f"{split}_n")
        if mean is None or not n:
            return NAN
        total, weight = total + float(mean) * n, weight + n
    return total / weight if weight else NAN


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high) of the two-sided ``level`` Student t interval of the mean of
    ``values`` (NaN excluded), ``df = len - 1``; the bounds are NaN below two values."""
    from scipy import stats

    x = np.asarray([v for v in values if v == v], float)
    if not len(x):
        return NAN, NAN, NAN
    mean = float(x.mean())
    if len(x) < 2:
        return mean, NAN, NAN
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def sentence_keys(sentences: dict[str, dict[str, np.ndarray]],
                  splits: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """One trial's per-sentence IoUs of ``splits`` as (sorted int64 keys, IoUs); None when a
    split is missing. A key names the split, the ref and the sentence."""
    keys, ious = [], []
    for index, split in enumerate(splits):
        arrays = sentences.get(split)
        if arrays is None:
            return None
        ref, sent = np.asarray(arrays["ref_id"], np.int64), np.asarray(arrays["sent_index"],
                                                                        np.int64)
        if len(ref) and (ref.max() >= 1 << _REF_BITS or sent.max() >= 1 << _SENT_BITS):
            raise ValueError("ref id or sentence index too large for a sentence key")
        keys.append((index << (_REF_BITS + _SENT_BITS)) | (ref << _SENT_BITS) | sent)
        ious.append(np.asarray(arrays["iou"], float))
    key, iou = np.concatenate(keys), np.concatenate(ious)
    order = np.argsort(key, kind="stable")
    return key[order], iou[order]


def _aligned(trials: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The sentences every trial scored: (keys [N], IoUs [trials, N])."""
    common = trials[0][0]
    for key, _ in trials[1:]:
        common = np.intersect1d(common, key, assume_unique=True)
    return common, np.stack([iou[np.searchsorted(key, common)] for key, iou in trials])


def paired_bootstrap(low: list[tuple[np.ndarray, np.ndarray]],
                     high: list[tuple[np.ndarray, np.ndarray]], *, share: bool = False,
                     level: float = LEVEL, resamples: int = RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float, int]:
    """Percentile interval (low, high) of the mean over seeds of the per-seed difference
    ``high - low`` of mean IoU (``share``: of the per-seed ratio ``high / low``), resampling
    seeds and refs; and the number of sentences both rows' trials scored.

    ``low[i]`` and ``high[i]`` are the same seed's trials, each as :func:`sentence_keys`. One
    resample draws the seeds with replacement and, independently, the refs (all sentences of
    a drawn ref, as often as it is drawn); every drawn seed is scored on the same drawn refs.
    """
    k = len(low)
    if k == 0 or k != len(high):
        return NAN, NAN, 0
    keys, ious = _aligned(list(low) + list(high))
    if not len(keys):
        return NAN, NAN, 0
    refs, cluster = np.unique(keys >> _SENT_BITS, return_inverse=True)
    sums = np.stack([np.bincount(cluster, weights=row, minlength=len(refs)) for row in ious])
    counts = np.bincount(cluster, minlength=len(refs)).astype(float)
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, resamples, 256):
        b = min(256, resamples - start)
        weights = rng.multinomial(len(refs), np.full(len(refs), 1 / len(refs)), size=b)
        drawn = rng.integers(k, size=(b, k))
        means = (weights @ sums.T) / (weights @ counts)[:, None]       # [b, 2k]
        m_low, m_high = means[:, :k], means[:, k:]
        per_seed = m_high / m_low if share else m_high - m_low
        stats.append(np.take_along_axis(per_seed, drawn, axis=1).mean(axis=1))
    stats = np.concatenate(stats)
    tail = 100 * (1 - level) / 2
    return (float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail)),
            len(keys))


def verdict(low: float, high: float, *, threshold: float = 0.0, at_most: bool = False) -> str:
    """Read an interval [low, high] of "higher minus lower" (or of a share) against
    ``threshold``: "holds" when it lies above, "fails" when it lies below, "undecided" when it
    contains it. ``at_most`` (the claim "<="): only an interval entirely below ``threshold``
    (the lower row significantly above the higher one) fails; anything else holds."""
    if low != low or high != high:
        return "undecided"
    if at_most:
        return "fails" if high < threshold else "holds"
    if low > threshold:
        return "holds"
    return "fails" if high < threshold else "undecided"
