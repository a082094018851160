"""The LR schedules of a training phase: cosine annealing and the plateau monitor."""

import pytest
import torch

from melanoma_detector.training.trainer import PlateauMonitor, cosine_lr


def test_cosine_starts_at_the_base_lr_and_anneals_towards_min_lr():
    lrs = [cosine_lr(e, 10, base_lr=1e-3, min_lr=1e-6) for e in range(1, 12)]
    assert lrs[0] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[5] == pytest.approx((1e-3 + 1e-6) / 2)  # half way through, half way down
    assert lrs[9] > 1e-6  # the last epoch still learns
    assert lrs[10] == pytest.approx(1e-6)  # the epoch after the last would sit at min_lr


def _opt(lr=1e-3):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_plateau_monitor_cuts_the_lr_after_its_patience():
    opt = _opt()
    mon = PlateauMonitor(opt, patience=10, lr_patience=2, factor=0.1, min_lr=1e-7)
    assert mon.step(0.8) == (True, False)
    mon.step(0.7)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    mon.step(0.7)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_plateau_monitor_leaves_the_lr_to_another_schedule_but_still_stops():
    opt = _opt()
    mon = PlateauMonitor(opt, patience=3, lr_patience=None, factor=0.1, min_lr=1e-7)
    mon.step(0.8)
    stops = [mon.step(0.5)[1] for _ in range(3)]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert stops == [False, False, True]
