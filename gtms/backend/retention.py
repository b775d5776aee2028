"""Which checkpoints a run keeps, and which one is its best: one rule for both backends.

``train.keep_checkpoints = N`` keeps the N best checkpoints by validation mean IoU plus the
latest one. This is the rule Ray Train (2.60) applies for ``CheckpointConfig(num_to_keep=N,
checkpoint_score_attribute="val_mean_iou", checkpoint_score_order="max")``, which
:func:`ray_checkpoint_config` builds for a Ray run; a local (``--no-ray``) run removes folders
by :func:`kept_epochs`, so both leave the same ``checkpoint_epoch_*`` folders:

* checkpoints are ranked by score; an epoch without validation (score NaN) ranks below every
  validated one;
* of two equal scores the later epoch ranks higher;
* the latest checkpoint is never removed (a resume continues from it), even when it is not
  among the N best; it is removed once a newer one replaces it as the latest.

:func:`best` picks the summary's best checkpoint by the same ranking, so the best is always one
of the kept folders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

SCORE = "val_mean_iou"   # Ray's checkpoint_score_attribute, higher is better


def validated(metrics: dict[str, Any] | None) -> bool:
    """Whether an epoch's metrics hold a validation score (NaN: the epoch was not validated)."""
    value = (metrics or {}).get(SCORE)
    return value is not None and not math.isnan(value)


def scored(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with the score set to NaN where the epoch was not validated: Ray ranks a
    checkpoint whose metrics lack the score attribute with an error in its log."""
    return {SCORE: math.nan, **metrics}


def rank(metrics: dict[str, Any]) -> tuple[bool, float, int]:
    """The sort key of a checkpoint's metrics: higher ranks better (validated first, then the
    score, then the later epoch)."""
    if not validated(metrics):
        return (False, -math.inf, int(metrics["epoch"]))
    return (True, float(metrics[SCORE]), int(metrics["epoch"]))


def kept_epochs(checkpoints: Sequence[dict[str, Any]], keep: int) -> set[int]:
    """The epochs whose checkpoints stay, given the metrics of every checkpoint still on disk
    (each with its ``epoch``): the ``keep`` best plus the latest."""
    if keep < 1:
        raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
    if not checkpoints:
        return set()
    ranked = sorted(checkpoints, key=rank, reverse=True)
    latest = max(int(m["epoch"]) for m in checkpoints)
    return {int(m["epoch"]) for m in ranked[:keep]} | {latest}


def best(checkpoints: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The metrics of the best validated checkpoint, or None when none was validated."""
    good = [m for m in checkpoints if validated(m)]
    return max(good, key=rank) if good else None


def ray_checkpoint_config(keep: int):
    """Ray Train's ``CheckpointConfig`` for the rule above."""
    from ray.train import CheckpointConfig

    return CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=SCORE,
                            checkpoint_score_order="max")
