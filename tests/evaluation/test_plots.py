"""Every plotting function writes a non-empty PNG and survives degenerate input."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from melanoma_detector.evaluation import metrics as M
from melanoma_detector.evaluation import plots as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(int)
    logits = rng.normal(size=300) * 2 + 2.5 * y - 1.5
    return y, 1.0 / (1.0 + np.exp(-logits)), logits


def test_plot_roc(tmp_path, data):
    y, p, _ = data
    ops = {
        "sens 95%": M.threshold_for_sensitivity(y, p, 0.95),
        "spec 90%": M.threshold_for_specificity(y, p, 0.90),
        "0.5": 0.5,
    }
    out = P.plot_roc(y, p, tmp_path / "sub" / "roc.png", operating_points=ops)
    assert out == tmp_path / "sub" / "roc.png" and _is_png(out)
    assert _is_png(P.plot_roc(y, p, tmp_path / "roc2.png", None))


def test_plot_pr(tmp_path, data):
    y, p, _ = data
    assert _is_png(P.plot_pr(y, p, tmp_path / "pr.png"))


def test_plot_confusion(tmp_path, data):
    y, p, _ = data
    cm = M.binary_metrics(y, p)["confusion"]
    assert _is_png(P.plot_confusion(cm, tmp_path / "cm.png", "Test set, t = 0.5"))
    assert _is_png(P.plot_confusion({"tn": 0, "fp": 0, "fn": 0, "tp": 3}, tmp_path / "cm0.png"))


def test_plot_reliability(tmp_path, data):
    y, p, logits = data
    t = M.fit_temperature(logits, y)
    after = M.apply_temperature(logits, t)
    assert _is_png(P.plot_reliability(y, p, tmp_path / "rel.png", p_after=after))
    assert _is_png(P.plot_reliability(y, p, tmp_path / "rel1.png"))


def test_plot_score_histograms(tmp_path, data):
    y, p, _ = data
    thr = {"default": 0.5, "sens 95%": M.threshold_for_sensitivity(y, p, 0.95), "none": None}
    assert _is_png(P.plot_score_histograms(y, p, tmp_path / "hist.png", thr))
    assert _is_png(P.plot_score_histograms(y, p, tmp_path / "hist0.png", None))


def test_plot_training_curves(tmp_path):
    history = []
    lr = 1e-3
    for phase, epochs in (("frozen", 5), ("finetune", 4)):
        for e in range(1, epochs + 1):
            history.append({
                "epoch": e, "phase": phase, "train_loss": 0.7 / e, "val_loss": 0.75 / e ** 0.5,
                "val_auc": 0.7 + 0.02 * e if e != 2 else None, "lr": lr,
            })
        lr = 1e-5
    assert _is_png(P.plot_training_curves(history, tmp_path / "curves.png"))
    assert _is_png(P.plot_training_curves([], tmp_path / "empty.png"))


def test_degenerate_inputs_still_write_figures(tmp_path):
    y1 = np.ones(10, int)
    p = np.linspace(0, 1, 10)
    assert _is_png(P.plot_roc(y1, p, tmp_path / "roc1.png", {"x": 0.5}))
    assert _is_png(P.plot_pr(np.zeros(10, int), p, tmp_path / "pr0.png"))
    assert _is_png(P.plot_reliability([], [], tmp_path / "rel_empty.png"))
    assert _is_png(P.plot_score_histograms(y1, p, tmp_path / "hist1.png", {"t": 0.3}))


def test_plots_leave_pyplot_alone(tmp_path, data):
    y, p, _ = data
    P.plot_roc(y, p, tmp_path / "r.png")
    if "matplotlib.pyplot" in sys.modules:  # imported by someone else: no figure left open
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []
