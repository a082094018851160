"""Batch mixing (`--mix mixup|cutmix`): the blends and their weights, the blended loss in
`train_one_epoch`, and a run that trains with it and refuses bad settings."""

import pytest
import torch
from torch import nn

from conftest import phase2_calls, run_rows, spy_epochs, train_tiny
from melanoma_detector.training.engine import Distillation, train_one_epoch, weighted_bce
from melanoma_detector.training.mixing import BatchMix


def _batch(n=6):
    # Item i is the constant image i, so every output pixel says which items it came from.
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 10).clone()


def test_mixup_blends_each_item_with_its_partner_by_lam():
    torch.manual_seed(0)
    x = _batch()
    m = BatchMix("mixup", alpha=0.4, prob=1.0)(x)
    assert 0 < m.lam < 1 and sorted(m.perm.tolist()) == list(range(6))
    expected = m.lam * torch.arange(6.0) + (1 - m.lam) * m.perm.float()
    assert torch.allclose(m.inputs[:, :, 0, 0], expected.view(6, 1).expand(6, 3))
    assert torch.equal(x, _batch())  # the input is left alone


def test_cutmix_pastes_one_box_and_lam_is_the_share_kept():
    for seed in range(20):
        torch.manual_seed(seed)
        x = _batch()
        m = BatchMix("cutmix", alpha=1.0, prob=1.0)(x)
        for i in range(6):
            j = int(m.perm[i])
            if i == j:
                continue
            kept = (m.inputs[i, 0] == i).float().mean().item()
            assert kept == pytest.approx(m.lam)
            assert bool(((m.inputs[i] == i) | (m.inputs[i] == j)).all())
            pasted = (m.inputs[i, 0] == j).nonzero()
            if len(pasted):  # one rectangle: its bounding box is all pasted
                (y0, x0), (y1, x1) = pasted.min(0).values, pasted.max(0).values
                assert len(pasted) == (y1 - y0 + 1) * (x1 - x0 + 1)


def test_prob_leaves_batches_alone_and_single_items_are_never_mixed():
    torch.manual_seed(0)
    mix = BatchMix("mixup", prob=0.5)
    mixed = sum(mix(_batch()) is not None for _ in range(400))
    assert 150 < mixed < 250
    assert BatchMix("mixup", prob=1.0)(_batch(1)) is None
    for bad in ({"kind": "blend"}, {"alpha": 0}, {"prob": 0}, {"prob": 1.5}):
        with pytest.raises(ValueError):
            BatchMix(**bad)


class _FixedMix:
    """Mixes a batch of two with a swap at a known weight."""

    def __call__(self, x):
        from melanoma_detector.training.mixing import Mixed

        return Mixed(0.7 * x + 0.3 * x.flip(0), torch.tensor([1, 0]), 0.7)


@pytest.mark.parametrize("with_teacher", [False, True])
def test_train_one_epoch_blends_the_two_items_losses(with_teacher):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 1), nn.Flatten(0))
    x, y, index = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 0.0]), torch.tensor([5, 2])
    # Soft targets are looked up by dataset index: the partner's term must use the partner's.
    distill = Distillation(torch.linspace(-3, 3, 8), weight=0.5, temperature=2.0) if with_teacher else None
    mixed = 0.7 * x + 0.3 * x.flip(0)
    with torch.no_grad():
        logits = net(mixed).reshape(-1)

    def loss(targets, idx):
        return (weighted_bce(logits, targets, (1.0, 3.0)) if distill is None
                else distill.loss(logits, targets, idx, (1.0, 3.0)))

    expected = 0.7 * loss(y, index) + 0.3 * loss(y.flip(0), index.flip(0))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    out = train_one_epoch(net, [(x, y, index)], opt, device=torch.device("cpu"), class_w=(1.0, 3.0),
                          distill=distill, mix=_FixedMix())
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-6)


def test_a_run_trains_with_mixing_and_refuses_bad_settings(seed_layout, tmp_path, capsys, monkeypatch):
    calls = spy_epochs(monkeypatch)
    assert train_tiny(seed_layout, tmp_path / "a", tmp_path / "cache", "--mix", "cutmix", "--mix-prob", "1",
                      "--threads", "1") == 0
    assert [r["phase"] for r in run_rows(tmp_path / "a")] == ["phase1", "phase2"]
    assert "mix: cutmix" in (tmp_path / "a" / "config.yaml").read_text()
    for _, kw in phase2_calls(calls):
        assert isinstance(kw["mix"], BatchMix) and kw["mix"].kind == "cutmix" and kw["mix"].prob == 1.0
    assert train_tiny(seed_layout, tmp_path / "b", tmp_path / "cache", "--mix-alpha", "0") == 2
    assert "mix_alpha" in capsys.readouterr().err
