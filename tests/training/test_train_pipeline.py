"""End to end on a tiny generated folder in the seed's layout: train 1+1 epochs on CPU with a
tiny random-init backbone, reload the checkpoint, and check evaluate and predict agree."""

import csv
import json

import numpy as np
import pytest
import torch

from conftest import TINY_BACKBONE
from melanoma_detector.cli import main
from melanoma_detector.models.checkpoint import load_checkpoint


@pytest.fixture
def trained_run(seed_layout, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    cache = tmp_path_factory.mktemp("cache")
    rc = main([
        "train", "--data", str(seed_layout), "--out", str(out), "--backbone", TINY_BACKBONE,
        "--no-pretrained", "--image-size", "64", "--epochs-frozen", "1", "--epochs-finetune", "1",
        "--batch-size", "8", "--cache-dir", str(cache), "--no-progress", "--seed", "3",
    ])
    assert rc == 0
    return out


@pytest.mark.parametrize("phase2_mode", ["plain", "cached"])
def test_train_writes_a_complete_run_folder(seed_layout, tmp_path, phase2_mode):
    out = tmp_path / f"run-{phase2_mode}"
    rc = main([
        "train", "--data", str(seed_layout), "--out", str(out), "--backbone", TINY_BACKBONE,
        "--no-pretrained", "--image-size", "64", "--epochs-frozen", "1", "--epochs-finetune", "1",
        "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
        "--phase2-mode", phase2_mode, "--cache-views", "2",
        *(["--cache-dihedral"] if phase2_mode == "cached" else []),
    ])
    assert rc == 0
    for name in ("config.yaml", "split.csv", "metrics.csv", "curves.png", "checkpoint.pt", "metrics.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["phase"] for r in rows] == ["phase1", "phase2"]
    assert all(float(r["train_loss"]) > 0 for r in rows)
    with (out / "split.csv").open() as fh:
        splits = {row["split"] for row in csv.DictReader(fh)}
    assert splits == {"train", "val", "test"}
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["class_names"] == ["benign", "malignant"]
    assert ckpt["preprocessing"]["input_size"] == 64
    assert set(ckpt["thresholds"]) == {"screening", "high_specificity"}
    assert "test" in ckpt["metrics"] and ckpt["temperature"] > 0


def test_refuses_to_overwrite_a_run(trained_run, seed_layout, capsys):
    rc = main(["train", "--data", str(seed_layout), "--out", str(trained_run), "--backbone", TINY_BACKBONE,
               "--no-pretrained", "--no-progress"])
    assert rc == 2
    assert "already holds a trained checkpoint" in capsys.readouterr().err


def test_checkpoint_reloads_and_evaluate_agrees_with_predict(trained_run, seed_layout, tmp_path):
    model, ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    assert not model.training
    ev_out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(trained_run), "--data", str(seed_layout), "--out", str(ev_out), "--no-progress"]) == 0
    metrics = json.loads((ev_out / "metrics.json").read_text())
    assert metrics["n"] == 12  # the test/ split of the seed layout
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity", "balanced_accuracy", "f1"):
        assert metrics[key] is not None
    for png in ("roc.png", "pr.png", "confusion.png"):
        assert (ev_out / png).stat().st_size > 1000
    eval_rows = {r["path"]: float(r["probability_malignant"]) for r in csv.DictReader((ev_out / "predictions.csv").open())}

    pred_csv = tmp_path / "pred.csv"
    assert main(["predict", "--model", str(trained_run / "checkpoint.pt"), str(seed_layout / "test"),
                 "--csv", str(pred_csv), "--no-progress"]) == 0
    pred_rows = list(csv.DictReader(pred_csv.open()))
    assert set(pred_rows[0]) >= {"path", "probability_malignant", "predicted_label"}
    assert len(pred_rows) == 12
    ckpt = torch.load(trained_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    screening, high = ckpt["thresholds"]["screening"], ckpt["thresholds"]["high_specificity"]
    for r in pred_rows:
        p = float(r["probability_malignant"])
        assert abs(p - eval_rows[r["path"]]) < 1e-5
        assert r["predicted_label"] in ("benign", "malignant")
        # the same columns as a bundle's: risk tiers from the checkpoint's own operating points
        assert r["risk_level"] == ("High" if p >= max(high, screening) else "Moderate" if p >= screening else "Low")
        assert r["recommendation"]


def test_predict_json_and_bad_file(trained_run, seed_layout, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = next((seed_layout / "test" / "benign").iterdir())
    rc = main(["predict", "--model", str(trained_run), str(good), str(bad), "--json", "--no-progress"])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    by_path = {r["path"]: r for r in payload["results"]}
    assert by_path[str(good)]["status"] == "ok"
    assert 0 <= by_path[str(good)]["probability_malignant"] <= 1
    assert by_path[str(bad)]["status"] == "cannot_assess" and "broken.jpg" in by_path[str(bad)]["reason"]
    assert "not a diagnosis" in payload["disclaimer"]


def test_head_l2_and_seed_head_shape():
    from melanoma_detector.models.factory import create_model

    model = create_model(TINY_BACKBONE, pretrained=False)
    head = model.head
    assert [head.fc1.out_features, head.fc2.out_features, head.out.out_features] == [512, 256, 1]
    assert head.drop1.p == 0.45 and head.drop2.p == 0.35
    assert isinstance(head.norm, torch.nn.BatchNorm1d)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2,)
    assert head.l2_parameters() == [head.fc1.weight, head.fc2.weight]


def test_backbone_split_composes_to_forward_features():
    from melanoma_detector.models.factory import create_model, split_backbone

    model = create_model(TINY_BACKBONE, pretrained=False).eval()
    bottom, top = split_backbone(model.backbone, 0.3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(top(bottom(x)).numpy(), model.forward_features(x).numpy(), atol=1e-5)
    n_top = sum(1 for _ in top)
    assert n_top >= 1 and sum(1 for _ in bottom) > n_top


def test_onnx_runtime_feature_engine_matches_pytorch(seed_layout):
    """The frozen-feature pass may run on ONNX Runtime (faster on CPU); its features must be the
    PyTorch ones, pooled and as phase-2 feature maps."""
    pytest.importorskip("onnxruntime")
    from melanoma_detector.data.discovery import discover_all
    from melanoma_detector.models.factory import create_model, default_preprocessing, split_backbone
    from melanoma_detector.training.features import bottom_feature_cache, pooled_features

    samples = [s for src in discover_all([str(seed_layout)]) for s in src.samples][:12]
    model = create_model(TINY_BACKBONE, pretrained=False)
    pp = default_preprocessing(model.backbone, image_size=64, resize_mode="crop")
    kw = dict(device=torch.device("cpu"), cache_dir=None, progress=False, batch_size=5)
    ref = pooled_features(model.backbone, samples, pp, engine="torch", **kw)
    from melanoma_detector.training.features import denormals_flushed, onnx_engine

    torch.set_flush_denormal(True)
    try:
        assert onnx_engine(model.backbone, torch.zeros(2, 3, 64, 64)) is not None, "the export must work, not fall back"
        # torch.onnx.export and ONNX Runtime clear the flag; the trainer's head phase needs it kept.
        assert denormals_flushed()
    finally:
        torch.set_flush_denormal(False)
    ort = pooled_features(model.backbone, samples, pp, engine="onnxruntime", **kw)
    assert ref.shape == ort.shape and np.abs(ref - ort).max() < 1e-4
    bottom, _ = split_backbone(model.backbone, 0.3)
    kw = dict(views=1, train=False, device=torch.device("cpu"), seed=0, progress=False, batch_size=5)
    import tempfile

    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        m_ref = np.asarray(bottom_feature_cache(bottom, samples, pp, cache_dir=a, engine="torch", **kw)[0], np.float32)
        m_ort = np.asarray(bottom_feature_cache(bottom, samples, pp, cache_dir=b, engine="onnxruntime", **kw)[0], np.float32)
    assert m_ref.shape == m_ort.shape and np.abs(m_ref - m_ort).max() < 1e-2  # float16 storage


def test_cosine_schedule_and_strong_augmentation_train(seed_layout, tmp_path, monkeypatch):
    from melanoma_detector.training import trainer

    real, augmentations = trainer.build_image_loader, []

    def spy(*args, **kwargs):
        if kwargs.get("train"):
            augmentations.append(kwargs.get("augmentation"))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "build_image_loader", spy)
    out = tmp_path / "run"
    rc = main([
        "train", "--data", str(seed_layout), "--out", str(out), "--backbone", TINY_BACKBONE,
        "--no-pretrained", "--image-size", "64", "--epochs-frozen", "2", "--epochs-finetune", "2",
        "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--phase2-mode", "plain",
        "--lr-finetune", "1e-3", "--lr-schedule", "cosine", "--augmentation", "strong",
    ])
    assert rc == 0
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r["phase"] == "phase2"]
    # min_lr 1e-7: epoch 1 at the base LR, epoch 2 half way down the cosine.
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3, (1e-3 + 1e-7) / 2])
    config = (out / "config.yaml").read_text()
    assert "lr_schedule: cosine" in config and "augmentation: strong" in config
    assert augmentations == ["strong"]  # the plain phase 2's loader (phase 1 reads cached features)


def test_feature_caches_leave_the_global_random_state_alone_and_key_on_precision(seed_layout, tmp_path):
    """A cold cache pass iterates DataLoaders (each draws a seed from torch's global generator), a warm one does
    not: the same seed then trained different models on a machine's first run. bf16 features differ from fp32
    ones, so a cache of one must not be served for the other."""
    from melanoma_detector.data.discovery import discover_all
    from melanoma_detector.models.factory import create_model, default_preprocessing, split_backbone
    from melanoma_detector.training.features import bottom_feature_cache, pooled_features

    samples = [s for src in discover_all([str(seed_layout)]) for s in src.samples][:8]
    model = create_model(TINY_BACKBONE, pretrained=False)
    pp = default_preprocessing(model.backbone, image_size=64, resize_mode="crop")
    kw = dict(device=torch.device("cpu"), cache_dir=tmp_path, progress=False, batch_size=4, engine="torch")
    states = []
    for _ in range(2):  # a miss, then a hit
        torch.manual_seed(0)
        pooled_features(model.backbone, samples, pp, **kw)
        bottom_feature_cache(split_backbone(model.backbone, 0.3)[0], samples, pp, views=1, train=True, seed=0, **kw)
        states.append(torch.get_rng_state())
    torch.manual_seed(0)
    assert torch.equal(states[0], torch.get_rng_state()) and torch.equal(states[1], states[0])
    fp32 = pooled_features(model.backbone, samples, pp, **kw)
    bf16 = pooled_features(model.backbone, samples, pp, amp_dtype=torch.bfloat16, **kw)
    assert len(list(tmp_path.glob("pooled-*.npy"))) == 2 and not np.array_equal(fp32, bf16)
    flipped = pooled_features(model.backbone, samples, pp, flip_average=True, **kw)  # crashed on the torch path
    assert flipped.shape == fp32.shape


def test_a_checkpoint_served_keeps_the_sensitivity_its_threshold_was_fitted_for(trained_run):
    """The checkpoint's thresholds are fitted in one pass (batch 64, the training memory layout); TorchPredictor
    serves in another, whose float32 logits differ in the last bits. The melanoma that set the threshold must
    stay above it."""
    from melanoma_detector.evaluation.metrics import SCREENING_SENSITIVITY
    from melanoma_detector.models.torch_predictor import TorchPredictor

    rows = [r for r in csv.DictReader((trained_run / "split.csv").open()) if r["split"] == "val"]
    predictor = TorchPredictor(trained_run)
    for batch_size in (1, 5):
        served = predictor.predict_paths([r["path"] for r in rows], batch_size=batch_size)
        mal = [s["probability_malignant"] for s, r in zip(served, rows) if r["label"] == "1"]
        assert mal and np.mean([p >= predictor.threshold for p in mal]) >= SCREENING_SENSITIVITY
