"""Schedules of gamma, the weight of ``L_pix`` in ``L = L_loc + gamma L_pix`` (Eq. 8).

The paper warms the pixel loss up linearly, reaching its maximum at epoch 10 (Sec. 4.2); the
ramp advances every iteration. ``delay_epochs`` (ours, default 0 as in the paper) keeps gamma at 0
for a first stretch: a model trained from scratch needs ``L_loc`` alone until its predictions
(and GradCAM) are good enough for ``P-hat = filter(P * W)`` to be worth copying.
"""

from __future__ import annotations

import math
from numbers import Integral

GAMMA_SHAPES = ("linear", "constant", "cosine")


def gamma_at(
    step: int,
    steps_per_epoch: int,
    *,
    gamma_max: float = 1.0,
    warmup_epochs: float = 10,
    shape: str = "linear",
    delay_epochs: float = 0.0,
) -> float:
    """Gamma at a global training iteration.

    Args:
        step: global iteration, counted from 0.
        steps_per_epoch: iterations per epoch, ``>= 1``.
        gamma_max: the value after warm-up, ``>= 0``.
        warmup_epochs: length of the ramp in epochs, ``>= 0`` (0: no ramp).
        shape: ``"linear"`` (ramp ``gamma_max * t``), ``"cosine"`` (half-cosine ramp
            ``gamma_max * (1 - cos(pi t)) / 2``) or ``"constant"`` (``gamma_max`` from step 0),
            where ``t = min(1, step' / (warmup_epochs * steps_per_epoch))``.
        delay_epochs: gamma is 0 for the first ``delay_epochs`` epochs, ``>= 0``; the ramp
            starts after them (``step' = step - delay_epochs * steps_per_epoch``).

    Returns:
        gamma, a float in ``[0, gamma_max]``.
    """
    if shape not in GAMMA_SHAPES:
        raise ValueError(f"gamma shape must be one of {GAMMA_SHAPES}, got {shape!r}")
    if not _is_int(step) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not _is_int(steps_per_epoch) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
    if not (math.isfinite(gamma_max) and gamma_max >= 0):
        raise ValueError(f"gamma_max must be finite and >= 0, got {gamma_max!r}")
    if not (math.isfinite(warmup_epochs) and warmup_epochs >= 0):
        raise ValueError(f"warmup_epochs must be finite and >= 0, got {warmup_epochs!r}")
    if not (math.isfinite(delay_epochs) and delay_epochs >= 0):
        raise ValueError(f"delay_epochs must be finite and >= 0, got {delay_epochs!r}")
    delay_steps = delay_epochs * steps_per_epoch
    if step < delay_steps:
        return 0.0
    step = step - delay_steps
    warmup_steps = warmup_epochs * steps_per_epoch
    if shape == "constant" or step >= warmup_steps:
        return float(gamma_max)
    progress = step / warmup_steps
    if shape == "linear":
        return float(gamma_max * progress)
    return float(gamma_max * 0.5 * (1.0 - math.cos(math.pi * progress)))


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)
