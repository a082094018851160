"""Secure defaults of `melanoma serve` and the app that test_app_api.py does not already cover:
the bind warning is really printed, the 20 MB upload limit is the default, credentials never reach
the output or the logs, and uploads are never written to the working folder."""

from __future__ import annotations

import inspect
import logging
import tempfile
import types
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e '.[app]')")
pytest.importorskip("httpx")

pytestmark = pytest.mark.timeout(300)

SECRET = "Sup3r-s3cret:pw"


@pytest.fixture
def fake_serving(monkeypatch):
    """`melanoma serve` up to the point where uvicorn would start: the app and the server are stubs."""
    import uvicorn

    import melanoma_detector.app as app_pkg

    built = {}

    def fake_build_app(model=None, **kwargs):
        built.update(kwargs, model=model)
        bundle = types.SimpleNamespace(version="test-version")
        return types.SimpleNamespace(state=types.SimpleNamespace(predictor=types.SimpleNamespace(bundle=bundle)))

    monkeypatch.setattr(app_pkg, "build_app", fake_build_app)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: built.update(host=self.config.host))
    monkeypatch.delenv("MELANOMA_AUTH", raising=False)
    return built


def test_serve_binds_loopback_by_default_without_warning(fake_serving, capsys):
    from melanoma_detector.cli import main

    assert main(["serve", "--port", "0"]) == 0
    out, err = capsys.readouterr()
    assert fake_serving["host"] == "127.0.0.1" and "http://127.0.0.1:0/" in out
    assert "warning" not in err
    assert fake_serving["max_upload_mb"] == 20 and fake_serving["auth"] is False
    assert "localhost" in fake_serving["allowed_hosts"] and "127.0.0.1" in fake_serving["allowed_hosts"]
    # behind a reverse proxy that forwards its public Host
    assert main(["serve", "--port", "0", "--allowed-host", "melanoma.example.org"]) == 0
    assert "melanoma.example.org" in fake_serving["allowed_hosts"]


def test_serve_on_all_interfaces_warns_and_never_shows_the_secret(fake_serving, capsys, monkeypatch, caplog):
    from melanoma_detector.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0 is not a loopback address" in err and "MELANOMA_AUTH" in err
    monkeypatch.setenv("MELANOMA_AUTH", f"alice:{SECRET}")
    caplog.set_level(logging.DEBUG)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 0
    out, err = capsys.readouterr()
    assert "not a loopback address" in err and "login required" in out
    assert fake_serving["auth"] == ("alice", SECRET)
    assert SECRET not in out + err + caplog.text


def test_upload_limit_defaults_to_20_mb():
    from melanoma_detector.app import build_app as package_build_app
    from melanoma_detector.app.server import build_app
    from melanoma_detector.cli import build_parser

    assert inspect.signature(build_app).parameters["max_upload_mb"].default == 20
    assert inspect.signature(package_build_app).parameters["max_upload_mb"].default == 20
    assert build_parser().parse_args(["serve"]).max_upload_mb == 20


@pytest.fixture(scope="module")
def default_app(app_predictor):
    """build_app with its defaults, except a login (MELANOMA_AUTH is not read from the test's env)."""
    from melanoma_detector.app import build_app

    return build_app(app_predictor, auth=("alice", SECRET))


def test_building_the_app_writes_nothing_into_the_package(default_app):
    """Subclassing a Gradio component makes Gradio write a .pyi stub beside the module defining it."""
    import melanoma_detector

    package = Path(melanoma_detector.__file__).parent
    assert not list(package.rglob("*.pyi"))


def test_default_app_refuses_uploads_over_20_mb_and_hides_credentials(default_app, caplog, capfd):
    from fastapi.testclient import TestClient

    caplog.set_level(logging.DEBUG)
    with TestClient(default_app) as client:
        big = b"\xff\xd8\xff" + b"\0" * (20 * 1024 * 1024 + 1)
        r = client.post("/api/v1/predict", files={"file": ("big.jpg", big, "image/jpeg")}, auth=("alice", SECRET))
        assert r.status_code == 413 and "20 MB" in r.json()["error"]
        r = client.post("/api/v1/predict", files={"file": ("x.jpg", b"abc", "image/jpeg")}, auth=("alice", "wrong"))
        assert r.status_code == 401 and SECRET not in r.text and "wrong" not in r.text
    out, err = capfd.readouterr()
    assert SECRET not in out + err + caplog.text


def test_uploads_are_not_written_outside_temp(default_app, tmp_path, monkeypatch):
    """A 3 MB upload (over the 1 MB that multipart parsing keeps in memory) leaves nothing in the
    working folder; the Gradio page's uploads go to its folder under the system temp folder."""
    import gradio.utils
    from fastapi.testclient import TestClient

    from conftest import EXAMPLE_FILES

    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    upload_dir = Path(gradio.utils.get_upload_folder()).resolve()
    assert upload_dir.is_relative_to(Path(tempfile.gettempdir()).resolve())
    work, spool = tmp_path / "work", tmp_path / "spool"
    work.mkdir()
    spool.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    data = EXAMPLE_FILES[0].read_bytes()
    padded = data + b"\0" * (3 * 1024 * 1024)  # a JPEG with trailing bytes: still decodes
    with TestClient(default_app) as client:
        r = client.post("/api/v1/predict", files={"file": ("big.jpg", padded, "image/jpeg")}, auth=("alice", SECRET))
        assert r.status_code == 200, r.text
    assert list(work.iterdir()) == []
    assert list(spool.rglob("*")) == []  # spooled copies are deleted after the request
