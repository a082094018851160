"""The pairwise ranking term (`--rank-weight`): its value on known orders, its gradient, its
place in `train_one_epoch`'s loss, and a run that trains with it and refuses bad settings."""

import math

import pytest
import torch
from torch import nn

from conftest import run_rows, spy_epochs, train_tiny
from melanoma_detector.training.engine import pairwise_rank_loss, train_one_epoch, weighted_bce


def test_the_loss_is_the_mean_softplus_over_every_melanoma_benign_pair():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0])
    pairs = [(2.0, -1.0), (2.0, 0.5), (3.0, -1.0), (3.0, 0.5)]
    expected = sum(math.log1p(math.exp(n - p)) for p, n in pairs) / len(pairs)
    assert pairwise_rank_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_it_falls_as_the_classes_separate_and_ignores_a_shift_of_all_scores():
    targets = torch.tensor([1.0, 0.0, 0.0])
    mis_ranked = pairwise_rank_loss(torch.tensor([0.0, 1.0, 2.0]), targets)
    tied = pairwise_rank_loss(torch.zeros(3), targets)
    ranked = pairwise_rank_loss(torch.tensor([5.0, -5.0, -6.0]), targets)
    assert mis_ranked > tied > ranked
    assert tied.item() == pytest.approx(math.log(2))
    assert ranked.item() < 1e-4
    # Only differences between the classes count: unlike the per-item loss, a common shift changes nothing.
    shifted = torch.tensor([5.0, -5.0, -6.0]) + 7.0
    assert pairwise_rank_loss(shifted, targets).item() == pytest.approx(ranked.item(), abs=1e-9)


def test_a_batch_of_one_class_adds_zero_and_still_backpropagates():
    z = torch.tensor([0.3, -0.2], requires_grad=True)
    loss = pairwise_rank_loss(z, torch.zeros(2))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros(2))


def test_the_gradient_pushes_a_benign_that_outscores_a_melanoma_down():
    z = torch.tensor([0.0, 1.0], requires_grad=True)  # melanoma scored below the benign image
    pairwise_rank_loss(z, torch.tensor([1.0, 0.0])).backward()
    assert z.grad[0] < 0 < z.grad[1]


def test_train_one_epoch_adds_the_weighted_term_to_the_batch_loss():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 1), nn.Flatten(0))
    x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([1.0, 0.0, 0.0])
    with torch.no_grad():
        logits = net(x).reshape(-1)
    expected = weighted_bce(logits, y, (1.0, 3.0)) + 0.5 * pairwise_rank_loss(logits, y)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    out = train_one_epoch(net, [(x, y, torch.arange(3))], opt, device=torch.device("cpu"), class_w=(1.0, 3.0),
                          rank_weight=0.5)
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-6)


def test_a_run_trains_with_the_ranking_term_and_refuses_bad_weights(seed_layout, tmp_path, capsys, monkeypatch):
    calls = spy_epochs(monkeypatch)
    assert train_tiny(seed_layout, tmp_path / "a", tmp_path / "cache", "--rank-weight", "0.5",
                      "--threads", "1") == 0
    assert [r["phase"] for r in run_rows(tmp_path / "a")] == ["phase1", "phase2"]
    assert "rank_weight: 0.5" in (tmp_path / "a" / "config.yaml").read_text()
    assert calls and all(kw["rank_weight"] == 0.5 for _, kw in calls)  # both phases
    for bad in ("-1", "11"):
        assert train_tiny(seed_layout, tmp_path / "b", tmp_path / "cache", "--rank-weight", bad) == 2
        assert "rank_weight" in capsys.readouterr().err
