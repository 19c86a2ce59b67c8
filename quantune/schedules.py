"""Learning-rate schedules and batch-size scaling for fine-tuning.

``lr_factor`` gives the multiplier of the peak learning rate for optimizer step ``step``
(0-based, ``0 .. total_steps - 1``). Every schedule begins with a linear warmup
``(step + 1) / warmup_steps``, so the first step is not wasted at zero and the last warmup
step is exactly the peak. After warmup:

- ``constant``: 1.0.
- ``linear``:   straight line from the peak down to ``min_ratio`` at the last step.
- ``cosine``:   ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2``.
- ``wsd``:      warmup-stable-decay ("cooldown"): 1.0, then a linear decay over the last
                ``decay_steps`` steps down to ``min_ratio`` at the last step.

Convention: progress counts the step being taken as done,
``p = (step - warmup_steps + 1) / (total_steps - warmup_steps)``, so p runs 1/n .. 1 over
the n steps after warmup and the last step ends exactly at ``min_ratio``. This is the usual
"value at the end of the step" schedule (e.g. Hugging Face's ``get_*_schedule_with_warmup``)
evaluated at ``step + 1``: no step after warmup repeats the peak, and no step is spent at 0.
"""
from __future__ import annotations

import math

import torch

from quantune.config import QuantuneError

SCHEDULES = ("constant", "linear", "cosine", "wsd")
SCALING_RULES = ("linear", "sqrt", "none")
WSD_DEFAULT_DECAY_FRACTION = 0.2


def _check(total_steps: int, schedule: str, warmup_steps: int, decay_steps: int | None,
           min_ratio: float) -> None:
    if schedule not in SCHEDULES:
        raise QuantuneError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise QuantuneError(f"total steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise QuantuneError(f"warmup steps must lie in [0, total steps={total_steps}), got {warmup_steps}")
    if decay_steps is not None and not 1 <= decay_steps <= total_steps - warmup_steps:
        raise QuantuneError(f"decay steps must lie in [1, total - warmup = {total_steps - warmup_steps}], "
                            f"got {decay_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise QuantuneError(f"min ratio must lie in [0, 1], got {min_ratio}")


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int = 0,
              decay_steps: int | None = None, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (see the module docstring).

    ``decay_steps`` is used by ``wsd`` only (it is range-checked for every schedule); its default
    is 20% of ``total_steps``, rounded, at least 1 and at most ``total_steps - warmup_steps``.
    """
    _check(total_steps, schedule, warmup_steps, decay_steps, min_ratio)
    if not 0 <= step < total_steps:
        raise QuantuneError(f"step must lie in [0, total steps={total_steps}), got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        if decay_steps is None:
            decay_steps = min(max(1, round(WSD_DEFAULT_DECAY_FRACTION * total_steps)),
                              total_steps - warmup_steps)
        done = step - (total_steps - decay_steps) + 1  # decay steps taken, including this one
        return 1.0 if done <= 0 else min_ratio + (1.0 - min_ratio) * (1.0 - done / decay_steps)
    p = (step - warmup_steps + 1) / (total_steps - warmup_steps)
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - p)  # this form is exactly min_ratio at p = 1
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def scaled_lr(lr: float, batch_size: int, base_batch_size: int, rule: str) -> float:
    """Scale a learning rate tuned at ``base_batch_size`` to ``batch_size``.

    ``linear`` (lr * batch / base) suits SGD: Goyal et al. 2017, "Accurate, Large Minibatch SGD".
    ``sqrt`` (lr * sqrt(batch / base)) suits Adam-type optimizers: Krizhevsky 2014, "One weird
    trick", and Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
    Algorithms". ``none`` returns ``lr`` unchanged.
    """
    if rule not in SCALING_RULES:
        raise QuantuneError(f"unknown lr scaling rule {rule!r}; choose one of {', '.join(SCALING_RULES)}")
    if batch_size < 1 or base_batch_size < 1:
        raise QuantuneError(f"batch sizes must be >= 1, got batch {batch_size} and base {base_batch_size}")
    ratio = batch_size / base_batch_size
    return lr * ratio if rule == "linear" else lr * math.sqrt(ratio) if rule == "sqrt" else lr


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, schedule: str,
                   warmup_steps: int = 0, decay_steps: int | None = None,
                   min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR giving optimizer step k the lr ``peak * lr_factor(k, ...)``.

    Call ``scheduler.step()`` after each ``optimizer.step()``. LambdaLR evaluates its counter 0
    at construction, so step 0 already runs at its factor; the final ``scheduler.step()`` (counter
    ``total_steps``) holds the last value. Settings are checked here, before training. To resume,
    load the optimizer's state_dict as well as the scheduler's (the current lr lives in the former).
    """
    lr_factor(0, total_steps, schedule, warmup_steps, decay_steps, min_ratio)  # fail early

    def factor(k: int) -> float:
        return lr_factor(min(k, total_steps - 1), total_steps, schedule, warmup_steps, decay_steps, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
