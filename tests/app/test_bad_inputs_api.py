"""The bad-input corpus through the web app, over real HTTP: the REST API (`POST /api/v1/predict`)
and the Gradio page's upload (`api_name="/predict"` via gradio_client). Never a 5xx, never a
traceback in the server's output, the same verdict as the library, and the server keeps answering."""

from __future__ import annotations

import pytest

from badinputs import CORPUS

pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e '.[app]')")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]  # before the refusal

# Files a client can send (a folder cannot be uploaded; the chmod-000 file is unreadable to the client).
UPLOADABLE = [c for c in CORPUS if c.name not in ("folder.jpg", "no-permission.jpg")]


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=60) as client:
        yield client


@pytest.mark.parametrize("content_type", ["image/jpeg", "text/plain", "application/octet-stream"])
def test_rest_answers_every_bad_input(live_server, http, app_predictor, bad_corpus, capfd, content_type):
    """The declared content type is not trusted either way: the bytes decide."""
    corpus = bad_corpus / "benign"
    for case in UPLOADABLE:
        data = case.path(corpus).read_bytes()
        r = http.post(f"{live_server}/api/v1/predict", files={"file": (case.name, data, content_type)})
        assert r.status_code < 500, (case.name, r.status_code, r.text[:300])
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        if case.kind == "undecodable":
            expected_status = 400 if case.name == "zero-bytes.jpg" else 422
            assert r.status_code == expected_status, (case.name, r.status_code, body)
            assert case.words in body["error"] and "\n" not in body["error"], body["error"]
            if expected_status == 422:
                assert body["error"].startswith(f"{case.name}: "), body["error"]
            continue
        assert r.status_code == 200, (case.name, body)
        direct = app_predictor.predict(data, name=case.name)
        assert body["status"] == direct["status"] and body["reason"] == direct["reason"], (case.name, body)
        if case.kind == "gate":
            assert body["status"] == "cannot_assess" and case.words in body["reason"]
    assert http.get(f"{live_server}/api/v1/health").json()["status"] == "ok"
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


def test_gradio_page_answers_every_bad_input(live_server, http, app_predictor, bad_corpus, capfd):
    """An upload Gradio itself cannot open used to fail inside gr.Image with a raw Pillow traceback
    naming the server's temp folder; now the page shows "Cannot assess" and the one-line reason."""
    from gradio_client import Client, handle_file

    corpus = bad_corpus / "benign"
    client = Client(live_server, verbose=False)
    try:
        for case in UPLOADABLE:
            probs, risk, recommendation, overlay = client.predict(
                handle_file(str(case.path(corpus))), False, api_name="/predict")
            direct = app_predictor.predict(str(case.path(corpus)), name=case.name)
            if direct["status"] == "ok":
                assert 'data-status="ok"' in risk and "Risk level:" in risk, (case.name, risk)
                assert overlay is not None
                continue
            assert case.kind != "accepted" or "does not look like" in direct["reason"], direct["reason"]
            assert 'data-status="cannot_assess"' in risk and "Cannot assess this image" in risk, (case.name, risk)
            assert not probs and overlay is None
            assert case.words in risk and "What to do" in recommendation, (case.name, risk)
            if case.kind == "undecodable":
                assert f"{case.name}: " in risk, risk
            assert "/tmp/" not in risk and str(bad_corpus) not in risk, risk  # no server paths
    finally:
        client.close()
    assert http.get(f"{live_server}/api/v1/health").status_code == 200
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err



def test_gradio_page_refuses_upload_over_the_limit(live_server, http, capfd):
    """The page's upload route has the REST API's limit (live_server: 20 MB); gradio_client even
    refuses before sending, so the route is called directly."""
    big = b"\xff\xd8\xff\xe0" + bytes(20 * 1024 * 1024 + 4096)
    r = http.post(f"{live_server}/gradio_api/upload", files={"files": ("huge.jpg", big, "image/jpeg")})
    assert r.status_code == 413, (r.status_code, r.text[:300])
    small = http.post(f"{live_server}/gradio_api/upload", files={"files": ("small.jpg", big[:1000], "image/jpeg")})
    assert small.status_code == 200, small.text[:300]
    assert http.get(f"{live_server}/api/v1/health").status_code == 200
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
