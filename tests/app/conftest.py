"""Fixtures for the web-app tests: a model bundle (the shipped one if present, else a tiny one trained
here in about a minute) and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

# pytest imports every folder's conftest.py as the top-level module `conftest`, and the one imported
# last replaces the others in sys.modules; test files elsewhere do `from conftest import ...` (the
# root helpers), so this module re-exports them (fixtures excluded: those stay registered once).
_ROOT_CONFTEST = Path(__file__).parents[1] / "conftest.py"
_spec = importlib.util.spec_from_file_location("_melanoma_tests_root_conftest", _ROOT_CONFTEST)
_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root)
for _name, _value in vars(_root).items():
    if _name.startswith("__") or _name in globals():
        continue
    if type(_value).__name__ == "FixtureFunctionDefinition" or hasattr(_value, "_pytestfixturefunction"):
        continue
    globals()[_name] = _value
TINY_BACKBONE = _root.TINY_BACKBONE

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SHIPPED_BUNDLE = REPO / "models" / "default"
SERVER_START_TIMEOUT = 60
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.jpg"))


def _augmented_copies(src: Path, n: int, rng: np.random.Generator):
    """Flips, 90-degree turns, crops and small colour changes of one sample image."""
    from PIL import Image, ImageEnhance

    base = Image.open(src).convert("RGB")
    for _ in range(n):
        img = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else base
        img = img.rotate(90 * int(rng.integers(4)), expand=True)
        w, h = img.size
        f = rng.uniform(0.8, 1.0)
        cw, ch = int(w * f), int(h * f)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((x, y, x + cw, y + ch)).resize((w, h))
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))
        yield ImageEnhance.Color(img).enhance(rng.uniform(0.9, 1.1))


def make_tiny_app_bundle(workdir: Path) -> Path:
    """Train timm's test model for a few steps on augmented copies of the 12 sample images and export
    a bundle. The sample images then fall inside the bundle's input gate, so they get status ok."""
    from melanoma_detector.cli import main

    rng = np.random.default_rng(0)
    data = workdir / "data"
    for split, n in (("train", 4), ("test", 2)):
        for src in EXAMPLE_FILES:
            cls = "malignant" if src.name.startswith("malignant") else "benign"
            (data / split / cls).mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(_augmented_copies(src, n, rng)):
                img.save(data / split / cls / f"{split}_{src.stem}_{i}.jpg", quality=92)
    run = workdir / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--backbone", TINY_BACKBONE, "--no-pretrained",
                 "--image-size", "64", "--epochs-frozen", "2", "--epochs-finetune", "1", "--batch-size", "8",
                 "--threads", "1", "--workers", "0", "--cache-dir", str(workdir / "cache"), "--no-progress"]) == 0
    bundle = workdir / "bundle"
    assert main(["export", "--model", str(run), "--out", str(bundle), "--resamples", "20"]) == 0
    return bundle


@pytest.fixture(scope="session")
def app_bundle(tmp_path_factory) -> Path:
    """MELANOMA_APP_TEST_BUNDLE=tiny|shipped|auto (default auto: the shipped bundle when it exists)."""
    choice = os.environ.get("MELANOMA_APP_TEST_BUNDLE", "auto")
    if choice != "tiny" and (SHIPPED_BUNDLE / "metadata.json").is_file():
        return SHIPPED_BUNDLE
    if choice == "shipped":
        pytest.fail(f"MELANOMA_APP_TEST_BUNDLE=shipped but {SHIPPED_BUNDLE} has no metadata.json")
    if len(EXAMPLE_FILES) < 4:
        pytest.skip(f"sample images missing from {EXAMPLES}")
    return make_tiny_app_bundle(tmp_path_factory.mktemp("app_bundle"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app, *, timeout: float = SERVER_START_TIMEOUT):
    """Run `app` under uvicorn in a thread on a free loopback port; yields the base URL and always
    shuts the server down."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port} within {timeout:.0f}s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="session")
def app_predictor(app_bundle):
    from melanoma_detector.inference import Predictor

    return Predictor(app_bundle)


@pytest.fixture(scope="session")
def live_server(app_predictor):
    """The full app (Gradio page + REST API) on a real loopback server, shared by the session."""
    pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e '.[app]')")
    from melanoma_detector.app import build_app

    app = build_app(app_predictor, max_upload_mb=20, auth=False)
    with serve(app) as url:
        yield url


def wait_for_health(proc, url: str, log: Path, *, auth=None, timeout: float = 120.0):
    """Poll GET {url}/api/v1/health until the subprocess server answers; fail with its log
    if it dies or stays silent past `timeout`."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(f"{url}/api/v1/health", auth=auth, timeout=5)
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"server at {url} did not answer within {timeout:.0f} s"
            time.sleep(0.5)


def stop_process(proc) -> None:
    """SIGINT (a clean uvicorn shutdown), then kill if it lingers."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
