"""Named moments at which a test may kill this process, as ``kill -9`` would.

``GTMS_KILL_AT=<point>:<epoch>`` (unset in normal use) makes :func:`reached` send SIGKILL to the
process when it reaches ``point`` during ``epoch`` (counted from 1). The kill harness
(``tests/test_resume.py``) uses it to prove that a run killed at each of these moments resumes
to the same numbers as a run that never stopped:

* ``mid_epoch``: after the epoch's first optimizer step;
* ``after_metrics``: the epoch's line is in ``metrics.jsonl``, its checkpoint not yet written;
* ``checkpoint_write``: part of the checkpoint file is written (a torn file is left behind).
"""

from __future__ import annotations

import os
import signal

ENV = "GTMS_KILL_AT"
POINTS = ("mid_epoch", "after_metrics", "checkpoint_write")


def reached(point: str, epoch: int) -> None:
    """Die here if ``GTMS_KILL_AT`` names this point and epoch."""
    if os.environ.get(ENV) == f"{point}:{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)
