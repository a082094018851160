"""Shared fixtures: tiny, generated image folders in the layouts the tool accepts."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_BACKBONE = "test_efficientnet"  # timm's 0.1M-parameter test model: seconds per epoch

# A training run given no --cache-dir caches features under $MELANOMA_CACHE (else ~/.cache): never the user's
# cache, whose warm entries a test could be served, and never left behind in the home folder.
os.environ["MELANOMA_CACHE"] = tempfile.mkdtemp(prefix="melanoma-test-cache-")


def lesion_image(rng: np.random.Generator, malignant: bool, size=(96, 72)) -> Image.Image:
    """A skin-coloured background with a blob: dark, irregular and large for 'malignant',
    light brown, round and small for 'benign', so a model can learn the difference."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    skin = np.array([224, 180, 150]) + rng.normal(0, 6, (h, w, 3))
    cx, cy = w / 2 + rng.normal(0, 4), h / 2 + rng.normal(0, 4)
    r = (h / 3 if malignant else h / 6) * rng.uniform(0.85, 1.15)
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + (0.25 * np.sin(5 * angle + rng.uniform(0, 6)) if malignant else 0)
    mask = np.hypot(xx - cx, yy - cy) < r * wobble
    colour = np.array([60, 35, 30]) if malignant else np.array([170, 120, 90])
    img = np.where(mask[..., None], colour + rng.normal(0, 10, (h, w, 3)), skin)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_class_folder(root: Path, n_per_class: int, rng: np.random.Generator, prefix: str = "img") -> list[Path]:
    paths = []
    for cls in ("benign", "malignant"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            p = root / cls / f"{prefix}_{cls}_{i:03d}.jpg"
            lesion_image(rng, cls == "malignant").save(p, quality=92)
            paths.append(p)
    return paths


@pytest.fixture
def seed_layout(tmp_path) -> Path:
    """ROOT/{train,test}/{benign,malignant}/*.jpg, the seed notebook's Kaggle layout."""
    rng = np.random.default_rng(0)
    root = tmp_path / "kaggle"
    make_class_folder(root / "train", 16, rng, "tr")
    make_class_folder(root / "test", 6, rng, "te")
    return root


@pytest.fixture
def grouped_manifest(tmp_path) -> Path:
    """A HAM10000-like folder: images in class folders plus labels.csv with lesion groups."""
    rng = np.random.default_rng(1)
    root = tmp_path / "ham"
    rows = []
    for lesion in range(40):
        malignant = lesion % 4 == 0
        cls = "malignant" if malignant else "benign"
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(1 + lesion % 3):
            image_id = f"ISIC_{lesion:04d}{k}"
            lesion_image(rng, malignant).save(root / cls / f"{image_id}.jpg")
            rows.append({"image_id": image_id, "lesion_id": f"HAM_{lesion:04d}", "group": f"HAM_{lesion:04d}",
                         "dx": "mel" if malignant else "nv", "sex": "male" if lesion % 2 else "female",
                         "label": cls})
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def shared_data_or_skip(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} is missing (read-only shared data set)")
    return path


def train_tiny(data: Path, out: Path, cache: Path, *extra: str, epochs_finetune: int = 1) -> int:
    """`melanoma train` in-process on a tiny random-init backbone at 64 px: seconds per run."""
    from melanoma_detector.cli import main

    return main([
        "train", "--data", str(data), "--out", str(out), "--backbone", TINY_BACKBONE,
        "--no-pretrained", "--image-size", "64", "--epochs-frozen", "1", "--epochs-finetune", str(epochs_finetune),
        "--batch-size", "8", "--cache-dir", str(cache), "--no-progress", "--seed", "3", *extra,
    ])


class TrainingKilled(Exception):
    """Raised by `kill_training_at`: stands for the process dying at that point."""


def kill_training_at(monkeypatch, desc_prefix: str) -> None:
    """Make the trainer's first epoch whose label starts with `desc_prefix` (e.g. "phase2 2/")
    raise TrainingKilled before it trains; `monkeypatch.undo()` restores the real step."""
    from melanoma_detector.training import trainer

    real = trainer.train_one_epoch

    def dies(*args, **kwargs):
        if kwargs.get("desc", "").startswith(desc_prefix):
            raise TrainingKilled
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", dies)


def train_tiny_bundle(tmp_path_factory, *, n_train: int, n_test: int, epochs_frozen: int, epochs_finetune: int,
                      resamples: int) -> tuple[Path, Path, Path]:
    """Generated seed-layout data -> `melanoma train` (tiny random-init backbone, 64 px) ->
    `melanoma export`. Returns (data root, run folder, bundle folder)."""
    from melanoma_detector.cli import main

    root = tmp_path_factory.mktemp("tinydata")
    rng = np.random.default_rng(0)
    make_class_folder(root / "train", n_train, rng, "tr")
    make_class_folder(root / "test", n_test, rng, "te")
    run = tmp_path_factory.mktemp("tinyrun") / "run"
    assert main(["train", "--data", str(root), "--out", str(run), "--backbone", TINY_BACKBONE, "--no-pretrained",
                 "--image-size", "64", "--epochs-frozen", str(epochs_frozen), "--epochs-finetune",
                 str(epochs_finetune), "--batch-size", "8", "--cache-dir", str(tmp_path_factory.mktemp("cache")),
                 "--no-progress"]) == 0
    bundle = tmp_path_factory.mktemp("tinybundle") / "b"
    assert main(["export", "--model", str(run), "--out", str(bundle), "--resamples", str(resamples)]) == 0
    return root, run, bundle


def assert_serves_alike(bundle_a: Path, bundle_b: Path, image: Path) -> None:
    """The two bundles give one image the same probability and the same heatmap."""
    from melanoma_detector.inference import Predictor

    a = Predictor(bundle_a).predict(image, heatmap=True)
    b = Predictor(bundle_b).predict(image, heatmap=True)
    assert a["status"] == b["status"] == "ok"
    assert abs(a["probability_malignant"] - b["probability_malignant"]) <= 1e-5
    np.testing.assert_allclose(np.asarray(a["heatmap"]), np.asarray(b["heatmap"]), atol=1e-4)


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory) -> Path:
    """The bad/odd input corpus of `tests/badinputs.py` as ROOT/benign/* beside one good image in
    ROOT/malignant/, so `data check` and the training loader read it as a data folder too.
    Returns ROOT; the corpus itself is ROOT / "benign"."""
    from badinputs import example_image, make_corpus, restore_permissions

    root = tmp_path_factory.mktemp("badinputs")
    make_corpus(root / "benign")
    (root / "malignant").mkdir()
    example_image().save(root / "malignant" / "good.jpg", quality=92)
    yield root
    restore_permissions(root / "benign")


def run_rows(run: Path) -> list[dict]:
    """The rows of a run folder's metrics.csv."""
    with (run / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts its ranks in sessions
    of their own, so a process-group kill would miss them)."""
    import os
    import signal

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in reversed(tree):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_training_after(cmd: list[str], run: Path, *, epochs: int, env: dict, log: Path, timeout: float = 300) -> list[dict]:
    """Start a training command, SIGKILL it (and its children) once `run` has recorded `epochs`
    epochs, i.e. while the next one is in progress; return the rows written before the kill."""
    import subprocess
    import time

    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if (run / "metrics.csv").is_file() and len(run_rows(run)) >= epochs:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "training ended before it could be killed:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
            kill_tree(proc.pid)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
    return run_rows(run)


def fake_bundle(folder: Path) -> Path:
    """A folder that every output check takes for a model bundle (the shipped metadata, an empty graph), so a
    test of a refusal never risks writing into the real models/default."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.json").write_bytes((Path(__file__).resolve().parents[1] / "models" / "default" /
                                            "metadata.json").read_bytes())
    (folder / "model.onnx").write_bytes(b"")
    return folder


def spy_epochs(monkeypatch) -> list[tuple[tuple, dict]]:
    """Record every (args, kwargs) the trainer passes to `train_one_epoch`, still training for real: a test
    of a run with an option can then check that the option reached the step, not only the saved config."""
    from melanoma_detector.training import trainer

    real, calls = trainer.train_one_epoch, []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", spy)
    return calls


def phase2_calls(calls: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    found = [(a, k) for a, k in calls if k.get("desc", "").startswith("phase2")]
    assert found, "no phase-2 epoch ran"
    return found
