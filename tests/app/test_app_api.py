"""The web app over real HTTP: REST predict, its error contract, health, model card, login, and
the Gradio API through gradio_client. One uvicorn server on a loopback port per session."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest

from conftest import EXAMPLE_FILES, serve

pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e '.[app]')")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.timeout(300)

RESULT_FIELDS = {"probability_malignant", "predicted_label", "risk_level", "recommendation", "status", "reason",
                 "model_version", "disclaimer"}


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=60) as client:
        yield client


def _post(http, url, **kwargs):
    return http.post(f"{url}/api/v1/predict", **kwargs)


def _assert_error(response, status):
    from melanoma_detector import DISCLAIMER

    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert body["disclaimer"] == DISCLAIMER
    return body["error"]


def test_rest_predict_example(live_server, http, app_predictor):
    from melanoma_detector import DISCLAIMER

    path = next(p for p in EXAMPLE_FILES if p.name.startswith("malignant"))
    r = _post(http, live_server, files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert RESULT_FIELDS <= set(body)
    assert body["status"] == "ok", body
    assert 0.0 <= body["probability_malignant"] <= 1.0
    assert body["predicted_label"] in ("benign", "malignant")
    assert body["risk_level"] in ("Low", "Moderate", "High")
    assert body["recommendation"]
    assert body["model_version"] == app_predictor.bundle.version
    assert body["disclaimer"] == DISCLAIMER
    assert r.headers.get("cache-control") == "no-store"
    # same number as the library gives for the same file
    direct = app_predictor.predict(str(path))
    assert body["probability_malignant"] == pytest.approx(direct["probability_malignant"], abs=1e-6)


def test_rest_predict_tta_query(live_server, http, app_predictor):
    path = EXAMPLE_FILES[0]
    r = _post(http, live_server, params={"tta": "true"}, files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    assert r.json()["tta"] is True
    # computed with TTA, not merely labelled: the library's TTA figure, which differs from the plain one
    with_tta = app_predictor.predict(str(path), tta=True)["probability_malignant"]
    assert r.json()["probability_malignant"] == pytest.approx(with_tta, abs=1e-6)
    assert abs(with_tta - app_predictor.predict(str(path))["probability_malignant"]) > 1e-4
    _assert_error(_post(http, live_server, params={"tta": "maybe"}, files={"file": ("a.jpg", path.read_bytes())}), 400)


def test_rest_gate_refusal_is_200_cannot_assess(live_server, http):
    """A decodable image the input gate refuses (nearly uniform) is a valid request."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (200, 150), (128, 128, 128)).save(buf, format="PNG")
    r = _post(http, live_server, files={"file": ("flat.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "cannot_assess"
    assert body["probability_malignant"] is None and "uniform" in body["reason"]


@pytest.mark.parametrize(
    "kwargs, status, words",
    [
        ({"files": {"image": ("a.jpg", b"\xff\xd8\xff", "image/jpeg")}}, 400, "field 'file'"),  # wrong field name
        ({"data": {"file": "not a file"}, "files": {"other": ("x.txt", b"x")}}, 400, "file upload"),
        ({"files": {"file": ("empty.jpg", b"", "image/jpeg")}}, 400, "empty"),
        ({"files": {"file": ("noise.jpg", bytes(range(256)) * 64, "image/jpeg")}}, 422, "not a recognised image"),
        ({"files": {"file": ("cut.jpg", EXAMPLE_FILES[0].read_bytes()[:600], "image/jpeg")}}, 422, "cut.jpg"),
        ({"content": b"plain text", "headers": {"content-type": "text/plain"}}, 400, "multipart"),
        ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=zz"}}, 400,
         "malformed"),
        ({}, 400, "multipart"),
    ],
    ids=["wrong-field", "text-field", "empty", "random-bytes", "truncated-jpeg", "not-multipart", "bad-body",
         "no-body"],
)
def test_rest_bad_input_is_4xx_json(live_server, http, kwargs, status, words):
    message = _assert_error(_post(http, live_server, **kwargs), status)
    assert words in message, message


def test_rest_two_files_refused(live_server, http):
    data = EXAMPLE_FILES[0].read_bytes()
    r = _post(http, live_server, files=[("file", ("a.jpg", data)), ("file", ("b.jpg", data))])
    assert "one image" in _assert_error(r, 400)


def test_rest_oversize_is_413(app_predictor):
    from melanoma_detector.app import build_app

    limit = 0.004  # MB: 4194 bytes, between the smallest (~2.7 kB) and largest (~5.7 kB) sample image
    app = build_app(app_predictor, max_upload_mb=limit, auth=False, examples_dir="/nonexistent")
    big = max(EXAMPLE_FILES, key=lambda p: p.stat().st_size)
    small = min(EXAMPLE_FILES, key=lambda p: p.stat().st_size)
    assert small.stat().st_size < limit * 2**20 < big.stat().st_size
    with serve(app) as url, httpx.Client(timeout=60) as http:
        assert "too large" in _assert_error(_post(http, url, files={"file": (big.name, big.read_bytes())}), 413)
        # streamed without Content-Length (chunked): still cut off, still 413
        body = b"--bnd\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n\r\n" + b"\0" * 200_000

        def chunks():
            for i in range(0, len(body), 8192):
                yield body[i:i + 8192]

        r = http.post(f"{url}/api/v1/predict", content=chunks(),
                      headers={"content-type": "multipart/form-data; boundary=bnd"})
        _assert_error(r, 413)
        assert _post(http, url, files={"file": (small.name, small.read_bytes())}).status_code == 200


def test_health(live_server, http, app_predictor):
    r = http.get(f"{live_server}/api/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model_version"] == app_predictor.bundle.version and body["disclaimer"]


def test_model_card(live_server, http, app_predictor):
    from melanoma_detector import DISCLAIMER

    r = http.get(f"{live_server}/model-card")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<h1>" in r.text and DISCLAIMER in r.text and app_predictor.bundle.version in r.text
    r = http.get(f"{live_server}/model-card", params={"format": "md"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
    assert r.text == (app_predictor.bundle.root / "MODEL_CARD.md").read_text(encoding="utf-8")


def test_gradio_page_served(live_server, http):
    r = http.get(f"{live_server}/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    config = http.get(f"{live_server}/config").json()
    text = str(config)
    assert "Research software, not a medical device" in text and "model-card" in text


def test_gradio_client_predict(live_server):
    from gradio_client import Client, handle_file

    path = next(p for p in EXAMPLE_FILES if p.name.startswith("benign"))
    client = Client(live_server, verbose=False)
    try:
        probs, risk, recommendation, overlay = client.predict(handle_file(str(path)), False, api_name="/predict")
    finally:
        client.close()
    confidences = {c["label"]: c["confidence"] for c in probs["confidences"]}
    assert set(confidences) == {"benign", "malignant"}
    assert confidences["benign"] + confidences["malignant"] == pytest.approx(1.0, abs=1e-6)
    assert "Risk level:" in risk
    assert "Recommendation" in recommendation and "not a diagnosis" in recommendation
    from PIL import Image

    with Image.open(overlay) as img:
        assert min(img.size) >= 64


def test_login_protects_page_and_api(app_predictor):
    from gradio_client import Client, handle_file

    app = build_app_with_auth(app_predictor)
    path = EXAMPLE_FILES[0]
    with serve(app) as url, httpx.Client(timeout=60) as http:
        files = {"file": (path.name, path.read_bytes(), "image/jpeg")}
        r = _post(http, url, files=files)
        assert "login" in _assert_error(r, 401)
        assert r.headers["www-authenticate"].startswith("Basic")
        _assert_error(_post(http, url, files=files, auth=("alice", "wrong")), 401)
        _assert_error(http.get(f"{url}/api/v1/health"), 401)
        assert _post(http, url, files=files, auth=("alice", "s3cret:pw")).status_code == 200
        assert http.get(f"{url}/api/v1/health", auth=("alice", "s3cret:pw")).status_code == 200
        # the Gradio page wants a login too; gradio_client logs in with the same pair
        assert http.get(f"{url}/config").status_code in (401, 403)
        client = Client(url, auth=("alice", "s3cret:pw"), verbose=False)
        try:
            out = client.predict(handle_file(str(path)), False, api_name="/predict")
        finally:
            client.close()
        assert "Risk level:" in out[1]


def build_app_with_auth(predictor):
    from melanoma_detector.app import build_app

    return build_app(predictor, auth=("alice", "s3cret:pw"))


def test_auth_from_env_never_echoes_secret(monkeypatch):
    from melanoma_detector.app.security import auth_from_env, check_basic_auth
    from melanoma_detector.errors import UserError

    monkeypatch.setenv("MELANOMA_AUTH", "bob:pa:ss")
    assert auth_from_env() == ("bob", "pa:ss")
    header = "Basic " + base64.b64encode(b"bob:pa:ss").decode()
    assert check_basic_auth(header, ("bob", "pa:ss")) and not check_basic_auth(header, ("bob", "pass"))
    assert not check_basic_auth("Basic !!!", ("bob", "pa:ss")) and not check_basic_auth(None, ("bob", "pa:ss"))
    monkeypatch.setenv("MELANOMA_AUTH", "hunter2-no-colon")
    with pytest.raises(UserError) as exc:
        auth_from_env()
    assert "hunter2" not in str(exc.value)
    monkeypatch.setenv("MELANOMA_AUTH", "")
    assert auth_from_env() is None


def test_app_import_is_lazy_and_torch_free(app_bundle):
    """Importing the app package does no work; building the app never imports torch."""
    code = (
        "import sys\n"
        "import melanoma_detector.app\n"
        "assert 'gradio' not in sys.modules and 'fastapi' not in sys.modules, 'import-time work'\n"
        "from melanoma_detector.app import build_app\n"
        f"app = build_app({str(app_bundle)!r}, auth=False)\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'torchvision', 'timm'))]\n"
        "assert not bad, bad[:5]\n"
        "print('OK')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK" in r.stdout


def test_core_never_imports_app():
    code = (
        "import sys\n"
        "import melanoma_detector.inference, melanoma_detector.cli, melanoma_detector.data.io\n"
        "from melanoma_detector.cli import build_parser\n"
        "build_parser()\n"
        "bad = [m for m in sys.modules if m.startswith('melanoma_detector.app') or m in ('gradio', 'fastapi')]\n"
        "assert not bad, bad\n"
        "print('OK')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_serve_cli_arguments_and_warnings(capsys):
    from melanoma_detector.app.security import exposure_warnings
    from melanoma_detector.cli import build_parser, main

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.share, args.model) == ("127.0.0.1", 7860, False, None)
    assert main(["serve", "--port", "70000"]) == 2
    assert "0-65535" in capsys.readouterr().err
    assert exposure_warnings("127.0.0.1", share=False, login=False) == []
    assert exposure_warnings("::1", share=False, login=False) == []
    assert exposure_warnings("localhost", share=False, login=False) == []
    (lan,) = exposure_warnings("0.0.0.0", share=False, login=False)
    assert "not a loopback" in lan and "MELANOMA_AUTH" in lan
    assert len(exposure_warnings("0.0.0.0", share=True, login=True)) == 2


def test_serve_cli_end_to_end(app_bundle, tmp_path):
    """`melanoma serve` in a subprocess on a free loopback port, with a login from MELANOMA_AUTH:
    it answers, never prints the secret, and stops on SIGINT."""
    import os

    from conftest import free_port, stop_process, wait_for_health

    port = free_port()
    env = dict(os.environ, MELANOMA_AUTH="carol:Tr0ub4dor&3", PYTHONUNBUFFERED="1")
    log = tmp_path / "serve.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "melanoma_detector", "serve", "--port", str(port),
                                 "--model", str(app_bundle)], stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        r = wait_for_health(proc, url, log, auth=("carol", "Tr0ub4dor&3"))
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert httpx.get(f"{url}/api/v1/health", timeout=5).status_code == 401
    finally:
        stop_process(proc)
    text = log.read_text()
    assert "Tr0ub4dor" not in text
    assert "login required" in text and "not a diagnosis" in text
    assert f"127.0.0.1:{port}" in text


def test_spaces_app_py_serves_on_loopback_without_space_id(app_bundle, tmp_path):
    """The root app.py (Hugging Face Spaces entry point) binds 127.0.0.1 unless SPACE_ID is set."""
    import os

    from conftest import REPO, free_port, stop_process, wait_for_health

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SPACE_ID", "MELANOMA_AUTH")}
    env.update(MELANOMA_MODEL=str(app_bundle), PORT=str(port), PYTHONUNBUFFERED="1")
    env.pop("GRADIO_SERVER_PORT", None)
    log = tmp_path / "app_py.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, str(REPO / "app.py")], cwd=tmp_path, stdout=fh,
                                stderr=subprocess.STDOUT, env=env)
    try:
        r = wait_for_health(proc, f"http://127.0.0.1:{port}", log)
        assert r.status_code == 200
    finally:
        stop_process(proc)
    assert f"http://127.0.0.1:{port}/" in log.read_text()
