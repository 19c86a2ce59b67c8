"""Learning-rate schedules: boundary values, monotonic decay, lr scaling, errors, LambdaLR wiring."""
import math

import pytest
import torch

from quantune.config import QuantuneError
from quantune.schedules import SCHEDULES, lr_factor, make_scheduler, scaled_lr

DECAYING = ("linear", "cosine", "wsd")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warmup_starts_above_zero_and_reaches_peak(schedule):
    assert lr_factor(0, 10, schedule, warmup_steps=4, min_ratio=0.1) == 0.25
    assert lr_factor(2, 10, schedule, warmup_steps=4, min_ratio=0.1) == 0.75
    assert lr_factor(3, 10, schedule, warmup_steps=4, min_ratio=0.1) == 1.0


@pytest.mark.parametrize("schedule, expected", [
    ("constant", 1.0),
    ("linear", 0.1 + 0.9 * (1 - 1 / 6)),
    ("cosine", 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 6))),
    ("wsd", 1.0),  # default decay is the last round(0.2 * 10) = 2 steps
])
def test_first_step_after_warmup(schedule, expected):
    assert lr_factor(4, 10, schedule, warmup_steps=4, min_ratio=0.1) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("schedule", DECAYING)
@pytest.mark.parametrize("total, warmup, min_ratio", [(10, 4, 0.1), (7, 0, 0.0), (100, 10, 0.3), (1, 0, 0.25)])
def test_last_step_is_exactly_min_ratio(schedule, total, warmup, min_ratio):
    assert lr_factor(total - 1, total, schedule, warmup_steps=warmup, min_ratio=min_ratio) == min_ratio


def test_constant_stays_at_peak():
    assert [lr_factor(s, 10, "constant", warmup_steps=2, min_ratio=0.5) for s in range(2, 10)] == [1.0] * 8
    assert lr_factor(0, 1, "constant") == 1.0


@pytest.mark.parametrize("total, warmup, decay, first_decay", [
    (20, 2, None, 16),  # default: round(0.2 * 20) = 4 decay steps
    (20, 2, 5, 15),
    (10, 0, 1, 9),
])
def test_wsd_is_flat_until_the_decay_begins(total, warmup, decay, first_decay):
    f = [lr_factor(s, total, "wsd", warmup, decay, min_ratio=0.1) for s in range(total)]
    assert f[warmup:first_decay] == [1.0] * (first_decay - warmup)
    assert f[first_decay] < 1.0
    assert f[-1] == 0.1
    d = total - first_decay
    assert f[first_decay] == pytest.approx(0.1 + 0.9 * (1 - 1 / d), rel=1e-12)


def test_wsd_default_decay_is_clamped_to_the_steps_after_warmup():
    # round(0.2 * 20) = 4 decay steps, but only 2 steps follow the warmup: decay over those 2
    assert [lr_factor(s, 20, "wsd", warmup_steps=18) for s in (17, 18, 19)] == [1.0, 0.5, 0.0]


def test_wsd_over_all_post_warmup_steps_equals_linear():
    for s in range(3, 12):
        assert lr_factor(s, 12, "wsd", 3, decay_steps=9, min_ratio=0.2) == pytest.approx(
            lr_factor(s, 12, "linear", 3, min_ratio=0.2), rel=1e-12)


@pytest.mark.parametrize("min_ratio", [0.0, 0.2])
def test_cosine_midpoint(min_ratio):
    # 10 steps after warmup: the 5th of them (step 6) ends half way, p = 0.5
    assert lr_factor(6, 12, "cosine", warmup_steps=2, min_ratio=min_ratio) == pytest.approx(
        min_ratio + (1 - min_ratio) / 2, rel=1e-12)


@pytest.mark.parametrize("schedule", DECAYING)
@pytest.mark.parametrize("total, warmup, min_ratio", [(50, 5, 0.0), (37, 0, 0.1), (9, 8, 0.5)])
def test_non_increasing_after_warmup(schedule, total, warmup, min_ratio):
    f = [lr_factor(s, total, schedule, warmup, min_ratio=min_ratio) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(f, f[1:]))
    assert all(min_ratio <= x <= 1.0 for x in f)
    assert f[0] <= 1.0 and f[-1] == min_ratio


@pytest.mark.parametrize("rule, expected", [("linear", 4e-3), ("sqrt", 2e-3), ("none", 1e-3)])
def test_scaled_lr(rule, expected):
    assert scaled_lr(1e-3, 64, 16, rule) == pytest.approx(expected, rel=1e-12)
    assert scaled_lr(1e-3, 16, 16, rule) == pytest.approx(1e-3, rel=1e-12)


def test_scaled_lr_shrinks_for_smaller_batches():
    assert scaled_lr(1e-3, 4, 16, "linear") == pytest.approx(2.5e-4, rel=1e-12)
    assert scaled_lr(1e-3, 4, 16, "sqrt") == pytest.approx(5e-4, rel=1e-12)


@pytest.mark.parametrize("args, match", [
    ((1e-3, 8, 8, "cubic"), r"unknown lr scaling rule 'cubic'; choose one of linear, sqrt, none"),
    ((1e-3, 0, 8, "linear"), r"batch sizes must be >= 1, got batch 0 and base 8"),
    ((1e-3, 8, 0, "sqrt"), r"batch sizes must be >= 1, got batch 8 and base 0"),
    ((1e-3, -4, 8, "none"), r"batch sizes must be >= 1"),
])
def test_scaled_lr_errors(args, match):
    with pytest.raises(QuantuneError, match=match):
        scaled_lr(*args)


@pytest.mark.parametrize("step, total, kwargs, match", [
    (0, 10, dict(schedule="step"), r"unknown schedule 'step'; choose one of constant, linear, cosine, wsd"),
    (0, 0, dict(schedule="linear"), r"total steps must be >= 1, got 0"),
    (0, 10, dict(schedule="linear", warmup_steps=-1), r"warmup steps must lie in \[0, total steps=10\), got -1"),
    (0, 10, dict(schedule="cosine", warmup_steps=10), r"warmup steps must lie in \[0, total steps=10\), got 10"),
    (0, 1, dict(schedule="constant", warmup_steps=1), r"warmup steps must lie in \[0, total steps=1\), got 1"),
    (0, 10, dict(schedule="wsd", decay_steps=0), r"decay steps must lie in \[1, total - warmup = 10\], got 0"),
    (0, 10, dict(schedule="wsd", warmup_steps=4, decay_steps=7),
     r"decay steps must lie in \[1, total - warmup = 6\], got 7"),
    (0, 10, dict(schedule="linear", min_ratio=-0.1), r"min ratio must lie in \[0, 1\], got -0.1"),
    (0, 10, dict(schedule="cosine", min_ratio=1.5), r"min ratio must lie in \[0, 1\], got 1.5"),
    (0, 10, dict(schedule="wsd", min_ratio=float("nan")), r"min ratio must lie in \[0, 1\], got nan"),
    (-1, 10, dict(schedule="linear"), r"step must lie in \[0, total steps=10\), got -1"),
    (10, 10, dict(schedule="linear"), r"step must lie in \[0, total steps=10\), got 10"),
])
def test_lr_factor_errors(step, total, kwargs, match):
    with pytest.raises(QuantuneError, match=match):
        lr_factor(step, total, **kwargs)


def _sgd(peak: float) -> tuple[torch.nn.Parameter, torch.optim.SGD]:
    p = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    return p, torch.optim.SGD([p], lr=peak)


def _train_step(p: torch.nn.Parameter, opt: torch.optim.Optimizer, sched) -> float:
    """One optimizer step on loss = p (gradient 1), then scheduler.step(); returns the lr applied."""
    opt.zero_grad()
    p.sum().backward()
    before = p.item()
    opt.step()
    sched.step()
    return before - p.item()


def test_make_scheduler_rejects_bad_settings_before_training():
    _, opt = _sgd(1e-2)
    with pytest.raises(QuantuneError, match=r"warmup steps must lie in \[0, total steps=5\), got 5"):
        make_scheduler(opt, 5, "linear", warmup_steps=5)
    with pytest.raises(QuantuneError, match=r"unknown schedule 'exp'"):
        make_scheduler(opt, 5, "exp")


@pytest.mark.filterwarnings("error")  # e.g. LambdaLR's warning about calling step() in the wrong order
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_scheduler_drives_sgd_with_the_factor_of_each_step(schedule):
    peak, total, settings = 0.5, 12, dict(warmup_steps=3, decay_steps=4, min_ratio=0.1)
    p, opt = _sgd(peak)
    sched = make_scheduler(opt, total, schedule, **settings)
    for k in range(total):
        expected = peak * lr_factor(k, total, schedule, **settings)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
        assert _train_step(p, opt, sched) == pytest.approx(expected, rel=1e-12)  # the update SGD applied
    # the scheduler.step() after the last optimizer step holds the final value instead of failing
    assert opt.param_groups[0]["lr"] == pytest.approx(peak * lr_factor(total - 1, total, schedule, **settings))


def test_state_dict_round_trip_resumes_the_schedule():
    peak, total, settings = 0.3, 10, dict(warmup_steps=2, min_ratio=0.05)
    p, opt = _sgd(peak)
    sched = make_scheduler(opt, total, "cosine", **settings)
    for _ in range(3):
        _train_step(p, opt, sched)
    opt_state, sched_state = opt.state_dict(), sched.state_dict()

    p2, opt2 = _sgd(peak)
    sched2 = make_scheduler(opt2, total, "cosine", **settings)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert sched2.last_epoch == 3
    expected = peak * lr_factor(3, total, "cosine", **settings)
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert sched2.get_last_lr() == pytest.approx([expected], rel=1e-12)
    for k in range(3, total):
        expected = peak * lr_factor(k, total, "cosine", **settings)
        assert _train_step(p2, opt2, sched2) == pytest.approx(expected, rel=1e-12)
        assert _train_step(p, opt, sched) == pytest.approx(expected, rel=1e-12)
